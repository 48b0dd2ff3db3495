//! What the manager needs from the machinery that runs sandboxes.
//!
//! [`crate::local::LocalEngine`] implements it over `sandpit-runtime` and
//! `sandpit-image`; [`crate::fake::FakeEngine`] in memory, for tests. Methods
//! are async: implementations run blocking engine calls on tokio's blocking
//! pool so the daemon's reactor never stalls.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;

use sandpit_image::Digest;
use sandpit_registry::Credentials;
use sandpit_wire::client::AgentClient;
use sandpit_wire::ExitStatus;

use crate::logs::LogWriter;
use crate::model::{MountedFile, NewSandbox, Resources, SandboxId};

/// What failed inside an engine's machinery. Boxed: engines differ in what
/// fails (a runtime and an image store here; a VMM or a remote node
/// elsewhere), and the manager only prints the chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The image store failed (not "image missing": that is `Ok(None)`).
    #[error("image store")]
    Image(#[source] BoxError),
    /// Creating the sandbox failed; nothing of it is left.
    #[error("start sandbox")]
    Start(#[source] BoxError),
    /// Destroying, adopting or sweeping sandboxes, or setting the engine
    /// up, failed.
    #[error("{op}")]
    Runtime {
        /// What was being done.
        op: &'static str,
        /// What failed.
        #[source]
        source: BoxError,
    },
    /// Talking to a sandbox's agent failed.
    #[error("agent")]
    Agent(#[source] sandpit_wire::client::ClientError),
    /// The sandbox started but its main command did not (missing binary,
    /// bad working directory...); nothing of it is left. The reason is the
    /// agent's, from inside the sandbox: text, not an error of ours.
    #[error("main command failed to start: {0}")]
    StartFailed(String),
    /// The engine knows no sandbox with this id.
    #[error("sandbox {0} is not known to the engine")]
    Unknown(SandboxId),
    /// A blocking task panicked or was cancelled.
    #[error("engine task failed")]
    Task,
}

impl EngineError {
    /// A failed `op` of the machinery.
    pub fn runtime(op: &'static str, source: impl Into<BoxError>) -> Self {
        EngineError::Runtime {
            op,
            source: source.into(),
        }
    }
}

/// The runtime part of an image, resolved from the local store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// Normalised reference.
    pub reference: String,
    /// OCI `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// OCI `Cmd`.
    pub cmd: Vec<String>,
    /// OCI `Env` (`K=V`).
    pub env: Vec<String>,
    /// OCI `WorkingDir` (empty = `/`).
    pub working_dir: String,
    /// Unpacked layers, top-most first.
    pub lower_dirs: Vec<PathBuf>,
    /// Diff ids of the layers, bottom first (leased while a sandbox runs).
    pub layers: Vec<Digest>,
}

/// Everything the engine needs to start a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The image's layers.
    pub lower_dirs: Vec<PathBuf>,
    /// Their diff ids, bottom first: kept from image garbage collection
    /// while the sandbox exists.
    pub layers: Vec<Digest>,
    /// Main command; empty means none (the sandbox idles until stopped).
    pub argv: Vec<String>,
    /// Environment of the main command and of every exec.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// Files written before the main command starts.
    pub files: Vec<MountedFile>,
    /// cgroup limits.
    pub limits: Resources,
}

/// Credentials for one registry, resolved from a secret store. `Debug`
/// hides the password (that of [`Credentials`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    /// Registry host they are for (`ghcr.io`, `docker.io`).
    pub registry: String,
    /// User name and password or token.
    pub credentials: Credentials,
}

/// Why a pull failed, for callers that act on it: the registry client's
/// classification (not found, unauthorized, unreachable, too large, no
/// matching platform, invalid, local store), shared rather than mirrored.
pub use sandpit_registry::PullErrorKind as PullFailureKind;

/// A failed pull: what kind, and the message that becomes the sandbox's
/// `state_reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PullFailure {
    /// What kind of failure.
    pub kind: PullFailureKind,
    /// Says what was pulled and what went wrong.
    pub message: String,
}

