//! Committing a sandbox's writable layer: copied (see `commit.rs` at the
//! crate root) into a staging directory under `tmp/`, renamed into
//! `layers/sha256/<diff id>` (or dropped when that layer is already there),
//! then named by an image record like any pulled layer, so `gc`, leases and
//! `image rm` treat it the same way.

use std::fs::{self, File};
use std::path::Path;
use std::time::Instant;

use super::ImageStore;
use crate::commit::Copier;
use crate::{Image, ImageError, LayerInfo, Reference};

/// What [`ImageStore::commit_layer`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedLayer {
    /// The layer (its diff id is the sha256 of the equivalent OCI tar).
    pub layer: LayerInfo,
    /// Entries copied: files, directories, symlinks, hard links,
    /// whiteouts.
    pub entries: u64,
    /// Device nodes, FIFOs and sockets left out.
    pub skipped: u64,
    /// The layer was already in the store: the copy was dropped.
    pub deduplicated: bool,
}

impl ImageStore {
    /// Copies an overlay writable layer (`upper`: a sandbox's, hostile) into
    /// a new layer of the store. Whiteouts and opaque directories are kept,
    /// ownership is kept as stored (already shifted), symlinks are never
    /// followed; see the crate's `commit` module for what is kept and how
    /// the diff id is computed. The copy is staged under `tmp/` and renamed
    /// into place once complete and synced; a layer with the same diff id
    /// already there is reused and the copy dropped. Fails, leaving nothing
    /// behind, on an entry it refuses or past the bounds
    /// ([`COMMIT_MAX_BYTES`](crate::COMMIT_MAX_BYTES) and friends).
    ///
    /// The caller quiesces `upper` (freezes the sandbox) for a consistent
    /// copy. Like an imported one, the layer is protected from `gc` in this
    /// process for ten minutes until an image names it.
    pub fn commit_layer(&self, upper: &Path) -> Result<CommittedLayer, ImageError> {
        let _lock = self.lock_shared()?;
        self.commit_layer_locked(upper)
    }

    fn commit_layer_locked(&self, upper: &Path) -> Result<CommittedLayer, ImageError> {
        let started = Instant::now();
        let staging = self.new_staging()?;
        let rootfs = staging.path().join("rootfs");
        fs::create_dir(&rootfs).map_err(|e| ImageError::io("create", &rootfs, e))?;
        let (diff_id, stats) = Copier::new(&rootfs, self.shift)?.copy(upper)?;
        let info = LayerInfo {
            diff_id: diff_id.clone(),
            digest: None,
            size: stats.content_bytes,
        };
        let target = self.layer_dir(&diff_id);
        let committed = |layer, deduplicated| CommittedLayer {
            layer,
            entries: stats.entries,
            skipped: stats.skipped,
            deduplicated,
        };
        if self.has_layer(&diff_id) {
            // Dropped with `staging`.
            self.mark_fresh(&diff_id);
            return Ok(committed(self.layer(&diff_id)?, true));
        }
        let (layer, deduplicated) = self.place(staging, &target, info)?;
        tracing::debug!(
            layer = %diff_id,
            entries = stats.entries,
            bytes = stats.content_bytes,
            deduplicated,
            elapsed_us = started.elapsed().as_micros() as u64,
            "layer committed"
        );
        Ok(committed(layer, deduplicated))
    }

    /// Writes `layer.json`, syncs, renames the staging dir to `target`;
    /// reuses the layer another writer put there first.
    fn place(
        &self,
        mut staging: super::import::Staging,
        target: &Path,
        info: LayerInfo,
    ) -> Result<(LayerInfo, bool), ImageError> {
        let meta_path = staging.path().join("layer.json");
        super::write_file_synced(
            &meta_path,
            &serde_json::to_vec_pretty(&info).expect("layer info serialises"),
        )?;
        // Durable before visible: a layer in place is never torn.
        let dir =
            File::open(staging.path()).map_err(|e| ImageError::io("open", staging.path(), e))?;
        nix::unistd::syncfs(&dir).map_err(|e| ImageError::io("sync", staging.path(), e.into()))?;
        let result = match fs::rename(staging.path(), target) {
            Ok(()) => {
                staging.disarm();
                Ok((info.clone(), false))
            }
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTEMPTY)
                    || e.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok((self.layer(&info.diff_id)?, true))
            }
            Err(e) => Err(ImageError::io("rename", target, e)),
        };
        if result.is_ok() {
            self.mark_fresh(&info.diff_id);
        }
        result
    }

    /// Commits `upper` ([`ImageStore::commit_layer`]) and writes the record
    /// of `reference`: `base`'s layers plus the new one on top, `base`'s
    /// config. Replaces any record of `reference`.
    pub fn commit(
        &self,
        base: &Image,
        upper: &Path,
        reference: &Reference,
    ) -> Result<(Image, CommittedLayer), ImageError> {
        let _lock = self.lock_shared()?;
        let committed = self.commit_layer_locked(upper)?;
        let mut layers = base.layers.clone();
        layers.push(committed.layer.diff_id.clone());
        let image = self.put_image_locked(reference, &layers, base.config.clone(), None)?;
        Ok((image, committed))
    }
}
