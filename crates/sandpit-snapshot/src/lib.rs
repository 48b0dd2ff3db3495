//! File-system snapshots of volumes (issue 14): a volume directory, whose
//! content a sandbox wrote and which is therefore HOSTILE, becomes one
//! immutable, content-addressed blob; a blob is restored into a fresh empty
//! directory. Blocking API, no gRPC types: the daemon calls it on tokio's
//! blocking pool.
//!
//! - [`archive`] / [`unarchive`]: the blob format, a deterministic
//!   zstd-compressed tar (see `archive.rs`, `unarchive.rs` and
//!   `docs/snapshots-storage.md`).
//! - [`BlobStore`]: where blobs live, [`LocalBlobStore`] (the embedded
//!   default, under the data dir) or [`S3BlobStore`] (a shared bucket).
//!   Blobs are named by the sha256 of their bytes; every read verifies it.
//! - [`snapshot_dir`] / [`restore_dir`]: the two calls the daemon makes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sandpit_image::{Digest, DigestWriter, IdShift};

mod archive;
mod local;
mod s3;
mod unarchive;
mod verify;

pub use archive::archive;
pub use local::LocalBlobStore;
pub use s3::{S3BlobStore, S3Config, S3_PART_SIZE};
pub use unarchive::unarchive;
pub use verify::VerifyingReader;

/// What an archive or unarchive did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ArchiveStats {
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    pub symlinks: u64,
    /// Sockets, fifos and device nodes: not archived.
    pub skipped: u64,
    /// Bytes of regular file content.
    pub content_bytes: u64,
    /// Entries whose host uid or gid lies outside the shift range: archived
    /// as the container's nobody (65534).
    pub unmapped_ids: u64,
}

/// Bounds on what one snapshot may hold, checked while walking a tree and
/// while unpacking an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of regular files' sizes.
    pub max_content_bytes: u64,
    /// Files, directories, symlinks and skipped entries.
    pub max_entries: u64,
    /// Directories below the root (a file in the root is at depth 1). One
    /// directory fd is held per level; `archive` caps it at 256 (it
    /// recurses per level).
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: 64 << 30,
            max_entries: 1_000_000,
            max_depth: 128,
        }
    }
}

/// A stored blob: its digest and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

/// Errors of this crate. Messages name their own step only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entry {path}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("bad entry {path}: {reason}")]
    BadEntry { path: String, reason: &'static str },
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error("writing the archive")]
    Write(#[source] io::Error),
    #[error("content over {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("deeper than {limit} directories")]
    TooDeep { limit: u32 },
    #[error("tree changed while archiving {path}")]
    Changed { path: String },
    #[error("{} is not an empty directory", path.display())]
    NotEmpty { path: PathBuf },
    #[error("blob {digest} failed verification: {detail}")]
    DigestMismatch { digest: Digest, detail: String },
    #[error("blob {digest} not found")]
    NotFound { digest: Digest },
    #[error("s3 {op}")]
    Store {
        op: &'static str,
        #[source]
        source: object_store::Error,
    },
    #[error("invalid s3 config: {0}")]
    Config(String),
    #[error("invalid id shift: {0}")]
    Shift(&'static str),
}

impl SnapshotError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The [`SnapshotError`] an `io::Error` carries, if any (a verifying
    /// reader's mismatch comes back wrapped, possibly in a tar error).
    pub fn from_io_ref(e: &io::Error) -> Option<&SnapshotError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
        while let Some(err) = cur {
            if let Some(s) = err.downcast_ref::<SnapshotError>() {
                return Some(s);
            }
            if let Some(io) = err.downcast_ref::<io::Error>() {
                if let Some(s) = io.get_ref().and_then(|e| e.downcast_ref::<SnapshotError>()) {
                    return Some(s);
                }
            }
            cur = err.source();
        }
        None
    }
}

pub(crate) fn check_shift(shift: &IdShift) -> Result<(), SnapshotError> {
    if shift.base == 0 {
        return Err(SnapshotError::Shift("base must not be 0"));
    }
    if shift.count == 0 {
        return Err(SnapshotError::Shift("count must not be 0"));
    }
    if shift.base.checked_add(shift.count).is_none() {
        return Err(SnapshotError::Shift("range overflows the id space"));
    }
    Ok(())
}

