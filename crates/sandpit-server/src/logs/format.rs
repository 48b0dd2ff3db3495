//! The on-disk format shared by the writer ([`super::FileSink`]) and the
//! readers ([`super::LogReader`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::model::SandboxId;

/// Magic at the start of every log segment (format version 1).
pub(super) const MAGIC: [u8; 8] = *b"SPLOG\x01\0\0";
/// Segment header: [`MAGIC`], then the stream offset of the segment's first
/// byte (u64, little endian).
pub(super) const SEGMENT_HEADER: u64 = 16;
/// Record header: offset (u64), time in ns (u64), stream (u8: 1 stdout,
/// 2 stderr), length (u32), all little endian; the bytes follow.
pub(super) const RECORD_HEADER: usize = 21;
/// Largest record a reader accepts (the agent sends chunks of 64 KiB).
pub(super) const MAX_RECORD: usize = 4 << 20;

/// Default cap on what is kept per sandbox.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;
/// Smallest accepted cap.
pub const MIN_MAX_LOG_BYTES: u64 = 1 << 20;

// Ids are valid file names by construction (no '/', no leading '.').
pub(super) fn log_path(dir: &Path, id: &SandboxId) -> PathBuf {
    dir.join(format!("{id}.log"))
}

pub(super) fn old_log_path(dir: &Path, id: &SandboxId) -> PathBuf {
    dir.join(format!("{id}.log.1"))
}

pub(super) fn pos_path(dir: &Path, id: &SandboxId) -> PathBuf {
    dir.join(format!("{id}.pos"))
}

pub(super) fn segment_header(base: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    h
}

/// The base offset of a segment, `None` when it has no valid header.
pub(super) fn read_segment_base(f: &File) -> Option<u64> {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    f.read_exact_at(&mut h, 0).ok()?;
    (h[..8] == MAGIC).then(|| u64::from_le_bytes(h[8..].try_into().expect("8 bytes")))
}

pub(super) fn new_segment(path: &Path, base: u64) -> std::io::Result<File> {
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

pub(super) fn read_pos(f: &File) -> u64 {
    let mut b = [0u8; 8];
    match f.read_exact_at(&mut b, 0) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}
