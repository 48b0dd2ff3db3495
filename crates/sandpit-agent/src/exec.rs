//! `Exec`: one command per connection, over pipes or a PTY.
//!
//! The connection's thread streams output (one frame per `read(2)`, blocking
//! writes, so a slow host stalls the command through full pipes rather than
//! growing our memory); a second thread forwards the host's stdin and control
//! frames. The host closing the connection before `Exited` kills the command's
//! process group.

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sandpit_wire::{read_frame, write_frame, ErrorKind, ExecRequest, Frame, CHUNK_LEN};

use crate::mainproc::{EOF_CAP, EOF_GRACE};
use crate::reaper::ExitCell;
use crate::serve::Ctx;
use crate::spawn::{self, Command, SpawnError};
use crate::sys;

/// The EOF character a terminal user types to end input (^D).
const VEOF: u8 = 0x04;

/// The running command as both threads see it.
#[derive(Debug)]
struct Proc {
    pid: i32,
    exit: Arc<ExitCell>,
    /// `Exited` is being sent: closing the connection now is no cancellation.
    finished: AtomicBool,
    cancelled: AtomicBool,
}

impl Proc {
    /// Kills the command's process group (once, and only before it finished).
    fn cancel(&self) {
        if self.finished.load(Ordering::SeqCst) || self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = sys::kill(-self.pid, libc::SIGKILL);
        // It may have left its group; its pid is its own until reaped.
        if self.exit.status().is_none() {
            let _ = sys::kill(self.pid, libc::SIGKILL);
        }
    }

    fn signal(&self, sig: i32) {
        if sys::kill(-self.pid, sig).is_err() && self.exit.status().is_none() {
            let _ = sys::kill(self.pid, sig);
        }
    }
}

fn error(stream: &UnixStream, kind: ErrorKind, message: String) -> io::Result<()> {
    let mut w = stream;
    write_frame(&mut w, &Frame::Error { kind, message })
}

/// Serves one `Exec` request on `stream`.
pub fn serve(ctx: &Ctx, stream: UnixStream, req: ExecRequest) -> io::Result<()> {
    if req.argv.is_empty() {
        return error(&stream, ErrorKind::InvalidArgument, "empty command".into());
    }
    let mut env = spawn::merge_env(&ctx.env, &req.env);
    // What `docker exec -t` gives a terminal that nobody described.
    if req.tty.is_some() && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }
    let cwd = match &req.cwd {
        None => ctx.cwd.clone(),
        Some(c) => Path::new(&ctx.cwd).join(c).to_string_lossy().into_owned(),
    };
    let io_err = |what: &'static str| {
        move |e: io::Error| SpawnError::Os {
            what,
            desc: sys::io_desc(&e),
        }
    };
    // (stdin for us to write, stdout to read, stderr to read, the child's 0-2)
    let setup = || -> Result<(OwnedFd, OwnedFd, Option<OwnedFd>, [OwnedFd; 3]), SpawnError> {
        match req.tty {
            Some(ws) => {
                let (master, slave) = sys::open_pty(ws.cols, ws.rows).map_err(io_err("pty"))?;
                let input = master.try_clone().map_err(io_err("dup"))?;
                let s1 = slave.try_clone().map_err(io_err("dup"))?;
                let s2 = slave.try_clone().map_err(io_err("dup"))?;
                Ok((input, master, None, [slave, s1, s2]))
            }
            None => {
                let (in_r, in_w) = sys::pipe().map_err(io_err("pipe"))?;
                let (out_r, out_w) = sys::pipe().map_err(io_err("pipe"))?;
                let (err_r, err_w) = sys::pipe().map_err(io_err("pipe"))?;
                Ok((in_w, out_r, Some(err_r), [in_r, out_w, err_w]))
            }
        }
    };
    let started = setup().and_then(|(input, out, err, child_fds)| {
        let child = spawn::spawn(
            &ctx.reaper,
            &Command {
                argv: &req.argv,
                env: &env,
                cwd: &cwd,
                stdio: [
                    child_fds[0].as_fd(),
                    child_fds[1].as_fd(),
                    child_fds[2].as_fd(),
                ],
                ctty: req.tty.is_some(),
            },
        )?;
        // Our copies of the child's ends must go, or EOF never comes.
        drop(child_fds);
        Ok((child, input, out, err))
    });
    let (child, input, out, err) = match started {
        Ok(v) => v,
        Err(e) => return error(&stream, e.kind(), e.to_string()),
    };
    let proc = Arc::new(Proc {
        pid: child.pid,
        exit: child.exit,
        finished: AtomicBool::new(false),
        cancelled: AtomicBool::new(false),
    });
    let result = run(&stream, &proc, req.tty.is_some(), input, out, err);
    if result.is_err() {
        proc.cancel();
    }
    result
}

