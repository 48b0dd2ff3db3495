//! Blocking host-side client of the agent.
//!
//! One connection per operation, opened lazily, as the protocol wants: an
//! [`AgentClient`] is just the socket path and is cheap to clone. Everything
//! read from the agent is treated as hostile: frames are bounded by
//! [`read_frame`], file sizes are checked against the caller's limit before
//! any data is accepted, and an agent that sends more than it announced is
//! cut off with [`ClientError::Protocol`].

use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    encode, read_frame, ExecRequest, ExitStatus, Frame, InitSpec, MainStatus, Signal, StartupState,
    WinSize, WireError, CHUNK_LEN,
};

mod error;

pub use error::ClientError;
pub(crate) use error::{is_disconnect, unexpected};

/// Largest file [`AgentClient::read_file`] accepts; use
/// [`AgentClient::read_file_to`] with a limit of your own for more.
pub const READ_FILE_MAX: u64 = 1 << 30;

/// Reads the next frame; a clean close is [`ClientError::Closed`] because every
/// caller still expects an answer.
fn expect_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, ClientError> {
    read_frame(r)?.ok_or(ClientError::Closed)
}

/// Sends one frame with a single `write_all`, so frames from threads sharing the
/// stream (behind a mutex) never interleave.
fn send(mut w: &UnixStream, frame: &Frame) -> Result<(), ClientError> {
    let mut buf = Vec::with_capacity(16);
    encode(frame, &mut buf);
    w.write_all(&buf)?;
    Ok(())
}

/// A handle on one sandbox's agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    timeout: Option<Duration>,
}

