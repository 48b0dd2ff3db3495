//! `coreweave.sandbox.v1.DiscoveryService`: this host as the only runner.

use std::time::SystemTime;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::discovery_service_server::DiscoveryService;
use tonic::{Code, Request, Response, Status};

use super::errors::{self, reason};
use super::{convert, principal};
use crate::auth::Organization;
use crate::engine::Engine;
use crate::manager::Manager;

/// The runner group this server reports.
pub const RUNNER_GROUP: &str = "local";

/// The DiscoveryService implementation.
#[derive(Debug)]
pub struct DiscoveryApi<E: Engine> {
    manager: Manager<E>,
    runner_id: String,
    started: SystemTime,
    organization_id: String,
}

impl<E: Engine> DiscoveryApi<E> {
    /// Reports runner `runner_id`, up since `started`, in the organization
    /// of each caller (its key's, else `organization_id`).
    pub fn new(
        manager: Manager<E>,
        runner_id: String,
        started: SystemTime,
        organization_id: String,
    ) -> Self {
        Self {
            manager,
            runner_id,
            started,
            organization_id,
        }
    }

    /// The caller's organization.
    fn organization<T>(&self, request: &Request<T>) -> String {
        request
            .extensions()
            .get::<Organization>()
            .map_or_else(|| self.organization_id.clone(), |o| o.0.clone())
    }

    /// PUBLIC and PRIVATE when sandboxes have a network (PRIVATE: their
    /// own address; PUBLIC: through the daemon); none without.
    fn visibilities(&self) -> Vec<i32> {
        match self.manager.engine().network() {
            Some(_) => vec![
                pb::Visibility::Public as i32,
                pb::Visibility::Private as i32,
            ],
            None => vec![],
        }
    }

    /// The runner as `organization` sees it. Capabilities come in every
    /// view (they are what a client filters on, and cost nothing here);
    /// the resources free now only in the full one.
    fn runner(&self, full: bool, organization: String) -> pb::AvailableRunner {
        let cap = self.manager.engine().capacity();
        // What admission allows (never more than the host has), and what
        // the live sandboxes' requests leave of it.
        let alloc = self.manager.config().allocatable;
        let max_cpu = alloc.cpu_millis.min(cap.cpu_millis);
        let max_memory = alloc.memory_bytes.min(cap.memory_total_bytes);
        let committed = self.manager.committed();
        let free_cpu = max_cpu.saturating_sub(committed.cpu_millis.unwrap_or(0));
        let free_memory = max_memory
            .saturating_sub(committed.memory_bytes.unwrap_or(0))
            .min(cap.memory_available_bytes);
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        pb::AvailableRunner {
            runner_id: self.runner_id.clone(),
            runner_group_id: RUNNER_GROUP.into(),
            tags: vec![],
            healthy: true,
            capabilities: Some(pb::RunnerCapabilitySummary {
                max_cpu_millicores: as_i64(max_cpu),
                max_memory_bytes: as_i64(max_memory),
                max_gpu_count: 0,
                supported_gpu_types: vec![],
                supported_architectures: vec![oci_architecture(&cap.architecture).to_owned()],
                supports_privileged: false,
                available_storage_classes: vec![],
                supported_service_visibilities: self.visibilities(),
            }),
            resources: full.then(|| pb::RunnerResourceSummary {
                available_cpu_millicores: as_i64(free_cpu),
                available_memory_bytes: as_i64(free_memory),
                available_gpu_count: 0,
                running_sandboxes: self.manager.running_count().min(i32::MAX as usize) as i32,
            }),
            connected_at: Some(convert::timestamp(self.started)),
            is_shared: false,
            organization_id: organization,
        }
    }
}

/// The architecture as OCI platforms (and the client's docs) spell it:
/// `amd64` for `x86_64`, `arm64` for `aarch64`.
fn oci_architecture(machine: &str) -> &str {
    match machine {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn full_view(view: i32) -> bool {
    // Unspecified means the default, which is the full view: a single
    // runner's capacity is cheap to compute.
    pb::RunnerView::try_from(view) != Ok(pb::RunnerView::Basic)
}

#[tonic::async_trait]
impl<E: Engine> DiscoveryService for DiscoveryApi<E> {
    async fn list_available_runners(
        &self,
        request: Request<pb::ListAvailableRunnersRequest>,
    ) -> Result<Response<pb::ListAvailableRunnersResponse>, Status> {
        principal(&request)?;
        let organization = self.organization(&request);
        let req = request.get_ref();
        let arch = std::env::consts::ARCH;
        let matches = (req.runner_group_id.is_empty() || req.runner_group_id == RUNNER_GROUP)
            && req.gpu_type.is_empty()
            && (req.architecture.is_empty()
                || req.architecture == arch
                || req.architecture == oci_architecture(arch))
            && (req.service_visibility == pb::Visibility::Unspecified as i32
                || self.visibilities().contains(&req.service_visibility));
        let runners = if matches {
            vec![self.runner(full_view(req.view), organization)]
        } else {
            vec![]
        };
        Ok(Response::new(pb::ListAvailableRunnersResponse {
            runners,
            next_page_token: String::new(),
        }))
    }

    async fn get_available_runner(
        &self,
        request: Request<pb::GetAvailableRunnerRequest>,
    ) -> Result<Response<pb::AvailableRunner>, Status> {
        principal(&request)?;
        let organization = self.organization(&request);
        let req = request.get_ref();
        // Another organization's runner is as unknown as a missing one. An
        // empty organization means the caller's own (the client refuses to
        // send one; other callers may).
        let elsewhere = !req.organization_id.is_empty() && req.organization_id != organization;
        if req.runner_id != self.runner_id || elsewhere {
            return Err(errors::status(
                Code::NotFound,
                format!("runner {} not found", req.runner_id),
                reason::RUNNER_NOT_FOUND,
                &[("runner_id", req.runner_id.clone())],
            ));
        }
        Ok(Response::new(
            self.runner(full_view(req.view), organization),
        ))
    }
}
