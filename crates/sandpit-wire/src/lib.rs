//! The host <-> agent protocol.
//!
//! A connection carries one operation. Every message is a frame:
//! `u32 little-endian length of the rest | u8 tag | payload`. The framing is
//! transport-agnostic: it runs over a Unix stream socket today and would run
//! unchanged over vsock for a microVM backend.
//!
//! The agent runs inside the sandbox, so everything the host reads from it is
//! hostile input: [`read_frame`] bounds frame sizes and every decoder checks
//! lengths before it allocates.
//!
//! Operations (first frame sent by the host):
//! - [`Frame::Ping`] -> [`Frame::Pong`].
//! - [`Frame::Exec`] -> [`Frame::Started`] or [`Frame::Error`]; then the host may
//!   send [`Frame::Stdin`], [`Frame::StdinEof`], [`Frame::Resize`], [`Frame::Signal`]
//!   and the agent sends [`Frame::Stdout`] / [`Frame::Stderr`] as produced and
//!   exactly one [`Frame::Exited`]. If the host closes the connection before
//!   `Exited`, the agent kills the command's process group (cancellation).
//! - [`Frame::ReadFile`] -> [`Frame::FileInfo`], [`Frame::Data`]*, [`Frame::End`]
//!   or [`Frame::Error`].
//! - [`Frame::WriteFile`], then host sends [`Frame::Data`]*, [`Frame::End`] ->
//!   [`Frame::Ok`] or [`Frame::Error`]. The write is atomic (temp file + rename).
//! - [`Frame::MainOutput`] -> [`Frame::Gap`]?, [`Frame::MainChunk`]*, [`Frame::End`].
//!   With `follow`, `End` comes once the main process exited and its output was
//!   drained; without, once the reader caught up.
//! - [`Frame::SignalMain`] -> [`Frame::Ok`] or [`Frame::Error`].
//! - [`Frame::AwaitStartup`] -> [`Frame::Startup`], once the startup probe
//!   passed or failed (at once without a probe).
//! - [`Frame::MainUsage`] -> [`Frame::Usage`] once the main process was
//!   reaped, or [`Frame::Error`] (not ended yet, or never started).
//!
//! An exec's `Exited` is followed by one [`Frame::Usage`], the command's
//! resource usage, before the agent closes the connection. It comes after
//! the exit, not in it, so that a host that stops reading at `Exited` (an
//! older one) is not disturbed, and a host that reads on finds the
//! connection closed by an older agent: both directions tolerate the other.
//!
//! At start-up the agent reads one [`Frame::Init`] from its init descriptor,
//! or [`Frame::Idle`]: then, until one [`Frame::Claim`] -> [`Frame::Pong`]
//! brings the init, it answers [`Frame::Ping`] with [`MainStatus::Idle`] and
//! refuses every other operation.
//!
//! Host-side clients: [`client::AgentClient`] (blocking, threads) and, with
//! the `tokio` feature, `async_client::AsyncAgentClient` (any transport
//! through an `async_client::Connector`); the `testing` feature adds an
//! in-memory transport for fake agents. [`process`] turns an image's
//! config and a request into the process to start, for every component.
//!
//! Errors follow one convention: a variant that wraps another error names
//! only its own step and leaves the cause to [`std::error::Error::source`],
//! so a printer that joins the chain with `": "` says everything once.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

#[cfg(feature = "tokio")]
pub mod async_client;
pub mod client;
mod codec;
pub mod process;
mod signal;
mod startup;
mod usage;

pub use codec::{decode, encode};
use codec::{tail_prefix, with_tail, MAX_TAIL_PREFIX};
pub use signal::{InvalidSignal, Signal};
pub use startup::{Probe, ProbeCheck, RunAs, StartupState, MAX_PROBE_OUTPUT};
pub use usage::Usage;

/// Largest frame accepted from the peer (header excluded).
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;
/// Largest data chunk a sender puts in one frame.
pub const CHUNK_LEN: usize = 64 * 1024;

/// Errors while decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The transport failed.
    #[error("transport")]
    Io(#[from] io::Error),
    /// The peer announced a frame larger than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// The peer sent an unknown tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed mid-frame")]
    Truncated,
}

/// Terminal size of a PTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Normal exit with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(Signal),
}

impl ExitStatus {
    /// Shell-style code: the exit code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s.number(),
        }
    }
}

/// The state of the sandbox's main process as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainStatus {
    /// The sandbox has no main command (it idles until stopped).
    Idle,
    /// The main process runs.
    Running {
        /// Its pid inside the sandbox.
        pid: u32,
    },
    /// The main process ended.
    Exited(ExitStatus),
    /// The main process could not be started.
    StartFailed(String),
}

