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
//!
//! At start-up the agent reads one [`Frame::Init`] from its init descriptor.
//!
//! Errors follow one convention: a variant that wraps another error names
//! only its own step and leaves the cause to [`std::error::Error::source`],
//! so a printer that joins the chain with `": "` says everything once.

#![forbid(unsafe_code)]

use std::io::{self, Read, Write};

pub mod client;
pub mod process;
mod signal;

pub use signal::{InvalidSignal, Signal};

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
}

mod tag {
    pub(crate) const PING: u8 = 1;
    pub(crate) const PONG: u8 = 2;
    pub(crate) const EXEC: u8 = 3;
    pub(crate) const STARTED: u8 = 4;
    pub(crate) const STDIN: u8 = 5;
    pub(crate) const STDIN_EOF: u8 = 6;
    pub(crate) const RESIZE: u8 = 7;
    pub(crate) const SIGNAL: u8 = 8;
    pub(crate) const STDOUT: u8 = 9;
    pub(crate) const STDERR: u8 = 10;
    pub(crate) const EXITED: u8 = 11;
    pub(crate) const READ_FILE: u8 = 12;
    pub(crate) const FILE_INFO: u8 = 13;
    pub(crate) const DATA: u8 = 14;
    pub(crate) const END: u8 = 15;
    pub(crate) const WRITE_FILE: u8 = 16;
    pub(crate) const OK: u8 = 17;
    pub(crate) const ERROR: u8 = 18;
    pub(crate) const MAIN_OUTPUT: u8 = 19;
    pub(crate) const GAP: u8 = 20;
    pub(crate) const MAIN_CHUNK: u8 = 21;
    pub(crate) const SIGNAL_MAIN: u8 = 22;
    pub(crate) const INIT: u8 = 23;
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn strs(&mut self, v: &[String]) {
        self.u32(v.len() as u32);
        for s in v {
            self.str(s);
        }
    }
    fn env(&mut self, v: &[(String, String)]) {
        self.u32(v.len() as u32);
        for (k, val) in v {
            self.str(k);
            self.str(val);
        }
    }
    fn signal(&mut self, s: Signal) {
        self.i32(s.number());
    }
    fn exit(&mut self, v: ExitStatus) {
        match v {
            ExitStatus::Code(c) => {
                self.u8(0);
                self.i32(c);
            }
            ExitStatus::Signal(s) => {
                self.u8(1);
                self.signal(s);
            }
        }
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed("short payload"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?).map_err(|_| WireError::Malformed("invalid utf-8"))
    }
    fn count(&mut self) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        // Every element takes at least 4 bytes: refuse counts the payload cannot hold.
        if n > self.0.len() / 4 {
            return Err(WireError::Malformed("element count"));
        }
        Ok(n)
    }
    fn strs(&mut self) -> Result<Vec<String>, WireError> {
        let n = self.count()?;
        (0..n).map(|_| self.str()).collect()
    }
    fn env(&mut self) -> Result<Vec<(String, String)>, WireError> {
        let n = self.count()?;
        (0..n).map(|_| Ok((self.str()?, self.str()?))).collect()
    }
    fn signal(&mut self) -> Result<Signal, WireError> {
        Signal::new(self.i32()?).ok_or(WireError::Malformed("signal"))
    }
    fn exit(&mut self) -> Result<ExitStatus, WireError> {
        match self.u8()? {
            0 => Ok(ExitStatus::Code(self.i32()?)),
            1 => Ok(ExitStatus::Signal(self.signal()?)),
            _ => Err(WireError::Malformed("exit status")),
        }
    }
    fn opt_str(&mut self) -> Result<Option<String>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            _ => Ok(Some(self.str()?)),
        }
    }
    fn finish(self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("trailing bytes"))
        }
    }
}

