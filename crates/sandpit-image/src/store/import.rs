//! Importing layers: a blob is read once, decompressed, counted and hashed
//! on the way (blob digest, diff id, size caps) while the unpacker writes
//! the tar into a staging directory under `tmp/`, which becomes visible
//! under `layers/` by one rename once everything is verified.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use super::{unique_name, write_file_synced, ImageStore, ROOTFS_MAX_BYTES};
use crate::unpack::Unpacker;
use crate::{
    Compression, Digest, DigestWriter, Image, ImageConfig, ImageError, LayerInfo, Reference,
};

const IO_BUF: usize = 1 << 20;

/// Byte count and running sha256 of a stream, shared with the reader that
/// feeds it.
#[derive(Debug)]
struct Tally {
    hasher: Option<DigestWriter>,
    bytes: u64,
    limit: u64,
    exceeded: bool,
}

impl Tally {
    fn new(hash: bool, limit: u64) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self {
            hasher: hash.then(DigestWriter::new),
            bytes: 0,
            limit,
            exceeded: false,
        }))
    }

    /// The digest of everything read so far.
    fn digest(&self) -> Option<Digest> {
        self.hasher.as_ref().map(DigestWriter::digest)
    }
}

/// A reader that counts and hashes what passes through it and fails once
/// more than the tally's limit has been read.
#[derive(Debug)]
struct Tallying<R> {
    inner: R,
    tally: Rc<RefCell<Tally>>,
}

impl<R> Tallying<R> {
    fn new(inner: R, tally: Rc<RefCell<Tally>>) -> Self {
        Self { inner, tally }
    }
}

impl<R: Read> Read for Tallying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut t = self.tally.borrow_mut();
        t.bytes += n as u64;
        if t.bytes > t.limit {
            t.exceeded = true;
            return Err(io::Error::other("size limit exceeded"));
        }
        if let Some(h) = &mut t.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Removes a staging directory on drop unless disarmed.
pub(super) struct Staging {
    path: Option<PathBuf>,
}

impl Staging {
    pub(super) fn path(&self) -> &Path {
        self.path.as_deref().expect("staging dir already taken")
    }

    pub(super) fn disarm(&mut self) -> PathBuf {
        self.path.take().expect("staging dir already taken")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove staging dir");
            }
        }
    }
}

impl ImageStore {
    /// Imports a rootfs tarball (e.g. from `mmdebstrap`) as a one-layer
    /// image: [`ImageStore::import_layer`] without compression, capped at
    /// [`ROOTFS_MAX_BYTES`], then [`ImageStore::put_image`].
    pub fn import_rootfs_tar(
        &self,
        reference: &Reference,
        reader: impl Read,
        config: ImageConfig,
    ) -> Result<Image, ImageError> {
        let _lock = self.lock_shared()?;
        let started = Instant::now();
        let layer =
            self.import_layer_locked(reader, Compression::None, None, None, ROOTFS_MAX_BYTES)?;
        let image = self.put_image_locked(
            reference,
            std::slice::from_ref(&layer.diff_id),
            config,
            None,
        )?;
        tracing::info!(
            reference = %image.reference,
            layer = %layer.diff_id,
            bytes = layer.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "rootfs imported"
        );
        Ok(image)
    }

    /// Imports one layer blob. The blob (`digest`) and the uncompressed tar
    /// (`diff_id`) are hashed while the tar is unpacked into `tmp/`; the
    /// result is renamed to `layers/sha256/<diff id hex>` or dropped when that
    /// layer is already there. Fails, leaving nothing behind, when the digest
    /// differs from `expected_digest` (`sha256:<hex>` of the blob as it
    /// arrives), when the uncompressed tar, the blob or the unpacked content
    /// exceeds `max_unpacked_bytes`, or on a refused entry (see the crate
    /// documentation: `..`, writes through symlinks, hard links leaving the
    /// layer).
    ///
    /// A layer no image references yet is protected from [`ImageStore::gc`]
    /// in this process for ten minutes, time for a pull to call
    /// [`ImageStore::put_image`].
    pub fn import_layer(
        &self,
        reader: impl Read,
        compression: Compression,
        expected_digest: Option<&Digest>,
        max_unpacked_bytes: u64,
    ) -> Result<LayerInfo, ImageError> {
        self.import_layer_verified(
            reader,
            compression,
            expected_digest,
            None,
            max_unpacked_bytes,
        )
    }

    /// [`ImageStore::import_layer`] that also checks the diff id (the
    /// sha256 of the uncompressed tar) against `expected_diff_id`, e.g. the
    /// image config's `rootfs.diff_ids`, before the layer becomes visible: a
    /// mismatch ([`ImageError::DiffIdMismatch`]) leaves nothing behind.
    pub fn import_layer_verified(
        &self,
        reader: impl Read,
        compression: Compression,
        expected_digest: Option<&Digest>,
        expected_diff_id: Option<&Digest>,
        max_unpacked_bytes: u64,
    ) -> Result<LayerInfo, ImageError> {
        let _lock = self.lock_shared()?;
        self.import_layer_locked(
            reader,
            compression,
            expected_digest,
            expected_diff_id,
            max_unpacked_bytes,
        )
    }

