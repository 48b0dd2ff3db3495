//! gRPC errors in the shape the cwsandbox client reads: a `google.rpc.Status`
//! in `grpc-status-details-bin` with an `ErrorInfo` of domain
//! `cwsandbox.com` (the client picks exception classes by its reason), plus
//! `BadRequest` field violations for invalid requests.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::auth::AuthError;
use crate::manager::ManagerError;

/// The `ErrorInfo.domain` the client expects.
pub const DOMAIN: &str = "cwsandbox.com";

/// Reasons (`ErrorInfo.reason`) this server uses.
pub mod reason {
    /// Unknown sandbox (or another principal's).
    pub const SANDBOX_NOT_FOUND: &str = "CWSANDBOX_SANDBOX_NOT_FOUND";
    /// Unknown runner.
    pub const RUNNER_NOT_FOUND: &str = "CWSANDBOX_RUNNER_NOT_FOUND";
    /// The request is invalid; `BadRequest` says which fields.
    pub const INVALID_REQUEST: &str = "CWSANDBOX_INVALID_REQUEST";
    /// An RPC or a field this server does not support (yet).
    pub const NOT_IMPLEMENTED: &str = "CWSANDBOX_NOT_IMPLEMENTED";
    /// Too many sandboxes on this runner.
    pub const RUNNER_CAPACITY_EXHAUSTED: &str = "CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED";
    /// A data-plane call on a sandbox that does not run.
    pub const SANDBOX_NOT_RUNNING: &str = "CWSANDBOX_SANDBOX_NOT_RUNNING";
    /// A command's deadline passed (it was killed).
    pub const COMMAND_TIMEOUT: &str = "CWSANDBOX_COMMAND_TIMEOUT";
    /// The file does not exist.
    pub const FILE_NOT_FOUND: &str = "CWSANDBOX_FILE_NOT_FOUND";
    /// The path is a directory.
    pub const FILE_IS_DIRECTORY: &str = "CWSANDBOX_FILE_IS_DIRECTORY";
    /// The sandbox's user may not read or write the file.
    pub const FILE_PERMISSION_DENIED: &str = "CWSANDBOX_FILE_PERMISSION_DENIED";
    /// The file is larger than one message may carry.
    pub const FILE_TOO_LARGE: &str = "CWSANDBOX_FILE_TOO_LARGE";
    /// Any other failure of a file transfer (not a regular file, I/O).
    pub const FILE_IO_FAILED: &str = "CWSANDBOX_FILE_IO_FAILED";
    /// No or a wrong API key.
    pub const UNAUTHENTICATED: &str = "CWSANDBOX_UNAUTHENTICATED";
    /// A fault of this server.
    pub const INTERNAL: &str = "CWSANDBOX_INTERNAL";
    /// More of a resource than this runner has (GPUs here).
    pub const RESOURCE_CEILING_EXCEEDED: &str = "CWSANDBOX_RESOURCE_CEILING_EXCEEDED";
    /// File-system snapshots are not available on this runner.
    pub const FSS_NOT_SUPPORTED: &str = "CWSANDBOX_FSS_NOT_SUPPORTED";
    /// TLS passthrough endpoints are not available on this runner.
    pub const TLS_PASSTHROUGH_ENDPOINTS_NOT_SUPPORTED: &str =
        "CWSANDBOX_TLS_PASSTHROUGH_ENDPOINTS_NOT_SUPPORTED";
    /// A secret store a request names is not configured (the client knows
    /// no secret reasons: it maps FAILED_PRECONDITION to `SandboxError`,
    /// keeping this reason and the metadata).
    pub const SECRET_STORE_NOT_FOUND: &str = "CWSANDBOX_SECRET_STORE_NOT_FOUND";
    /// A secret, or its field, does not exist (NOT_FOUND, which the client
    /// raises as `SandboxNotFoundError` with this reason).
    pub const SECRET_NOT_FOUND: &str = "CWSANDBOX_SECRET_NOT_FOUND";
    /// A secret exists but cannot be used as asked (FAILED_PRECONDITION).
    pub const SECRET_UNUSABLE: &str = "CWSANDBOX_SECRET_UNUSABLE";
    /// No such registered volume of the caller's (NOT_FOUND).
    pub const VOLUME_NOT_FOUND: &str = "CWSANDBOX_VOLUME_NOT_FOUND";
    /// The volume is not READY (FAILED_PRECONDITION).
    pub const VOLUME_NOT_READY: &str = "CWSANDBOX_VOLUME_NOT_READY";
    /// Sandboxes mount the volume (FAILED_PRECONDITION).
    pub const VOLUME_IN_USE: &str = "CWSANDBOX_VOLUME_IN_USE";
    /// Not a kind of volume this runner has (FAILED_PRECONDITION).
    pub const VOLUME_TYPE_NOT_SUPPORTED: &str = "CWSANDBOX_VOLUME_TYPE_NOT_SUPPORTED";
    /// A registered volume named for a snapshot (FAILED_PRECONDITION).
    pub const VOLUME_NOT_SNAPSHOTTABLE: &str = "CWSANDBOX_VOLUME_NOT_SNAPSHOTTABLE";
    /// No such snapshot of the caller's (NOT_FOUND).
    pub const FSS_NOT_FOUND: &str = "CWSANDBOX_FSS_NOT_FOUND";
    /// The snapshot is not READY (FAILED_PRECONDITION).
    pub const FSS_NOT_READY: &str = "CWSANDBOX_FSS_NOT_READY";
    /// The snapshot bucket cannot be used (FAILED_PRECONDITION).
    pub const FSS_BUCKET_UNAVAILABLE: &str = "CWSANDBOX_FSS_BUCKET_UNAVAILABLE";
    /// Taking the snapshot failed (INTERNAL).
    pub const FSS_CREATE_FAILED: &str = "CWSANDBOX_FSS_CREATE_FAILED";
}

