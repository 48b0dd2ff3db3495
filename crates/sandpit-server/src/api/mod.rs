//! The gRPC surface: handlers that translate between `coreweave.sandbox.v1`
//! messages and the manager's domain types. Nothing here decides lifecycle
//! policy.
//!
//! The data-plane RPCs ([`exec`]: StreamExec and Exec, [`files`]: ReadFile
//! and WriteFile) start from [`crate::manager::Manager::agent_for`], which
//! waits while a sandbox is being created and refuses one that is not
//! running; [`logs`] (StreamLogs) reads what the log sink kept.

pub mod accounting;
pub mod checkpoint;
pub mod convert;
pub mod discovery;
pub mod errors;
pub mod exec;
pub mod files;
pub mod logs;
pub(crate) mod network;
pub mod operations;
pub mod pool;
pub mod sandbox;
pub mod secrets;
pub(crate) mod services;
pub mod snapshots;
pub mod validate;
pub mod volumes;

use tonic::{Code, Request, Status};

use crate::manager::ManagerError;
use crate::model::{Principal, SandboxId};

pub use accounting::AccountingApi;
pub use checkpoint::CheckpointApi;
pub use discovery::DiscoveryApi;
pub use operations::OperationsApi;
pub use sandbox::{DataPlaneOptions, SandboxApi};
pub use snapshots::SettingsApi;
pub use volumes::VolumeApi;

/// A sandbox id from a request. One that is not even a valid id names no
/// sandbox: NOT_FOUND, exactly like an unknown one.
pub(crate) fn known_id(id: &str) -> Result<SandboxId, Status> {
    SandboxId::parse(id).map_err(|_| errors::from_manager(ManagerError::NotFound(id.to_owned())))
}

/// INVALID_ARGUMENT naming `field` when a required string is empty.
pub(crate) fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(errors::invalid_request(&[errors::Violation::new(
            field, "required",
        )]));
    }
    Ok(())
}

/// The caller, as the auth interceptor recorded it.
pub(crate) fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        // Only reachable if a service was mounted without the interceptor.
        .ok_or_else(|| {
            errors::status(
                Code::Unauthenticated,
                "no principal",
                errors::reason::UNAUTHENTICATED,
                &[],
            )
        })
}
