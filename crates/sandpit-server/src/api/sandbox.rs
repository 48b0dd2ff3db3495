//! `coreweave.sandbox.v1.SandboxService`: thin handlers over the manager.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_server::SandboxService;
use tokio::sync::watch;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status};

use super::errors::{self, invalid_request, Violation};
use super::validate::{self, CreatePolicy};
use super::{convert, known_id, principal};
use crate::engine::Engine;
use crate::logs::LogReader;
use crate::manager::{ListQuery, Manager, StateFilter};
use crate::model::State;
use crate::secrets::SecretStores;

/// Settings of the data-plane RPCs.
#[derive(Debug, Clone)]
pub struct DataPlaneOptions {
    /// Largest file moved by one ReadFile or WriteFile.
    pub max_file_bytes: u64,
    /// The kept main-process output; StreamLogs streams nothing without.
    pub logs: Option<LogReader>,
    /// Becomes true when the daemon shuts down: long streams end then.
    pub shutdown: watch::Receiver<bool>,
}

impl Default for DataPlaneOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: super::files::DEFAULT_MAX_FILE_BYTES,
            logs: None,
            shutdown: watch::channel(false).1,
        }
    }
}

/// The SandboxService implementation.
#[derive(Debug)]
pub struct SandboxApi<E: Engine> {
    manager: Manager<E>,
    policy: CreatePolicy,
    data: DataPlaneOptions,
    secrets: SecretStores,
    storage: Option<crate::storage::Storage<E>>,
}

impl<E: Engine> SandboxApi<E> {
    /// Handlers over `manager`, for runner `runner_id`.
    pub fn new(manager: Manager<E>, runner_id: String, data: DataPlaneOptions) -> Self {
        let policy = CreatePolicy::of(&manager, runner_id);
        Self {
            manager,
            policy,
            data,
            secrets: SecretStores::default(),
            storage: None,
        }
    }

    /// Volumes and snapshots, when the runner offers them.
    pub fn with_storage(mut self, storage: crate::storage::Storage<E>) -> Self {
        if storage.offered() {
            self.policy.storage = self.manager.engine().storage();
            self.storage = Some(storage);
        }
        self
    }

    /// Where `image_pull_credentials` and `secret_stores` are looked up.
    pub fn with_secret_stores(mut self, secrets: SecretStores) -> Self {
        self.secrets = secrets;
        self
    }

    fn sandbox(&self, r: &crate::model::SandboxRecord) -> pb::Sandbox {
        let mut sb = convert::sandbox(r, &self.policy.runner_id);
        if let (Some(offer), Some(status)) = (&self.policy.network, sb.status.as_mut()) {
            let spec = sb.spec.as_ref();
            super::network::report(
                status,
                spec.and_then(|s| s.network.as_ref()),
                offer.default_egress,
            );
            let live = if r.state.is_terminal() {
                None
            } else {
                self.manager.engine().network_status(&r.id)
            };
            status.services = super::services::report(
                r.id.as_str(),
                spec.map_or(&[][..], |s| &s.services[..]),
                &offer.public,
                live.as_ref(),
            );
        }
        sb
    }
}

fn require_id(id: &str) -> Result<(), Status> {
    super::require("sandbox_id", id)
}

/// The domain state for a ListSandboxes state filter.
fn state_filter(s: i32) -> Result<StateFilter, Status> {
    let Ok(s) = pb::State::try_from(s) else {
        return Err(invalid_request(&[Violation::new(
            "state",
            format!("unknown state {s}"),
        )]));
    };
    Ok(match s {
        pb::State::Unspecified => StateFilter::Any,
        pb::State::Pending => StateFilter::Only(State::Pending),
        pb::State::Creating => StateFilter::Only(State::Creating),
        pb::State::Running => StateFilter::Only(State::Running),
        pb::State::Completed => StateFilter::Only(State::Completed),
        pb::State::Failed => StateFilter::Only(State::Failed),
        pb::State::Terminating => StateFilter::Only(State::Terminating),
        pb::State::Terminated => StateFilter::Only(State::Terminated),
        // States this server never reports.
        pb::State::Paused | pb::State::Preparing => StateFilter::Nothing,
    })
}

