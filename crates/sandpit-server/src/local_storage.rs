//! The embedded engine's volumes and snapshots: scratch and registered
//! volumes as quota'd directories under the data dir (`sandpit-volume`),
//! snapshots as content-addressed archives (`sandpit-snapshot`) kept under
//! the data dir or in an S3-compatible bucket. Blocking: the engine calls
//! it on tokio's blocking pool.
//!
//! ```text
//! <data-dir>/volumes/scratch/<sandbox-id>.<name>/   one scratch volume (ends with the sandbox)
//! <data-dir>/volumes/registered/vol-<hash>/          one registered volume's storage
//! <data-dir>/snapshots/sha256/<hex>                  one snapshot archive (local bucket)
//! <data-dir>/snapshots/tmp/                          archives being written (cleared at start)
//! ```

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use sandpit_image::IdShift;
use sandpit_runtime::BindMount;
use sandpit_snapshot::{BlobRef, BlobStore, Limits, LocalBlobStore, S3BlobStore, S3Config};
use sandpit_volume::{LocalVolumes, Medium as VolMedium, VolumeBackend, VolumeKey, VolumeRequest};

use crate::engine::{EngineError, SnapshotTaken, StorageOffer, VolumeUsage};
use crate::model::SandboxId;
use crate::storage::model::{LaunchSource, LaunchVolume, Medium, SnapshotBlob};
use crate::storageconfig::{StorageSettings, LOCAL_BUCKET};

/// Mode of a volume's root: writable by every user of the sandbox, as a
/// Kubernetes emptyDir is.
const VOLUME_MODE: u32 = 0o777;

fn storage_err(op: impl Into<String>, e: impl Into<crate::engine::BoxError>) -> EngineError {
    EngineError::Storage {
        op: op.into(),
        source: e.into(),
    }
}

/// Volumes and snapshots of the local engine.
#[derive(Debug)]
pub struct LocalStorage {
    settings: StorageSettings,
    scratch: LocalVolumes,
    registered: LocalVolumes,
    local_blobs: Arc<LocalBlobStore>,
    buckets: Mutex<HashMap<String, Arc<S3BlobStore>>>,
    staging: PathBuf,
    shift: IdShift,
}

