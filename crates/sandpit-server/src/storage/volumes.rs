//! Registered volumes (VolumeService): named per principal, with a
//! lifetime of their own. A create answers VALIDATING at once; a task of
//! its own provisions the storage (the embedded engine: a quota'd
//! directory under the data dir) and makes it READY, or ERROR with the
//! reason. Deletion is refused while any sandbox mounts it.

use super::model::{VolumeRecord, VolumeState};
use super::{Storage, StorageError};
use crate::engine::Engine;
use crate::model::Principal;

/// What a CreateVolume asks for, checked by the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    /// `volume_id`.
    pub volume_id: String,
    /// `pvc.runner_id`.
    pub runner_id: String,
    /// `pvc.namespace`.
    pub namespace: String,
    /// `pvc.claim_name`.
    pub claim_name: String,
    /// `pvc.sub_path` (relative, normalised; may be empty).
    pub sub_path: String,
    /// Read-only for every sandbox.
    pub read_only: bool,
    /// Free text.
    pub description: String,
    /// Idempotency key.
    pub request_id: Option<String>,
}

/// What an UpdateVolume may change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeUpdate {
    /// New description.
    pub description: Option<String>,
    /// New read-only flag (applies to sandboxes created afterwards).
    pub read_only: Option<bool>,
}

impl<E: Engine> Storage<E> {
    /// Registers a volume: VALIDATING now, READY or ERROR once provisioned.
    /// A retry with the same `request_id` returns the first one.
    pub async fn create_volume(
        &self,
        principal: &Principal,
        new: NewVolume,
    ) -> Result<VolumeRecord, StorageError> {
        if !self.offered() {
            return Err(StorageError::NotSupported("volumes"));
        }
        if new.runner_id != self.runner_id() {
            return Err(StorageError::invalid(
                "volume.spec.pvc.runner_id",
                format!(
                    "no such runner {:?}; this server is the single runner {:?}",
                    new.runner_id,
                    self.runner_id()
                ),
            ));
        }
        let (p, id) = (principal.clone(), new.volume_id.clone());
        if let Some(existing) = self.db(move |c| c.volume(&p, &id)).await? {
            if existing.request_id.is_some() && existing.request_id == new.request_id {
                return Ok(existing);
            }
            return Err(StorageError::VolumeExists(new.volume_id));
        }
        let now = self.inner.manager.now();
        let record = VolumeRecord {
            principal: principal.clone(),
            volume_id: new.volume_id,
            runner_id: new.runner_id,
            namespace: new.namespace,
            claim_name: new.claim_name,
            sub_path: new.sub_path,
            read_only: new.read_only,
            description: new.description,
            state: VolumeState::Validating,
            state_reason: String::new(),
            capacity_bytes: self.inner.settings.volume_capacity,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
            last_validated_time: None,
        };
        let stored = record.clone();
        self.db(move |c| c.put_volume(&stored)).await?;
        let this = self.clone();
        let validating = record.clone();
        tokio::spawn(async move { this.validate_now(validating).await });
        Ok(record)
    }

    /// Provisions (or re-attaches) the volume's storage and records the
    /// verdict.
    async fn validate_now(&self, mut record: VolumeRecord) -> Result<VolumeRecord, StorageError> {
        let verdict = self
            .inner
            .manager
            .engine()
            .provision_volume(&record.storage_key(), record.capacity_bytes)
            .await;
        // Deleted meanwhile: nothing to record.
        let (p, id) = (record.principal.clone(), record.volume_id.clone());
        let Some(current) = self.db(move |c| c.volume(&p, &id)).await? else {
            return Ok(record);
        };
        if current.state == VolumeState::Deleting {
            return Ok(current);
        }
        let now = self.inner.manager.now();
        record.description = current.description;
        record.read_only = current.read_only;
        match verdict {
            Ok(usage) => {
                record.state = VolumeState::Ready;
                record.state_reason = String::new();
                record.capacity_bytes = usage.capacity_bytes.max(1);
            }
            Err(e) => {
                tracing::warn!(volume = record.volume_id, error = %crate::chain(&e), "volume validation");
                record.state = VolumeState::Error;
                record.state_reason = crate::chain(&e);
            }
        }
        record.update_time = now;
        record.last_validated_time = Some(now);
        let stored = record.clone();
        self.db(move |c| c.put_volume(&stored)).await?;
        Ok(record)
    }

    /// The caller's volume.
    pub async fn volume(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<VolumeRecord, StorageError> {
        let (p, i) = (principal.clone(), id.to_owned());
        self.db(move |c| c.volume(&p, &i))
            .await?
            .ok_or_else(|| StorageError::VolumeNotFound(id.to_owned()))
    }

    /// The caller's volumes, by id, with how many sandboxes mount each.
    pub async fn volumes(&self, principal: &Principal) -> Result<Vec<VolumeRecord>, StorageError> {
        let p = principal.clone();
        self.db(move |c| c.volumes(&p)).await
    }

    /// Changes the description or the read-only flag.
    pub async fn update_volume(
        &self,
        principal: &Principal,
        id: &str,
        update: VolumeUpdate,
    ) -> Result<VolumeRecord, StorageError> {
        let mut record = self.volume(principal, id).await?;
        if let Some(d) = update.description {
            record.description = d;
        }
        if let Some(ro) = update.read_only {
            record.read_only = ro;
        }
        record.update_time = self.inner.manager.now();
        let stored = record.clone();
        self.db(move |c| c.put_volume(&stored)).await?;
        Ok(record)
    }

    /// Checks the storage again.
    pub async fn revalidate_volume(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<VolumeRecord, StorageError> {
        let record = self.volume(principal, id).await?;
        self.validate_now(record).await
    }

    /// Deletes the volume and its data, unless a sandbox mounts it
    /// (FAILED_PRECONDITION naming them, `force` or not: the data of a
    /// running sandbox is never pulled from under it). The storage goes
    /// only when no other record of the caller names the same claim.
    /// `Ok(None)`: missing and `allow_missing`.
    pub async fn delete_volume(
        &self,
        principal: &Principal,
        id: &str,
        allow_missing: bool,
    ) -> Result<Option<VolumeRecord>, StorageError> {
        let mut record = match self.volume(principal, id).await {
            Ok(r) => r,
            Err(StorageError::VolumeNotFound(_)) if allow_missing => return Ok(None),
            Err(e) => return Err(e),
        };
        let ops = self.inner.volume_lock.lock().await;
        let users = self.mounted_by(principal, id);
        if !users.is_empty() {
            return Err(StorageError::VolumeInUse {
                id: id.to_owned(),
                sandboxes: users,
            });
        }
        record.state = VolumeState::Deleting;
        record.update_time = self.inner.manager.now();
        let stored = record.clone();
        self.db(move |c| c.put_volume(&stored)).await?;
        drop(ops);
        let key = record.storage_key();
        let (p, i) = (principal.clone(), id.to_owned());
        let others = self
            .db(move |c| {
                c.delete_volume(&p, &i)?;
                c.volumes(&p)
            })
            .await?
            .into_iter()
            .any(|v| v.storage_key() == key);
        if !others {
            self.inner.manager.engine().remove_volume(&key).await?;
        }
        Ok(Some(record))
    }
}