/// One offending field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `sandbox.spec.containers[0].image`.
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A status with an `ErrorInfo` (and optional extras).
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, String)],
) -> Status {
    with_details(code, message, reason, metadata, &[], None)
}

fn with_details(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, String)],
    violations: &[Violation],
    retry_after: Option<Duration>,
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    if !violations.is_empty() {
        details.set_bad_request(
            violations
                .iter()
                .map(|v| FieldViolation::new(v.field.clone(), v.description.clone()))
                .collect::<Vec<_>>(),
        );
    }
    if let Some(d) = retry_after {
        details.set_retry_info(Some(d));
    }
    Status::with_error_details(code, message, details)
}

/// A refusal that names the fields at fault, with metadata of its own
/// (the secret store, the secret): `code` with an `ErrorInfo` and
/// `BadRequest` violations.
pub fn refused_with(
    code: Code,
    reason: &str,
    metadata: &[(&str, String)],
    violations: &[Violation],
) -> Status {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    with_details(code, parts.join("; "), reason, metadata, violations, None)
}

/// RESOURCE_EXHAUSTED with the client's capacity reason and a RetryInfo:
/// nothing can take the sandbox now, later something may.
pub fn capacity_exhausted(message: impl Into<String>, retry_after: Duration) -> Status {
    with_details(
        Code::ResourceExhausted,
        message,
        reason::RUNNER_CAPACITY_EXHAUSTED,
        &[],
        &[],
        Some(retry_after),
    )
}

/// NOT_FOUND for a sandbox id.
pub fn sandbox_not_found(id: &str) -> Status {
    status(
        Code::NotFound,
        format!("sandbox {id} not found"),
        reason::SANDBOX_NOT_FOUND,
        &[("sandbox_id", id.to_owned())],
    )
}

/// UNIMPLEMENTED for a whole RPC.
pub fn rpc_not_implemented(rpc: &str) -> Status {
    status(
        Code::Unimplemented,
        format!("{rpc} is not implemented by this server"),
        reason::NOT_IMPLEMENTED,
        &[("rpc", rpc.to_owned())],
    )
}

/// FAILED_PRECONDITION for a file-system snapshot operation: the client
/// raises `SnapshotNotSupportedError` for it.
pub fn snapshots_not_supported(what: &str) -> Status {
    status(
        Code::FailedPrecondition,
        format!("{what}: file-system snapshots are not supported on this runner"),
        reason::FSS_NOT_SUPPORTED,
        &[("rpc", what.to_owned())],
    )
}

/// INVALID_ARGUMENT with field violations.
pub fn invalid_request(violations: &[Violation]) -> Status {
    with_details(
        Code::InvalidArgument,
        summary("invalid request", violations),
        reason::INVALID_REQUEST,
        &[],
        violations,
        None,
    )
}

