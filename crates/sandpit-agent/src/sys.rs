//! Thin wrappers over the few raw syscalls the agent needs.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{SystemTime, UNIX_EPOCH};

/// `strerror` in the agent's house style: lowercase, no "(os error N)".
pub(crate) fn errno_desc(errno: i32) -> String {
    let desc = nix::errno::Errno::from_raw(errno).desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => format!("error {errno}"),
    }
}

/// Describes an I/O error the way [`errno_desc`] does.
pub(crate) fn io_desc(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => errno_desc(errno),
        None => e.to_string(),
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Switches `O_NONBLOCK` on the open file description behind `fd`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller keeps open; no memory passed.
    unsafe {
        let flags = check(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        check(libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags))?;
    }
    Ok(())
}

/// `poll(2)`, retried on EINTR. `timeout_ms < 0` waits forever.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A pollfd entry.
pub(crate) fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// `read(2)`, retried on EINTR.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `read(2)` of at most `max` bytes, appended to `buf` (its spare room is
/// not zeroed first), retried on EINTR.
pub(crate) fn read_append(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut().as_mut_ptr();
    loop {
        // SAFETY: `reserve` made room for `max` bytes at `spare`, which read
        // only writes to.
        let n = unsafe { libc::read(fd.as_raw_fd(), spare.cast(), max) };
        if n >= 0 {
            // SAFETY: read initialised the first `n` (<= max) spare bytes.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `write(2)`, retried on EINTR.
pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable buffer of `buf.len()` bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `kill(2)`; `pid < 0` addresses a process group.
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Unix time in nanoseconds.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Opens a path with raw flags (close-on-exec added).
pub(crate) fn open(path: &std::ffi::CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the returned descriptor is owned only here.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets a terminal's window size.
pub(crate) fn set_winsize(fd: BorrowedFd<'_>, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct that lives across the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// Opens a new PTY pair (master, slave) of the given size.
pub(crate) fn open_pty(cols: u16, rows: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY;
    let master = open(c"/dev/ptmx", flags).or_else(|_| open(c"/dev/pts/ptmx", flags))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int that lives across the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // TIOCGPTPEER opens the slave through the master itself: no path lookup in
    // /dev/pts, which may be laid out differently in the sandbox.
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            flags | libc::O_CLOEXEC,
        )
    };
    let slave = if peer >= 0 {
        // SAFETY: `peer` is a fresh descriptor returned by the ioctl, owned only here.
        unsafe { OwnedFd::from_raw_fd(peer) }
    } else {
        let mut n: libc::c_uint = 0;
        // SAFETY: TIOCGPTN writes one unsigned int into `n`.
        check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
        let path = std::ffi::CString::new(format!("/dev/pts/{n}")).expect("no nul");
        open(&path, flags)?
    };
    set_winsize(master.as_fd(), cols, rows)?;
    Ok((master, slave))
}

/// Checks without blocking whether the peer of a stream socket hung up
/// completely (it closed its end, not just its writing side).
pub(crate) fn peer_gone(fd: BorrowedFd<'_>) -> bool {
    let mut p = [pollfd(fd.as_raw_fd(), 0)];
    matches!(poll(&mut p, 0), Ok(1)) && p[0].revents & (libc::POLLHUP | libc::POLLERR) != 0
}
