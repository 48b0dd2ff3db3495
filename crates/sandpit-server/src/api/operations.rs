//! `sandpit.v1.Operations`, the operations extension: SandboxStats (live
//! figures of the caller's running sandboxes, `sandpit stats`). Only
//! delegates: who may see which sandbox is the manager's rule (a principal
//! sees its own; another's id is NOT_FOUND like an unknown one).

use std::time::SystemTime;

use sandpit_proto::sandpit::v1 as spb;
use sandpit_proto::sandpit::v1::operations_server::Operations;
use tonic::{Request, Response, Status};

use super::errors::{self, invalid_request, Violation};
use super::{known_id, principal};
use crate::engine::Engine;
use crate::manager::Manager;

/// The most ids one call may name.
pub const MAX_IDS: usize = 1000;

/// The Operations implementation.
#[derive(Debug)]
pub struct OperationsApi<E: Engine> {
    manager: Manager<E>,
}

impl<E: Engine> OperationsApi<E> {
    /// Handlers over `manager`.
    pub fn new(manager: Manager<E>) -> Self {
        Self { manager }
    }
}

#[tonic::async_trait]
impl<E: Engine> Operations for OperationsApi<E> {
    async fn sandbox_stats(
        &self,
        request: Request<spb::SandboxStatsRequest>,
    ) -> Result<Response<spb::SandboxStatsResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.into_inner();
        if req.sandbox_ids.len() > MAX_IDS {
            return Err(invalid_request(&[Violation::new(
                "sandbox_ids",
                format!("at most {MAX_IDS} ids"),
            )]));
        }
        let ids = req
            .sandbox_ids
            .iter()
            .map(|id| known_id(id))
            .collect::<Result<Vec<_>, _>>()?;
        let read = SystemTime::now();
        let stats = self
            .manager
            .sandbox_stats(&principal, &ids)
            .await
            .map_err(errors::from_manager)?;
        let sandboxes = stats
            .into_iter()
            .map(|(r, s)| spb::SandboxStatsEntry {
                sandbox_id: r.id.to_string(),
                display_name: r.display_name,
                tags: r.tags,
                cpu_usage_ns: s.cpu_usage_ns,
                memory_bytes: s.memory_bytes,
                memory_limit_bytes: s.memory_limit_bytes,
                memory_peak_bytes: s.memory_peak_bytes,
                pids: s.pids,
                net_rx_bytes: s.net_rx_bytes,
                net_tx_bytes: s.net_tx_bytes,
                cpu_limit_millis: r.resources.limits.cpu_millis,
            })
            .collect();
        Ok(Response::new(spb::SandboxStatsResponse {
            sandboxes,
            read_time_unix_nanos: read
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }))
    }
}
