//! [`LogReader`] and [`LogCursor`]: what a [`super::FileSink`] keeps, read
//! while it is being written (StreamLogs, `sandpit logs`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    log_path, old_log_path, pos_path, read_pos, read_segment_base, MAX_RECORD, RECORD_HEADER,
    SEGMENT_HEADER,
};
use super::Stream;
use crate::model::SandboxId;

/// One kept chunk of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Stream offset of its first byte.
    pub offset: u64,
    /// Unix time in nanoseconds when the agent read it.
    pub time_ns: u64,
    /// The stream.
    pub stream: Stream,
    /// The bytes.
    pub data: Vec<u8>,
}

impl LogRecord {
    /// The offset just past it.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.data.len() as u64)
    }
}

/// What [`LogCursor::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A record (trimmed to start at the cursor's offset).
    Record(LogRecord),
    /// The cursor's offset is no longer kept; output resumes at this offset.
    Gap(u64),
    /// Nothing more for now.
    Pending,
}

/// Reads what a [`FileSink`] keeps, while it is being written.
#[derive(Debug, Clone)]
pub struct LogReader {
    dir: PathBuf,
}

impl LogReader {
    /// A reader of the logs in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// A cursor over one sandbox's output, at offset 0 (call
    /// [`LogCursor::seek`] to place it).
    pub fn cursor(&self, id: &SandboxId) -> LogCursor {
        LogCursor {
            current: log_path(&self.dir, id),
            old: old_log_path(&self.dir, id),
            next: 0,
            handle: None,
        }
    }

    /// The offset just past the kept output (0 when nothing was kept).
    pub fn end(&self, id: &SandboxId) -> u64 {
        File::open(pos_path(&self.dir, id)).map_or(0, |f| read_pos(&f))
    }

    /// The offset where the last `n` lines of the kept output start.
    pub fn tail_start(&self, id: &SandboxId, n: u64) -> std::io::Result<u64> {
        let mut c = self.cursor(id);
        let start = c.start()?.unwrap_or(0);
        // Two passes in constant memory: count the lines, then find where the
        // last n begin.
        let mut newlines = 0u64;
        let mut last = b'\n';
        let mut end = start;
        c.seek(start)?;
        while let Next::Record(r) = c.next()? {
            newlines += r.data.iter().filter(|&&b| b == b'\n').count() as u64;
            if let Some(&b) = r.data.last() {
                last = b;
            }
            end = r.end();
        }
        let lines = newlines + u64::from(last != b'\n');
        if lines <= n {
            return Ok(start);
        }
        let mut skip = lines - n;
        c.seek(start)?;
        while let Next::Record(r) = c.next()? {
            for (i, &b) in r.data.iter().enumerate() {
                if b == b'\n' {
                    skip -= 1;
                    if skip == 0 {
                        return Ok(r.offset + i as u64 + 1);
                    }
                }
            }
        }
        Ok(end)
    }
}

#[derive(Debug)]
struct Handle {
    file: File,
    pos: u64,
    ident: (u64, u64),
    base: u64,
}

fn ident(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// A position in one sandbox's kept output, following rotations.
#[derive(Debug)]
pub struct LogCursor {
    current: PathBuf,
    old: PathBuf,
    next: u64,
    handle: Option<Handle>,
}

fn read_record_at(f: &File, pos: u64) -> std::io::Result<Option<LogRecord>> {
    let mut h = [0u8; RECORD_HEADER];
    match f.read_exact_at(&mut h, pos) {
        Ok(()) => {}
        // At the end, or a record being written.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (offset, time_ns, stream, len) = parse_record_header(&h)?;
    let mut data = vec![0u8; len];
    match f.read_exact_at(&mut data, pos + RECORD_HEADER as u64) {
        Ok(()) => Ok(Some(LogRecord {
            offset,
            time_ns,
            stream,
            data,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

fn parse_record_header(h: &[u8; RECORD_HEADER]) -> std::io::Result<(u64, u64, Stream, usize)> {
    let corrupt = || std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt log record");
    let offset = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
    let time_ns = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let stream = match h[16] {
        1 => Stream::Stdout,
        2 => Stream::Stderr,
        _ => return Err(corrupt()),
    };
    let len = u32::from_le_bytes(h[17..21].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD {
        return Err(corrupt());
    }
    Ok((offset, time_ns, stream, len))
}

impl LogCursor {
    /// The offset of the next byte this cursor yields.
    pub fn offset(&self) -> u64 {
        self.next
    }

    /// The segments that exist, oldest first.
    fn segments(&self) -> std::io::Result<Vec<Handle>> {
        let mut out = Vec::new();
        for path in [&self.old, &self.current] {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Some(base) = read_segment_base(&file) else {
                continue;
            };
            let ident = ident(&file.metadata()?);
            out.push(Handle {
                file,
                pos: SEGMENT_HEADER,
                ident,
                base,
            });
        }
        Ok(out)
    }

    /// The first offset still kept; `None` when nothing is.
    pub fn start(&self) -> std::io::Result<Option<u64>> {
        Ok(self.segments()?.first().map(|h| h.base))
    }

    /// Places the cursor at `offset`; `Some(first kept offset)` when
    /// `offset` is no longer kept.
    pub fn seek(&mut self, offset: u64) -> std::io::Result<Option<u64>> {
        self.next = offset;
        self.handle = None;
        let segments = self.segments()?;
        let Some(first) = segments.first() else {
            return Ok(None);
        };
        if offset < first.base {
            return Ok(Some(first.base));
        }
        let Some(mut h) = segments.into_iter().rev().find(|h| h.base <= offset) else {
            return Ok(None);
        };
        // Skip the records that end before `offset` (headers only).
        loop {
            let mut hdr = [0u8; RECORD_HEADER];
            match h.file.read_exact_at(&mut hdr, h.pos) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let (at, _, _, len) = parse_record_header(&hdr)?;
            if at.saturating_add(len as u64) > offset {
                break;
            }
            h.pos += (RECORD_HEADER + len) as u64;
        }
        self.handle = Some(h);
        Ok(None)
    }

    /// The next record from the cursor's offset.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> std::io::Result<Next> {
        loop {
            if self.handle.is_none() {
                if let Some(first) = self.seek(self.next)? {
                    return Ok(Next::Gap(first));
                }
                if self.handle.is_none() {
                    return Ok(Next::Pending);
                }
            }
            let h = self.handle.as_mut().expect("set above");
            if let Some(mut r) = read_record_at(&h.file, h.pos)? {
                h.pos += (RECORD_HEADER + r.data.len()) as u64;
                if r.end() <= self.next {
                    continue;
                }
                if r.offset < self.next {
                    let cut = (self.next - r.offset) as usize;
                    r.data.drain(..cut);
                    r.offset = self.next;
                }
                self.next = r.end();
                return Ok(Next::Record(r));
            }
            // At the end of this segment: is it still the one being written?
            let was = h.ident;
            match std::fs::metadata(&self.current) {
                Ok(m) if ident(&m) == was => return Ok(Next::Pending),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // Rotated away: find the offset again.
            if let Some(first) = self.seek(self.next)? {
                return Ok(Next::Gap(first));
            }
            match &self.handle {
                Some(h) if h.ident != was => {}
                _ => return Ok(Next::Pending),
            }
        }
    }
}
