//! Where the main process's output goes while a sandbox is watched.
//!
//! The watcher reads the agent's output stream anyway (its end is how the
//! exit is noticed without polling), so every chunk passes through a
//! [`LogSink`] (storage, blocking), reached from async code through a
//! [`LogWriter`] that does its work on the blocking pool. StreamLogs serves
//! what a [`FileSink`] kept, through a [`LogReader`].

use std::fmt::Debug;

use crate::model::SandboxId;

mod file;
mod format;
mod reader;
mod writer;

pub use file::FileSink;
pub use format::{DEFAULT_MAX_LOG_BYTES, MIN_MAX_LOG_BYTES};
pub use reader::{LogCursor, LogReader, LogRecord, Next};
pub use writer::LogWriter;

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

/// Receives the main process's output of every watched sandbox. Its
/// methods may block (file I/O): the daemon calls them only through a
/// [`LogWriter`].
pub trait LogSink: Send + Sync + Debug + 'static {
    /// A chunk arrived.
    fn append(&self, sandbox_id: &SandboxId, chunk: &OutputChunk);
    /// The offset to resume from after a daemon restart (what was kept).
    fn resume_offset(&self, _sandbox_id: &SandboxId) -> u64 {
        0
    }
    /// The sandbox's output ended (main process exited or sandbox gone).
    fn finish(&self, _sandbox_id: &SandboxId) {}
    /// The sandbox's record was garbage-collected: drop what was kept.
    fn remove(&self, _sandbox_id: &SandboxId) {}
}

/// Discards everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl LogSink for NullSink {
    fn append(&self, _: &SandboxId, _: &OutputChunk) {}
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
mod tests;
