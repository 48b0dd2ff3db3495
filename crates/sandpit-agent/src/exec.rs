//! `Exec`: one command per connection, over pipes or a PTY.
//!
//! One thread serves the whole session with a `poll` loop over the host's
//! socket, the command's output, its stdin and its exit: no second thread,
//! no hand-off between threads on the way from the command's exit to the
//! `Exited` frame (each wake-up of another thread costs tens of
//! microseconds, and far more when other work competes for the CPUs).
//! Nothing in the loop blocks: at most one output frame waits for the host
//! (the command's output is not read meanwhile, so a slow host stalls the
//! command through full pipes rather than growing our memory), and at most
//! one stdin frame waits for the command (the host's socket is not read
//! meanwhile). The host closing the connection before `Exited` kills the
//! command's process group.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sandpit_wire::{
    body_len, decode, output_header, write_frame, ErrorKind, ExecRequest, Frame, Signal, CHUNK_LEN,
    OUTPUT_HEADER_LEN,
};

use crate::mainproc::{EOF_CAP, EOF_GRACE};
use crate::reaper::ExitCell;
use crate::serve::Ctx;
use crate::spawn::{self, Command, SpawnError};
use crate::sys;

/// The EOF character a terminal user types to end input (^D).
const VEOF: u8 = 0x04;

