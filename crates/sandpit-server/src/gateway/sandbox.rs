//! SandboxService at the gateway: creates placed, every other call sent
//! to the runner holding its sandbox, listings merged from all runners.

use sandpit_cluster::{PlacementRequest, RunnerId, SandboxState};
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_server::SandboxService;
use tonic::codegen::BoxStream;
use tonic::{Code, Request, Response, Status};

use super::directory::{store_status, Directory, Route, Runner};
use super::forward::{back, onward, runner_error, with_metadata};
use crate::api::errors::{self, invalid_request, reason, Violation};
use crate::api::{principal, validate};
use crate::manager::ListQuery;
use crate::model::{ResourceSpec, SandboxId};

/// How long a client waits before retrying a create nothing could take.
const RETRY_FULL: std::time::Duration = std::time::Duration::from_secs(5);

/// The gateway's SandboxService.
#[derive(Debug)]
pub(super) struct GatewaySandboxApi {
    directory: Directory,
    defaults: ResourceSpec,
    ca: Option<crate::direct::ClusterCa>,
}

impl GatewaySandboxApi {
    /// Over `directory`, placing sandboxes that ask for nothing by
    /// `defaults`, signing direct credentials with `ca`.
    pub(super) fn new(
        directory: Directory,
        defaults: ResourceSpec,
        ca: Option<crate::direct::ClusterCa>,
    ) -> Self {
        Self {
            directory,
            defaults,
            ca,
        }
    }

    /// The runner of the caller's sandbox `id` when it can take a call; a
    /// failed sandbox is refused as not running, with its reason.
    async fn running(&self, caller: &str, id: &str) -> Result<Runner, Status> {
        match self.directory.route(caller, id).await? {
            Route::Runner(runner) => Ok(runner),
            Route::Failed(row) => Err(not_running(&row)),
        }
    }
}

/// FAILED_PRECONDITION for a sandbox whose row says it failed, as a
/// runner refuses a data-plane call to a sandbox that is not running.
fn not_running(row: &sandpit_cluster::SandboxRow) -> Status {
    errors::status(
        Code::FailedPrecondition,
        format!("sandbox {} is FAILED, not running ({})", row.id, row.reason),
        reason::SANDBOX_NOT_RUNNING,
        &[("sandbox_id", row.id.clone())],
    )
}

