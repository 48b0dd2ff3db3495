//! Where the main process's output goes while a sandbox is watched.
//!
//! The watcher reads the agent's output stream anyway (its end is how the
//! exit is noticed without polling), so every chunk passes through a
//! [`LogSink`]. The next issue serves logs (StreamLogs) from what a sink kept.

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

/// Keeps each sandbox's output in `<dir>/<id>.log`, appended as it comes,
/// and the stream offset reached in `<dir>/<id>.pos` (8 bytes, little
/// endian): after a restart the watcher resumes there, and a replayed
/// overlap is skipped rather than written twice. Offsets come from the
/// sandbox's agent, which is not trusted: they only ever decide what to
/// skip, never where to write, so a forged offset cannot grow the file.
#[derive(Debug)]
pub struct FileSink {
    dir: PathBuf,
    open: Mutex<HashMap<String, OpenLog>>,
}

#[derive(Debug)]
struct OpenLog {
    log: File,
    pos: File,
    next: u64,
}

impl FileSink {
    /// Creates `dir` (0700) if needed.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn pos_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pos"))
    }

    fn open(&self, id: &str) -> std::io::Result<OpenLog> {
        let opts = |append| {
            let mut o = OpenOptions::new();
            o.create(true).mode(0o600);
            if append {
                o.append(true);
            } else {
                o.read(true).write(true).truncate(false);
            }
            o
        };
        let log = opts(true).open(self.log_path(id))?;
        let pos = opts(false).open(self.pos_path(id))?;
        let next = read_pos(&pos);
        Ok(OpenLog { log, pos, next })
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
        let next = chunk.offset.max(o.next).saturating_add(data.len() as u64);
        let written = (&o.log)
            .write_all(data)
            .and_then(|()| o.pos.write_all_at(&next.to_le_bytes(), 0));
        match written {
            Ok(()) => o.next = next,
            Err(e) => tracing::warn!(sandbox_id, error = %e, "write log file"),
        }
    }

    fn resume_offset(&self, sandbox_id: &str) -> u64 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.get(sandbox_id) {
            return o.next;
        }
        File::open(self.pos_path(sandbox_id)).map_or(0, |f| read_pos(&f))
    }

    fn finish(&self, sandbox_id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sandbox_id);
    }

    fn remove(&self, sandbox_id: &str) {
        self.finish(sandbox_id);
        for path in [self.log_path(sandbox_id), self.pos_path(sandbox_id)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(sandbox_id, error = %e, "remove log file"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, data: &[u8]) -> OutputChunk {
        OutputChunk {
            offset,
            stream: Stream::Stdout,
            time_ns: 0,
            data: data.to_vec(),
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
        let path = dir.path().join("logs/a.log");
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world!\nxyz");
        fresh.remove("a");
        assert!(!path.exists());
        assert!(!dir.path().join("logs/a.pos").exists());
    }
}