/// Category of an error reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorKind {
    /// No such file or directory.
    NotFound = 1,
    /// Permission denied.
    PermissionDenied = 2,
    /// The path is a directory.
    IsDirectory = 3,
    /// The path exists but is not a regular file.
    NotRegularFile = 4,
    /// The request itself is invalid (empty argv, bad path...).
    InvalidArgument = 5,
    /// The command could not be started (binary or cwd missing, not executable).
    SpawnFailed = 6,
    /// Any other I/O error.
    Io = 7,
    /// The peer violated the protocol.
    Protocol = 8,
    /// The main process is not running.
    NotRunning = 9,
}

impl ErrorKind {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::NotFound,
            2 => Self::PermissionDenied,
            3 => Self::IsDirectory,
            4 => Self::NotRegularFile,
            5 => Self::InvalidArgument,
            6 => Self::SpawnFailed,
            7 => Self::Io,
            8 => Self::Protocol,
            9 => Self::NotRunning,
            _ => return Err(WireError::Malformed("error kind")),
        })
    }

    /// The exit code a shell gives a command that did not start, for the
    /// kind of an exec's spawn failure: 127 when the command (or its working
    /// directory) was not found, 126 when it was found but could not run
    /// (permission denied, not executable, or any other failure), as POSIX
    /// shells do.
    pub fn spawn_exit_code(self) -> i32 {
        match self {
            Self::NotFound => 127,
            _ => 126,
        }
    }

    /// Maps an OS error to the closest kind.
    pub fn from_io(err: &io::Error) -> Self {
        match err.raw_os_error() {
            Some(2) | Some(20) => Self::NotFound, // ENOENT, ENOTDIR
            Some(13) | Some(1) | Some(30) => Self::PermissionDenied, // EACCES, EPERM, EROFS
            Some(21) => Self::IsDirectory,        // EISDIR
            _ => Self::Io,
        }
    }
}

/// A command to run inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the sandbox's working dir when `None`.
    pub cwd: Option<String>,
    /// Run under a pseudo-terminal of this size.
    pub tty: Option<WinSize>,
}

/// A file the agent writes before it starts the main command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitFile {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub content: Vec<u8>,
}

/// What the agent needs to start: handed over once at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InitSpec {
    /// The main command; empty means no main command (the sandbox idles).
    pub argv: Vec<String>,
    /// The sandbox's environment (for the main command and every exec).
    pub env: Vec<(String, String)>,
    /// The sandbox's working directory.
    pub cwd: String,
    /// Files put in place before the main command starts.
    pub files: Vec<InitFile>,
    /// Who the main command and every exec run as (files the agent
    /// creates for the host are theirs too).
    pub run_as: RunAs,
    /// Capabilities the main command and every exec keep, as a bit mask
    /// (bit N = capability N, as `CapBnd` in `/proc/PID/status`); `None`:
    /// the agent's own set.
    pub capabilities: Option<u64>,
    /// Gates the sandbox's start: see [`Frame::AwaitStartup`].
    pub startup_probe: Option<Probe>,
}

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host: is the agent alive, and how is the main process?
    Ping,
    /// Agent: answer to [`Frame::Ping`].
    Pong(MainStatus),
    /// Host: run a command.
    Exec(ExecRequest),
    /// Agent: the command runs.
    Started {
        /// Pid inside the sandbox.
        pid: u32,
    },
    /// Host: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Host: stdin is at its end (never a cancellation).
    StdinEof,
    /// Host: new terminal size.
    Resize(WinSize),
    /// Host: send a signal to the command's process group.
    Signal(Signal),
    /// Agent: output on stdout (or the PTY).
    Stdout(Vec<u8>),
    /// Agent: output on stderr.
    Stderr(Vec<u8>),
    /// Agent: the command ended; the last frame of an exec.
    Exited(ExitStatus),
    /// Host: read a file.
    ReadFile {
        /// Path as the sandbox sees it; relative paths start at the sandbox's working dir.
        path: String,
    },
    /// Agent: metadata of the file about to be sent.
    FileInfo {
        /// Size in bytes.
        size: u64,
        /// Permission bits.
        mode: u32,
    },
    /// Either side: a chunk of file content.
    Data(Vec<u8>),
    /// Either side: end of a sequence.
    End,
    /// Host: write a file (content follows as `Data`, then `End`).
    WriteFile {
        /// Path as the sandbox sees it.
        path: String,
        /// Permission bits for a new file; an existing file keeps its own.
        mode: u32,
    },
    /// Agent: the operation succeeded.
    Ok,
    /// Agent: the operation failed.
    Error {
        /// Category.
        kind: ErrorKind,
        /// Human-readable detail.
        message: String,
    },
    /// Host: stream the main process's output from an offset.
    MainOutput {
        /// Byte offset (over stdout and stderr together) to start from.
        offset: u64,
        /// Keep streaming until the main process exits.
        follow: bool,
    },
    /// Agent: bytes between these offsets were dropped from the buffer.
    Gap {
        /// First offset requested.
        from: u64,
        /// First offset still available.
        to: u64,
    },
    /// Agent: a chunk of the main process's output.
    MainChunk {
        /// Offset of the first byte of `data`.
        offset: u64,
        /// 1 = stdout, 2 = stderr.
        stream: u8,
        /// Unix time in nanoseconds when the agent read it.
        time_ns: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Host: send a signal to the main process.
    SignalMain(Signal),
    /// Spawner -> agent at start-up.
    Init(InitSpec),
    /// Spawner -> agent at start-up, instead of [`Frame::Init`]: serve, but
    /// start nothing until a host sends [`Frame::Claim`] (a warm pool's
    /// sandbox: its user, files and main command are not known yet).
    Idle,
    /// Host -> an [`Frame::Idle`] agent: the sandbox's init, applied as an
    /// `Init` would have been; answered [`Frame::Pong`] with the main
    /// process's status (or [`Frame::Error`] when already claimed).
    Claim(InitSpec),
    /// Host: answer once the sandbox's start is decided.
    AwaitStartup,
    /// Agent: how the start ended.
    Startup(StartupState),
    /// Agent: what a reaped process used (after an exec's `Exited`; the
    /// answer to [`Frame::MainUsage`]).
    Usage(Usage),
    /// Host: what did the main process use? (once it ended)
    MainUsage,
}