/// The answer about a sandbox whose runner no longer answers for it.
fn failed_sandbox(row: &sandpit_cluster::SandboxRow) -> pb::Sandbox {
    pb::Sandbox {
        sandbox_id: row.id.clone(),
        status: Some(pb::SandboxStatus {
            state: pb::State::Failed as i32,
            state_reason: row.reason.clone(),
            runner_id: row.runner.as_str().to_owned(),
            runner_group_id: crate::api::discovery::RUNNER_GROUP.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The runner pins of a create, each a registered runner.
async fn pins(directory: &Directory, spec: &pb::SandboxSpec) -> Result<Vec<RunnerId>, Status> {
    let mut pins = Vec::with_capacity(spec.runner_ids.len());
    let mut bad = Vec::new();
    for (i, name) in spec.runner_ids.iter().enumerate() {
        let field = format!("sandbox.spec.runner_ids[{i}]");
        match RunnerId::new(name.clone()) {
            Ok(id) if directory.runner(id.as_str()).await.is_some() => pins.push(id),
            Ok(_) => bad.push(Violation::new(
                field,
                format!("no runner {name:?} is registered"),
            )),
            Err(_) => bad.push(Violation::new(
                field,
                format!("{name:?} is not a runner id"),
            )),
        }
    }
    if bad.is_empty() {
        Ok(pins)
    } else {
        Err(invalid_request(&bad))
    }
}

fn no_fit(why: &sandpit_cluster::Error) -> Status {
    errors::capacity_exhausted(format!("no runner can take the sandbox: {why}"), RETRY_FULL)
}

/// The order listings use: creation time, then id.
fn list_key(sb: &pb::Sandbox) -> (i64, i32, String) {
    let t = sb.status.as_ref().and_then(|s| s.create_time);
    let (secs, nanos) = t.map_or((0, 0), |t| (t.seconds, t.nanos));
    (secs, nanos, sb.sandbox_id.clone())
}

fn page_token(key: &(i64, i32, String)) -> String {
    format!("{}.{}.{}", key.0, key.1, key.2)
}

fn parse_token(token: &str) -> Option<(i64, i32, String)> {
    let mut parts = token.splitn(3, '.');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.to_owned(),
    ))
}

#[tonic::async_trait]
impl SandboxService for GatewaySandboxApi {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = principal(&request)?;
        let req = request.get_ref();
        let spec = req
            .sandbox
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .ok_or_else(|| invalid_request(&[Violation::new("sandbox.spec", "required")]))?;
        let resources = validate::requested_resources(req, &self.defaults)?;
        let reservation = format!("rsv-{}", SandboxId::generate());
        let placement = PlacementRequest {
            sandbox_id: reservation.clone(),
            principal: caller.to_string(),
            cpu_millis: resources.requests.cpu_millis.unwrap_or(0),
            memory_bytes: resources.requests.memory_bytes.unwrap_or(0),
            pins: pins(&self.directory, spec).await?,
            selector: Default::default(),
        };
        let store = self.directory.store();
        let placed = match store.place(&placement).await {
            Ok(p) => p,
            Err(e @ sandpit_cluster::Error::NoCapacity(_)) => return Err(no_fit(&e)),
            Err(e) => return Err(store_status(e)),
        };
        let Some(runner) = self.directory.runner(placed.runner.as_str()).await else {
            let _ = store
                .release(&reservation, SandboxState::Failed, "runner left")
                .await;
            return Err(Status::unavailable(format!(
                "runner {} left the registry",
                placed.runner
            )));
        };
        tracing::debug!(runner = %placed.runner, %reservation, "create placed");
        let answer = self
            .directory
            .sandbox_client(&runner)
            .create_sandbox(onward(request))
            .await;
        match answer {
            Ok(response) => {
                let id = response.get_ref().sandbox_id.clone();
                match store.bind(&reservation, &id).await {
                    Ok(true) => {}
                    // The runner answered a retried create (same request
                    // id) with a sandbox bound already, or the reservation
                    // expired meanwhile: give the reservation back.
                    Ok(false) => {
                        let _ = store
                            .release(
                                &reservation,
                                SandboxState::Terminated,
                                &format!("the runner answered with sandbox {id}, bound already"),
                            )
                            .await;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox_id = %id, error = %sandpit_errors::chain(&e), "cannot bind a placement; the runner's sync releases it");
                    }
                }
                tracing::info!(sandbox_id = %id, runner = %placed.runner, "created through the gateway");
                Ok(back(response))
            }
            Err(status) => {
                let _ = store
                    .release(
                        &reservation,
                        SandboxState::Failed,
                        &format!("refused by runner {}: {}", placed.runner, status.message()),
                    )
                    .await;
                Err(runner_error(&runner, status))
            }
        }
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
        let caller = principal(&request)?;
        let id = request.get_ref().sandbox_id.clone();
        match self.directory.route(caller.as_str(), &id).await? {
            Route::Failed(row) => Ok(Response::new(failed_sandbox(&row))),
            Route::Runner(runner) => self
                .directory
                .sandbox_client(&runner)
                .get_sandbox(onward(request))
                .await
                .map(back)
                .map_err(|s| runner_error(&runner, s)),
        }
    }

    async fn get_sandbox_build_logs(
        &self,
        request: Request<pb::GetSandboxBuildLogsRequest>,
    ) -> Result<Response<pb::GetSandboxBuildLogsResponse>, Status> {
        let caller = principal(&request)?;
        let runner = self
            .running(caller.as_str(), &request.get_ref().sandbox_id)
            .await?;
        self.directory
            .sandbox_client(&runner)
            .get_sandbox_build_logs(onward(request))
            .await
            .map(back)
            .map_err(|s| runner_error(&runner, s))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        principal(&request)?;
        let req = request.get_ref().clone();
        if req.page_size < 0 {
            return Err(invalid_request(&[Violation::new(
                "page_size",
                "must not be negative",
            )]));
        }
        let after = match req.page_token.as_str() {
            "" => None,
            t => Some(parse_token(t).ok_or_else(|| {
                invalid_request(&[Violation::new("page_token", "not a token of this listing")])
            })?),
        };
        let descending = req.sort_direction == pb::SortDirection::Descending as i32;
        let runners: Vec<Runner> = self
            .directory
            .live()
            .await
            .into_iter()
            .filter(|r| {
                req.runner_ids.is_empty()
                    || req.runner_ids.iter().any(|p| p == r.status.id.as_str())
            })
            .collect();
        // Each runner's whole listing (its pages), all runners at once.
        let calls = runners.iter().map(|runner| {
            let metadata = request.metadata().clone();
            let mut per = req.clone();
            per.page_size = ListQuery::MAX_PAGE_SIZE as i32;
            per.page_token.clear();
            let mut client = self.directory.sandbox_client(runner);
            async move {
                let mut out = Vec::new();
                loop {
                    let page = client
                        .list_sandboxes(with_metadata(&metadata, per.clone()))
                        .await
                        .map_err(|s| runner_error(runner, s))?
                        .into_inner();
                    out.extend(page.sandboxes);
                    if page.next_page_token.is_empty() {
                        return Ok::<_, Status>(out);
                    }
                    per.page_token = page.next_page_token;
                }
            }
        });
        let mut all = Vec::new();
        for (runner, listed) in runners
            .iter()
            .zip(futures_util::future::join_all(calls).await)
        {
            match listed {
                Ok(sandboxes) => all.extend(sandboxes),
                // A runner that does not answer (its lease not expired
                // yet) is left out, not the whole listing failed.
                Err(e) if e.code() == Code::Unavailable => {
                    tracing::warn!(runner = %runner.status.id, error = %e.message(), "runner left out of a listing")
                }
                Err(e) => return Err(e),
            }
        }
        let mut keyed: Vec<_> = all.into_iter().map(|sb| (list_key(&sb), sb)).collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        if descending {
            keyed.reverse();
        }
        if let Some(after) = &after {
            keyed.retain(|(k, _)| if descending { k < after } else { k > after });
        }
        let size = match req.page_size as usize {
            0 => ListQuery::DEFAULT_PAGE_SIZE,
            n => n.min(ListQuery::MAX_PAGE_SIZE),
        };
        let next_page_token = if keyed.len() > size {
            keyed.truncate(size);
            keyed.last().map(|(k, _)| page_token(k)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSandboxesResponse {
            sandboxes: keyed.into_iter().map(|(_, sb)| sb).collect(),
            next_page_token,
        }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let caller = principal(&request)?;
        let id = request.get_ref().sandbox_id.clone();
        let allow_missing = request.get_ref().allow_missing;
        let route = match self.directory.route(caller.as_str(), &id).await {
            Err(s) if s.code() == Code::NotFound && allow_missing => {
                return Ok(Response::new(pb::DeleteSandboxResponse::default()))
            }
            other => other?,
        };
        match route {
            // Nothing left to stop: its runner lost it.
            Route::Failed(row) => Ok(Response::new(pb::DeleteSandboxResponse {
                sandbox: Some(failed_sandbox(&row)),
                file_system_snapshot_ids: vec![],
            })),
            Route::Runner(runner) => {
                let answer = self
                    .directory
                    .sandbox_client(&runner)
                    .delete_sandbox(onward(request))
                    .await
                    .map_err(|s| runner_error(&runner, s))?;
                // The capacity is back at once; the runner's sync would
                // also see the sandbox ended.
                if let Err(e) = self
                    .directory
                    .store()
                    .release(&id, SandboxState::Terminated, "stopped by request")
                    .await
                {
                    tracing::warn!(sandbox_id = %id, error = %sandpit_errors::chain(&e), "cannot release; the runner's sync does");
                }
                Ok(back(answer))
            }
        }
    }

    async fn purge_sandboxes(
        &self,
        request: Request<pb::PurgeSandboxesRequest>,
    ) -> Result<Response<pb::PurgeSandboxesResponse>, Status> {
        principal(&request)?;
        let req = request.get_ref();
        if req.tags.is_empty() && !req.purge_all {
            return Err(invalid_request(&[Violation::new(
                "tags",
                "give at least one tag, or set purge_all",
            )]));
        }
        let runners = self.directory.live().await;
        let calls = runners.iter().map(|runner| {
            let mut client = self.directory.sandbox_client(runner);
            let forwarded = with_metadata(request.metadata(), req.clone());
            async move {
                client
                    .purge_sandboxes(forwarded)
                    .await
                    .map_err(|s| runner_error(runner, s))
            }
        });
        let mut out = pb::PurgeSandboxesResponse::default();
        for answer in futures_util::future::join_all(calls).await {
            let answer = answer?.into_inner();
            out.purge_count = out.purge_count.saturating_add(answer.purge_count);
            out.failed_sandbox_ids.extend(answer.failed_sandbox_ids);
            out.retryable_failed_sandbox_ids
                .extend(answer.retryable_failed_sandbox_ids);
        }
        Ok(Response::new(out))
    }

    async fn connect_sandbox(
        &self,
        request: Request<pb::ConnectSandboxRequest>,
    ) -> Result<Response<pb::SandboxConnection>, Status> {
        let caller = principal(&request)?;
        let Some(ca) = &self.ca else {
            // No signing CA, no direct credentials: the client then uses
            // the data RPCs of this service, through the gateway.
            return Err(errors::rpc_not_implemented("ConnectSandbox"));
        };
        let runner = self.running(caller.as_str(), &request.get_ref().sandbox_id);
        super::connect::connect(ca, caller.as_str(), request.get_ref(), runner).await
    }

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let caller = principal(&request)?;
        let runner = self
            .running(caller.as_str(), &request.get_ref().sandbox_id)
            .await?;
        self.directory
            .sandbox_client(&runner)
            .exec(onward(request))
            .await
            .map(back)
            .map_err(|s| runner_error(&runner, s))
    }

    async fn stream_exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecStreamRequest>>,
    ) -> Result<Response<BoxStream<pb::ExecStreamResponse>>, Status> {
        use tokio_stream::StreamExt;
        let caller = principal(&request)?;
        let (metadata, _, mut inbound) = request.into_parts();
        // The first message names the sandbox; it goes on with the rest.
        let first = inbound.message().await?.ok_or_else(|| {
            invalid_request(&[Violation::new("init", "the stream ended before its init")])
        })?;
        let id = match &first.message {
            Some(pb::exec_stream_request::Message::Init(init)) => init.sandbox_id.clone(),
            _ => {
                return Err(invalid_request(&[Violation::new(
                    "init",
                    "the first message must be init",
                )]))
            }
        };
        let runner = self.running(caller.as_str(), &id).await?;
        // A client whose stream breaks is gone: the runner sees its end.
        let rest = inbound.map_while(Result::ok);
        let outbound = tokio_stream::once(first).chain(rest);
        let response = self
            .directory
            .sandbox_client(&runner)
            .stream_exec(with_metadata(&metadata, outbound))
            .await
            .map_err(|s| runner_error(&runner, s))?;
        let (metadata, stream, _) = response.into_parts();
        Ok(Response::from_parts(
            metadata,
            Box::pin(stream) as BoxStream<pb::ExecStreamResponse>,
            Default::default(),
        ))
    }

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<BoxStream<pb::LogEntry>>, Status> {
        let caller = principal(&request)?;
        let runner = self
            .running(caller.as_str(), &request.get_ref().sandbox_id)
            .await?;
        let response = self
            .directory
            .sandbox_client(&runner)
            .stream_logs(onward(request))
            .await
            .map_err(|s| runner_error(&runner, s))?;
        let (metadata, stream, _) = response.into_parts();
        Ok(Response::from_parts(
            metadata,
            Box::pin(stream) as BoxStream<pb::LogEntry>,
            Default::default(),
        ))
    }

    async fn write_file(
        &self,
        request: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let caller = principal(&request)?;
        let runner = self
            .running(caller.as_str(), &request.get_ref().sandbox_id)
            .await?;
        self.directory
            .sandbox_client(&runner)
            .write_file(onward(request))
            .await
            .map(back)
            .map_err(|s| runner_error(&runner, s))
    }

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let caller = principal(&request)?;
        let runner = self
            .running(caller.as_str(), &request.get_ref().sandbox_id)
            .await?;
        self.directory
            .sandbox_client(&runner)
            .read_file(onward(request))
            .await
            .map(back)
            .map_err(|s| runner_error(&runner, s))
    }

    async fn create_file_system_snapshot(
        &self,
        _: Request<pb::CreateFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        Err(errors::snapshots_not_supported(
            "file-system snapshots through the gateway",
        ))
    }

    async fn get_file_system_snapshot(
        &self,
        _: Request<pb::GetFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        Err(errors::snapshots_not_supported(
            "file-system snapshots through the gateway",
        ))
    }

    async fn list_file_system_snapshots(
        &self,
        _: Request<pb::ListFileSystemSnapshotsRequest>,
    ) -> Result<Response<pb::ListFileSystemSnapshotsResponse>, Status> {
        Err(errors::snapshots_not_supported(
            "file-system snapshots through the gateway",
        ))
    }

    async fn delete_file_system_snapshot(
        &self,
        _: Request<pb::DeleteFileSystemSnapshotRequest>,
    ) -> Result<Response<pb::FileSystemSnapshot>, Status> {
        Err(errors::snapshots_not_supported(
            "file-system snapshots through the gateway",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_junk_is_refused() {
        let key = (1_700_000_000, 123, "abc.def".to_owned());
        assert_eq!(parse_token(&page_token(&key)), Some(key));
        assert_eq!(parse_token("junk"), None);
        assert_eq!(parse_token("1.x.id"), None);
    }

    #[test]
    fn a_failed_row_answers_failed_with_its_reason_and_runner() {
        let row = sandpit_cluster::SandboxRow {
            id: "sb1".into(),
            principal: "alice".into(),
            runner: RunnerId::new("r3").unwrap(),
            cpu_millis: 0,
            memory_bytes: 0,
            state: SandboxState::Failed,
            reason: "runner r3 stopped answering".into(),
        };
        let sb = failed_sandbox(&row);
        let st = sb.status.unwrap();
        assert_eq!(st.state, pb::State::Failed as i32);
        assert_eq!(
            (st.state_reason.as_str(), st.runner_id.as_str()),
            ("runner r3 stopped answering", "r3")
        );
        let s = not_running(&row);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("stopped answering"));
    }
}