impl LocalStorage {
    /// Opens the storage under `data_dir`; `shift` maps the sandboxes' ids.
    pub fn open(
        settings: StorageSettings,
        data_dir: &Path,
        shift: IdShift,
    ) -> Result<Self, EngineError> {
        let open_err = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
            storage_err(format!("open {what}"), e)
        };
        let scratch = LocalVolumes::open(&data_dir.join("volumes/scratch"))
            .map_err(|e| open_err("scratch volumes", e.into()))?;
        let registered = LocalVolumes::open(&data_dir.join("volumes/registered"))
            .map_err(|e| open_err("registered volumes", e.into()))?;
        let local_blobs = LocalBlobStore::open(&data_dir.join("snapshots"))
            .map_err(|e| open_err("snapshot store", e.into()))?;
        // Cleared by the store at open: what a killed daemon was writing.
        let staging = local_blobs.staging_dir();
        Ok(Self {
            settings,
            scratch,
            registered,
            local_blobs: Arc::new(local_blobs),
            buckets: Mutex::new(HashMap::new()),
            staging,
            shift,
        })
    }

    /// What the engine offers.
    pub fn offer(&self) -> StorageOffer {
        StorageOffer {
            scratch_default_size: self.settings.scratch_default_size,
            max_volume_size: self.settings.max_volume_size,
            snapshots: true,
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_content_bytes: self.settings.max_snapshot_size,
            max_entries: 1_000_000,
            max_depth: 256,
        }
    }

    /// The store of `bucket`: the data dir's for [`LOCAL_BUCKET`], an S3
    /// bucket of the configured endpoint otherwise.
    fn store(&self, bucket: &str) -> Result<Arc<dyn BlobStore>, EngineError> {
        if bucket == LOCAL_BUCKET {
            return Ok(self.local_blobs.clone());
        }
        let Some(s3) = &self.settings.s3 else {
            return Err(storage_err(
                format!("use bucket {bucket:?}"),
                "no S3 endpoint is configured ([storage.s3])",
            ));
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get(bucket) {
            return Ok(b.clone());
        }
        let store = S3BlobStore::new(&S3Config {
            bucket: bucket.to_owned(),
            ..s3.clone()
        })
        .map_err(|e| storage_err(format!("open bucket {bucket:?}"), e))?;
        let store = Arc::new(store);
        buckets.insert(bucket.to_owned(), store.clone());
        Ok(store)
    }

    fn owner(&self) -> (u32, u32) {
        (self.shift.base, self.shift.base)
    }

    fn scratch_key(id: &SandboxId, name: &str) -> Result<VolumeKey, EngineError> {
        format!("{}.{name}", id.as_str())
            .parse()
            .map_err(|e| storage_err(format!("volume {name:?}"), e))
    }

    fn registered_key(key: &str) -> Result<VolumeKey, EngineError> {
        key.parse()
            .map_err(|e| storage_err(format!("volume {key:?}"), e))
    }

    /// Sets up the sandbox's volumes (scratch ones made and restored,
    /// registered ones attached) and returns their mounts. On error what
    /// was made is removed again.
    pub fn prepare(
        &self,
        id: &SandboxId,
        volumes: &[LaunchVolume],
    ) -> Result<Vec<BindMount>, EngineError> {
        let mut mounts = Vec::new();
        for v in volumes {
            match self.prepare_one(id, v, &mut mounts) {
                Ok(()) => {}
                Err(e) => {
                    self.release(id);
                    return Err(e);
                }
            }
        }
        Ok(mounts)
    }

    fn prepare_one(
        &self,
        id: &SandboxId,
        v: &LaunchVolume,
        mounts: &mut Vec<BindMount>,
    ) -> Result<(), EngineError> {
        let (root, forced_ro) = match &v.source {
            LaunchSource::Scratch {
                size_bytes,
                medium,
                restore,
            } => {
                let key = Self::scratch_key(id, &v.name)?;
                let req = VolumeRequest {
                    size_bytes: *size_bytes,
                    medium: match medium {
                        Medium::Disk => VolMedium::Disk,
                        Medium::Memory => VolMedium::Memory,
                    },
                    owner: self.owner(),
                    mode: VOLUME_MODE,
                };
                let root = self
                    .scratch
                    .provision(&key, &req)
                    .map_err(|e| storage_err(format!("create scratch volume {:?}", v.name), e))?;
                if let Some(blob) = restore {
                    let store = self.store(&blob.bucket)?;
                    sandpit_snapshot::restore_dir(
                        store.as_ref(),
                        &BlobRef {
                            digest: blob.digest.clone(),
                            size: blob.size,
                        },
                        &root,
                        self.shift,
                        &self.limits(),
                    )
                    .map_err(|e| {
                        storage_err(format!("restore a snapshot into volume {:?}", v.name), e)
                    })?;
                }
                (root, false)
            }
            LaunchSource::Registered {
                key,
                size_bytes,
                read_only,
            } => {
                let key = Self::registered_key(key)?;
                let req = VolumeRequest {
                    size_bytes: *size_bytes,
                    medium: VolMedium::Disk,
                    owner: self.owner(),
                    mode: VOLUME_MODE,
                };
                let root = match self.registered.path(&key) {
                    Some(p) => p,
                    None => self
                        .registered
                        .provision(&key, &req)
                        .map_err(|e| storage_err(format!("attach volume {:?}", v.name), e))?,
                };
                (root, *read_only)
            }
        };
        for m in &v.mounts {
            if let Some(sub) = &m.sub_path {
                // Kubernetes makes a missing subPath; its components are
                // hostile (the volume's contents are the sandboxes').
                mkdir_beneath(&root, sub, self.owner()).map_err(|e| {
                    storage_err(format!("sub_path {sub:?} of volume {:?}", v.name), e)
                })?;
            }
            mounts.push(BindMount {
                source: root.clone(),
                sub_path: m.sub_path.clone(),
                target: m.mount_path.clone(),
                read_only: m.read_only || forced_ro,
            });
        }
        Ok(())
    }

    /// Removes the sandbox's scratch volumes (registered ones stay).
    pub fn release(&self, id: &SandboxId) {
        let prefix = format!("{}.", id.as_str());
        let keys = match self.scratch.list() {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %crate::chain(&e), "list scratch volumes");
                return;
            }
        };
        for key in keys.iter().filter(|k| k.as_str().starts_with(&prefix)) {
            if let Err(e) = self.scratch.remove(key) {
                tracing::warn!(sandbox_id = %id, volume = key.as_str(), error = %crate::chain(&e), "remove scratch volume");
            }
        }
    }

    /// Removes scratch volumes of sandboxes not in `keep`; returns how many.
    pub fn sweep(&self, keep: &HashSet<SandboxId>) -> usize {
        let Ok(keys) = self.scratch.list() else {
            return 0;
        };
        let mut removed = 0;
        for key in keys {
            let owner = key.as_str().split('.').next().unwrap_or_default();
            let kept = SandboxId::parse(owner).is_ok_and(|id| keep.contains(&id));
            if !kept && self.scratch.remove(&key).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Archives scratch volume `name` of sandbox `id` into `bucket`;
    /// `freeze` keeps the sandbox's processes still meanwhile.
    pub fn snapshot<G>(
        &self,
        id: &SandboxId,
        name: &str,
        bucket: &str,
        freeze: impl FnOnce() -> Result<G, EngineError>,
    ) -> Result<SnapshotTaken, EngineError> {
        let key = Self::scratch_key(id, name)?;
        let Some(root) = self.scratch.path(&key) else {
            return Err(storage_err(
                format!("snapshot volume {name:?}"),
                "the volume is not attached (did the sandbox end?)",
            ));
        };
        let store = self.store(bucket)?;
        let frozen = freeze()?;
        let result = sandpit_snapshot::snapshot_dir(
            &root,
            self.shift,
            &self.limits(),
            store.as_ref(),
            &self.staging,
        );
        drop(frozen);
        let (blob, stats) =
            result.map_err(|e| storage_err(format!("snapshot volume {name:?}"), e))?;
        Ok(SnapshotTaken {
            blob: SnapshotBlob {
                digest: blob.digest,
                size: blob.size,
                bucket: bucket.to_owned(),
            },
            content_bytes: stats.content_bytes,
            files: stats.files,
        })
    }

    /// Creates (or re-attaches) a registered volume's storage.
    pub fn provision_registered(
        &self,
        key: &str,
        capacity: u64,
    ) -> Result<VolumeUsage, EngineError> {
        let key = Self::registered_key(key)?;
        let req = VolumeRequest {
            size_bytes: capacity,
            medium: VolMedium::Disk,
            owner: self.owner(),
            mode: VOLUME_MODE,
        };
        self.registered
            .provision(&key, &req)
            .map_err(|e| storage_err("provision the volume's storage", e))?;
        let usage = self
            .registered
            .usage(&key)
            .map_err(|e| storage_err("read the volume's usage", e))?;
        Ok(VolumeUsage {
            used_bytes: usage.used_bytes,
            capacity_bytes: capacity,
        })
    }

    /// Removes a registered volume's storage.
    pub fn remove_registered(&self, key: &str) -> Result<(), EngineError> {
        let key = Self::registered_key(key)?;
        self.registered
            .remove(&key)
            .map_err(|e| storage_err("remove the volume's storage", e))
    }

    /// Removes archives of `bucket` not in `referenced`.
    pub fn gc(
        &self,
        bucket: &str,
        referenced: &HashSet<sandpit_image::Digest>,
    ) -> Result<usize, EngineError> {
        let store = self.store(bucket)?;
        let all = store
            .list()
            .map_err(|e| storage_err(format!("list bucket {bucket:?}"), e))?;
        let mut removed = 0;
        for d in all.iter().filter(|d| !referenced.contains(*d)) {
            store
                .delete(d)
                .map_err(|e| storage_err(format!("delete archive {d}"), e))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Checks that `bucket` can be listed.
    pub fn check_bucket(&self, bucket: &str) -> Result<(), EngineError> {
        let store = self.store(bucket)?;
        store
            .list()
            .map(|_| ())
            .map_err(|e| storage_err(format!("list bucket {bucket:?}"), e))
    }
}

/// Creates the directories of `rel` (relative, normalised) below `root`,
/// never following a symlink nor leaving `root`: each component is opened
/// by the directory fd of the one before, with `O_NOFOLLOW`.
fn mkdir_beneath(root: &Path, rel: &str, owner: (u32, u32)) -> nix::Result<()> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let mut dir: OwnedFd = nix::fcntl::open(root, flags, Mode::empty())?;
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        if c == ".." || c == "." {
            return Err(nix::errno::Errno::EINVAL);
        }
        match mkdirat(dir.as_fd(), c, Mode::from_bits_truncate(0o755)) {
            Ok(()) => {
                let next = openat(dir.as_fd(), c, flags, Mode::empty())?;
                nix::unistd::fchown(
                    next.as_fd(),
                    Some(nix::unistd::Uid::from_raw(owner.0)),
                    Some(nix::unistd::Gid::from_raw(owner.1)),
                )?;
                dir = next;
            }
            Err(nix::errno::Errno::EEXIST) => dir = openat(dir.as_fd(), c, flags, Mode::empty())?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_are_made_beneath_the_root_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        std::fs::create_dir(&root).unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        mkdir_beneath(&root, "a/b/c", me).unwrap();
        assert!(root.join("a/b/c").is_dir());
        // Again: what exists is fine.
        mkdir_beneath(&root, "a/b", me).unwrap();
        // A planted symlink pointing out of the volume is refused.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        assert!(mkdir_beneath(&root, "link/x", me).is_err());
        assert!(!outside.join("x").exists());
        assert!(mkdir_beneath(&root, "a/../..", me).is_err());
    }
}
