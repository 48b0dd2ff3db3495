//! File-system snapshot RPCs of SandboxService and the snapshot bucket
//! RPCs of SettingsService: only delegating to [`Storage`].

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::settings_service_server::SettingsService;
use tonic::{Request, Response, Status};

use super::convert::timestamp;
use super::errors::{self, invalid_request, Violation};
use super::{known_id, principal, require};
use crate::engine::Engine;
use crate::storage::model::{BucketConfig, SnapshotRecord, SnapshotState, Trigger};
use crate::storage::Storage;

/// A snapshot record as the API shows it.
pub fn snapshot(s: &SnapshotRecord) -> pb::FileSystemSnapshot {
    pb::FileSystemSnapshot {
        file_system_snapshot_id: s.id.clone(),
        state: match s.state {
            SnapshotState::Creating => pb::SnapshotState::Creating,
            SnapshotState::Ready => pb::SnapshotState::Ready,
            SnapshotState::Failed => pb::SnapshotState::Failed,
            SnapshotState::Deleting => pb::SnapshotState::Deleting,
        } as i32,
        state_reason: s.state_reason.clone(),
        size_bytes: s
            .blob
            .as_ref()
            .map_or(0, |b| b.size.min(i64::MAX as u64) as i64),
        source_sandbox_id: s.source_sandbox.to_string(),
        trigger: match s.trigger {
            Trigger::Manual => pb::SnapshotTrigger::Manual,
            Trigger::OnDelete => pb::SnapshotTrigger::OnDelete,
        } as i32,
        create_time: Some(timestamp(s.create_time)),
        complete_time: s.complete_time.map(timestamp),
        source_volume_name: s.source_volume.clone(),
        object_bucket: s.bucket.clone(),
        updated_at: Some(timestamp(s.update_time)),
        request_id: s.request_id.clone().unwrap_or_default(),
    }
}

fn snapshots_of<'a, E: Engine>(
    storage: Option<&'a Storage<E>>,
    rpc: &str,
) -> Result<&'a Storage<E>, Status> {
    storage.ok_or_else(|| errors::snapshots_not_supported(rpc))
}

/// CreateFileSystemSnapshot.
pub async fn create<E: Engine>(
    storage: Option<&Storage<E>>,
    request: Request<pb::CreateFileSystemSnapshotRequest>,
) -> Result<Response<pb::FileSystemSnapshot>, Status> {
    let storage = snapshots_of(storage, "CreateFileSystemSnapshot")?;
    let principal = principal(&request)?;
    let req = request.get_ref();
    require("sandbox_id", &req.sandbox_id)?;
    let id = known_id(&req.sandbox_id)?;
    let volume = (!req.scratch_volume_name.is_empty()).then_some(req.scratch_volume_name.as_str());
    let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
    let s = storage
        .create_snapshot(&principal, &id, volume, request_id)
        .await
        .map_err(errors::from_storage)?;
    Ok(Response::new(snapshot(&s)))
}

/// GetFileSystemSnapshot.
pub async fn get<E: Engine>(
    storage: Option<&Storage<E>>,
    request: Request<pb::GetFileSystemSnapshotRequest>,
) -> Result<Response<pb::FileSystemSnapshot>, Status> {
    let storage = snapshots_of(storage, "GetFileSystemSnapshot")?;
    let principal = principal(&request)?;
    let id = &request.get_ref().file_system_snapshot_id;
    require("file_system_snapshot_id", id)?;
    let s = storage
        .snapshot(&principal, id)
        .await
        .map_err(errors::from_storage)?;
    Ok(Response::new(snapshot(&s)))
}