/// Appends the frame (length header included) to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut e = Enc(out);
    match frame {
        Frame::Ping => e.u8(tag::PING),
        Frame::Pong(status) => {
            e.u8(tag::PONG);
            match status {
                MainStatus::Idle => e.u8(0),
                MainStatus::Running { pid } => {
                    e.u8(1);
                    e.u32(*pid);
                }
                MainStatus::Exited(s) => {
                    e.u8(2);
                    e.exit(*s);
                }
                MainStatus::StartFailed(msg) => {
                    e.u8(3);
                    e.str(msg);
                }
            }
        }
        Frame::Exec(req) => {
            e.u8(tag::EXEC);
            e.strs(&req.argv);
            e.env(&req.env);
            match &req.cwd {
                None => e.u8(0),
                Some(c) => {
                    e.u8(1);
                    e.str(c);
                }
            }
            match req.tty {
                None => e.u8(0),
                Some(ws) => {
                    e.u8(1);
                    e.u16(ws.cols);
                    e.u16(ws.rows);
                }
            }
        }
        Frame::Started { pid } => {
            e.u8(tag::STARTED);
            e.u32(*pid);
        }
        Frame::Stdin(d) => {
            e.u8(tag::STDIN);
            e.0.extend_from_slice(d);
        }
        Frame::StdinEof => e.u8(tag::STDIN_EOF),
        Frame::Resize(ws) => {
            e.u8(tag::RESIZE);
            e.u16(ws.cols);
            e.u16(ws.rows);
        }
        Frame::Signal(s) => {
            e.u8(tag::SIGNAL);
            e.signal(*s);
        }
        Frame::Stdout(d) => {
            e.u8(tag::STDOUT);
            e.0.extend_from_slice(d);
        }
        Frame::Stderr(d) => {
            e.u8(tag::STDERR);
            e.0.extend_from_slice(d);
        }
        Frame::Exited(s) => {
            e.u8(tag::EXITED);
            e.exit(*s);
        }
        Frame::ReadFile { path } => {
            e.u8(tag::READ_FILE);
            e.str(path);
        }
        Frame::FileInfo { size, mode } => {
            e.u8(tag::FILE_INFO);
            e.u64(*size);
            e.u32(*mode);
        }
        Frame::Data(d) => {
            e.u8(tag::DATA);
            e.0.extend_from_slice(d);
        }
        Frame::End => e.u8(tag::END),
        Frame::WriteFile { path, mode } => {
            e.u8(tag::WRITE_FILE);
            e.str(path);
            e.u32(*mode);
        }
        Frame::Ok => e.u8(tag::OK),
        Frame::Error { kind, message } => {
            e.u8(tag::ERROR);
            e.u8(*kind as u8);
            e.str(message);
        }
        Frame::MainOutput { offset, follow } => {
            e.u8(tag::MAIN_OUTPUT);
            e.u64(*offset);
            e.u8(u8::from(*follow));
        }
        Frame::Gap { from, to } => {
            e.u8(tag::GAP);
            e.u64(*from);
            e.u64(*to);
        }
        Frame::MainChunk {
            offset,
            stream,
            time_ns,
            data,
        } => {
            e.u8(tag::MAIN_CHUNK);
            e.u64(*offset);
            e.u8(*stream);
            e.u64(*time_ns);
            e.0.extend_from_slice(data);
        }
        Frame::SignalMain(s) => {
            e.u8(tag::SIGNAL_MAIN);
            e.signal(*s);
        }
        Frame::Init(spec) => {
            e.u8(tag::INIT);
            e.strs(&spec.argv);
            e.env(&spec.env);
            e.str(&spec.cwd);
            e.u32(spec.files.len() as u32);
            for f in &spec.files {
                e.str(&f.path);
                e.u32(f.mode);
                e.bytes(&f.content);
            }
        }
    }
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Longest [`tail_prefix`].
pub(crate) const MAX_TAIL_PREFIX: usize = 17;

