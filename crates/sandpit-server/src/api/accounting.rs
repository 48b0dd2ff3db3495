//! `sandpit.v1.Accounting`, the extension next to `coreweave.sandbox.v1`:
//! ListCommands answers a sandbox's command records (see
//! [`crate::accounting`]), which the client's protocol has no field for.

use sandpit_proto::sandpit::v1 as spb;
use sandpit_proto::sandpit::v1::accounting_server::Accounting;
use tonic::{Request, Response, Status};

use super::{convert, errors, known_id, principal, require};
use crate::accounting::{CommandRecord, Outcome};
use crate::engine::Engine;
use crate::manager::Manager;

/// The Accounting service.
#[derive(Debug)]
pub struct AccountingApi<E: Engine> {
    manager: Manager<E>,
}

impl<E: Engine> AccountingApi<E> {
    /// Handlers over `manager`.
    pub fn new(manager: Manager<E>) -> Self {
        Self { manager }
    }
}

#[tonic::async_trait]
impl<E: Engine> Accounting for AccountingApi<E> {
    async fn list_commands(
        &self,
        request: Request<spb::ListCommandsRequest>,
    ) -> Result<Response<spb::ListCommandsResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        require("sandbox_id", &req.sandbox_id)?;
        let id = known_id(&req.sandbox_id)?;
        let records = self
            .manager
            .list_commands(&principal, &id)
            .map_err(errors::from_manager)?;
        Ok(Response::new(spb::ListCommandsResponse {
            commands: records.iter().map(command).collect(),
        }))
    }
}

/// A record as the service answers it.
pub fn command(r: &CommandRecord) -> spb::CommandRecord {
    use spb::CommandOutcome as O;
    let (outcome, signal) = match r.outcome {
        Outcome::Exited { .. } => (O::Exited, None),
        Outcome::Signaled { signal } => (O::Signaled, Some(signal)),
        Outcome::OomKilled => (O::OomKilled, Some(libc::SIGKILL)),
        Outcome::TimedOut => (O::TimedOut, None),
        Outcome::SandboxStopped => (O::SandboxStopped, None),
        Outcome::Cancelled => (O::Cancelled, None),
        Outcome::InfrastructureError => (O::InfrastructureError, None),
    };
    spb::CommandRecord {
        id: r.id.clone(),
        argv: r.argv.clone(),
        start_time: Some(convert::timestamp(r.start_time)),
        end_time: Some(convert::timestamp(r.end_time)),
        duration_seconds: r.duration.as_secs_f64(),
        cpu_user_seconds: r.usage.map(|u| u.user_us as f64 / 1e6),
        cpu_system_seconds: r.usage.map(|u| u.sys_us as f64 / 1e6),
        peak_memory_bytes: r.usage.map(|u| u.max_rss_bytes),
        outcome: outcome as i32,
        exit_code: r.exit_code,
        signal,
        detail: r.detail.clone(),
    }
}