/// The running command.
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

    fn signal(&self, sig: Signal) {
        let sig = sig.number();
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
pub(crate) fn serve(ctx: &Ctx, stream: UnixStream, req: ExecRequest) -> io::Result<()> {
    if req.argv.is_empty() {
        return error(&stream, ErrorKind::InvalidArgument, "empty command".into());
    }
    let mut env = sandpit_wire::process::merge_env(&ctx.env, &req.env);
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
                creds: &ctx.creds,
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
    let proc = Proc {
        pid: child.pid,
        exit: child.exit,
        finished: AtomicBool::new(false),
        cancelled: AtomicBool::new(false),
    };
    let result = run(&stream, &proc, req.tty.is_some(), input, out, err);
    if result.is_err() {
        proc.cancel();
    }
    result
}

fn run(
    stream: &UnixStream,
    proc: &Proc,
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
    // The loop waits for everything at once, so no single read or write may
    // block it.
    sys::set_nonblocking(input.as_fd(), true)?;
    stream.set_nonblocking(true)?;
    let mut session = Session {
        sock: stream,
        readers: [Some(out), err],
        input: Some(input),
        pty,
        out: Vec::with_capacity(OUTPUT_HEADER_LEN + CHUNK_LEN),
        out_pos: 0,
        host: Vec::new(),
        host_eof: false,
        stdin: Vec::new(),
        stdin_pos: 0,
    };
    let outcome = session.pump(proc);
    if outcome.is_ok() {
        // The command exited: what is left to send may wait for the host.
        let flushed = stream
            .set_nonblocking(false)
            .and_then(|()| w.write_all(&session.out[session.out_pos..]));
        // The output loop ends normally only after the exit was seen.
        if let (Ok(()), Some(status)) = (flushed, proc.exit.status()) {
            // Usage after the exit, never before: a host that stops reading
            // at `Exited` still gets what it expects.
            if write_frame(&mut w, &Frame::Exited(status)).is_ok() {
                if let Some(usage) = proc.exit.usage() {
                    let _ = write_frame(&mut w, &Frame::Usage(usage));
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    outcome
}

/// One exec's I/O state.
struct Session<'a> {
    sock: &'a UnixStream,
    /// The command's stdout (or PTY) and stderr, until their EOF.
    readers: [Option<OwnedFd>; 2],
    /// The command's stdin, until closed (by the host, or by the command).
    input: Option<OwnedFd>,
    pty: bool,
    /// One encoded output frame, sent up to `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes from the host not yet parsed into frames.
    host: Vec<u8>,
    /// The host closed its writing side (stdin EOF, never a cancellation).
    host_eof: bool,
    /// One stdin frame's data, written to the command up to `stdin_pos`.
    stdin: Vec<u8>,
    stdin_pos: usize,
}

fn aborted() -> io::Error {
    io::ErrorKind::ConnectionAborted.into()
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Session<'_> {
    fn out_pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn stdin_pending(&self) -> bool {
        self.stdin_pos < self.stdin.len()
    }

    /// Moves output and input until the command exited and its output
    /// reached EOF (or stayed silent for [`EOF_GRACE`] after the exit, or
    /// [`EOF_CAP`] passed). Marks the command finished. An error means the
    /// host is gone or broke the protocol: the caller kills the command.
    fn pump(&mut self, proc: &Proc) -> io::Result<()> {
        let mut exited_at: Option<Instant> = None;
        loop {
            if exited_at.is_none() && proc.exit.status().is_some() {
                exited_at = Some(Instant::now());
            }
            if let Some(t) = exited_at {
                if self.readers.iter().all(Option::is_none) || t.elapsed() > EOF_CAP {
                    break;
                }
            }
            self.handle_host_frames(proc)?;

            // Slots: 0 the host, 1-2 the outputs, 3 stdin, 4 the exit.
            let mut fds = [sys::pollfd(-1, 0); 5];
            let mut events = 0;
            if !self.host_eof && !self.stdin_pending() {
                events |= libc::POLLIN;
            }
            if self.out_pending() {
                events |= libc::POLLOUT;
            }
            // Even with no events, a full hang-up (or error) of the host's
            // end is reported: that is the cancellation.
            fds[0] = sys::pollfd(self.sock.as_raw_fd(), events);
            if !self.out_pending() {
                for (slot, r) in fds[1..3].iter_mut().zip(&self.readers) {
                    if let Some(r) = r {
                        *slot = sys::pollfd(r.as_raw_fd(), libc::POLLIN);
                    }
                }
            }
            if let (true, Some(fd)) = (self.stdin_pending(), &self.input) {
                fds[3] = sys::pollfd(fd.as_raw_fd(), libc::POLLOUT);
            }
            if exited_at.is_none() {
                fds[4] = sys::pollfd(proc.exit.fd().as_raw_fd(), libc::POLLIN);
            }
            let timeout = match exited_at {
                Some(_) => EOF_GRACE.as_millis() as i32,
                None => -1,
            };
            if sys::poll(&mut fds, timeout)? == 0 {
                // Exited, and its output stayed silent: a background child
                // holds it (or the host stopped reading; the caller waits).
                break;
            }
            if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(aborted());
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.read_host()?;
            }
            if fds[0].revents & libc::POLLOUT != 0 {
                self.flush_out()?;
            }
            for i in 0..2 {
                if fds[1 + i].revents != 0 && !self.out_pending() {
                    self.read_output(i)?;
                }
            }
            if fds[3].revents != 0 {
                self.flush_stdin();
            }
        }
        proc.finished.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Reads what the host sent; a hang-up of its writing side is its stdin
    /// EOF.
    fn read_host(&mut self) -> io::Result<()> {
        match sys::read_append(self.sock.as_fd(), &mut self.host, CHUNK_LEN + 64) {
            Ok(0) => self.host_eof = true,
            Ok(_) => {}
            Err(e) if would_block(&e) => {}
            // A reset connection: drop the host.
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Acts on the complete frames received, in order, as long as no stdin
    /// data waits for the command (later frames must not overtake it).
    fn handle_host_frames(&mut self, proc: &Proc) -> io::Result<()> {
        let mut used = 0;
        while !self.stdin_pending() {
            let rest = &self.host[used..];
            let Some(header) = rest.first_chunk::<4>() else {
                break;
            };
            let len = body_len(*header).map_err(|_| protocol())?;
            let Some(body) = rest.get(4..4 + len) else {
                break;
            };
            let frame = decode(body).map_err(|_| protocol())?;
            used += 4 + len;
            self.handle_frame(frame, proc)?;
        }
        self.host.drain(..used);
        if self.host_eof && !self.stdin_pending() {
            if !self.host.is_empty() {
                // Closed in the middle of a frame.
                return Err(protocol());
            }
            // Whatever the host sent is written: the command's stdin ends.
            self.input = None;
        }
        Ok(())
    }

    fn handle_frame(&mut self, frame: Frame, proc: &Proc) -> io::Result<()> {
        match frame {
            Frame::Stdin(data) => {
                if self.input.is_some() {
                    self.stdin = data;
                    self.stdin_pos = 0;
                    self.flush_stdin();
                }
            }
            Frame::StdinEof if self.pty => {
                if self.input.is_some() {
                    self.stdin = vec![VEOF];
                    self.stdin_pos = 0;
                    self.flush_stdin();
                }
            }
            Frame::StdinEof => self.input = None,
            Frame::Resize(ws) => {
                if let (true, Some(fd)) = (self.pty, &self.input) {
                    let _ = sys::set_winsize(fd.as_fd(), ws.cols, ws.rows);
                }
            }
            Frame::Signal(sig) => proc.signal(sig),
            _ => return Err(protocol()),
        }
        Ok(())
    }

    /// Writes pending stdin data as far as the command takes it now.
    fn flush_stdin(&mut self) {
        let Some(fd) = &self.input else {
            self.stdin.clear();
            self.stdin_pos = 0;
            return;
        };
        while self.stdin_pending() {
            match sys::write(fd.as_fd(), &self.stdin[self.stdin_pos..]) {
                Ok(n) => self.stdin_pos += n,
                Err(e) if would_block(&e) => return,
                // EPIPE, or EIO on a PTY: nobody reads any more; later
                // stdin is dropped.
                Err(_) => {
                    self.input = None;
                    break;
                }
            }
        }
        self.stdin.clear();
        self.stdin_pos = 0;
    }

    /// Reads one chunk of output `i` (0 stdout, 1 stderr) into the output
    /// frame and starts sending it.
    fn read_output(&mut self, i: usize) -> io::Result<()> {
        let Some(fd) = &self.readers[i] else {
            return Ok(());
        };
        self.out.clear();
        self.out_pos = 0;
        self.out.extend_from_slice(&[0; OUTPUT_HEADER_LEN]);
        match sys::read_append(fd.as_fd(), &mut self.out, CHUNK_LEN) {
            Ok(0) => self.readers[i] = None,
            Ok(n) => {
                self.out[..OUTPUT_HEADER_LEN].copy_from_slice(&output_header(i == 1, n));
                return self.flush_out();
            }
            Err(e) if would_block(&e) => {}
            // EIO: a PTY whose slave side is closed everywhere.
            Err(_) => self.readers[i] = None,
        }
        self.out.clear();
        Ok(())
    }

    /// Sends as much of the pending output frame as the host takes now.
    fn flush_out(&mut self) -> io::Result<()> {
        while self.out_pending() {
            match sys::write(self.sock.as_fd(), &self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn protocol() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed frame from the host")
}