#[tonic::async_trait]
impl<E: Engine> SandboxService for SandboxApi<E> {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = principal(&request)?;
        let mut new = validate::create_request(request.get_ref(), &self.policy)?;
        let wants_token = new.network.as_ref().is_some_and(|net| {
            net.services.iter().any(|s| {
                matches!(
                    s.exposure,
                    crate::engine::Exposure::PublicHttp {
                        share_token: true,
                        ..
                    }
                )
            })
        });
        if let Some(net) = &mut new.network {
            net.owner = principal.as_str().to_owned();
        }
        if let Some(secret) = &new.pull_secret {
            let credentials = self.secrets.resolve(secret).map_err(|e| {
                invalid_request(&[Violation::new(
                    format!(
                        "sandbox.spec.containers[0].image_pull_credentials.credentials.{}",
                        crate::secrets::pull_field(&e)
                    ),
                    e.to_string(),
                )])
            })?;
            new.pull_credentials = Some(credentials);
        }
        new.secret_values = super::secrets::resolve(
            &self.secrets,
            &new.secret_env,
            &new.env,
            "sandbox.spec.containers[0]",
        )
        .await?;
        // The caller's own commits (`sandpit commit`) come first.
        if let Some(committed) = super::checkpoint::commit_reference(&principal, &new.image) {
            if let Ok(Some(_)) = self.manager.engine().image(&committed).await {
                new.image = committed;
            }
        }
        let _pending = match (&self.storage, new.volumes.is_empty()) {
            (_, true) => None,
            (Some(storage), false) => {
                let (launch, guard) = storage
                    .resolve(&principal, &new.volumes)
                    .await
                    .map_err(errors::from_storage)?;
                new.launch_volumes = launch;
                Some(guard)
            }
            // Refused by validation already.
            (None, false) => None,
        };
        let record = self
            .manager
            .create(&principal, new)
            .await
            .map_err(errors::from_manager)?;
        let mut sb = self.sandbox(&record);
        // Shown in create responses only (the client's "create-only"
        // credential), replays of an idempotent create included.
        if wants_token {
            sb.endpoint_share_token = self
                .manager
                .engine()
                .share_token(&record.id)
                .unwrap_or_default();
        }
        Ok(Response::new(sb))
    }

    async fn create_sandbox_from_template(
        &self,
        _: Request<pb::CreateSandboxFromTemplateRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        Err(errors::rpc_not_implemented("CreateSandboxFromTemplate"))
    }

    async fn create_sandbox_from_file(
        &self,
        _: Request<pb::CreateSandboxFromFileRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        Err(errors::rpc_not_implemented("CreateSandboxFromFile"))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let principal = principal(&request)?;
        let id = &request.get_ref().sandbox_id;
        require_id(id)?;
        let record = self
            .manager
            .get(&principal, &known_id(id)?)
            .map_err(errors::from_manager)?;
        Ok(Response::new(self.sandbox(&record)))
    }

    async fn get_sandbox_build_logs(
        &self,
        _: Request<pb::GetSandboxBuildLogsRequest>,
    ) -> Result<Response<pb::GetSandboxBuildLogsResponse>, Status> {
        Err(errors::rpc_not_implemented("GetSandboxBuildLogs"))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        if req.page_size < 0 {
            return Err(invalid_request(&[Violation::new(
                "page_size",
                "must not be negative",
            )]));
        }
        let descending = match pb::SortDirection::try_from(req.sort_direction) {
            Ok(pb::SortDirection::Descending) => true,
            Ok(_) => false,
            Err(_) => {
                return Err(invalid_request(&[Violation::new(
                    "sort_direction",
                    format!("unknown sort direction {}", req.sort_direction),
                )]))
            }
        };
        let state = state_filter(req.state)?;
        // Every sandbox runs on this runner and none has volumes.
        let elsewhere =
            !req.runner_ids.is_empty() && !req.runner_ids.contains(&self.policy.runner_id);
        if elsewhere || !req.volume_ids.is_empty() {
            return Ok(Response::new(pb::ListSandboxesResponse::default()));
        }
        let page = self
            .manager
            .list(
                &principal,
                &ListQuery {
                    tags: req.tags.clone(),
                    state,
                    show_terminated: req.show_terminated,
                    page_size: req.page_size as usize,
                    page_token: Some(req.page_token.clone()),
                    descending,
                },
            )
            .map_err(errors::from_manager)?;
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: page.sandboxes.iter().map(|r| self.sandbox(r)).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        require_id(&req.sandbox_id)?;
        if req.grace_period_seconds < 0 {
            return Err(invalid_request(&[Violation::new(
                "grace_period_seconds",
                "must not be negative",
            )]));
        }
        if !req.snapshot_volumes.is_empty() && self.storage.is_none() {
            return Err(errors::refused(
                Code::FailedPrecondition,
                errors::reason::FSS_NOT_SUPPORTED,
                &[Violation::new(
                    "snapshot_volumes",
                    "file-system snapshots are not supported on this runner",
                )],
            ));
        }
        let grace = Duration::from_secs(req.grace_period_seconds as u64);
        let id = match known_id(&req.sandbox_id) {
            Ok(id) => id,
            Err(_) if req.allow_missing => {
                return Ok(Response::new(pb::DeleteSandboxResponse::default()))
            }
            Err(e) => return Err(e),
        };
        // Snapshots asked for are taken first, the sandbox frozen; none
        // of another request runs while the sandbox is being stopped.
        let (snapshot_ids, _quiet) = match &self.storage {
            None => (vec![], None),
            Some(storage) if !req.snapshot_volumes.is_empty() => {
                let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
                let (ids, guard) = storage
                    .snapshot_before_delete(&principal, &id, &req.snapshot_volumes, request_id)
                    .await
                    .map_err(errors::from_storage)?;
                (ids, Some(guard))
            }
            Some(storage) => (vec![], Some(storage.quiesce(&id).await)),
        };
        let record = self
            .manager
            .delete(&principal, &id, grace, req.allow_missing)
            .await
            .map_err(errors::from_manager)?;
        Ok(Response::new(pb::DeleteSandboxResponse {
            sandbox: record.map(|r| self.sandbox(&r)),
            file_system_snapshot_ids: snapshot_ids,
        }))
    }

    async fn purge_sandboxes(
        &self,
        request: Request<pb::PurgeSandboxesRequest>,
    ) -> Result<Response<pb::PurgeSandboxesResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        // Without tags a purge would hit everything: only on explicit request.
        if req.tags.is_empty() && !req.purge_all {
            return Err(invalid_request(&[Violation::new(
                "tags",
                "give at least one tag, or set purge_all",
            )]));
        }
        let outcome = self.manager.purge(&principal, &req.tags, req.dry_run).await;
        Ok(Response::new(pb::PurgeSandboxesResponse {
            purge_count: outcome.count.min(i32::MAX as usize) as i32,
            failed_sandbox_ids: outcome.failed.iter().map(|id| id.to_string()).collect(),
            retryable_failed_sandbox_ids: vec![],
        }))
    }

    async fn connect_sandbox(
        &self,
        _: Request<pb::ConnectSandboxRequest>,
    ) -> Result<Response<pb::SandboxConnection>, Status> {
        // The client then uses the data RPCs of this service instead.
        Err(errors::rpc_not_implemented("ConnectSandbox"))
    }

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        super::exec::exec(&self.manager, self.data.shutdown.clone(), request).await
    }

    async fn stream_exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecStreamRequest>>,
    ) -> Result<Response<BoxStream<pb::ExecStreamResponse>>, Status> {
        super::exec::stream_exec(&self.manager, self.data.shutdown.clone(), request).await
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<BoxStream<pb::LogEntry>>, Status> {
        super::logs::stream_logs(
            &self.manager,
            self.data.logs.clone(),
            self.data.shutdown.clone(),
            request,
        )
        .await
    }

    async fn write_file(
        &self,
        request: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        super::files::write_file(&self.manager, self.data.max_file_bytes, request).await
    }

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        super::files::read_file(&self.manager, self.data.max_file_bytes, request).await
    }

    async fn create_file_system_snapshot(
        &self,
        request: Request<pb::CreateFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        super::snapshots::create(self.storage.as_ref(), request).await
    }

    async fn get_file_system_snapshot(
        &self,
        request: Request<pb::GetFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        super::snapshots::get(self.storage.as_ref(), request).await
    }

    async fn list_file_system_snapshots(
        &self,
        request: Request<pb::ListFileSystemSnapshotsRequest>,
    ) -> Result<Response<pb::ListFileSystemSnapshotsResponse>, Status> {
        super::snapshots::list(self.storage.as_ref(), request).await
    }

    async fn delete_file_system_snapshot(
        &self,
        request: Request<pb::DeleteFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        super::snapshots::delete(self.storage.as_ref(), request).await
    }
}