impl AgentClient {
    /// A client for the agent listening at `socket`; nothing is opened yet.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: None,
        }
    }

    /// Bounds every read and write of the request-response operations (ping,
    /// signal, file reads and writes). Exec sessions and main output streams
    /// may legitimately stay silent for long and are never bounded.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Path of the agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound of [`AgentClient::with_timeout`], if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn connect(&self, bounded: bool) -> Result<UnixStream, ClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(ClientError::Connect)?;
        if bounded && self.timeout.is_some() {
            stream.set_read_timeout(self.timeout)?;
            stream.set_write_timeout(self.timeout)?;
        }
        Ok(stream)
    }

    /// Opens a connection and sends the operation's first frame.
    fn start(&self, first: &Frame, bounded: bool) -> Result<UnixStream, ClientError> {
        let stream = self.connect(bounded)?;
        send(&stream, first)?;
        Ok(stream)
    }

    /// Is the agent alive, and how is the main process?
    pub fn ping(&self) -> Result<MainStatus, ClientError> {
        let mut s = self.start(&Frame::Ping, true)?;
        match expect_frame(&mut s)? {
            Frame::Pong(status) => Ok(status),
            other => Err(unexpected(other, "ping")),
        }
    }

    /// Claims an idle agent (one started with [`Frame::Idle`]): it applies
    /// `init` (user, files, working dir, main command, startup probe) as it
    /// would have at start-up, and answers with the main process's status.
    pub fn claim(&self, init: &InitSpec) -> Result<MainStatus, ClientError> {
        let mut s = self.start(&Frame::Claim(init.clone()), true)?;
        match expect_frame(&mut s)? {
            Frame::Pong(status) => Ok(status),
            other => Err(unexpected(other, "claim")),
        }
    }

    /// Sends a signal to the main command's process group.
    pub fn signal_main(&self, sig: Signal) -> Result<(), ClientError> {
        let mut s = self.start(&Frame::SignalMain(sig), true)?;
        match expect_frame(&mut s)? {
            Frame::Ok => Ok(()),
            other => Err(unexpected(other, "signal")),
        }
    }

    /// Waits, without a bound, until the sandbox's start is decided: its
    /// startup probe passed or failed (at once when it has none).
    pub fn await_startup(&self) -> Result<StartupState, ClientError> {
        let mut s = self.start(&Frame::AwaitStartup, false)?;
        match expect_frame(&mut s)? {
            Frame::Startup(state) => Ok(state),
            other => Err(unexpected(other, "await startup")),
        }
    }

    /// Starts a command; returns once it runs.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecSession, ClientError> {
        let stream = self.start(&Frame::Exec(req), false)?;
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        let conn = Arc::new(stream.try_clone()?);
        let mut reader = BufReader::with_capacity(CHUNK_LEN + 64, stream);
        match expect_frame(&mut reader)? {
            Frame::Started { pid } => Ok(ExecSession {
                reader,
                writer,
                conn,
                pid,
                done: false,
            }),
            other => Err(unexpected(other, "exec")),
        }
    }

    /// Runs a command to completion and collects its output. `stdin` is fed on
    /// a separate thread so a command that writes while it reads cannot
    /// deadlock against us; `None` closes its stdin at once.
    pub fn run(&self, req: ExecRequest, stdin: Option<&[u8]>) -> Result<Output, ClientError> {
        let mut session = self.exec(req)?;
        let Some(data) = stdin else {
            // A command that already exited may have closed the connection
            // (EPIPE): its events are still queued for us to read.
            let _ = session.close_stdin();
            let out = session.collect();
            session.shutdown();
            return out;
        };
        let writer = session.stdin_writer()?;
        std::thread::scope(|scope| {
            let feeder = scope.spawn(move || {
                let mut writer = writer;
                writer.send_stdin(data)?;
                writer.close_stdin()
            });
            let out = session.collect();
            // Unblocks the feeder if the command exited without reading all of
            // its input (or the session failed).
            session.shutdown();
            // A feeder error only means the command stopped reading: not ours
            // to report when the command ran to its end.
            let _ = feeder.join();
            out
        })
    }

    /// Reads a whole file (at most [`READ_FILE_MAX`] bytes).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.read_file_to(path, &mut out, READ_FILE_MAX)?;
        Ok(out)
    }

    /// Streams a file into `w`; refuses files larger than `max_size` before any
    /// byte is accepted. Returns the number of bytes written.
    pub fn read_file_to(
        &self,
        path: &str,
        w: &mut dyn Write,
        max_size: u64,
    ) -> Result<u64, ClientError> {
        let stream = self.start(
            &Frame::ReadFile {
                path: path.to_string(),
            },
            true,
        )?;
        let mut r = BufReader::with_capacity(CHUNK_LEN + 64, stream);
        let size = match expect_frame(&mut r)? {
            Frame::FileInfo { size, .. } => size,
            other => return Err(unexpected(other, "read")),
        };
        if size > max_size {
            return Err(ClientError::TooLarge {
                size,
                max: max_size,
            });
        }
        let mut got = 0u64;
        loop {
            match expect_frame(&mut r)? {
                Frame::Data(d) => {
                    got += d.len() as u64;
                    if got > size {
                        return Err(ClientError::Protocol(format!(
                            "agent sent more than the announced {size} bytes"
                        )));
                    }
                    w.write_all(&d)?;
                }
                Frame::End if got == size => return Ok(size),
                Frame::End => {
                    return Err(ClientError::Protocol(format!(
                        "agent sent {got} of the announced {size} bytes"
                    )))
                }
                other => return Err(unexpected(other, "read")),
            }
        }
    }

    /// Writes a whole file atomically; an existing file keeps its mode.
    pub fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut r = data;
        self.write_file_from(path, mode, &mut r)
    }

    /// Writes a file atomically from a reader.
    pub fn write_file_from(
        &self,
        path: &str,
        mode: u32,
        r: &mut dyn Read,
    ) -> Result<(), ClientError> {
        let mut stream = self.start(
            &Frame::WriteFile {
                path: path.to_string(),
                mode,
            },
            true,
        )?;
        let sent = Self::send_body(&stream, r);
        match sent {
            Ok(()) => {}
            // The agent gave up early: its answer says why.
            Err(ref e) if is_disconnect(e) => {}
            Err(e) => return Err(e),
        }
        write_verdict(read_frame(&mut stream), sent)
    }

    fn send_body(stream: &UnixStream, r: &mut dyn Read) -> Result<(), ClientError> {
        let mut buf = vec![0u8; CHUNK_LEN];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            send(stream, &Frame::Data(buf[..n].to_vec()))?;
        }
        send(stream, &Frame::End)
    }

    /// Streams the main command's output from `offset` (over stdout and
    /// stderr together). With `follow`, the stream lasts until the main
    /// command exited and its output was drained.
    pub fn main_output(&self, offset: u64, follow: bool) -> Result<MainOutput, ClientError> {
        let stream = self.start(&Frame::MainOutput { offset, follow }, !follow)?;
        Ok(MainOutput {
            reader: BufReader::with_capacity(CHUNK_LEN + 64, stream),
            done: false,
        })
    }
}