/// ListFileSystemSnapshots.
pub async fn list<E: Engine>(
    storage: Option<&Storage<E>>,
    request: Request<pb::ListFileSystemSnapshotsRequest>,
) -> Result<Response<pb::ListFileSystemSnapshotsResponse>, Status> {
    let storage = snapshots_of(storage, "ListFileSystemSnapshots")?;
    let principal = principal(&request)?;
    let req = request.get_ref();
    if req.page_size < 0 {
        return Err(invalid_request(&[Violation::new(
            "page_size",
            "must not be negative",
        )]));
    }
    let offset = match req.page_token.as_str() {
        "" => 0,
        t => t.parse::<usize>().map_err(|_| {
            invalid_request(&[Violation::new(
                "page_token",
                "not a token this server handed out",
            )])
        })?,
    };
    let source = (!req.source_sandbox_id.is_empty()).then_some(req.source_sandbox_id.as_str());
    let (page, next) = storage
        .snapshots(&principal, source, offset, req.page_size as usize)
        .await
        .map_err(errors::from_storage)?;
    Ok(Response::new(pb::ListFileSystemSnapshotsResponse {
        file_system_snapshots: page.iter().map(snapshot).collect(),
        next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
    }))
}

/// DeleteFileSystemSnapshot.
pub async fn delete<E: Engine>(
    storage: Option<&Storage<E>>,
    request: Request<pb::DeleteFileSystemSnapshotRequest>,
) -> Result<Response<pb::FileSystemSnapshot>, Status> {
    let storage = snapshots_of(storage, "DeleteFileSystemSnapshot")?;
    let principal = principal(&request)?;
    let req = request.get_ref();
    require("file_system_snapshot_id", &req.file_system_snapshot_id)?;
    let s = storage
        .delete_snapshot(&principal, &req.file_system_snapshot_id, req.allow_missing)
        .await
        .map_err(errors::from_storage)?;
    Ok(Response::new(s.as_ref().map(snapshot).unwrap_or_default()))
}

/// SettingsService: the snapshot bucket RPCs (the rest answer
/// UNIMPLEMENTED).
#[derive(Debug)]
pub struct SettingsApi<E: Engine> {
    storage: Storage<E>,
}

impl<E: Engine> SettingsApi<E> {
    /// Handlers over `storage`.
    pub fn new(storage: Storage<E>) -> Self {
        Self { storage }
    }
}

fn bucket_message(config: &BucketConfig, effective: String) -> pb::FileSystemSnapshotBucketConfig {
    pb::FileSystemSnapshotBucketConfig {
        bucket_name: config.bucket_name.clone(),
        region: config.region.clone(),
        mode: if config.bucket_name.is_empty() {
            pb::FileSystemSnapshotBucketMode::CwManaged
        } else {
            pb::FileSystemSnapshotBucketMode::BringYourOwn
        } as i32,
        effective_bucket_name: effective,
    }
}

#[tonic::async_trait]
impl<E: Engine> SettingsService for SettingsApi<E> {
    async fn get_file_system_snapshot_bucket_config(
        &self,
        request: Request<pb::GetFileSystemSnapshotBucketConfigRequest>,
    ) -> Result<Response<pb::FileSystemSnapshotBucketConfig>, Status> {
        let principal = principal(&request)?;
        let (config, effective) = self
            .storage
            .bucket_config(&principal)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(bucket_message(&config, effective)))
    }

    async fn update_file_system_snapshot_bucket_config(
        &self,
        request: Request<pb::UpdateFileSystemSnapshotBucketConfigRequest>,
    ) -> Result<Response<pb::FileSystemSnapshotBucketConfig>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        let Some(given) = &req.file_system_snapshot_bucket_config else {
            return Err(invalid_request(&[Violation::new(
                "file_system_snapshot_bucket_config",
                "required",
            )]));
        };
        let (mut config, _) = self
            .storage
            .bucket_config(&principal)
            .await
            .map_err(errors::from_storage)?;
        let paths: Vec<&str> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let all = paths.is_empty();
        for p in &paths {
            if !matches!(*p, "bucket_name" | "region") {
                return Err(invalid_request(&[Violation::new(
                    format!("update_mask.paths[{p:?}]"),
                    "only bucket_name and region can be updated",
                )]));
            }
        }
        if all || paths.contains(&"bucket_name") {
            config.bucket_name = given.bucket_name.clone();
        }
        if all || paths.contains(&"region") {
            config.region = given.region.clone();
        }
        let (config, effective) = self
            .storage
            .set_bucket_config(&principal, config)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(bucket_message(&config, effective)))
    }
}
