//! Where the main process's output goes while a sandbox is watched.
//!
//! The watcher reads the agent's output stream anyway (its end is how the
//! exit is noticed without polling), so every chunk passes through a
//! [`LogSink`]. StreamLogs serves what a [`FileSink`] kept, through a
//! [`LogReader`].

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One chunk of the main process's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Offset of the first byte over both streams together.
    pub offset: u64,
    /// The stream.
    pub stream: Stream,
    /// Unix time in nanoseconds when the agent read it.
    pub time_ns: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Receives the main process's output of every watched sandbox.
pub trait LogSink: Send + Sync + Debug + 'static {
    /// A chunk arrived. Must not block for long: it runs on the watcher.
    fn append(&self, sandbox_id: &str, chunk: &OutputChunk);
    /// The offset to resume from after a daemon restart (what was kept).
    fn resume_offset(&self, _sandbox_id: &str) -> u64 {
        0
    }
    /// The sandbox's output ended (main process exited or sandbox gone).
    fn finish(&self, _sandbox_id: &str) {}
    /// The sandbox's record was garbage-collected: drop what was kept.
    fn remove(&self, _sandbox_id: &str) {}
}

/// Discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl LogSink for NullSink {
    fn append(&self, _: &str, _: &OutputChunk) {}
}

/// Magic at the start of every log segment (format version 1).
const MAGIC: [u8; 8] = *b"SPLOG\x01\0\0";
/// Segment header: [`MAGIC`], then the stream offset of the segment's first
/// byte (u64, little endian).
const SEGMENT_HEADER: u64 = 16;
/// Record header: offset (u64), time in ns (u64), stream (u8: 1 stdout,
/// 2 stderr), length (u32), all little endian; the bytes follow.
const RECORD_HEADER: usize = 21;
/// Largest record a reader accepts (the agent sends chunks of 64 KiB).
const MAX_RECORD: usize = 4 << 20;

/// Default cap on what is kept per sandbox.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;
/// Smallest accepted cap.
pub const MIN_MAX_LOG_BYTES: u64 = 1 << 20;

/// Keeps each sandbox's output on disk, as records that carry the stream
/// offset, the time and the stream of each chunk, in at most two segments:
/// `<dir>/<id>.log` (being written) and `<dir>/<id>.log.1` (the previous
/// one). When the current segment would grow beyond half the cap it becomes
/// the previous one (dropping the oldest output) and a new one starts, so a
/// sandbox keeps at most about `max_bytes`. The stream offset reached is also
/// kept in `<dir>/<id>.pos` (8 bytes, little endian): after a restart the
/// watcher resumes there, and a replayed overlap is skipped rather than
/// written twice. Offsets come from the sandbox's agent, which is not
/// trusted: they only ever decide what to skip, never where to write, so a
/// forged offset cannot grow the file.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    max_bytes: u64,
    open: Mutex<HashMap<String, OpenLog>>,
}

#[derive(Debug)]
struct OpenLog {
    log: File,
    size: u64,
    pos: File,
    next: u64,
}

fn log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log"))
}

fn old_log_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.log.1"))
}

fn pos_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.pos"))
}

fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    h
}

/// The base offset of a segment, `None` when it has no valid header.
fn read_segment_base(f: &File) -> Option<u64> {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    f.read_exact_at(&mut h, 0).ok()?;
    (h[..8] == MAGIC).then(|| u64::from_le_bytes(h[8..].try_into().expect("8 bytes")))
}

fn new_segment(path: &Path, base: u64) -> std::io::Result<File> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&segment_header(base))?;
    // Appends from here on.
    drop(f);
    OpenOptions::new().append(true).read(true).open(path)
}

impl FileSink {
    /// Creates `dir` (0700) if needed; keeps [`DEFAULT_MAX_LOG_BYTES`] per
    /// sandbox.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        Self::with_max_bytes(dir, DEFAULT_MAX_LOG_BYTES)
    }

    /// Like [`FileSink::new`], keeping about `max_bytes` per sandbox (at
    /// least [`MIN_MAX_LOG_BYTES`]).
    pub fn with_max_bytes(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes: max_bytes.max(MIN_MAX_LOG_BYTES),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A reader of what this sink keeps.
    pub fn reader(&self) -> LogReader {
        LogReader::new(&self.dir)
    }

    fn open(&self, id: &str) -> std::io::Result<OpenLog> {
        let pos = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(pos_path(&self.dir, id))?;
        let next = read_pos(&pos);
        let path = log_path(&self.dir, id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&path)?;
        if read_segment_base(&log).is_some() {
            let size = log.metadata()?.len();
            return Ok(OpenLog {
                log,
                size,
                pos,
                next,
            });
        }
        // New, or not in this format: start a segment at the kept offset.
        let log = new_segment(&path, next)?;
        Ok(OpenLog {
            log,
            size: SEGMENT_HEADER,
            pos,
            next,
        })
    }

    /// The current segment becomes the previous one (replacing it); a new
    /// one starts at `base`.
    fn rotate(&self, id: &str, o: &mut OpenLog, base: u64) -> std::io::Result<()> {
        let path = log_path(&self.dir, id);
        std::fs::rename(&path, old_log_path(&self.dir, id))?;
        o.log = new_segment(&path, base)?;
        o.size = SEGMENT_HEADER;
        Ok(())
    }
}

