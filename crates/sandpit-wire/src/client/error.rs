//! The clients' errors, and how frames that do not belong become one.

use std::io;

use crate::{ErrorKind, Frame, WireError};

/// Errors of both clients (blocking and async).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent cannot be reached: its socket is missing or refuses
    /// connections (or, with a timeout, connecting took too long).
    #[error("connect")]
    Connect(#[source] io::Error),
    /// The transport failed or the agent sent a malformed frame.
    #[error("wire")]
    Wire(#[from] WireError),
    /// The agent reported an error.
    #[error("agent: {}: {message}", kind_name(.kind))]
    Agent {
        /// Category.
        kind: ErrorKind,
        /// Detail from the agent.
        message: String,
    },
    /// The agent sent a frame that does not belong here.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The file is larger than the caller accepts.
    #[error("file of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Size announced by the agent.
        size: u64,
        /// The caller's limit.
        max: u64,
    },
    /// The agent closed the connection in the middle of an operation.
    #[error("agent closed the connection")]
    Closed,
}

fn kind_name(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not found",
        ErrorKind::PermissionDenied => "permission denied",
        ErrorKind::IsDirectory => "is a directory",
        ErrorKind::NotRegularFile => "not a regular file",
        ErrorKind::InvalidArgument => "invalid argument",
        ErrorKind::SpawnFailed => "spawn failed",
        ErrorKind::Io => "i/o error",
        ErrorKind::Protocol => "protocol error",
        ErrorKind::NotRunning => "not running",
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Wire(WireError::Io(e))
    }
}

/// Names a frame for error messages without dumping its payload.
fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Ping => "ping",
        Frame::Pong(_) => "pong",
        Frame::Exec(_) => "exec",
        Frame::Started { .. } => "started",
        Frame::Stdin(_) => "stdin",
        Frame::StdinEof => "stdin-eof",
        Frame::Resize(_) => "resize",
        Frame::Signal(_) => "signal",
        Frame::Stdout(_) => "stdout",
        Frame::Stderr(_) => "stderr",
        Frame::Exited(_) => "exited",
        Frame::ReadFile { .. } => "read-file",
        Frame::FileInfo { .. } => "file-info",
        Frame::Data(_) => "data",
        Frame::End => "end",
        Frame::WriteFile { .. } => "write-file",
        Frame::Ok => "ok",
        Frame::Error { .. } => "error",
        Frame::MainOutput { .. } => "main-output",
        Frame::Gap { .. } => "gap",
        Frame::MainChunk { .. } => "main-chunk",
        Frame::SignalMain(_) => "signal-main",
        Frame::Init(_) => "init",
        Frame::Idle => "idle",
        Frame::Claim(_) => "claim",
        Frame::AwaitStartup => "await-startup",
        Frame::Startup(_) => "startup",
        Frame::Usage(_) => "usage",
        Frame::MainUsage => "main-usage",
    }
}

pub(crate) fn unexpected(f: Frame, during: &str) -> ClientError {
    match f {
        Frame::Error { kind, message } => ClientError::Agent { kind, message },
        other => {
            ClientError::Protocol(format!("unexpected {} during {during}", frame_name(&other)))
        }
    }
}

/// Whether a send failed because the agent closed the connection (its
/// answer, already sent, then says why).
pub(crate) fn is_disconnect(e: &ClientError) -> bool {
    matches!(e, ClientError::Wire(WireError::Io(io)) if matches!(
        io.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    ))
}
