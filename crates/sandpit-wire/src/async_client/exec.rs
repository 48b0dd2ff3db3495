//! A running command: its events in, its stdin and control frames out, as
//! two halves that separate tasks (or one `select!`) may drive at once.

use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

use super::frames::{FrameReader, FrameWriter};
use super::{ClientError, Connector, ExecEvent, Output};
use crate::codec::tag;
use crate::{Frame, Signal, Usage, WinSize, CHUNK_LEN};

/// A command started by [`AsyncAgentClient::exec`](super::AsyncAgentClient::exec).
///
/// Dropping both halves before [`ExecEvent::Exited`] closes the connection,
/// and the agent then kills the command's process group: that is how a
/// caller cancels a command (a deadline, a client gone). Over a Unix
/// socket, dropping only the [`ExecControl`] shuts our writing side down,
/// which the agent takes as the end of the command's stdin.
pub struct AsyncExec<C: Connector> {
    pid: u32,
    events: ExecEvents<C::Reader>,
    control: ExecControl<C::Writer>,
}

impl<C: Connector> fmt::Debug for AsyncExec<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncExec")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> AsyncExec<C> {
    pub(super) fn new(
        pid: u32,
        reader: FrameReader<C::Reader>,
        writer: FrameWriter<C::Writer>,
    ) -> Self {
        Self {
            pid,
            events: ExecEvents {
                reader,
                done: false,
                exited: false,
            },
            control: ExecControl { writer },
        }
    }

    /// The command's pid inside the sandbox.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command's events, and the handle that sends it stdin and
    /// control frames.
    pub fn into_split(self) -> (ExecEvents<C::Reader>, ExecControl<C::Writer>) {
        (self.events, self.control)
    }
}

/// What the command produces, read from the agent as it comes.
pub struct ExecEvents<R> {
    reader: FrameReader<R>,
    done: bool,
    /// `Exited` was read: a `Usage` frame may follow.
    exited: bool,
}

impl<R> fmt::Debug for ExecEvents<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecEvents")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> ExecEvents<R> {
    /// The next event: output as the agent read it, then
    /// [`ExecEvent::Exited`], the last one, then `None`. The connection
    /// closing before `Exited` is [`ClientError::Closed`]; an `Error` frame
    /// is [`ClientError::Agent`]; any frame other than output, exit or
    /// error is [`ClientError::Protocol`]. After an error, `None`.
    ///
    /// Cancel-safe: dropping the future (in a `select!`, under a timeout)
    /// loses nothing, a frame half read is completed by the next call.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let ev = crate::client::exec_event(self.reader.next().await, &mut self.done);
        if let Ok(Some(ExecEvent::Exited(_))) = &ev {
            self.exited = true;
        }
        ev
    }

    /// What the command used, read after [`ExecEvent::Exited`] (the agent
    /// sends it next). `None` before the exit, once taken, or from an agent
    /// that sends none (an older one closes the connection instead).
    pub async fn usage(&mut self) -> Option<Usage> {
        if !std::mem::take(&mut self.exited) {
            return None;
        }
        match self.reader.next().await {
            Ok(Some(Frame::Usage(u))) => Some(u),
            _ => None,
        }
    }

    /// Reads events up to the exit, keeping all output.
    pub(super) async fn collect(&mut self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event().await? {
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

    /// The transport's reading half (e.g. to shut the socket down).
    pub fn get_ref(&self) -> &R {
        self.reader.get_ref()
    }
}

/// Sends the command's stdin and control frames.
///
/// Each frame goes out with one buffer, reused, and a call whose future is
/// dropped midway never tears a frame: the next call finishes it first (a
/// cancelled [`ExecControl::send_stdin`] may have sent some of its frames).
pub struct ExecControl<W> {
    writer: FrameWriter<W>,
}

impl<W> fmt::Debug for ExecControl<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecControl").finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> ExecControl<W> {
    /// Sends bytes to the command's stdin, in frames of at most
    /// [`CHUNK_LEN`]. Waits while the command does not read (the agent
    /// holds one frame at most): backpressure, not memory.
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(CHUNK_LEN) {
            self.writer.send_bytes(tag::STDIN, chunk).await?;
        }
        Ok(())
    }

    /// Ends the command's stdin (on a PTY: sends the EOF character). Never
    /// a cancellation.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        Ok(self.writer.send(&Frame::StdinEof).await?)
    }

    /// Resizes the command's PTY (ignored without one).
    pub async fn resize(&mut self, ws: WinSize) -> Result<(), ClientError> {
        Ok(self.writer.send(&Frame::Resize(ws)).await?)
    }

    /// Sends a signal to the command's process group.
    pub async fn signal(&mut self, sig: Signal) -> Result<(), ClientError> {
        Ok(self.writer.send(&Frame::Signal(sig)).await?)
    }

    /// The transport's writing half.
    pub fn get_ref(&self) -> &W {
        self.writer.get_ref()
    }
}
