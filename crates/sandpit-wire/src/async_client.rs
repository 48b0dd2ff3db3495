//! Asynchronous host-side client of the agent, over tokio (feature `tokio`).
//!
//! The same protocol and the same guarantees as the blocking
//! [`client`](crate::client), side by side with it (as containerd's `runc`
//! crate keeps its two clients): one connection per operation, opened
//! lazily through a [`Connector`] (a Unix socket today, [`UnixConnector`];
//! vsock later; an in-memory pipe in tests). Everything read from the agent
//! is hostile: frames are bounded before anything is allocated
//! ([`read_frame`]), a file's size is checked against the caller's limit
//! before any data is accepted, and an agent that sends more or less than
//! it announced is cut off with [`ClientError::Protocol`].
//!
//! The hot path costs no extra task, thread or copy: an exec's events are
//! read by whoever awaits them, each frame is sent with one buffer (reused)
//! and output bytes are read straight into the event's own buffer.
//!
//! Cancellation: the exec and main-output streams are cancel-safe, so they
//! can sit in a `select!` or under a timeout and be polled again. A
//! request-response call ([`AsyncAgentClient::ping`], files...) dropped
//! midway just drops its connection, which the agent tolerates.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::client::{is_disconnect, unexpected, AgentClient};
use crate::codec::tag;
use crate::{ExecRequest, Frame, MainStatus, Signal, StartupState, Usage, WireError, CHUNK_LEN};

mod exec;
mod frames;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use crate::client::{ClientError, ExecEvent, MainOutputEvent, Output, OutputStream};
pub use exec::{AsyncExec, ExecControl, ExecEvents};
pub use frames::{read_frame, write_frame};

use frames::{within, FrameReader, FrameWriter};

/// How the client reaches an agent: one call, one new connection, as a
/// reading and a writing half (which an exec's two directions use
/// independently).
pub trait Connector: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// The half the agent's frames come from.
    type Reader: AsyncRead + Send + Unpin + 'static;
    /// The half our frames go to. Shutting it down (or dropping it, where
    /// that shuts it down) must read as end of input to the agent, and
    /// closing both halves as the connection's end.
    type Writer: AsyncWrite + Send + Unpin + 'static;

    /// Opens a new connection to the agent.
    fn connect(&self) -> impl Future<Output = io::Result<(Self::Reader, Self::Writer)>> + Send;
}

/// The agent's Unix socket (`<state-dir>/<id>/agent.sock`).
#[derive(Debug, Clone)]
pub struct UnixConnector {
    path: PathBuf,
}

impl UnixConnector {
    /// Connects to the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Connector for UnixConnector {
    type Reader = OwnedReadHalf;
    /// Dropping it shuts our writing side down: the agent reads that as
    /// the end of an exec's stdin, never as a cancellation.
    type Writer = OwnedWriteHalf;

    async fn connect(&self) -> io::Result<(OwnedReadHalf, OwnedWriteHalf)> {
        Ok(UnixStream::connect(&self.path).await?.into_split())
    }
}

/// A handle on one sandbox's agent: the connector and a timeout; cheap to
/// clone, nothing is opened until a call.
#[derive(Debug, Clone)]
pub struct AsyncAgentClient<C: Connector = UnixConnector> {
    connector: C,
    timeout: Option<Duration>,
}

impl AsyncAgentClient<UnixConnector> {
    /// A client for the agent listening at `socket`.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        Self::new(UnixConnector::new(socket))
    }
}

/// The same agent, and the same timeout, as a blocking client's.
impl From<&AgentClient> for AsyncAgentClient<UnixConnector> {
    fn from(c: &AgentClient) -> Self {
        Self {
            connector: UnixConnector::new(c.socket()),
            timeout: c.timeout(),
        }
    }
}

/// One request-response connection: every connect, read and write bounded
/// by the client's timeout.
struct Bounded<C: Connector> {
    reader: FrameReader<C::Reader>,
    writer: FrameWriter<C::Writer>,
    limit: Option<Duration>,
}

impl<C: Connector> Bounded<C> {
    async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        within(self.limit, self.writer.send(frame)).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<Frame>, WireError> {
        within(self.limit, self.reader.next()).await
    }

    /// The next frame; a clean close is [`ClientError::Closed`] because
    /// every caller still expects an answer.
    async fn expect(&mut self) -> Result<Frame, ClientError> {
        self.recv().await?.ok_or(ClientError::Closed)
    }

    /// A file's content as `Data` frames of at most [`CHUNK_LEN`], then `End`.
    async fn send_body(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(CHUNK_LEN) {
            within(self.limit, self.writer.send_bytes(tag::DATA, chunk)).await?;
        }
        self.send(&Frame::End).await
    }
}

/// What a file read preallocates at most ahead of the data received: the
/// announced size is the agent's word.
const READ_RESERVE_MAX: u64 = 16 << 20;