fn read_pos(f: &File) -> u64 {
    let mut b = [0u8; 8];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

impl LogSink for FileSink {
    fn append(&self, sandbox_id: &str, chunk: &OutputChunk) {
        use std::io::Write;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.contains_key(sandbox_id) {
            match self.open(sandbox_id) {
                Ok(o) => {
                    open.insert(sandbox_id.to_owned(), o);
                }
                Err(e) => {
                    tracing::warn!(sandbox_id, error = %e, "open log file");
                    return;
                }
            }
        }
        let Some(o) = open.get_mut(sandbox_id) else {
            return;
        };
        // Already kept (a replay after a restart), entirely or in part.
        let skip = o.next.saturating_sub(chunk.offset);
        let Some(data) = usize::try_from(skip)
            .ok()
            .and_then(|skip| chunk.data.get(skip..))
            .filter(|d| !d.is_empty())
        else {
            return;
        };
        // An offset past `next` is output the agent dropped: nothing to write.
        let at = chunk.offset.max(o.next);
        let next = at.saturating_add(data.len() as u64);
        let record_len = (RECORD_HEADER + data.len()) as u64;
        if o.size > SEGMENT_HEADER && o.size + record_len > self.max_bytes / 2 {
            // The new segment starts where the old one ended, so readers
            // find every offset in exactly one place.
            if let Err(e) = self.rotate(sandbox_id, o, o.next) {
                tracing::warn!(sandbox_id, error = %e, "rotate log file");
                return;
            }
        }
        let mut record = Vec::with_capacity(record_len as usize);
        record.extend_from_slice(&at.to_le_bytes());
        record.extend_from_slice(&chunk.time_ns.to_le_bytes());
        record.push(match chunk.stream {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        });
        record.extend_from_slice(&(data.len() as u32).to_le_bytes());
        record.extend_from_slice(data);
        let written = (&o.log)
            .write_all(&record)
            .and_then(|()| o.pos.write_all_at(&next.to_le_bytes(), 0));
        match written {
            Ok(()) => {
                o.next = next;
                o.size += record_len;
            }
            Err(e) => tracing::warn!(sandbox_id, error = %e, "write log file"),
        }
    }

    fn resume_offset(&self, sandbox_id: &str) -> u64 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.get(sandbox_id) {
            return o.next;
        }
        File::open(pos_path(&self.dir, sandbox_id)).map_or(0, |f| read_pos(&f))
    }

    fn finish(&self, sandbox_id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox_id);
    }

    fn remove(&self, sandbox_id: &str) {
        self.finish(sandbox_id);
        for path in [
            log_path(&self.dir, sandbox_id),
            old_log_path(&self.dir, sandbox_id),
            pos_path(&self.dir, sandbox_id),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(sandbox_id, error = %e, "remove log file"),
            }
        }
    }
}

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
    pub fn cursor(&self, id: &str) -> LogCursor {
        LogCursor {
            current: log_path(&self.dir, id),
            old: old_log_path(&self.dir, id),
            next: 0,
            handle: None,
        }
    }

    /// The offset just past the kept output (0 when nothing was kept).
    pub fn end(&self, id: &str) -> u64 {
        File::open(pos_path(&self.dir, id)).map_or(0, |f| read_pos(&f))
    }

    /// The offset where the last `n` lines of the kept output start.
    pub fn tail_start(&self, id: &str, n: u64) -> std::io::Result<u64> {
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

/// `RFC 3339` UTC time with nanoseconds, e.g. `2024-05-01T12:00:00.000000001Z`.
pub fn rfc3339_nanos(time_ns: u64) -> String {
    let secs = time_ns / 1_000_000_000;
    let nanos = time_ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, data: &[u8]) -> OutputChunk {
        OutputChunk {
            offset,
            stream: Stream::Stdout,
            time_ns: offset,
            data: data.to_vec(),
        }
    }

    fn read_all(reader: &LogReader, id: &str, from: u64) -> (Vec<u8>, Option<u64>) {
        let mut c = reader.cursor(id);
        if let Some(gap) = c.seek(from).unwrap() {
            return (vec![], Some(gap));
        }
        let mut out = vec![];
        loop {
            match c.next().unwrap() {
                Next::Record(r) => out.extend(r.data),
                Next::Gap(g) => return (out, Some(g)),
                Next::Pending => return (out, None),
            }
        }
    }

    #[test]
    fn file_sink_appends_skips_replays_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(&dir.path().join("logs")).unwrap();
        assert_eq!(sink.resume_offset("a"), 0);
        sink.append("a", &chunk(0, b"hello "));
        sink.append("a", &chunk(6, b"world"));
        // A replay after a restart (overlapping, partly new) adds only what is new.
        sink.append("a", &chunk(0, b"hello "));
        sink.append("a", &chunk(8, b"rld!"));
        assert_eq!(sink.resume_offset("a"), 12);
        sink.finish("a");
        // Read back from disk after "a restart".
        let fresh = FileSink::new(&dir.path().join("logs")).unwrap();
        assert_eq!(fresh.resume_offset("a"), 12);
        // Dropped output (a gap) is skipped, not written as a hole.
        fresh.append("a", &chunk(1 << 40, b"\n"));
        assert_eq!(fresh.resume_offset("a"), (1 << 40) + 1);
        // A forged offset near the end of the range cannot overflow.
        fresh.append("a", &chunk(u64::MAX - 1, b"xyz"));
        let reader = fresh.reader();
        assert_eq!(read_all(&reader, "a", 0).0, b"hello world!\nxyz");
        assert_eq!(read_all(&reader, "a", 3).0, b"lo world!\nxyz");
        assert!(dir.path().join("logs/a.log").metadata().unwrap().len() < 200);
        fresh.remove("a");
        assert!(!dir.path().join("logs/a.log").exists());
        assert!(!dir.path().join("logs/a.pos").exists());
        assert_eq!(read_all(&reader, "a", 0), (vec![], None));
    }

    #[test]
    fn records_keep_time_and_stream() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path()).unwrap();
        sink.append("a", &chunk(0, b"out"));
        sink.append(
            "a",
            &OutputChunk {
                offset: 3,
                stream: Stream::Stderr,
                time_ns: 77,
                data: b"err".to_vec(),
            },
        );
        let mut c = sink.reader().cursor("a");
        c.seek(0).unwrap();
        assert!(matches!(c.next().unwrap(), Next::Record(r) if r.stream == Stream::Stdout));
        let Next::Record(r) = c.next().unwrap() else {
            panic!()
        };
        assert_eq!((r.offset, r.time_ns, r.stream), (3, 77, Stream::Stderr));
        assert_eq!(c.next().unwrap(), Next::Pending);
        assert_eq!(c.offset(), 6);
    }

    #[test]
    fn cap_drops_the_oldest_and_readers_follow_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::with_max_bytes(dir.path(), MIN_MAX_LOG_BYTES).unwrap();
        let reader = sink.reader();
        let line = vec![b'x'; 1000];
        let mut c = reader.cursor("a");
        c.seek(0).unwrap();
        let mut seen = 0u64;
        let mut offset = 0u64;
        for _ in 0..3000 {
            sink.append("a", &chunk(offset, &line));
            offset += line.len() as u64;
            // A reader keeping up sees everything across rotations.
            while let Next::Record(r) = c.next().unwrap() {
                assert_eq!(r.offset, seen);
                seen = r.end();
            }
        }
        assert_eq!(seen, offset);
        let kept: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(kept <= MIN_MAX_LOG_BYTES + 64, "{kept}");
        // The oldest output is gone: a reader there is told where it resumes.
        let start = c.start().unwrap().unwrap();
        assert!(start > 0 && start < offset - 400_000, "{start}");
        let (data, gap) = read_all(&reader, "a", 10);
        assert!(data.is_empty());
        assert_eq!(gap, Some(start));
        let (data, gap) = read_all(&reader, "a", start);
        assert_eq!((data.len() as u64, gap), (offset - start, None));
    }

    #[test]
    fn tail_finds_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path()).unwrap();
        let r = sink.reader();
        assert_eq!(r.tail_start("a", 2).unwrap(), 0);
        sink.append("a", &chunk(0, b"one\ntw"));
        sink.append("a", &chunk(6, b"o\nthree\n"));
        assert_eq!(r.tail_start("a", 1).unwrap(), 8);
        assert_eq!(r.tail_start("a", 2).unwrap(), 4);
        assert_eq!(r.tail_start("a", 10).unwrap(), 0);
        sink.append("a", &chunk(14, b"four"));
        assert_eq!(r.tail_start("a", 1).unwrap(), 14);
        assert_eq!(read_all(&r, "a", 8).0, b"three\nfour");
        assert_eq!(r.end("a"), 18);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_709_251_199_000_000_001),
            "2024-02-29T23:59:59.000000001Z"
        );
        assert_eq!(
            rfc3339_nanos(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}
