//! Volumes and file-system snapshots (issue 14), above the engine: the
//! records (registered volumes, snapshots, bucket choices, in
//! [`catalog::Catalog`]), who may use what (everything is per principal:
//! another principal's id is NOT_FOUND), and the order of things (a volume
//! mounted by a sandbox is not deleted; a snapshot is READY only once its
//! archive is stored; an archive is collected only once no record names
//! it). The engine does the work on the host ([`Engine::storage`] and the
//! methods after it).
//!
//! Handlers in `api/volumes.rs` and `api/snapshots.rs` only delegate here.

pub mod catalog;
pub mod error;
pub mod model;
mod snapshots;
mod volumes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prost::Message;
use sandpit_proto::sandbox::v1 as pb;

pub use error::StorageError;
pub use volumes::{NewVolume, VolumeUpdate};

use crate::engine::Engine;
use crate::manager::Manager;
use crate::model::{Principal, SandboxId, SandboxRecord};
use crate::storageconfig::StorageSettings;
use catalog::Catalog;
use model::{
    BucketConfig, LaunchSource, LaunchVolume, RequestedSource, SnapshotState, VolumeRequest,
    VolumeState,
};

/// The storage service of one daemon.
pub struct Storage<E: Engine> {
    inner: Arc<Inner<E>>,
}

impl<E: Engine> Clone for Storage<E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Inner<E: Engine> {
    manager: Manager<E>,
    catalog: Arc<Catalog>,
    settings: StorageSettings,
    runner_id: String,
    /// One snapshot of a sandbox at a time (its freezer is not nested),
    /// and none while it is being deleted.
    sandbox_locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
    /// Registered volumes resolved for creates that have no record yet:
    /// `(principal, volume_id)` -> how many.
    pending_mounts: Mutex<HashMap<(Principal, String), usize>>,
    /// Held shared from an archive's upload until its record is READY,
    /// exclusively by the collector: a fresh archive is never collected.
    gc_lock: tokio::sync::RwLock<()>,
    /// Held from a registered volume's READY check to its pending count in
    /// a create, and from the in-use check to DELETING in a delete: the two
    /// never interleave.
    volume_lock: tokio::sync::Mutex<()>,
}

impl<E: Engine> std::fmt::Debug for Storage<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl<E: Engine> std::fmt::Debug for PendingMounts<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMounts")
            .field("keys", &self.keys)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases the pending mounts of one create when dropped.
pub struct PendingMounts<E: Engine> {
    storage: Storage<E>,
    keys: Vec<(Principal, String)>,
}

impl<E: Engine> Drop for PendingMounts<E> {
    fn drop(&mut self) {
        let mut pending = lock(&self.storage.inner.pending_mounts);
        for key in self.keys.drain(..) {
            if let Some(n) = pending.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    pending.remove(&key);
                }
            }
        }
    }
}

impl<E: Engine> Storage<E> {
    /// Opens the catalog and settles what a previous daemon left: snapshots
    /// it was taking are FAILED (never half-visible), archives no record
    /// names are collected.
    pub async fn start(
        manager: Manager<E>,
        catalog: Catalog,
        settings: StorageSettings,
        runner_id: String,
    ) -> Result<Self, StorageError> {
        let storage = Self {
            inner: Arc::new(Inner {
                manager,
                catalog: Arc::new(catalog),
                settings,
                runner_id,
                sandbox_locks: Mutex::new(HashMap::new()),
                pending_mounts: Mutex::new(HashMap::new()),
                gc_lock: tokio::sync::RwLock::new(()),
                volume_lock: tokio::sync::Mutex::new(()),
            }),
        };
        let now = storage.inner.manager.now();
        let failed = storage
            .db(move |c| {
                c.fail_unfinished(
                    "interrupted: the daemon restarted while it was being taken",
                    now,
                )
            })
            .await?;
        if failed > 0 {
            tracing::warn!(failed, "snapshots interrupted by a restart marked FAILED");
        }
        if storage.offered() {
            let bucket = storage.inner.settings.managed_bucket();
            if let Err(e) = storage.collect(&bucket).await {
                tracing::warn!(error = %crate::chain(&e), "snapshot collection at start-up");
            }
        }
        Ok(storage)
    }

