//! The binary encoding of [`Frame`]s: little-endian integers,
//! length-prefixed strings and lists, and frames whose payload ends in raw
//! bytes (output, stdin, file data) so that those bytes need no copy.

use crate::{
    ErrorKind, ExecRequest, ExitStatus, Frame, MainStatus, Signal, Usage, WinSize, WireError,
    OUTPUT_HEADER_LEN,
};

pub(crate) mod tag {
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
    pub(crate) const AWAIT_STARTUP: u8 = 24;
    pub(crate) const STARTUP: u8 = 25;
    pub(crate) const USAGE: u8 = 26;
    pub(crate) const MAIN_USAGE: u8 = 27;
    pub(crate) const IDLE: u8 = 28;
    pub(crate) const CLAIM: u8 = 29;
}

mod startup;

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
            e.init(spec);
        }
        Frame::Idle => e.u8(tag::IDLE),
        Frame::Claim(spec) => {
            e.u8(tag::CLAIM);
            e.init(spec);
        }
        Frame::AwaitStartup => e.u8(tag::AWAIT_STARTUP),
        Frame::Startup(state) => {
            e.u8(tag::STARTUP);
            e.startup(state);
        }
        Frame::Usage(u) => {
            e.u8(tag::USAGE);
            e.u64(u.user_us);
            e.u64(u.sys_us);
            e.u64(u.max_rss_bytes);
        }
        Frame::MainUsage => e.u8(tag::MAIN_USAGE),
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
        tag::INIT => Frame::Init(d.init()?),
        tag::IDLE => Frame::Idle,
        tag::CLAIM => Frame::Claim(d.init()?),
        tag::AWAIT_STARTUP => Frame::AwaitStartup,
        tag::STARTUP => Frame::Startup(d.startup()?),
        tag::USAGE => Frame::Usage(Usage {
            user_us: d.u64()?,
            sys_us: d.u64()?,
            max_rss_bytes: d.u64()?,
        }),
        tag::MAIN_USAGE => Frame::MainUsage,
        other => return Err(WireError::UnknownTag(other)),
    };
    d.finish()?;
    Ok(frame)
}