/// Everything a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its stdout (or the PTY's output).
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

/// What a running command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes on stdout (or the PTY).
    Stdout(Vec<u8>),
    /// Bytes on stderr.
    Stderr(Vec<u8>),
    /// The command ended; the last event.
    Exited(ExitStatus),
}

/// A running command. Dropping it before [`ExecEvent::Exited`] closes the
/// connection, and the agent kills the command's process group.
#[derive(Debug)]
pub struct ExecSession {
    reader: BufReader<UnixStream>,
    writer: Arc<Mutex<UnixStream>>,
    conn: Arc<UnixStream>,
    pid: u32,
    done: bool,
}

impl ExecSession {
    /// The command's pid inside the sandbox.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn control(&self) -> StdinWriter {
        StdinWriter {
            writer: Arc::clone(&self.writer),
            conn: Arc::clone(&self.conn),
        }
    }

    /// Sends bytes to the command's stdin (in frames of at most [`CHUNK_LEN`]).
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.control().send_stdin(data)
    }

    /// Ends the command's stdin (on a PTY: sends the EOF character).
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.control().close_stdin()
    }

    /// Resizes the command's PTY (ignored without one).
    pub fn resize(&mut self, ws: WinSize) -> Result<(), ClientError> {
        self.control().resize(ws)
    }

    /// Sends a signal to the command's process group.
    pub fn signal(&mut self, sig: Signal) -> Result<(), ClientError> {
        self.control().signal(sig)
    }

    /// A handle that sends stdin (and control frames) from another thread
    /// while this session reads output. Frames of all handles are serialised.
    pub fn stdin_writer(&self) -> Result<StdinWriter, ClientError> {
        Ok(self.control())
    }

    /// The next event; `None` once [`ExecEvent::Exited`] was returned.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        exec_event(read_frame(&mut self.reader), &mut self.done)
    }

    /// Reads events up to the exit.
    fn collect(&mut self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event()? {
                Some(ExecEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(ExecEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(ExecEvent::Exited(status)) => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    })
                }
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// Closes both directions now, whoever else holds a handle: the agent sees
    /// the connection go (and cancels a command still running).
    fn shutdown(&self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        // A `StdinWriter` may still hold a clone of the socket: shut it down so
        // dropping the session cancels the command as documented.
        self.shutdown();
    }
}

/// Sends stdin and control frames of an [`ExecSession`] from another thread.
#[derive(Debug, Clone)]
pub struct StdinWriter {
    writer: Arc<Mutex<UnixStream>>,
    conn: Arc<UnixStream>,
}

impl StdinWriter {
    fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        send(&guard, frame)
    }

    /// Sends bytes to the command's stdin (in frames of at most [`CHUNK_LEN`]).
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(CHUNK_LEN) {
            self.send(&Frame::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(&Frame::StdinEof)
    }

    /// Resizes the command's PTY.
    pub fn resize(&mut self, ws: WinSize) -> Result<(), ClientError> {
        self.send(&Frame::Resize(ws))
    }

    /// Sends a signal to the command's process group.
    pub fn signal(&mut self, sig: Signal) -> Result<(), ClientError> {
        self.send(&Frame::Signal(sig))
    }

    /// Closes the session's connection in both directions now, from any
    /// thread: the agent kills the command's process group, and a reader
    /// blocked in [`ExecSession::next_event`] returns.
    pub fn abort(&self) {
        // Not through the writer's lock: a writer may be blocked on a
        // command that does not read its stdin.
        let _ = self.conn.shutdown(Shutdown::Both);
    }
}