    fn import_layer_locked(
        &self,
        reader: impl Read,
        compression: Compression,
        expected_digest: Option<&Digest>,
        expected_diff_id: Option<&Digest>,
        limit: u64,
    ) -> Result<LayerInfo, ImageError> {
        if let Some(expected) = expected_digest {
            // Uncompressed: the blob digest is the diff id.
            if compression == Compression::None && self.has_layer(expected) {
                if let Some(diff_id) = expected_diff_id.filter(|d| *d != expected) {
                    return Err(ImageError::DiffIdMismatch {
                        expected: diff_id.clone(),
                        actual: expected.clone(),
                    });
                }
                self.mark_fresh(expected);
                return self.layer(expected);
            }
        }

        let mut staging = self.new_staging()?;
        let rootfs = staging.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(|e| ImageError::io("create", &rootfs, e))?;

        let blob_tally = Tally::new(compression != Compression::None, limit);
        let tar_tally = Tally::new(true, limit);
        let mut unpacker = Unpacker::new(&rootfs, self.shift, limit)?;
        let result = (|| -> Result<(), ImageError> {
            let mut blob =
                Tallying::new(BufReader::with_capacity(IO_BUF, reader), blob_tally.clone());
            {
                let decoded: Box<dyn Read + '_> = match compression {
                    Compression::None => Box::new(&mut blob),
                    Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut blob)),
                    // The decoder's default window cap (128 MiB) bounds its
                    // memory; the tar tally bounds the output.
                    Compression::Zstd => Box::new(
                        zstd::stream::read::Decoder::new(&mut blob).map_err(ImageError::Archive)?,
                    ),
                };
                let tar = Tallying::new(decoded, tar_tally.clone());
                let mut archive = tar::Archive::new(BufReader::with_capacity(IO_BUF, tar));
                unpacker.unpack(&mut archive)?;
                // The diff id covers the whole tar, padding after the end
                // marker included.
                io::copy(&mut archive.into_inner(), &mut io::sink())
                    .map_err(ImageError::Archive)?;
            }
            io::copy(&mut blob, &mut io::sink()).map_err(ImageError::Archive)?;
            Ok(())
        })();
        if let Err(e) = result {
            if blob_tally.borrow().exceeded || tar_tally.borrow().exceeded {
                return Err(ImageError::TooLarge { limit });
            }
            return Err(e);
        }

        let diff_id = tar_tally.borrow().digest().expect("tar is hashed");
        let digest = blob_tally.borrow().digest();
        let actual = digest.as_ref().unwrap_or(&diff_id);
        if let Some(expected) = expected_digest {
            if expected != actual {
                return Err(ImageError::DigestMismatch {
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
        }
        if let Some(expected) = expected_diff_id {
            if *expected != diff_id {
                return Err(ImageError::DiffIdMismatch {
                    expected: expected.clone(),
                    actual: diff_id,
                });
            }
        }
        let info = LayerInfo {
            diff_id: diff_id.clone(),
            digest,
            size: unpacker.stats.content_bytes,
        };
        drop(unpacker);
        let meta_path = staging.path().join("layer.json");
        write_file_synced(
            &meta_path,
            &serde_json::to_vec_pretty(&info).expect("layer info serialises"),
        )?;
        // Durable before visible: a layer in place is never torn.
        let dir =
            File::open(staging.path()).map_err(|e| ImageError::io("open", staging.path(), e))?;
        nix::unistd::syncfs(&dir).map_err(|e| ImageError::io("sync", staging.path(), e.into()))?;

        let target = self.layer_dir(&diff_id);
        let result = match fs::rename(staging.path(), &target) {
            Ok(()) => {
                staging.disarm();
                tracing::debug!(layer = %diff_id, "layer stored");
                Ok(info)
            }
            // The layer is already there (another import won): reuse it.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                tracing::debug!(layer = %diff_id, "layer already stored");
                self.layer(&diff_id)
            }
            Err(e) => Err(ImageError::io("rename", &target, e)),
        };
        if result.is_ok() {
            self.mark_fresh(&diff_id);
        }
        result
    }

    pub(super) fn new_staging(&self) -> Result<Staging, ImageError> {
        let path = self.root.join("tmp").join(unique_name("layer-"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| ImageError::io("create", &path, e))?;
        Ok(Staging { path: Some(path) })
    }

    pub(super) fn mark_fresh(&self, diff_id: &Digest) {
        let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        fresh.insert(diff_id.clone(), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_hashes_and_limits() {
        let tally = Tally::new(true, 10);
        let mut r = Tallying::new(&b"hello"[..], tally.clone());
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(tally.borrow().bytes, 5);
        assert_eq!(
            tally.borrow().digest().unwrap(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let tally = Tally::new(false, 3);
        let mut r = Tallying::new(&b"hello"[..], tally.clone());
        assert!(io::copy(&mut r, &mut io::sink()).is_err());
        assert!(tally.borrow().exceeded);
        assert_eq!(tally.borrow().digest(), None);
    }
}
