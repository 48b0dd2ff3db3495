//! What storage operations refuse or fail with; `api` maps each to a gRPC
//! code and the client's ErrorInfo reason.

use crate::engine::EngineError;
use crate::manager::ManagerError;

use super::catalog::CatalogError;

/// Errors of [`super::Storage`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No such volume of the caller's.
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    /// The volume exists but cannot be mounted now.
    #[error("volume {id:?} is {state}{}", reason_suffix(.reason))]
    VolumeNotReady {
        /// The volume.
        id: String,
        /// Its state.
        state: &'static str,
        /// Its state reason.
        reason: String,
    },
    /// Sandboxes mount the volume.
    #[error("volume {id:?} is mounted by {}", .sandboxes.join(", "))]
    VolumeInUse {
        /// The volume.
        id: String,
        /// Who mounts it (ids, or a note about sandboxes being created).
        sandboxes: Vec<String>,
    },
    /// A volume with this id exists (made by another request).
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    /// A field of the request is wrong.
    #[error("{field}: {why}")]
    Invalid {
        /// The field path.
        field: String,
        /// Why.
        why: String,
    },
    /// No such snapshot of the caller's.
    #[error("file-system snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// The snapshot exists but is not usable (yet).
    #[error("file-system snapshot {id:?} is {state}{}", reason_suffix(.reason))]
    SnapshotNotReady {
        /// The snapshot.
        id: String,
        /// Its state.
        state: &'static str,
        /// Its state reason.
        reason: String,
    },
    /// The named volume cannot be snapshotted.
    #[error("{0}")]
    NotSnapshottable(String),
    /// The sandbox is not running.
    #[error("sandbox {id} is {state}, not running")]
    SandboxNotRunning {
        /// The sandbox.
        id: String,
        /// Its state.
        state: String,
    },
    /// This runner does not offer it.
    #[error("{0} not offered on this runner")]
    NotSupported(&'static str),
    /// The snapshot bucket cannot be used.
    #[error("snapshot bucket {bucket:?} is unavailable")]
    BucketUnavailable {
        /// The bucket.
        bucket: String,
        /// Why.
        #[source]
        source: EngineError,
    },
    /// A sandbox lookup failed.
    #[error("sandbox")]
    Manager(#[from] ManagerError),
    /// The records failed.
    #[error("storage records")]
    Catalog(#[from] CatalogError),
    /// The machinery failed.
    #[error("storage engine")]
    Engine(#[from] EngineError),
    /// A blocking task panicked or was cancelled.
    #[error("storage task failed")]
    Task,
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

impl StorageError {
    /// A field violation.
    pub fn invalid(field: impl Into<String>, why: impl Into<String>) -> Self {
        StorageError::Invalid {
            field: field.into(),
            why: why.into(),
        }
    }
}
