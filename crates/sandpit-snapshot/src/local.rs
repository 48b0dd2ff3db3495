//! [`LocalBlobStore`]: blobs as files under the daemon's data dir.
//!
//! ```text
//! <root>/sha256/<hex>   one blob, 0600, fsynced before it is renamed in
//! <root>/tmp/           staging (snapshots being written); cleared at open
//! ```
//!
//! `<root>` and both directories are 0700. A blob appears under its name
//! only complete and synced (rename, then fsync of the directory), so a
//! crash leaves either no blob or the whole one; leftovers in `tmp/` are
//! removed by the next open.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sandpit_image::Digest;

use crate::verify::VerifyingReader;
use crate::{BlobRef, BlobStore, SnapshotError};

/// Blobs in a directory; see the module docs.
#[derive(Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
}

fn private_dir(path: &Path) -> Result<(), SnapshotError> {
    fs::create_dir_all(path).map_err(|e| SnapshotError::io("create", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(|e| SnapshotError::io("chmod", path, e))
}

fn sync_dir(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io("fsync", path, e))
}

impl LocalBlobStore {
    /// Opens (creating) the store at `root` and clears its staging dir.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let store = Self { root: root.into() };
        private_dir(root)?;
        private_dir(&store.root.join("sha256"))?;
        let tmp = store.staging_dir();
        private_dir(&tmp)?;
        crate::unarchive::empty_dir(&tmp)?;
        Ok(store)
    }

    /// Where snapshots are best staged: on the same file system as the
    /// blobs, so that `put` is a rename.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The file that holds `digest`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Moves `staged` to `dest` (same file system: a rename; otherwise a
    /// copy into staging first).
    fn place(&self, staged: &Path, dest: &Path) -> Result<(), SnapshotError> {
        match fs::rename(staged, dest) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
            Err(e) => return Err(SnapshotError::io("rename", staged, e)),
        }
        let copy = tempfile::Builder::new()
            .prefix("put-")
            .tempfile_in(self.staging_dir())
            .map_err(|e| SnapshotError::io("create staging file in", self.staging_dir(), e))?;
        let mut src = File::open(staged).map_err(|e| SnapshotError::io("open", staged, e))?;
        io::copy(&mut src, &mut copy.as_file())
            .map_err(|e| SnapshotError::io("copy", staged, e))?;
        copy.as_file()
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| copy.as_file().sync_all())
            .map_err(|e| SnapshotError::io("fsync", copy.path(), e))?;
        copy.persist(dest)
            .map_err(|e| SnapshotError::io("rename", dest, e.error))?;
        fs::remove_file(staged).map_err(|e| SnapshotError::io("remove", staged, e))
    }
}

impl BlobStore for LocalBlobStore {
    fn location(&self) -> String {
        "local".into()
    }

    fn put(&self, staged: &Path, blob: &BlobRef) -> Result<(), SnapshotError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(staged)
            .map_err(|e| SnapshotError::io("open", staged, e))?;
        let meta = file
            .metadata()
            .map_err(|e| SnapshotError::io("stat", staged, e))?;
        if !meta.is_file() || meta.len() != blob.size {
            return Err(SnapshotError::DigestMismatch {
                digest: blob.digest.clone(),
                detail: format!("staged file has {} bytes, not {}", meta.len(), blob.size),
            });
        }
        let dest = self.blob_path(&blob.digest);
        if self.exists(&blob.digest)? {
            drop(file);
            return fs::remove_file(staged).map_err(|e| SnapshotError::io("remove", staged, e));
        }
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.sync_all())
            .map_err(|e| SnapshotError::io("fsync", staged, e))?;
        drop(file);
        self.place(staged, &dest)?;
        sync_dir(&self.root.join("sha256"))
    }

    fn open(&self, blob: &BlobRef) -> Result<Box<dyn Read + Send>, SnapshotError> {
        let path = self.blob_path(&blob.digest);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::NotFound {
                    digest: blob.digest.clone(),
                })
            }
            Err(e) => return Err(SnapshotError::io("open", path, e)),
        };
        let reader = BufReader::with_capacity(1 << 20, file);
        Ok(Box::new(VerifyingReader::new(reader, blob.clone())))
    }

    fn exists(&self, digest: &Digest) -> Result<bool, SnapshotError> {
        let path = self.blob_path(digest);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SnapshotError::io("stat", path, e)),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<(), SnapshotError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SnapshotError::io("remove", path, e)),
        }
    }

    fn list(&self) -> Result<Vec<Digest>, SnapshotError> {
        let dir = self.root.join("sha256");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| SnapshotError::io("list", &dir, e))? {
            let entry = entry.map_err(|e| SnapshotError::io("list", &dir, e))?;
            match entry.file_name().to_str().map(Digest::from_sha256_hex) {
                Some(Ok(d)) => out.push(d),
                _ => tracing::warn!(path = %entry.path().display(), "not a blob, ignored"),
            }
        }
        out.sort();
        Ok(out)
    }
}