impl<C: Connector> AsyncAgentClient<C> {
    /// A client that reaches the agent through `connector`.
    pub fn new(connector: C) -> Self {
        Self {
            connector,
            timeout: None,
        }
    }

    /// Bounds the connect and each frame read or written of the
    /// request-response operations (ping, signal_main, read_file,
    /// write_file, and main_output without follow), as the blocking
    /// client's socket timeouts do; running out is a
    /// [`ClientError::Wire`] of kind `TimedOut` (a [`ClientError::Connect`]
    /// while connecting). Exec sessions and followed main output may
    /// legitimately stay silent for long and are never bounded.
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// The bound of [`AsyncAgentClient::with_timeout`], if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How the agent is reached.
    pub fn connector(&self) -> &C {
        &self.connector
    }

    async fn connect(
        &self,
        limit: Option<Duration>,
    ) -> Result<(C::Reader, C::Writer), ClientError> {
        within(limit, self.connector.connect())
            .await
            .map_err(ClientError::Connect)
    }

    /// Opens a bounded connection and sends the operation's first frame.
    async fn start(&self, first: &Frame) -> Result<Bounded<C>, ClientError> {
        let (r, w) = self.connect(self.timeout).await?;
        let mut conn = Bounded {
            reader: FrameReader::new(r),
            writer: FrameWriter::new(w),
            limit: self.timeout,
        };
        conn.send(first).await?;
        Ok(conn)
    }

    /// Is the agent alive, and how is the main process?
    pub async fn ping(&self) -> Result<MainStatus, ClientError> {
        let mut c = self.start(&Frame::Ping).await?;
        match c.expect().await? {
            Frame::Pong(status) => Ok(status),
            other => Err(unexpected(other, "ping")),
        }
    }

    /// Sends a signal to the main command's process group.
    pub async fn signal_main(&self, sig: Signal) -> Result<(), ClientError> {
        let mut c = self.start(&Frame::SignalMain(sig)).await?;
        match c.expect().await? {
            Frame::Ok => Ok(()),
            other => Err(unexpected(other, "signal")),
        }
    }

    /// What the main process used, once it was reaped. An error while it
    /// runs or when it never started; an older agent closes the connection
    /// ([`ClientError::Closed`]).
    pub async fn main_usage(&self) -> Result<Usage, ClientError> {
        let mut c = self.start(&Frame::MainUsage).await?;
        match c.expect().await? {
            Frame::Usage(u) => Ok(u),
            other => Err(unexpected(other, "main usage")),
        }
    }

    /// Waits until the sandbox's start is decided: its startup probe passed
    /// or failed (at once when it has none). Not bounded by the client's
    /// timeout: a probe may take minutes.
    pub async fn await_startup(&self) -> Result<StartupState, ClientError> {
        let (r, w) = self.connect(self.timeout).await?;
        let mut writer = FrameWriter::new(w);
        writer.send(&Frame::AwaitStartup).await?;
        let mut reader = FrameReader::new(r);
        match reader.next().await?.ok_or(ClientError::Closed)? {
            Frame::Startup(state) => Ok(state),
            other => Err(unexpected(other, "await startup")),
        }
    }

    /// Starts a command; returns once it runs (the agent's `Started`). A
    /// command that cannot start is a [`ClientError::Agent`] whose kind
    /// tells why ([`ErrorKind::spawn_exit_code`](crate::ErrorKind::spawn_exit_code)).
    pub async fn exec(&self, req: ExecRequest) -> Result<AsyncExec<C>, ClientError> {
        let (r, w) = self.connect(None).await?;
        let mut writer = FrameWriter::new(w);
        writer.send(&Frame::Exec(req)).await?;
        let mut reader = FrameReader::new(r);
        match reader.next().await?.ok_or(ClientError::Closed)? {
            Frame::Started { pid } => Ok(AsyncExec::new(pid, reader, writer)),
            other => Err(unexpected(other, "exec")),
        }
    }

    /// Runs a command to completion and collects its output. `stdin` is fed
    /// while the output is read (in the same task), so a command that
    /// writes while it reads cannot deadlock against us; `None` closes its
    /// stdin at once. Output is kept in memory without a bound: for
    /// commands you trust, or use [`AsyncAgentClient::exec`].
    pub async fn run(&self, req: ExecRequest, stdin: Option<&[u8]>) -> Result<Output, ClientError> {
        let (mut events, mut control) = self.exec(req).await?.into_split();
        let feed = async {
            if let Some(data) = stdin {
                control.send_stdin(data).await?;
            }
            control.close_stdin().await
        };
        let collect = events.collect();
        tokio::pin!(feed, collect);
        let mut feeding = true;
        loop {
            tokio::select! {
                out = &mut collect => return out,
                // A feeding error only means the command stopped reading
                // (or exited): not ours to report when it ran to its end.
                _ = &mut feed, if feeding => feeding = false,
            }
        }
    }