/// Length of the header [`output_header`] makes.
pub const OUTPUT_HEADER_LEN: usize = 5;

/// The header of a [`Frame::Stdout`] (or, with `stderr`, [`Frame::Stderr`])
/// frame carrying `len` bytes of output: a sender can read output straight
/// into its frame buffer after this header instead of copying it into a
/// `Frame` and encoding that.
pub fn output_header(stderr: bool, len: usize) -> [u8; OUTPUT_HEADER_LEN] {
    codec::data_header(
        if stderr {
            codec::tag::STDERR
        } else {
            codec::tag::STDOUT
        },
        len,
    )
}

/// Writes one frame. Callers that send many frames should wrap `w` in a `BufWriter`
/// and flush at message boundaries.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> io::Result<()> {
    let mut buf = Vec::with_capacity(64);
    encode(frame, &mut buf);
    w.write_all(&buf)
}

/// Reads one frame. `Ok(None)` means the peer closed the connection cleanly
/// between frames.
///
/// Output and data bytes are read straight into the frame's own buffer.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut head = [0u8; 5 + MAX_TAIL_PREFIX];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut head[got..4]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len([head[0], head[1], head[2], head[3]])?;
    if len == 0 {
        return Err(WireError::Malformed("short payload"));
    }
    r.read_exact(&mut head[4..5])
        .map_err(WireError::reading_body)?;
    let tag = head[4];
    match tail_prefix(tag) {
        Some(p) => {
            let data_len = (len - 1)
                .checked_sub(p)
                .ok_or(WireError::Malformed("short payload"))?;
            r.read_exact(&mut head[5..5 + p])
                .map_err(WireError::reading_body)?;
            let mut data = vec![0u8; data_len];
            r.read_exact(&mut data).map_err(WireError::reading_body)?;
            with_tail(tag, &head[5..5 + p], data).map(Some)
        }
        None => {
            let mut body = vec![0u8; len];
            body[0] = tag;
            r.read_exact(&mut body[1..])
                .map_err(WireError::reading_body)?;
            decode(&body).map(Some)
        }
    }
}

/// The body length a frame header announces, refused beyond
/// [`MAX_FRAME_LEN`] before anything is allocated. Shared by every reader
/// (this module's blocking one, the daemon's async one) so the bound on
/// hostile input lives in one place.
pub fn body_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::TooLarge(len));
    }
    Ok(len)
}

impl WireError {
    /// Maps an error of reading a frame's body: an early EOF means the
    /// peer closed mid-frame.
    pub fn reading_body(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Truncated
        } else {
            WireError::Io(e)
        }
    }
}

#[cfg(test)]
pub(crate) use sandpit_errors::chain;

#[cfg(test)]
mod tests;