    /// Whether the engine offers storage at all.
    pub fn offered(&self) -> bool {
        self.inner.settings.enabled && self.inner.manager.engine().storage().is_some()
    }

    fn snapshots_offered(&self) -> bool {
        self.inner.settings.enabled
            && self
                .inner
                .manager
                .engine()
                .storage()
                .is_some_and(|o| o.snapshots)
    }

    /// Runs `f` on the catalog on the blocking pool.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Catalog) -> Result<T, catalog::CatalogError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let catalog = Arc::clone(&self.inner.catalog);
        Ok(tokio::task::spawn_blocking(move || f(&catalog))
            .await
            .map_err(|_| StorageError::Task)??)
    }

    fn sandbox_lock(&self, id: &SandboxId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.inner.sandbox_locks);
        // Locks of sandboxes nobody holds go: the map stays small.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(locks.entry(id.clone()).or_default())
    }

    /// Waits for snapshots of the sandbox being taken, and keeps new ones
    /// out while the guard lives (a delete holds it).
    pub async fn quiesce(&self, id: &SandboxId) -> tokio::sync::OwnedMutexGuard<()> {
        self.sandbox_lock(id).lock_owned().await
    }

    /// Turns a create's checked volumes into what the engine sets up:
    /// snapshots to restore and registered volumes are looked up (the
    /// caller's, READY). The guard keeps the registered volumes from being
    /// deleted until the create's record exists; drop it after
    /// [`Manager::create`] returned.
    pub async fn resolve(
        &self,
        principal: &Principal,
        requests: &[VolumeRequest],
    ) -> Result<(Vec<LaunchVolume>, PendingMounts<E>), StorageError> {
        let mut guard = PendingMounts {
            storage: self.clone(),
            keys: Vec::new(),
        };
        let mut out = Vec::with_capacity(requests.len());
        for (i, req) in requests.iter().enumerate() {
            let field = format!("sandbox.spec.volumes[{i}]");
            let mut registered_root = String::new();
            let source = match &req.source {
                RequestedSource::Scratch {
                    size_bytes,
                    medium,
                    restore_from,
                } => {
                    let restore = match restore_from {
                        None => None,
                        Some(id) => Some(self.restorable(principal, id).await?),
                    };
                    let size_bytes = size_bytes.unwrap_or(self.inner.settings.scratch_default_size);
                    LaunchSource::Scratch {
                        size_bytes,
                        medium: *medium,
                        restore,
                    }
                }
                RequestedSource::Registered { volume_id } => {
                    let _ops = self.inner.volume_lock.lock().await;
                    let (p, id) = (principal.clone(), volume_id.clone());
                    let v = self
                        .db(move |c| c.volume(&p, &id))
                        .await?
                        .ok_or_else(|| StorageError::VolumeNotFound(volume_id.clone()))?;
                    if v.state != VolumeState::Ready {
                        return Err(StorageError::VolumeNotReady {
                            id: v.volume_id,
                            state: v.state.as_str(),
                            reason: v.state_reason,
                        });
                    }
                    let key = (principal.clone(), v.volume_id.clone());
                    *lock(&self.inner.pending_mounts)
                        .entry(key.clone())
                        .or_default() += 1;
                    guard.keys.push(key);
                    registered_root = v.sub_path.clone();
                    LaunchSource::Registered {
                        key: v.storage_key(),
                        size_bytes: v.capacity_bytes,
                        read_only: v.read_only,
                    }
                }
            };
            let mut mounts = req.mounts.clone();
            // A registered volume's own root inside its claim comes first.
            if !registered_root.is_empty() {
                for m in &mut mounts {
                    m.sub_path = Some(match &m.sub_path {
                        Some(s) => format!("{registered_root}/{s}"),
                        None => registered_root.clone(),
                    });
                }
            }
            if mounts.is_empty() {
                tracing::debug!(field, volume = req.name, "volume declared but not mounted");
            }
            out.push(LaunchVolume {
                name: req.name.clone(),
                source,
                mounts,
            });
        }
        Ok((out, guard))
    }

    /// How many sandboxes mount the volume now, live or being created.
    pub fn attached_count(&self, principal: &Principal, id: &str) -> usize {
        self.live_mounts(principal, id).len() + self.pending_mounts(principal, id)
    }

    fn pending_mounts(&self, principal: &Principal, volume_id: &str) -> usize {
        lock(&self.inner.pending_mounts)
            .get(&(principal.clone(), volume_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Live sandboxes of `principal` that mount registered volume
    /// `volume_id`, by id.
    fn live_mounts(&self, principal: &Principal, volume_id: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .manager
            .live_records(principal)
            .iter()
            .filter(|r| {
                sandbox_volumes(r)
                    .iter()
                    .any(|v| matches!(&v.source, Some(pb::sandbox_volume::Source::VolumeId(id)) if id == volume_id))
            })
            .map(|r| r.id.to_string())
            .collect();
        ids.sort();
        ids
    }

    /// What mounts the volume, for a refusal: live sandboxes by id, and a
    /// note for creates in flight.
    fn mounted_by(&self, principal: &Principal, volume_id: &str) -> Vec<String> {
        let mut users = self.live_mounts(principal, volume_id);
        let pending = self.pending_mounts(principal, volume_id);
        if pending > 0 {
            users.push(format!("{pending} sandbox(es) being created"));
        }
        users
    }

    /// The caller's snapshot bucket choice.
    pub async fn bucket_config(
        &self,
        principal: &Principal,
    ) -> Result<(BucketConfig, String), StorageError> {
        let p = principal.clone();
        let config = self.db(move |c| c.bucket_config(&p)).await?;
        let effective = self.effective_bucket(&config);
        Ok((config, effective))
    }

    fn effective_bucket(&self, config: &BucketConfig) -> String {
        if config.bucket_name.is_empty() {
            self.inner.settings.managed_bucket()
        } else {
            config.bucket_name.clone()
        }
    }

    /// Stores the caller's bucket choice once the engine could use it.
    pub async fn set_bucket_config(
        &self,
        principal: &Principal,
        config: BucketConfig,
    ) -> Result<(BucketConfig, String), StorageError> {
        if !self.snapshots_offered() {
            return Err(StorageError::NotSupported("file-system snapshots"));
        }
        if !config.bucket_name.is_empty() {
            if !crate::storageconfig::valid_bucket(&config.bucket_name) {
                return Err(StorageError::invalid(
                    "file_system_snapshot_bucket_config.bucket_name",
                    format!("{:?} is not an S3 bucket name", config.bucket_name),
                ));
            }
            self.inner
                .manager
                .engine()
                .check_bucket(&config.bucket_name)
                .await
                .map_err(|source| StorageError::BucketUnavailable {
                    bucket: config.bucket_name.clone(),
                    source,
                })?;
        }
        let p = principal.clone();
        let stored = config.clone();
        self.db(move |c| c.put_bucket_config(&p, &stored)).await?;
        let effective = self.effective_bucket(&config);
        Ok((config, effective))
    }

    /// Removes the archives of `bucket` that no record names.
    async fn collect(&self, bucket: &str) -> Result<usize, StorageError> {
        let _gc = self.inner.gc_lock.write().await;
        let b = bucket.to_owned();
        let referenced = self.db(move |c| c.referenced_digests(&b)).await?;
        let referenced = referenced.iter().filter_map(|d| d.parse().ok()).collect();
        let removed = self
            .inner
            .manager
            .engine()
            .gc_snapshots(bucket, referenced)
            .await?;
        if removed > 0 {
            tracing::info!(bucket, removed, "unreferenced snapshot archives collected");
        }
        Ok(removed)
    }

    fn runner_id(&self) -> &str {
        &self.inner.runner_id
    }
}

/// The volumes a sandbox was created with (from its stored spec).
pub fn sandbox_volumes(r: &SandboxRecord) -> Vec<pb::SandboxVolume> {
    pb::SandboxSpec::decode(r.spec_echo.as_slice())
        .map(|s| s.volumes)
        .unwrap_or_default()
}

/// Whether a sandbox volume is a scratch one (proto3: an unset source is).
pub fn is_scratch(v: &pb::SandboxVolume) -> bool {
    !matches!(v.source, Some(pb::sandbox_volume::Source::VolumeId(_)))
}

impl SnapshotState {
    /// Usable as a restore source.
    pub fn is_ready(self) -> bool {
        self == SnapshotState::Ready
    }
}
