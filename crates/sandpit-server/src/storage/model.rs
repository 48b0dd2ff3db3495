//! The storage domain's own types: volumes a sandbox asks for, registered
//! volumes and file-system snapshots, independent of the gRPC messages
//! (`api` converts) and of the machinery (`engine` abstracts).

use std::time::SystemTime;

use sandpit_image::Digest;

use crate::model::{Principal, SandboxId};

/// Where a scratch volume's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Medium {
    /// The data dir's disk, size-enforced.
    Disk,
    /// tmpfs, counted against the sandbox's memory.
    Memory,
}

/// Where one volume appears in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Absolute, normalised path inside the sandbox.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// A directory inside the volume to mount instead of its root
    /// (relative, normalised).
    pub sub_path: Option<String>,
}

/// A volume of a CreateSandbox request, checked but not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRequest {
    /// `SandboxVolume.name`, unique in the sandbox.
    pub name: String,
    /// What it is.
    pub source: RequestedSource,
    /// Its mounts into the container.
    pub mounts: Vec<MountSpec>,
}

/// A requested volume's source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedSource {
    /// Empty storage that ends with the sandbox.
    Scratch {
        /// Its size; `None`: the runner's default.
        size_bytes: Option<u64>,
        /// Disk or memory.
        medium: Medium,
        /// Start from this snapshot's contents.
        restore_from: Option<String>,
    },
    /// A registered volume of the caller.
    Registered {
        /// Its `volume_id`.
        volume_id: String,
    },
}

/// A stored snapshot archive: its content address and where it is kept.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotBlob {
    /// sha256 of the archive.
    pub digest: Digest,
    /// Archive size in bytes.
    pub size: u64,
    /// `local`, or the S3 bucket's name.
    pub bucket: String,
}

/// A volume as the engine sets it up for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchVolume {
    /// `SandboxVolume.name`.
    pub name: String,
    /// What backs it.
    pub source: LaunchSource,
    /// Its mounts.
    pub mounts: Vec<MountSpec>,
}

/// What backs a [`LaunchVolume`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchSource {
    /// A scratch volume made for the sandbox.
    Scratch {
        /// Its size.
        size_bytes: u64,
        /// Disk or memory.
        medium: Medium,
        /// Contents to restore first.
        restore: Option<SnapshotBlob>,
    },
    /// A registered volume's storage.
    Registered {
        /// Its storage key (see [`storage_key`]).
        key: String,
        /// Its capacity (for re-attaching).
        size_bytes: u64,
        /// Every mount of it is read-only.
        read_only: bool,
    },
}

/// State of a registered volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// Being provisioned or checked.
    Validating,
    /// Usable.
    Ready,
    /// Provisioning or the last check failed (`state_reason`).
    Error,
    /// Being removed.
    Deleting,
}

impl VolumeState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Validating => "validating",
            VolumeState::Ready => "ready",
            VolumeState::Error => "error",
            VolumeState::Deleting => "deleting",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            VolumeState::Validating,
            VolumeState::Ready,
            VolumeState::Error,
            VolumeState::Deleting,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// A registered volume (VolumeService).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Owner; ids are unique per principal.
    pub principal: Principal,
    /// `Volume.volume_id`.
    pub volume_id: String,
    /// `PvcVolumeSource.runner_id` (this runner).
    pub runner_id: String,
    /// `PvcVolumeSource.namespace`: a grouping of claims.
    pub namespace: String,
    /// `PvcVolumeSource.claim_name`: the storage itself.
    pub claim_name: String,
    /// `PvcVolumeSource.sub_path`: the volume's root inside the claim.
    pub sub_path: String,
    /// Mounted read-only everywhere.
    pub read_only: bool,
    /// Free text.
    pub description: String,
    /// Lifecycle.
    pub state: VolumeState,
    /// Why, in `Error`.
    pub state_reason: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// The create's idempotency key.
    pub request_id: Option<String>,
    /// Times.
    pub create_time: SystemTime,
    /// Last change.
    pub update_time: SystemTime,
    /// Last check of the backing storage.
    pub last_validated_time: Option<SystemTime>,
}

impl VolumeRecord {
    /// The backend's key for this volume's storage: one per (principal,
    /// namespace, claim), so two records naming one claim share it, and
    /// principals never do.
    pub fn storage_key(&self) -> String {
        storage_key(&self.principal, &self.namespace, &self.claim_name)
    }
}

/// See [`VolumeRecord::storage_key`].
pub fn storage_key(principal: &Principal, namespace: &str, claim: &str) -> String {
    let mut input = Vec::new();
    for part in [principal.as_str(), namespace, claim] {
        input.extend_from_slice(part.as_bytes());
        input.push(0);
    }
    let digest = Digest::sha256_of(&input);
    format!("vol-{}", &digest.hex()[..32])
}

/// State of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    /// Being taken.
    Creating,
    /// Complete and restorable.
    Ready,
    /// Not taken (`state_reason`).
    Failed,
    /// Being deleted.
    Deleting,
}

impl SnapshotState {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Failed => "failed",
            SnapshotState::Deleting => "deleting",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            SnapshotState::Creating,
            SnapshotState::Ready,
            SnapshotState::Failed,
            SnapshotState::Deleting,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// What made a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// CreateFileSystemSnapshot.
    Manual,
    /// DeleteSandbox's `snapshot_volumes`.
    OnDelete,
}

impl Trigger {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::OnDelete => "on_delete",
        }
    }

    /// From the stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "manual" => Some(Trigger::Manual),
            "on_delete" => Some(Trigger::OnDelete),
            _ => None,
        }
    }
}

/// A file-system snapshot of one scratch volume. Immutable once READY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// `fss-...`.
    pub id: String,
    /// Owner: another principal's id is NOT_FOUND.
    pub principal: Principal,
    /// Lifecycle.
    pub state: SnapshotState,
    /// Why, when FAILED.
    pub state_reason: String,
    /// What made it.
    pub trigger: Trigger,
    /// The sandbox it was taken of.
    pub source_sandbox: SandboxId,
    /// The scratch volume's name.
    pub source_volume: String,
    /// The archive, once READY.
    pub blob: Option<SnapshotBlob>,
    /// Where it is (or will be) kept: `local` or a bucket name.
    pub bucket: String,
    /// Bytes of file contents in it.
    pub content_bytes: u64,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// Times.
    pub create_time: SystemTime,
    /// When it became READY or FAILED.
    pub complete_time: Option<SystemTime>,
    /// Last change.
    pub update_time: SystemTime,
}

/// A principal's choice of snapshot bucket (SettingsService).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketConfig {
    /// Empty: the runner's managed store.
    pub bucket_name: String,
    /// The bucket's region (informational with one endpoint).
    pub region: String,
}