/// A request using fields this server does not honour, with the code and
/// reason the client maps (CWSANDBOX_NOT_IMPLEMENTED for most; a specific
/// one where the client has one: snapshots, TLS passthrough, GPUs).
pub fn refused(code: Code, reason: &str, violations: &[Violation]) -> Status {
    let fields = violations
        .iter()
        .map(|v| v.field.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let what = if reason == reason::NOT_IMPLEMENTED {
        "not implemented"
    } else {
        "not supported on this runner"
    };
    with_details(
        code,
        summary(what, violations),
        reason,
        &[("field", fields)],
        violations,
        None,
    )
}

fn summary(what: &str, violations: &[Violation]) -> String {
    let parts: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    format!("{what}: {}", parts.join("; "))
}

/// UNAUTHENTICATED.
pub fn unauthenticated(e: &AuthError) -> Status {
    status(
        Code::Unauthenticated,
        e.to_string(),
        reason::UNAUTHENTICATED,
        &[],
    )
}

/// A quantity as a person reads it: `1500m` CPU, `1.5 GiB` memory.
fn unit(resource: &str, n: u64) -> String {
    if resource == "cpu" {
        format!("{n}m CPU")
    } else if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30))
    } else {
        format!("{} MiB", n >> 20)
    }
}

fn capacity_message(resource: &str, requested: u64, available: u64, allocatable: u64) -> String {
    format!(
        "runner is at capacity: {resource} request of {} exceeds the {} of {} not yet requested by live sandboxes",
        unit(resource, requested),
        unit(resource, available),
        unit(resource, allocatable)
    )
}

/// The status for a manager error.
pub fn from_manager(e: ManagerError) -> Status {
    match e {
        ManagerError::NotFound(id) => sandbox_not_found(&id),
        ManagerError::CapacityExhausted { live, max } => with_details(
            Code::ResourceExhausted,
            format!("runner is at capacity: {live} of {max} sandboxes are live"),
            reason::RUNNER_CAPACITY_EXHAUSTED,
            &[("max_sandboxes", max.to_string())],
            &[],
            Some(Duration::from_secs(5)),
        ),
        ManagerError::InsufficientCapacity {
            resource,
            requested,
            available,
            allocatable,
        } => with_details(
            Code::ResourceExhausted,
            capacity_message(resource, requested, available, allocatable),
            reason::RUNNER_CAPACITY_EXHAUSTED,
            &[
                ("resource", resource.to_string()),
                ("requested", requested.to_string()),
                ("available", available.to_string()),
                ("allocatable", allocatable.to_string()),
            ],
            &[],
            Some(Duration::from_secs(5)),
        ),
        ManagerError::ResourceCeiling {
            resource,
            requested,
            allocatable,
        } => with_details(
            Code::InvalidArgument,
            format!(
                "{resource} request of {} is more than this runner can ever allocate ({})",
                unit(resource, requested),
                unit(resource, allocatable)
            ),
            reason::RESOURCE_CEILING_EXCEEDED,
            &[
                ("resource", resource.to_string()),
                ("requested", requested.to_string()),
                ("allocatable", allocatable.to_string()),
            ],
            &[Violation::new(
                format!("sandbox.spec.containers[0].resource_requirements.requests.{resource}"),
                format!("more than the runner's {}", unit(resource, allocatable)),
            )],
            None,
        ),
        ManagerError::DiskLow { free, reserve } => with_details(
            Code::ResourceExhausted,
            format!(
                "runner is low on disk: {} free in its data dir, below the reserve of {}; delete sandboxes, volumes or snapshots",
                unit("memory", free),
                unit("memory", reserve)
            ),
            reason::RUNNER_CAPACITY_EXHAUSTED,
            &[
                ("resource", "ephemeral-storage".to_string()),
                ("free_bytes", free.to_string()),
                ("reserve_bytes", reserve.to_string()),
            ],
            &[],
            Some(Duration::from_secs(30)),
        ),
        ManagerError::NotRunning {
            id,
            state,
            reason: why,
        } => {
            let mut message = format!("sandbox {id} is {state}, not running");
            if !why.is_empty() {
                message.push_str(&format!(" ({why})"));
            }
            status(
                Code::FailedPrecondition,
                message,
                reason::SANDBOX_NOT_RUNNING,
                &[("sandbox_id", id.to_string()), ("state", state.to_string())],
            )
        }
        ManagerError::InvalidPageToken => invalid_request(&[Violation::new(
            "page_token",
            "not a token this server handed out",
        )]),
        e @ (ManagerError::Db(_) | ManagerError::Engine(_)) => {
            tracing::error!(error = %crate::chain(&e), "internal error");
            status(
                Code::Internal,
                format!("internal error: {}", crate::chain(&e)),
                reason::INTERNAL,
                &[],
            )
        }
    }
}