impl Write for StdinWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK_LEN);
        self.send(&Frame::Stdin(buf[..n].to_vec()))
            .map_err(|e| match e {
                ClientError::Wire(WireError::Io(io)) => io,
                other => io::Error::other(other),
            })?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Which of the main command's outputs a chunk is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// Its stdout.
    Stdout,
    /// Its stderr.
    Stderr,
}

impl OutputStream {
    /// The stream of a [`Frame::MainChunk`]'s `stream` byte (1 or 2).
    pub fn from_wire(stream: u8) -> Option<Self> {
        match stream {
            1 => Some(Self::Stdout),
            2 => Some(Self::Stderr),
            _ => None,
        }
    }
}

/// One item of the main command's output stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainOutputEvent {
    /// Bytes between these offsets were dropped from the agent's buffer
    /// before anyone read them.
    Gap {
        /// First offset asked for.
        from: u64,
        /// First offset still held.
        to: u64,
    },
    /// A chunk of output.
    Chunk {
        /// Offset of the first byte of `data` (over stdout and stderr together).
        offset: u64,
        /// Where it was written.
        stream: OutputStream,
        /// Unix time in nanoseconds when the agent read it.
        time_ns: u64,
        /// The bytes.
        data: Vec<u8>,
    },
}

/// The main command's output: [`Frame::Gap`] and [`Frame::MainChunk`] frames,
/// ending at the agent's `End`.
#[derive(Debug)]
pub struct MainOutput {
    reader: BufReader<UnixStream>,
    done: bool,
}

impl Iterator for MainOutput {
    type Item = Result<Frame, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = match read_frame(&mut self.reader) {
            Ok(Some(Frame::End)) => {
                self.done = true;
                return None;
            }
            Ok(Some(f @ Frame::Gap { .. })) => return Some(Ok(f)),
            Ok(Some(f @ Frame::MainChunk { stream: 1 | 2, .. })) => return Some(Ok(f)),
            Ok(Some(Frame::MainChunk { stream, .. })) => Err(ClientError::Protocol(format!(
                "main chunk of unknown stream {stream}"
            ))),
            Ok(Some(other)) => Err(unexpected(other, "main output")),
            Ok(None) => Err(ClientError::Closed),
            Err(e) => Err(e.into()),
        };
        self.done = true;
        Some(item)
    }
}

#[cfg(test)]
mod tests;

/// What one frame read during an exec means, for both clients: an event,
/// or the end (`done` set once the exit, an error or a close was seen).
pub(crate) fn exec_event(
    read: Result<Option<Frame>, WireError>,
    done: &mut bool,
) -> Result<Option<ExecEvent>, ClientError> {
    let frame = match read {
        Ok(Some(f)) => f,
        Ok(None) => {
            *done = true;
            return Err(ClientError::Closed);
        }
        Err(e) => {
            *done = true;
            return Err(e.into());
        }
    };
    match frame {
        Frame::Stdout(d) => Ok(Some(ExecEvent::Stdout(d))),
        Frame::Stderr(d) => Ok(Some(ExecEvent::Stderr(d))),
        Frame::Exited(s) => {
            *done = true;
            Ok(Some(ExecEvent::Exited(s)))
        }
        other => {
            *done = true;
            Err(unexpected(other, "exec"))
        }
    }
}

/// How a file write ended, for both clients, from the agent's reply and
/// how sending the body went.
pub(crate) fn write_verdict(
    reply: Result<Option<Frame>, WireError>,
    sent: Result<(), ClientError>,
) -> Result<(), ClientError> {
    match (reply, sent) {
        (Ok(Some(Frame::Ok)), Ok(())) => Ok(()),
        // The agent's own reason beats our broken pipe.
        (Ok(Some(f @ Frame::Error { .. })), _) => Err(unexpected(f, "write")),
        (_, Err(e)) => Err(e),
        (Ok(Some(other)), Ok(())) => Err(unexpected(other, "write")),
        (Ok(None), Ok(())) => Err(ClientError::Closed),
        (Err(e), Ok(())) => Err(e.into()),
    }
}