    /// Reads a whole file of at most `max_size` bytes: a larger one is
    /// [`ClientError::TooLarge`] before any data is accepted, and an agent
    /// that sends more or less than it announced is
    /// [`ClientError::Protocol`].
    pub async fn read_file(&self, path: &str, max_size: u64) -> Result<Vec<u8>, ClientError> {
        let mut c = self
            .start(&Frame::ReadFile {
                path: path.to_owned(),
            })
            .await?;
        let size = match c.expect().await? {
            Frame::FileInfo { size, .. } => size,
            other => return Err(unexpected(other, "read")),
        };
        if size > max_size {
            return Err(ClientError::TooLarge {
                size,
                max: max_size,
            });
        }
        let mut out = Vec::new();
        loop {
            match c.expect().await? {
                Frame::Data(d) => {
                    let got = out.len() as u64 + d.len() as u64;
                    if got > size {
                        return Err(ClientError::Protocol(format!(
                            "agent sent more than the announced {size} bytes"
                        )));
                    }
                    if out.is_empty() {
                        // The first chunk's buffer becomes the file's: a
                        // file of one frame is never copied.
                        out = d;
                    } else {
                        // Room ahead only for data that is coming anyway.
                        out.reserve((size - out.len() as u64).min(READ_RESERVE_MAX) as usize);
                        out.extend_from_slice(&d);
                    }
                }
                Frame::End if out.len() as u64 == size => return Ok(out),
                Frame::End => {
                    return Err(ClientError::Protocol(format!(
                        "agent sent {} of the announced {size} bytes",
                        out.len()
                    )))
                }
                other => return Err(unexpected(other, "read")),
            }
        }
    }

    /// Writes a whole file; atomic on the agent's side (temp file and
    /// rename), and an existing file keeps its mode. When the agent gives
    /// up early, its own reason is reported, not our broken pipe.
    pub async fn write_file(&self, path: &str, mode: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut c = self
            .start(&Frame::WriteFile {
                path: path.to_owned(),
                mode,
            })
            .await?;
        let sent = c.send_body(data).await;
        match sent {
            Ok(()) => {}
            // The agent gave up early: its answer says why.
            Err(ref e) if is_disconnect(e) => {}
            Err(e) => return Err(e),
        }
        crate::client::write_verdict(c.recv().await, sent)
    }

    /// Streams the main command's output from `offset` (over stdout and
    /// stderr together). With `follow`, the stream lasts until the main
    /// command exited and its output was drained, and is never bounded by
    /// the timeout; without, it ends once it caught up.
    pub async fn main_output(
        &self,
        offset: u64,
        follow: bool,
    ) -> Result<MainOutputStream<C::Reader>, ClientError> {
        let limit = if follow { None } else { self.timeout };
        let (r, w) = self.connect(limit).await?;
        let mut writer = FrameWriter::new(w);
        within(limit, writer.send(&Frame::MainOutput { offset, follow })).await?;
        // Our writing side is done: dropping it (a half-close) is no
        // hang-up to the agent.
        drop(writer);
        Ok(MainOutputStream {
            reader: FrameReader::new(r),
            limit,
            done: false,
        })
    }
}

/// What a frame of a main output stream means: `Ok(None)` at its `End`.
/// Any other frame, or a chunk of an unknown stream, is an error.
fn main_output_event(frame: Frame) -> Result<Option<MainOutputEvent>, ClientError> {
    match frame {
        Frame::End => Ok(None),
        Frame::Gap { from, to } => Ok(Some(MainOutputEvent::Gap { from, to })),
        Frame::MainChunk {
            offset,
            stream,
            time_ns,
            data,
        } => match OutputStream::from_wire(stream) {
            Some(stream) => Ok(Some(MainOutputEvent::Chunk {
                offset,
                stream,
                time_ns,
                data,
            })),
            None => Err(ClientError::Protocol(format!(
                "main chunk of unknown stream {stream}"
            ))),
        },
        other => Err(unexpected(other, "main output")),
    }
}

/// The main command's output ([`MainOutputEvent`]s), up to the agent's
/// `End`.
pub struct MainOutputStream<R> {
    reader: FrameReader<R>,
    limit: Option<Duration>,
    done: bool,
}

impl<R> std::fmt::Debug for MainOutputStream<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MainOutputStream")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> MainOutputStream<R> {
    /// The next gap or chunk; `None` after the agent's `End`, and after an
    /// error (a chunk of a stream other than stdout or stderr, any other
    /// frame, or the connection closing before `End`). Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<MainOutputEvent, ClientError>> {
        if self.done {
            return None;
        }
        let item = match within(self.limit, self.reader.next()).await {
            Ok(Some(frame)) => match main_output_event(frame) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => Err(e),
            },
            Ok(None) => Err(ClientError::Closed),
            Err(e) => Err(e.into()),
        };
        self.done = true;
        Some(item)
    }
}