/// The status for a storage error.
pub fn from_storage(e: crate::storage::StorageError) -> Status {
    use crate::storage::StorageError as S;
    let msg = crate::chain(&e);
    match e {
        S::VolumeNotFound(id) => status(
            Code::NotFound,
            msg,
            reason::VOLUME_NOT_FOUND,
            &[("volume_id", id)],
        ),
        S::VolumeNotReady { id, state, .. } => status(
            Code::FailedPrecondition,
            msg,
            reason::VOLUME_NOT_READY,
            &[("volume_id", id), ("state", state.to_owned())],
        ),
        S::VolumeInUse { id, sandboxes } => status(
            Code::FailedPrecondition,
            msg,
            reason::VOLUME_IN_USE,
            &[("volume_id", id), ("sandbox_ids", sandboxes.join(","))],
        ),
        S::VolumeExists(id) => status(
            Code::AlreadyExists,
            msg,
            reason::INVALID_REQUEST,
            &[("volume_id", id)],
        ),
        S::Invalid { field, why } => invalid_request(&[Violation::new(field, why)]),
        S::SnapshotNotFound(id) => status(
            Code::NotFound,
            msg,
            reason::FSS_NOT_FOUND,
            &[("file_system_snapshot_id", id)],
        ),
        S::SnapshotNotReady { id, state, .. } => status(
            Code::FailedPrecondition,
            msg,
            reason::FSS_NOT_READY,
            &[("file_system_snapshot_id", id), ("state", state.to_owned())],
        ),
        S::NotSnapshottable(_) => status(
            Code::FailedPrecondition,
            msg,
            reason::VOLUME_NOT_SNAPSHOTTABLE,
            &[],
        ),
        S::SandboxNotRunning { id, state } => status(
            Code::FailedPrecondition,
            msg,
            reason::SANDBOX_NOT_RUNNING,
            &[("sandbox_id", id), ("state", state)],
        ),
        S::NotSupported(what) => status(
            Code::FailedPrecondition,
            msg,
            if what == "volumes" {
                reason::VOLUME_TYPE_NOT_SUPPORTED
            } else {
                reason::FSS_NOT_SUPPORTED
            },
            &[],
        ),
        S::BucketUnavailable { bucket, .. } => status(
            Code::FailedPrecondition,
            msg,
            reason::FSS_BUCKET_UNAVAILABLE,
            &[("bucket", bucket)],
        ),
        S::Manager(m) => from_manager(m),
        e @ (S::Catalog(_) | S::Engine(_) | S::Task) => {
            tracing::error!(error = %msg, "storage error");
            let _ = e;
            status(
                Code::Internal,
                format!("internal error: {msg}"),
                reason::INTERNAL,
                &[],
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_carries_error_info() {
        let s = sandbox_not_found("abc");
        assert_eq!(s.code(), Code::NotFound);
        let d = s.get_error_details();
        let info = d.error_info().unwrap();
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.reason, reason::SANDBOX_NOT_FOUND);
        assert_eq!(info.metadata["sandbox_id"], "abc");
    }

    #[test]
    fn invalid_request_lists_fields() {
        let s = invalid_request(&[Violation::new("a.b", "bad"), Violation::new("c", "worse")]);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "invalid request: a.b: bad; c: worse");
        let d = s.get_error_details();
        let fields: Vec<_> = d
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["a.b", "c"]);
        assert_eq!(d.error_info().unwrap().reason, reason::INVALID_REQUEST);
    }

    #[test]
    fn capacity_has_retry_info() {
        let s = from_manager(ManagerError::CapacityExhausted { live: 2, max: 2 });
        assert_eq!(s.code(), Code::ResourceExhausted);
        let d = s.get_error_details();
        assert!(d.retry_info().is_some());
        assert_eq!(
            d.error_info().unwrap().reason,
            reason::RUNNER_CAPACITY_EXHAUSTED
        );
    }
}