fn run(
    stream: &UnixStream,
    proc: &Arc<Proc>,
    pty: bool,
    input: OwnedFd,
    out: OwnedFd,
    err: Option<OwnedFd>,
) -> io::Result<()> {
    let mut w = stream;
    write_frame(
        &mut w,
        &Frame::Started {
            pid: proc.pid as u32,
        },
    )?;
    // Writes to the command must never block the input thread for good: it
    // polls them together with `done`, which hangs up when we are finished.
    sys::set_nonblocking(input.as_fd(), true)?;
    let (done_r, done_w) = sys::pipe()?;
    let sock = stream.try_clone()?;
    let p = Arc::clone(proc);
    let input_pump = crate::pool::spawn(move || pump_input(sock, input, pty, done_r, &p))?;

    let outcome = pump_output(stream, proc, out, err);
    if outcome.is_ok() {
        // The output loop ends normally only after the exit was seen.
        if let Some(status) = proc.exit.status() {
            let _ = write_frame(&mut w, &Frame::Exited(status));
        }
    }
    // Wakes the input thread: its read sees EOF, its stdin writes see `done`.
    let _ = stream.shutdown(Shutdown::Both);
    drop(done_w);
    input_pump.join();
    outcome
}

/// Streams output until the command exited and its output reached EOF (or
/// stayed silent for [`EOF_GRACE`] after the exit). Marks the command finished.
fn pump_output(
    stream: &UnixStream,
    proc: &Proc,
    out: OwnedFd,
    err: Option<OwnedFd>,
) -> io::Result<()> {
    let mut w = stream;
    let mut readers = [Some(out), err];
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        if exited_at.is_none() && proc.exit.status().is_some() {
            exited_at = Some(Instant::now());
        }
        if let Some(t) = exited_at {
            if readers.iter().all(Option::is_none) || t.elapsed() > EOF_CAP {
                break;
            }
        }
        let mut fds = Vec::with_capacity(4);
        // Events 0: only a full hang-up (or error) of the host's end is reported.
        fds.push(sys::pollfd(stream.as_raw_fd(), 0));
        for r in readers.iter().flatten() {
            fds.push(sys::pollfd(r.as_raw_fd(), libc::POLLIN));
        }
        if exited_at.is_none() {
            fds.push(sys::pollfd(proc.exit.fd().as_raw_fd(), libc::POLLIN));
        }
        let timeout = match exited_at {
            Some(_) => EOF_GRACE.as_millis() as i32,
            None => -1,
        };
        if sys::poll(&mut fds, timeout)? == 0 {
            // Exited, and its output stayed silent: a background child holds it.
            break;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        for (i, slot) in readers.iter_mut().enumerate() {
            let Some(fd) = slot else { continue };
            let ready = fds
                .iter()
                .skip(1)
                .any(|p| p.fd == fd.as_raw_fd() && p.revents != 0);
            if !ready {
                continue;
            }
            match sys::read(fd.as_fd(), &mut buf) {
                Ok(0) => *slot = None,
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let frame = if i == 0 {
                        Frame::Stdout(data)
                    } else {
                        Frame::Stderr(data)
                    };
                    write_frame(&mut w, &frame)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO: a PTY whose slave side is closed everywhere.
                Err(_) => *slot = None,
            }
        }
    }
    proc.finished.store(true, Ordering::SeqCst);
    Ok(())
}

enum Stop {
    /// The session is over.
    Done,
    /// The command closed its input.
    Closed,
}

/// Writes all of `data` to the non-blocking `fd`, unless `done` hangs up first.
fn write_input(fd: BorrowedFd<'_>, mut data: &[u8], done: BorrowedFd<'_>) -> Result<(), Stop> {
    while !data.is_empty() {
        match sys::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [
                    sys::pollfd(fd.as_raw_fd(), libc::POLLOUT),
                    sys::pollfd(done.as_raw_fd(), libc::POLLIN),
                ];
                if sys::poll(&mut fds, -1).is_err() || fds[1].revents != 0 {
                    return Err(Stop::Done);
                }
            }
            // EPIPE, or EIO on a PTY: nobody reads any more.
            Err(_) => return Err(Stop::Closed),
        }
    }
    Ok(())
}

/// Forwards `Stdin`, `StdinEof`, `Resize` and `Signal` frames from the host.
fn pump_input(sock: UnixStream, input: OwnedFd, pty: bool, done: OwnedFd, proc: &Proc) {
    let mut r = BufReader::with_capacity(CHUNK_LEN + 64, &sock);
    let mut input = Some(input);
    loop {
        let frame = match read_frame(&mut r) {
            Ok(Some(f)) => f,
            // Closed or half-closed: the output side notices a real hang-up.
            Ok(None) => return,
            Err(_) => {
                // Reset connection or malformed frames: drop the host.
                proc.cancel();
                let _ = sock.shutdown(Shutdown::Both);
                return;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                if let Some(fd) = &input {
                    match write_input(fd.as_fd(), &data, done.as_fd()) {
                        Ok(()) => {}
                        Err(Stop::Done) => return,
                        Err(Stop::Closed) => input = None,
                    }
                }
            }
            Frame::StdinEof if pty => {
                if let Some(fd) = &input {
                    if let Err(Stop::Done) = write_input(fd.as_fd(), &[VEOF], done.as_fd()) {
                        return;
                    }
                }
            }
            Frame::StdinEof => input = None,
            Frame::Resize(ws) => {
                if let (true, Some(fd)) = (pty, &input) {
                    let _ = sys::set_winsize(fd.as_fd(), ws.cols, ws.rows);
                }
            }
            Frame::Signal(sig) => proc.signal(sig),
            _ => {
                proc.cancel();
                let _ = sock.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}