/// How a watched sandbox's main process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainExit {
    /// It exited (or was killed by a signal).
    Exited {
        /// The status.
        status: ExitStatus,
        /// OOM kills counted in the sandbox's cgroup.
        oom_kills: u64,
    },
    /// It could not be started (binary or working dir missing...).
    StartFailed(String),
    /// The sandbox's init (the agent) died, so the main process's status is
    /// unknown.
    InitDied {
        /// OOM kills counted in the sandbox's cgroup.
        oom_kills: u64,
    },
}

/// What adopting a sandbox after a restart found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Its init runs: it can be watched again.
    Running,
    /// Its init runs but the main process ended while nobody watched: the
    /// watcher returns at once with the real outcome.
    Exited,
    /// Nothing (or only debris) is left of it.
    Gone,
}

/// This host's capacity, for discovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// CPUs usable by sandboxes, in thousandths.
    pub cpu_millis: u64,
    /// Total memory in bytes.
    pub memory_total_bytes: u64,
    /// Memory available now, in bytes.
    pub memory_available_bytes: u64,
    /// Machine architecture (`x86_64`, `aarch64`).
    pub architecture: String,
}

/// The backend the manager drives.
pub trait Engine: Send + Sync + 'static {
    /// Looks an image up in the local store; `Ok(None)` when it is missing.
    fn image(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<Option<ImageInfo>, EngineError>> + Send;

    /// Pulls `reference` from its registry into the local store (concurrent
    /// pulls of one image are coalesced by the engine) and returns it.
    fn pull(
        &self,
        reference: &str,
        credentials: Option<RegistryCredentials>,
    ) -> impl Future<Output = Result<ImageInfo, PullFailure>> + Send;

    /// Creates and starts a sandbox; returns once its agent listens. On error
    /// nothing of the sandbox is left.
    fn create(
        &self,
        id: &SandboxId,
        spec: LaunchSpec,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Waits, without polling, until the sandbox's main process ended,
    /// storing its output through `logs` on the way. A sandbox without a
    /// main command resolves only when its init dies.
    fn wait_exit(&self, id: &SandboxId, logs: LogWriter) -> impl Future<Output = MainExit> + Send;

    /// Sends a signal to the main process's process group.
    fn signal_main(
        &self,
        id: &SandboxId,
        signal: i32,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Kills everything of the sandbox and removes its host resources.
    /// Destroying an unknown or already destroyed sandbox succeeds.
    fn destroy(&self, id: &SandboxId) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Re-attaches to a sandbox that outlived a daemon restart.
    fn adopt(&self, id: &SandboxId) -> impl Future<Output = Adoption> + Send;

    /// Removes the host resources of every sandbox this daemon created that
    /// is not in `keep` (debris of a crash); returns how many.
    fn sweep(
        &self,
        keep: HashSet<SandboxId>,
    ) -> impl Future<Output = Result<usize, EngineError>> + Send;

    /// A client for a running sandbox's agent (the data plane's way in).
    fn agent(&self, id: &SandboxId) -> Option<AgentClient>;

    /// This host's capacity.
    fn capacity(&self) -> HostCapacity;
}

/// Default `PATH` when neither the image nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The main command, environment, working dir, files and limits of a
/// sandbox, from its image and the request (Kubernetes semantics: `command`
/// replaces the entrypoint, `args` the image's cmd).
pub fn launch_spec(image: &ImageInfo, req: &NewSandbox) -> LaunchSpec {
    let argv = match (&req.command, req.args.is_empty()) {
        (Some(c), _) => std::iter::once(c.clone())
            .chain(req.args.iter().cloned())
            .collect(),
        (None, false) => image
            .entrypoint
            .iter()
            .chain(req.args.iter())
            .cloned()
            .collect(),
        (None, true) => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(existing, _)| existing != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    for kv in &image.env {
        match kv.split_once('=') {
            Some((k, v)) => set(k, v),
            None => set(kv, ""),
        }
    }
    for (k, v) in &req.env {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let cwd = req
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());
    LaunchSpec {
        lower_dirs: image.lower_dirs.clone(),
        layers: image.layers.clone(),
        argv,
        env,
        cwd,
        files: req.files.clone(),
        limits: req.limits,
    }
}