/// For the frames whose payload ends in raw bytes (stdin, output, file data,
/// main output): the length of the fixed fields between the tag and those
/// bytes. Readers read the bytes straight into the frame's own buffer
/// instead of copying them out of a frame body.
pub(crate) fn tail_prefix(tag: u8) -> Option<usize> {
    match tag {
        tag::STDIN | tag::STDOUT | tag::STDERR | tag::DATA => Some(0),
        // offset u64, stream u8, time u64
        tag::MAIN_CHUNK => Some(MAX_TAIL_PREFIX),
        _ => None,
    }
}

/// Builds a frame of a [`tail_prefix`] tag from its fixed fields and bytes.
pub(crate) fn with_tail(tag: u8, prefix: &[u8], data: Vec<u8>) -> Result<Frame, WireError> {
    let mut d = Dec(prefix);
    let frame = match tag {
        tag::STDIN => Frame::Stdin(data),
        tag::STDOUT => Frame::Stdout(data),
        tag::STDERR => Frame::Stderr(data),
        tag::DATA => Frame::Data(data),
        tag::MAIN_CHUNK => Frame::MainChunk {
            offset: d.u64()?,
            stream: d.u8()?,
            time_ns: d.u64()?,
            data,
        },
        other => return Err(WireError::UnknownTag(other)),
    };
    d.finish()?;
    Ok(frame)
}

/// The length header and tag of a frame of a [`tail_prefix`] tag without
/// fixed fields, carrying `len` bytes.
pub(crate) fn data_header(tag: u8, len: usize) -> [u8; OUTPUT_HEADER_LEN] {
    debug_assert_eq!(tail_prefix(tag), Some(0));
    let b = ((len + 1) as u32).to_le_bytes();
    [b[0], b[1], b[2], b[3], tag]
}

/// Decodes one frame body (tag and payload, without the length header).
pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
    let mut d = Dec(body);
    let t = d.u8()?;
    if let Some(p) = tail_prefix(t) {
        let fixed = d.take(p)?;
        return with_tail(t, fixed, d.0.to_vec());
    }
    let frame = match t {
        tag::PING => Frame::Ping,
        tag::PONG => Frame::Pong(match d.u8()? {
            0 => MainStatus::Idle,
            1 => MainStatus::Running { pid: d.u32()? },
            2 => MainStatus::Exited(d.exit()?),
            3 => MainStatus::StartFailed(d.str()?),
            _ => return Err(WireError::Malformed("main status")),
        }),
        tag::EXEC => {
            let argv = d.strs()?;
            let env = d.env()?;
            let cwd = d.opt_str()?;
            let tty = match d.u8()? {
                0 => None,
                _ => Some(WinSize {
                    cols: d.u16()?,
                    rows: d.u16()?,
                }),
            };
            Frame::Exec(ExecRequest {
                argv,
                env,
                cwd,
                tty,
            })
        }
        tag::STARTED => Frame::Started { pid: d.u32()? },
        tag::STDIN_EOF => Frame::StdinEof,
        tag::RESIZE => Frame::Resize(WinSize {
            cols: d.u16()?,
            rows: d.u16()?,
        }),
        tag::SIGNAL => Frame::Signal(d.signal()?),
        tag::EXITED => Frame::Exited(d.exit()?),
        tag::READ_FILE => Frame::ReadFile { path: d.str()? },
        tag::FILE_INFO => Frame::FileInfo {
            size: d.u64()?,
            mode: d.u32()?,
        },
        tag::END => Frame::End,
        tag::WRITE_FILE => Frame::WriteFile {
            path: d.str()?,
            mode: d.u32()?,
        },
        tag::OK => Frame::Ok,
        tag::ERROR => Frame::Error {
            kind: ErrorKind::from_u8(d.u8()?)?,
            message: d.str()?,
        },
        tag::MAIN_OUTPUT => Frame::MainOutput {
            offset: d.u64()?,
            follow: d.u8()? != 0,
        },
        tag::GAP => Frame::Gap {
            from: d.u64()?,
            to: d.u64()?,
        },
        tag::SIGNAL_MAIN => Frame::SignalMain(d.signal()?),
        tag::INIT => {
            let argv = d.strs()?;
            let env = d.env()?;
            let cwd = d.str()?;
            let n = d.count()?;
            let mut files = Vec::with_capacity(n);
            for _ in 0..n {
                files.push(InitFile {
                    path: d.str()?,
                    mode: d.u32()?,
                    content: d.bytes()?,
                });
            }
            Frame::Init(InitSpec {
                argv,
                env,
                cwd,
                files,
            })
        }
        other => return Err(WireError::UnknownTag(other)),
    };
    d.finish()?;
    Ok(frame)
}

