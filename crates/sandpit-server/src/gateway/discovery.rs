//! DiscoveryService at the gateway: every live runner describes itself
//! (its capacity and what it supports, as the single host does), and the
//! gateway merges the answers.

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::discovery_service_server::DiscoveryService;
use tonic::{Code, Request, Response, Status};

use super::directory::Directory;
use super::forward::{back, onward, runner_error, with_metadata};
use crate::api::errors::{self, reason};
use crate::api::principal;

/// The gateway's DiscoveryService.
#[derive(Debug)]
pub(super) struct GatewayDiscoveryApi {
    directory: Directory,
}

impl GatewayDiscoveryApi {
    /// Over `directory`.
    pub(super) fn new(directory: Directory) -> Self {
        Self { directory }
    }
}

fn runner_not_found(id: &str) -> Status {
    errors::status(
        Code::NotFound,
        format!("runner {id} not found"),
        reason::RUNNER_NOT_FOUND,
        &[("runner_id", id.to_owned())],
    )
}

#[tonic::async_trait]
impl DiscoveryService for GatewayDiscoveryApi {
    async fn list_available_runners(
        &self,
        request: Request<pb::ListAvailableRunnersRequest>,
    ) -> Result<Response<pb::ListAvailableRunnersResponse>, Status> {
        principal(&request)?;
        let mut per = request.get_ref().clone();
        per.page_token.clear();
        per.page_size = 0;
        let runners = self.directory.live().await;
        let calls = runners.iter().map(|runner| {
            let mut client = self.directory.discovery_client(runner);
            let forwarded = with_metadata(request.metadata(), per.clone());
            async move {
                client
                    .list_available_runners(forwarded)
                    .await
                    .map_err(|s| runner_error(runner, s))
            }
        });
        let mut out = pb::ListAvailableRunnersResponse::default();
        for (runner, answer) in runners
            .iter()
            .zip(futures_util::future::join_all(calls).await)
        {
            match answer {
                Ok(a) => out.runners.extend(a.into_inner().runners),
                // One runner down does not hide the others: it is left
                // out, as an unhealthy runner would be.
                Err(e) => {
                    tracing::warn!(runner = %runner.status.id, error = %e.message(), "runner did not describe itself")
                }
            }
        }
        out.runners.sort_by(|a, b| a.runner_id.cmp(&b.runner_id));
        Ok(Response::new(out))
    }

    async fn get_available_runner(
        &self,
        request: Request<pb::GetAvailableRunnerRequest>,
    ) -> Result<Response<pb::AvailableRunner>, Status> {
        principal(&request)?;
        let id = request.get_ref().runner_id.clone();
        let runner = self
            .directory
            .runner(&id)
            .await
            .filter(|r| r.status.live)
            .ok_or_else(|| runner_not_found(&id))?;
        self.directory
            .discovery_client(&runner)
            .get_available_runner(onward(request))
            .await
            .map(back)
            .map_err(|s| runner_error(&runner, s))
    }
}
