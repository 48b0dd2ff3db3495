//! File-system snapshots of scratch volumes: taken by the engine with the
//! sandbox frozen, stored content-addressed (so equal contents share one
//! archive), READY only once the archive is stored, immutable afterwards,
//! and collected once no record names their archive.

use std::time::SystemTime;

use super::model::{SnapshotBlob, SnapshotRecord, SnapshotState, Trigger};
use super::{is_scratch, sandbox_volumes, Storage, StorageError};
use crate::engine::Engine;
use crate::model::{Principal, SandboxId, SandboxRecord, State};

/// Most snapshots a principal lists in one page.
const MAX_PAGE: usize = 1000;

impl<E: Engine> Storage<E> {
    /// A READY snapshot of the caller's, to restore from.
    pub(super) async fn restorable(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SnapshotBlob, StorageError> {
        let s = self.snapshot(principal, id).await?;
        match (&s.blob, s.state) {
            (Some(blob), SnapshotState::Ready) => Ok(blob.clone()),
            _ => Err(StorageError::SnapshotNotReady {
                id: s.id,
                state: s.state.as_str(),
                reason: s.state_reason,
            }),
        }
    }

    /// The caller's snapshot (another principal's is NOT_FOUND).
    pub async fn snapshot(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<SnapshotRecord, StorageError> {
        let i = id.to_owned();
        match self.db(move |c| c.snapshot(&i)).await? {
            Some(s) if &s.principal == principal => Ok(s),
            _ => Err(StorageError::SnapshotNotFound(id.to_owned())),
        }
    }

    /// The caller's snapshots, oldest first, optionally of one sandbox;
    /// `(page, next offset)`.
    pub async fn snapshots(
        &self,
        principal: &Principal,
        source: Option<&str>,
        offset: usize,
        page_size: usize,
    ) -> Result<(Vec<SnapshotRecord>, Option<usize>), StorageError> {
        let p = principal.clone();
        let all = self.db(move |c| c.snapshots(&p)).await?;
        let matching: Vec<SnapshotRecord> = all
            .into_iter()
            .filter(|s| source.is_none_or(|id| s.source_sandbox.as_str() == id))
            .collect();
        let size = if page_size == 0 {
            MAX_PAGE
        } else {
            page_size.min(MAX_PAGE)
        };
        let page: Vec<SnapshotRecord> = matching.iter().skip(offset).take(size).cloned().collect();
        let next = (offset + page.len() < matching.len()).then_some(offset + page.len());
        Ok((page, next))
    }

    /// The scratch volume of `record` a snapshot request names (or the only
    /// one, when it names none).
    fn scratch_volume_of(
        record: &SandboxRecord,
        name: Option<&str>,
    ) -> Result<String, StorageError> {
        let volumes = sandbox_volumes(record);
        match name {
            Some(n) => match volumes.iter().find(|v| v.name == n) {
                Some(v) if is_scratch(v) => Ok(n.to_owned()),
                Some(_) => Err(StorageError::NotSnapshottable(format!(
                    "volume {n:?} of sandbox {} is a registered volume; only scratch volumes are snapshotted",
                    record.id
                ))),
                None => Err(StorageError::NotSnapshottable(format!(
                    "sandbox {} has no volume {n:?}",
                    record.id
                ))),
            },
            None => {
                let scratch: Vec<&str> = volumes
                    .iter()
                    .filter(|v| is_scratch(v))
                    .map(|v| v.name.as_str())
                    .collect();
                match scratch[..] {
                    [one] => Ok(one.to_owned()),
                    [] => Err(StorageError::NotSnapshottable(format!(
                        "sandbox {} has no scratch volume",
                        record.id
                    ))),
                    _ => Err(StorageError::invalid(
                        "scratch_volume_name",
                        format!("required: sandbox {} has several scratch volumes ({})", record.id, scratch.join(", ")),
                    )),
                }
            }
        }
    }

    fn new_record(
        &self,
        principal: &Principal,
        sandbox: &SandboxId,
        volume: &str,
        trigger: Trigger,
        bucket: String,
        request_id: Option<String>,
    ) -> SnapshotRecord {
        let now = self.inner.manager.now();
        SnapshotRecord {
            id: format!("fss-{}", SandboxId::generate().as_str()),
            principal: principal.clone(),
            state: SnapshotState::Creating,
            state_reason: String::new(),
            trigger,
            source_sandbox: sandbox.clone(),
            source_volume: volume.to_owned(),
            blob: None,
            bucket,
            content_bytes: 0,
            request_id,
            create_time: now,
            complete_time: None,
            update_time: now,
        }
    }

    /// The sandbox, which must be the caller's and running.
    fn running_sandbox(
        &self,
        principal: &Principal,
        id: &SandboxId,
    ) -> Result<SandboxRecord, StorageError> {
        let record = self.inner.manager.get(principal, id)?;
        if record.state != State::Running {
            return Err(StorageError::SandboxNotRunning {
                id: id.to_string(),
                state: record.state.to_string(),
            });
        }
        Ok(record)
    }

    /// CreateFileSystemSnapshot: records the snapshot CREATING and takes it
    /// in a task of its own (the client polls GetFileSystemSnapshot). A
    /// retry with the same `request_id` returns the first one.
    pub async fn create_snapshot(
        &self,
        principal: &Principal,
        sandbox: &SandboxId,
        volume: Option<&str>,
        request_id: Option<String>,
    ) -> Result<SnapshotRecord, StorageError> {
        if !self.snapshots_offered() {
            return Err(StorageError::NotSupported("file-system snapshots"));
        }
        let record = self.running_sandbox(principal, sandbox)?;
        let volume = Self::scratch_volume_of(&record, volume)?;
        if let Some(rid) = &request_id {
            let (p, r, v) = (principal.clone(), rid.clone(), volume.clone());
            if let Some(existing) = self.db(move |c| c.snapshot_by_request(&p, &r, &v)).await? {
                return Ok(existing);
            }
        }
        let (_, bucket) = self.bucket_config(principal).await?;
        let snap = self.new_record(
            principal,
            sandbox,
            &volume,
            Trigger::Manual,
            bucket,
            request_id,
        );
        let stored = snap.clone();
        self.db(move |c| c.put_snapshot(&stored)).await?;
        let this = self.clone();
        let taking = snap.clone();
        tokio::spawn(async move {
            let lock = this.sandbox_lock(&taking.source_sandbox);
            let _one_at_a_time = lock.lock().await;
            this.take(taking).await
        });
        Ok(snap)
    }

    /// DeleteSandbox's `snapshot_volumes`: each named scratch volume is
    /// snapshotted (the sandbox frozen) before the sandbox is stopped;
    /// returns the snapshots' ids, READY or FAILED. The guard keeps other
    /// snapshots of the sandbox out until it is dropped (after the stop).
    pub async fn snapshot_before_delete(
        &self,
        principal: &Principal,
        sandbox: &SandboxId,
        volumes: &[String],
        request_id: Option<String>,
    ) -> Result<(Vec<String>, tokio::sync::OwnedMutexGuard<()>), StorageError> {
        if !self.snapshots_offered() {
            return Err(StorageError::NotSupported("file-system snapshots"));
        }
        let guard = self.sandbox_lock(sandbox).lock_owned().await;
        let record = self.running_sandbox(principal, sandbox)?;
        let mut names = Vec::new();
        for v in volumes {
            let name = Self::scratch_volume_of(&record, Some(v))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let (_, bucket) = self.bucket_config(principal).await?;
        let mut ids = Vec::new();
        for name in names {
            if let Some(rid) = &request_id {
                let (p, r, v) = (principal.clone(), rid.clone(), name.clone());
                if let Some(existing) = self.db(move |c| c.snapshot_by_request(&p, &r, &v)).await? {
                    ids.push(existing.id);
                    continue;
                }
            }
            let snap = self.new_record(
                principal,
                sandbox,
                &name,
                Trigger::OnDelete,
                bucket.clone(),
                request_id.clone(),
            );
            let stored = snap.clone();
            self.db(move |c| c.put_snapshot(&stored)).await?;
            let taken = self.take(snap).await?;
            ids.push(taken.id);
        }
        Ok((ids, guard))
    }

    /// Takes the snapshot (the caller holds the sandbox's lock) and records
    /// READY or FAILED.
    async fn take(&self, mut snap: SnapshotRecord) -> Result<SnapshotRecord, StorageError> {
        // Shared with other snapshots, exclusive with the collector: the
        // archive is stored before its record names it.
        let _no_gc = self.inner.gc_lock.read().await;
        let result = self
            .inner
            .manager
            .engine()
            .snapshot_volume(&snap.source_sandbox, &snap.source_volume, &snap.bucket)
            .await;
        let now: SystemTime = self.inner.manager.now();
        match result {
            Ok(taken) => {
                snap.state = SnapshotState::Ready;
                snap.content_bytes = taken.content_bytes;
                snap.blob = Some(taken.blob);
                tracing::info!(
                    sandbox_id = %snap.source_sandbox,
                    snapshot = snap.id,
                    files = taken.files,
                    bytes = taken.content_bytes,
                    "snapshot taken"
                );
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %snap.source_sandbox, snapshot = snap.id, error = %crate::chain(&e), "snapshot failed");
                snap.state = SnapshotState::Failed;
                snap.state_reason = crate::chain(&e);
            }
        }
        snap.complete_time = Some(now);
        snap.update_time = now;
        let stored = snap.clone();
        self.db(move |c| c.put_snapshot(&stored)).await?;
        Ok(snap)
    }

    /// Deletes the caller's snapshot; its archive goes once no other
    /// record names it. One being taken cannot be deleted yet.
    /// `Ok(None)`: missing and `allow_missing`.
    pub async fn delete_snapshot(
        &self,
        principal: &Principal,
        id: &str,
        allow_missing: bool,
    ) -> Result<Option<SnapshotRecord>, StorageError> {
        let mut snap = match self.snapshot(principal, id).await {
            Ok(s) => s,
            Err(StorageError::SnapshotNotFound(_)) if allow_missing => return Ok(None),
            Err(e) => return Err(e),
        };
        if snap.state == SnapshotState::Creating {
            return Err(StorageError::SnapshotNotReady {
                id: snap.id,
                state: snap.state.as_str(),
                reason: "it is being taken; delete it once it is READY or FAILED".into(),
            });
        }
        let i = snap.id.clone();
        self.db(move |c| c.delete_snapshot(&i)).await?;
        snap.state = SnapshotState::Deleting;
        snap.update_time = self.inner.manager.now();
        if let Some(blob) = snap.blob.clone() {
            let b = blob.clone();
            if !self.db(move |c| c.blob_referenced(&b)).await? {
                if let Err(e) = self.collect(&blob.bucket).await {
                    // The record is gone either way; the next collection
                    // (at start-up, after the next delete) retries.
                    tracing::warn!(error = %crate::chain(&e), "snapshot collection");
                }
            }
        }
        Ok(Some(snap))
    }
}