/// Length of the header [`output_header`] makes.
pub const OUTPUT_HEADER_LEN: usize = 5;

/// The header of a [`Frame::Stdout`] (or, with `stderr`, [`Frame::Stderr`])
/// frame carrying `len` bytes of output: a sender can read output straight
/// into its frame buffer after this header instead of copying it into a
/// `Frame` and encoding that.
pub fn output_header(stderr: bool, len: usize) -> [u8; OUTPUT_HEADER_LEN] {
    data_header(if stderr { tag::STDERR } else { tag::STDOUT }, len)
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

/// Joins an error's Display with its sources' along the chain, as the
/// printers at the edges of the programs do.
#[cfg(test)]
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn wire_errors_do_not_repeat_their_sources() {
        let e = WireError::Io(io::Error::other("disk on fire"));
        let source = e.source().expect("io has a source").to_string();
        assert!(!e.to_string().contains(&source), "{e}");
        // What the Display alone said before sources were split off.
        assert_eq!(chain(&e), "transport: disk on fire");
        for e in [
            WireError::TooLarge(5),
            WireError::Malformed("x"),
            WireError::UnknownTag(9),
            WireError::Truncated,
        ] {
            assert!(e.source().is_none(), "{e}");
        }
    }

    fn roundtrip(f: Frame) {
        let mut buf = Vec::new();
        encode(&f, &mut buf);
        let got = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn output_headers_match_encoded_frames() {
        for (stderr, data) in [
            (false, &b"out"[..]),
            (true, &b""[..]),
            (true, &[7u8; 300][..]),
        ] {
            let mut raw = output_header(stderr, data.len()).to_vec();
            raw.extend_from_slice(data);
            let frame = if stderr {
                Frame::Stderr(data.to_vec())
            } else {
                Frame::Stdout(data.to_vec())
            };
            let mut encoded = Vec::new();
            encode(&frame, &mut encoded);
            assert_eq!(raw, encoded);
        }
    }

    #[test]
    fn every_frame_roundtrips() {
        roundtrip(Frame::Ping);
        roundtrip(Frame::Pong(MainStatus::Idle));
        roundtrip(Frame::Pong(MainStatus::Running { pid: 7 }));
        roundtrip(Frame::Pong(MainStatus::Exited(ExitStatus::Signal(
            Signal::KILL,
        ))));
        roundtrip(Frame::Pong(MainStatus::StartFailed("nope".into())));
        roundtrip(Frame::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("A".into(), "b".into())],
            cwd: Some("/tmp".into()),
            tty: Some(WinSize { cols: 80, rows: 24 }),
        }));
        roundtrip(Frame::Exec(ExecRequest::default()));
        roundtrip(Frame::Started { pid: 42 });
        roundtrip(Frame::Stdin(vec![0, 1, 2, 255]));
        roundtrip(Frame::StdinEof);
        roundtrip(Frame::Resize(WinSize { cols: 1, rows: 2 }));
        roundtrip(Frame::Signal(Signal::TERM));
        roundtrip(Frame::Signal(Signal::new(64).unwrap()));
        roundtrip(Frame::Stdout(b"out".to_vec()));
        roundtrip(Frame::Stderr(vec![]));
        roundtrip(Frame::Exited(ExitStatus::Code(-1)));
        roundtrip(Frame::ReadFile { path: "/a".into() });
        roundtrip(Frame::FileInfo {
            size: 5,
            mode: 0o644,
        });
        roundtrip(Frame::Data(vec![9; 100]));
        roundtrip(Frame::End);
        roundtrip(Frame::WriteFile {
            path: "x".into(),
            mode: 0o600,
        });
        roundtrip(Frame::Ok);
        roundtrip(Frame::Error {
            kind: ErrorKind::IsDirectory,
            message: "is a directory".into(),
        });
        roundtrip(Frame::MainOutput {
            offset: 3,
            follow: true,
        });
        roundtrip(Frame::Gap { from: 0, to: 10 });
        roundtrip(Frame::MainChunk {
            offset: 10,
            stream: 2,
            time_ns: 99,
            data: b"line\n".to_vec(),
        });
        roundtrip(Frame::SignalMain(Signal::INT));
        roundtrip(Frame::Init(InitSpec {
            argv: vec!["true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            files: vec![InitFile {
                path: "/etc/x".into(),
                mode: 0o644,
                content: b"c".to_vec(),
            }],
        }));
    }

    #[test]
    fn clean_eof_is_none_and_partial_is_error() {
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
        assert!(matches!(
            read_frame(&mut &[5, 0][..]),
            Err(WireError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &[5, 0, 0, 0, tag::PING][..]),
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let huge = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(WireError::TooLarge(_))
        ));
        // A string that claims more bytes than the frame holds.
        let body = [tag::READ_FILE, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(decode(&body), Err(WireError::Malformed(_))));
        // A list count larger than the payload can hold.
        let body = [tag::EXEC, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(decode(&body), Err(WireError::Malformed(_))));
        assert!(matches!(decode(&[200]), Err(WireError::UnknownTag(200))));
        assert!(matches!(
            decode(&[tag::PING, 0]),
            Err(WireError::Malformed("trailing bytes"))
        ));
    }

    #[test]
    fn spawn_failures_get_shell_exit_codes() {
        assert_eq!(ErrorKind::NotFound.spawn_exit_code(), 127);
        for kind in [
            ErrorKind::PermissionDenied,
            ErrorKind::SpawnFailed,
            ErrorKind::IsDirectory,
            ErrorKind::Io,
        ] {
            assert_eq!(kind.spawn_exit_code(), 126, "{kind:?}");
        }
    }

    #[test]
    fn frames_shorter_than_their_fixed_fields_are_malformed() {
        let body = [tag::MAIN_CHUNK, 1, 2, 3];
        assert!(matches!(
            decode(&body),
            Err(WireError::Malformed("short payload"))
        ));
        let mut raw = (body.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(&body);
        assert!(matches!(
            read_frame(&mut &raw[..]),
            Err(WireError::Malformed("short payload"))
        ));
        // A frame without even a tag.
        assert!(matches!(
            read_frame(&mut &[0, 0, 0, 0][..]),
            Err(WireError::Malformed("short payload"))
        ));
        assert!(matches!(decode(&[]), Err(WireError::Malformed(_))));
    }

    #[test]
    fn shell_code_follows_the_shell_convention() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(Signal::KILL).shell_code(), 137);
        assert_eq!(
            ExitStatus::Signal(Signal::new(64).unwrap()).shell_code(),
            192
        );
    }

    #[test]
    fn signal_numbers_outside_linux_are_malformed() {
        let frames = |n: i32| {
            let n = n.to_le_bytes();
            [
                [&[tag::SIGNAL][..], &n].concat(),
                [&[tag::SIGNAL_MAIN][..], &n].concat(),
                [&[tag::EXITED, 1][..], &n].concat(),
                [&[tag::PONG, 2, 1][..], &n].concat(),
            ]
        };
        for bad in [0, -1, 65, 128, i32::MAX] {
            for body in frames(bad) {
                assert!(
                    matches!(decode(&body), Err(WireError::Malformed("signal"))),
                    "{bad}: {body:?}"
                );
            }
        }
        for good in [1, 64] {
            for body in frames(good) {
                assert!(decode(&body).is_ok(), "{good}: {body:?}");
            }
        }
    }
}