/// Where blobs live. Implementations are blocking and shareable.
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// `"local"` or `"s3://bucket/prefix"`: recorded with each snapshot.
    fn location(&self) -> String;
    /// Stores the staged file whose sha256 and size the caller computed
    /// while writing it; the staged file is consumed. A blob already
    /// present is kept (dedup) and the staged file dropped.
    fn put(&self, staged: &Path, blob: &BlobRef) -> Result<(), SnapshotError>;
    /// A reader of the blob that verifies it: at EOF, bytes that do not hash
    /// to `blob.digest` or a size other than `blob.size` are an error
    /// (`io::Error` wrapping [`SnapshotError::DigestMismatch`]).
    fn open(&self, blob: &BlobRef) -> Result<Box<dyn Read + Send>, SnapshotError>;
    fn exists(&self, digest: &Digest) -> Result<bool, SnapshotError>;
    /// Idempotent: deleting a missing blob is Ok.
    fn delete(&self, digest: &Digest) -> Result<(), SnapshotError>;
    /// Every stored blob, for collecting unreferenced ones.
    fn list(&self) -> Result<Vec<Digest>, SnapshotError>;
}

/// Hashes and counts what passes through to a file.
struct HashingWriter {
    file: File,
    digest: DigestWriter,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.digest.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Archives `dir` into a staged file under `staging` (hashed while it is
/// written), then puts it into `store`. The staged file never outlives the
/// call.
pub fn snapshot_dir(
    dir: &Path,
    shift: IdShift,
    limits: &Limits,
    store: &dyn BlobStore,
    staging: &Path,
) -> Result<(BlobRef, ArchiveStats), SnapshotError> {
    let staged = tempfile::Builder::new()
        .prefix("snapshot-")
        .tempfile_in(staging)
        .map_err(|e| SnapshotError::io("create staging file in", staging, e))?;
    let file = staged
        .as_file()
        .try_clone()
        .map_err(|e| SnapshotError::io("dup", staged.path(), e))?;
    let mut writer = io::BufWriter::with_capacity(
        1 << 20,
        HashingWriter {
            file,
            digest: DigestWriter::new(),
            size: 0,
        },
    );
    let stats = archive(dir, shift, limits, &mut writer)?;
    let writer = writer
        .into_inner()
        .map_err(|e| SnapshotError::Write(e.into_error()))?;
    writer
        .file
        .sync_all()
        .map_err(|e| SnapshotError::io("fsync", staged.path(), e))?;
    let blob = BlobRef {
        digest: writer.digest.finish(),
        size: writer.size,
    };
    // From here the store owns the path; `keep` stops the temp file's drop
    // from racing a rename. A failed put may leave it: remove it then.
    let (_, path) = staged
        .keep()
        .map_err(|e| SnapshotError::io("keep staging file", staging, e.error))?;
    if let Err(e) = store.put(&path, &blob) {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((blob, stats))
}

/// Restores `blob` into the empty directory `dir`, shifting ids.
///
/// The blob is verified while it streams (no second copy on disk, one read):
/// content is written before the digest is known, so on ANY error, a digest
/// mismatch at EOF included, `dir` is emptied again before returning. The
/// daemon hands `dir` to a sandbox only after this returned Ok, so nothing
/// sees unverified content. An archive error caused by tampered bytes is
/// reported as [`SnapshotError::DigestMismatch`]: the rest of the blob is
/// read to tell.
pub fn restore_dir(
    store: &dyn BlobStore,
    blob: &BlobRef,
    dir: &Path,
    shift: IdShift,
    limits: &Limits,
) -> Result<ArchiveStats, SnapshotError> {
    unarchive::check_empty(dir)?;
    let mut reader = store.open(blob)?;
    let result = unarchive(&mut reader, dir, shift, limits).and_then(|stats| {
        // The tar end marker may come before the blob's end: read to EOF
        // so that the digest is checked.
        io::copy(&mut reader, &mut io::sink()).map_err(read_error)?;
        Ok(stats)
    });
    match result {
        Ok(stats) => Ok(stats),
        Err(e) => {
            let e = match e {
                e @ SnapshotError::DigestMismatch { .. } => e,
                other => match io::copy(&mut reader, &mut io::sink()) {
                    Err(io) => match read_error(io) {
                        m @ SnapshotError::DigestMismatch { .. } => m,
                        _ => other,
                    },
                    Ok(_) => other,
                },
            };
            if let Err(clean) = unarchive::empty_dir(dir) {
                tracing::error!(dir = %dir.display(), error = %sandpit_errors::Chain(&clean), "emptying a failed restore");
            }
            Err(e)
        }
    }
}

/// A verification or size error carried by an `io::Error` as itself,
/// others as a read error.
pub(crate) fn read_error(e: io::Error) -> SnapshotError {
    match SnapshotError::from_io_ref(&e) {
        Some(SnapshotError::DigestMismatch { digest, detail }) => SnapshotError::DigestMismatch {
            digest: digest.clone(),
            detail: detail.clone(),
        },
        Some(SnapshotError::TooLarge { limit }) => SnapshotError::TooLarge { limit: *limit },
        _ => SnapshotError::Read(e),
    }
}
