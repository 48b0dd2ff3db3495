//! The domain's own types: what a sandbox is to the manager, independent of
//! the gRPC messages (`api` converts) and of the engine (`engine` abstracts).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

pub use sandpit_runtime::{InvalidSandboxId, SandboxId};

/// Lifecycle state of a sandbox. Which transitions lead from one to another
/// is decided in one place, [`crate::manager::lifecycle::apply`]; its table
/// is in ARCHITECTURE.md (checked against the code by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Accepted; waiting for its image (a registry pull would run here).
    Pending,
    /// The engine is creating it.
    Creating,
    /// Its main process runs (or it idles without one).
    Running,
    /// The main process exited with code 0.
    Completed,
    /// The main process failed, was killed, or the sandbox could not start.
    Failed,
    /// Being stopped (by request or its maximum lifetime).
    Terminating,
    /// Stopped.
    Terminated,
}

impl State {
    /// Every state, in declaration order.
    pub const ALL: [State; 7] = [
        State::Pending,
        State::Creating,
        State::Running,
        State::Completed,
        State::Failed,
        State::Terminating,
        State::Terminated,
    ];

    /// Whether the sandbox reached its end (nothing of it runs any more).
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Completed | State::Failed | State::Terminated)
    }

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Creating => "creating",
            State::Running => "running",
            State::Completed => "completed",
            State::Failed => "failed",
            State::Terminating => "terminating",
            State::Terminated => "terminated",
        }
    }

    /// Inverse of [`State::as_str`].
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling: the owner of the sandboxes it creates. Derived from the
/// API key (see `auth`); principals never see each other's sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(pub String);

impl Principal {
    /// The principal's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CPU and memory quantities (unset = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU in thousandths of a CPU.
    pub cpu_millis: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
}

/// How a sandbox's processes run, from its `security_context` (validated:
/// only what keeps a sandbox inside its isolation is accepted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Security {
    /// The uid of the main command and every exec; `None`: the image's
    /// user, else root.
    pub run_as_user: Option<u32>,
    /// Their gid; `None`: the user's primary group.
    pub run_as_group: Option<u32>,
    /// The capabilities they keep (bit N = capability N); `None`: the
    /// default set (`sandpit_runtime::DEFAULT_CAPS`).
    pub capabilities: Option<u64>,
    /// A read-only root file system, with a writable `/tmp`.
    pub read_only_root: bool,
}

/// What a sandbox asks for and what it may use, Kubernetes' split:
/// requests are its share when the host is contended (CPU weight, a memory
/// floor), never a cap; limits are enforced (CPU quota, memory max).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceSpec {
    /// Asked for.
    pub requests: Resources,
    /// At most.
    pub limits: Resources,
}

impl ResourceSpec {
    /// Whether anything is asked for or capped.
    pub fn is_empty(&self) -> bool {
        *self == ResourceSpec::default()
    }
}

/// A file written into the sandbox before its main command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedFile {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Content.
    pub content: Vec<u8>,
}

/// A validated creation request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSandbox {
    /// Idempotency key: a retry with the same key returns the same sandbox.
    pub request_id: Option<String>,
    /// Normalised image reference (`docker.io/library/python:3.11`).
    pub image: String,
    /// The executable; replaces the image's entrypoint (and cmd) when set.
    pub command: Option<String>,
    /// Arguments; replace the image's cmd.
    pub args: Vec<String>,
    /// Added to (or overriding) the image's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the image's when unset.
    pub working_dir: Option<String>,
    /// Files written before the main command starts.
    pub files: Vec<MountedFile>,
    /// Requests and limits for the sandbox's cgroup.
    pub resources: ResourceSpec,
    /// User, capabilities and root file system of its processes.
    pub security: Security,
    /// Gates RUNNING: the sandbox stays CREATING until it passes, and
    /// FAILED if it fails.
    pub startup_probe: Option<sandpit_wire::Probe>,
    /// Requested lifetime in seconds; `None` means the server's default.
    pub max_lifetime_seconds: Option<u32>,
    /// Labels for filtering.
    pub tags: Vec<String>,
    /// Free-form key/values, stored and returned.
    pub annotations: BTreeMap<String, String>,
    /// Display name, stored and returned.
    pub display_name: String,
    /// The request's spec as the API layer wants to return it, opaque here.
    pub spec_echo: Vec<u8>,
    /// Where the credentials for pulling the image are, as requested.
    pub pull_secret: Option<crate::secrets::SecretRef>,
    /// Those credentials, resolved by the API layer; never persisted.
    pub pull_credentials: Option<crate::engine::RegistryCredentials>,
    /// The secrets asked for as environment variables, as requested.
    pub secret_env: Vec<crate::secrets::SecretEnvRef>,
    /// Their values by variable, resolved by the API layer; never
    /// persisted, `Debug` redacted.
    pub secret_values: Vec<(String, crate::secrets::SecretValue)>,
    /// Its network (an engine that offers one); `None`: loopback only.
    pub network: Option<crate::engine::LaunchNetwork>,
    /// Volumes, as requested (checked).
    pub volumes: Vec<crate::storage::model::VolumeRequest>,
    /// Volumes, resolved by the handler (snapshots and registered volumes
    /// looked up): what the engine sets up.
    pub launch_volumes: Vec<crate::storage::model::LaunchVolume>,
    /// Size of the writable layer (`sandpit.dev/ephemeral-storage` or the
    /// runner's default); `None`: unbounded.
    pub disk_bytes: Option<u64>,
}

/// Everything known about one sandbox; persisted on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Short random id ([`SandboxId::generate`]).
    pub id: SandboxId,
    /// Owner.
    pub principal: Principal,
    /// Idempotency key of the creating request.
    pub request_id: Option<String>,
    /// Current state.
    pub state: State,
    /// Why it is in this state (set on failure and termination).
    pub state_reason: String,
    /// When the request was accepted.
    pub create_time: SystemTime,
    /// When it started running.
    pub start_time: Option<SystemTime>,
    /// When it reached a terminal state.
    pub end_time: Option<SystemTime>,
    /// Exit code of the main process once it exited (128 + N for signal N).
    pub exit_code: Option<i32>,
    /// Normalised image reference.
    pub image: String,
    /// Labels.
    pub tags: Vec<String>,
    /// Free-form key/values.
    pub annotations: BTreeMap<String, String>,
    /// Display name.
    pub display_name: String,
    /// Requests and limits in force.
    pub resources: ResourceSpec,
    /// The lifetime in force, after defaulting and clamping.
    pub max_lifetime_seconds: u32,
    /// The spec to return (see [`NewSandbox::spec_echo`]).
    pub spec_echo: Vec<u8>,
}

impl SandboxRecord {
    /// Whether the record carries every tag of `wanted`.
    pub fn has_all_tags(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|t| self.tags.contains(t))
    }
}
