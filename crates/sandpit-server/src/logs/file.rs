//! [`FileSink`]: each sandbox's main output kept on disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::format::{
    log_path, new_segment, old_log_path, pos_path, read_pos, read_segment_base,
    DEFAULT_MAX_LOG_BYTES, MIN_MAX_LOG_BYTES, RECORD_HEADER, SEGMENT_HEADER,
};
use super::{LogReader, LogSink, OutputChunk, Stream};
use crate::model::SandboxId;

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
    open: Mutex<HashMap<SandboxId, OpenLog>>,
}

#[derive(Debug)]
struct OpenLog {
    log: File,
    size: u64,
    pos: File,
    next: u64,
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

    fn open(&self, id: &SandboxId) -> std::io::Result<OpenLog> {
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
    fn rotate(&self, id: &SandboxId, o: &mut OpenLog, base: u64) -> std::io::Result<()> {
        let path = log_path(&self.dir, id);
        std::fs::rename(&path, old_log_path(&self.dir, id))?;
        o.log = new_segment(&path, base)?;
        o.size = SEGMENT_HEADER;
        Ok(())
    }
}

impl LogSink for FileSink {
    fn append(&self, sandbox_id: &SandboxId, chunk: &OutputChunk) {
        use std::io::Write;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if !open.contains_key(sandbox_id) {
            match self.open(sandbox_id) {
                Ok(o) => {
                    open.insert(sandbox_id.clone(), o);
                }
                Err(e) => {
                    tracing::warn!(%sandbox_id, error = %e, "open log file");
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
                tracing::warn!(%sandbox_id, error = %e, "rotate log file");
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
            Err(e) => tracing::warn!(%sandbox_id, error = %e, "write log file"),
        }
    }

    fn resume_offset(&self, sandbox_id: &SandboxId) -> u64 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.get(sandbox_id) {
            return o.next;
        }
        File::open(pos_path(&self.dir, sandbox_id)).map_or(0, |f| read_pos(&f))
    }

    fn finish(&self, sandbox_id: &SandboxId) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox_id);
    }

    fn remove(&self, sandbox_id: &SandboxId) {
        self.finish(sandbox_id);
        for path in [
            log_path(&self.dir, sandbox_id),
            old_log_path(&self.dir, sandbox_id),
            pos_path(&self.dir, sandbox_id),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(%sandbox_id, error = %e, "remove log file"),
            }
        }
    }
}
