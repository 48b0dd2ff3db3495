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
use sandpit_net::policy::{DefaultEgress, NetworkPolicy};
use sandpit_net::Allocation;
use sandpit_registry::Credentials;
use sandpit_wire::async_client::{AsyncAgentClient, Connector};
use sandpit_wire::process::{ImageProcess, ProcessOverrides};
use sandpit_wire::{ExitStatus, Probe, RunAs, Signal};

use crate::logs::LogWriter;
use crate::model::{MountedFile, NewSandbox, ResourceSpec, SandboxId, Security};
use crate::storage::model::{LaunchVolume, SnapshotBlob};

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
    Agent(#[source] sandpit_wire::async_client::ClientError),
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
    /// This engine does not offer it.
    #[error("{0} not offered by this engine")]
    Unsupported(&'static str),
    /// A storage operation failed.
    #[error("{op}")]
    Storage {
        /// What was being done.
        op: String,
        /// What failed.
        #[source]
        source: BoxError,
    },
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
    /// OCI `User`: `user`, `uid`, `user:group` or `uid:gid`; empty = root.
    pub user: String,
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
    /// cgroup requests and limits.
    pub resources: ResourceSpec,
    /// Who the main command and every exec run as.
    pub run_as: RunAs,
    /// Capabilities they keep (bit mask); `None`: the default set.
    pub capabilities: Option<u64>,
    /// A read-only root file system (with a writable `/tmp`).
    pub read_only_root: bool,
    /// The startup probe, run by the agent.
    pub startup_probe: Option<Probe>,
    /// Secrets as environment variables: over `env` (a secret wins over a
    /// plain variable of the same name). Kept apart so that `Debug` of the
    /// spec redacts them; see [`LaunchSpec::environment`].
    pub secret_env: Vec<(String, crate::secrets::SecretValue)>,
    /// Its network, on an engine that offers one ([`Engine::network`]);
    /// `None`: loopback only.
    pub network: Option<LaunchNetwork>,
    /// Its volumes, on an engine that offers them ([`Engine::storage`]).
    pub volumes: Vec<LaunchVolume>,
    /// Size of the writable layer; `None`: unbounded.
    pub disk_bytes: Option<u64>,
}

/// The volumes and snapshots an engine offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOffer {
    /// Size of a scratch volume that names none.
    pub scratch_default_size: u64,
    /// The largest volume.
    pub max_volume_size: u64,
    /// Snapshots of scratch volumes (and restores).
    pub snapshots: bool,
}

/// A snapshot the engine took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTaken {
    /// The stored archive.
    pub blob: SnapshotBlob,
    /// Bytes of file contents in it.
    pub content_bytes: u64,
    /// Files in it.
    pub files: u64,
}

/// A checkpoint of a sandbox's root file system, stored as an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The stored reference.
    pub reference: String,
    /// The image's id (sha256 of its layers and config).
    pub image_id: String,
    /// The new top layer's diff id.
    pub layer_digest: String,
    /// Bytes of file content in it.
    pub layer_size_bytes: u64,
    /// Entries in it.
    pub files: u64,
    /// How long the sandbox was frozen.
    pub frozen: std::time::Duration,
}

/// Space of a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Used.
    pub used_bytes: u64,
    /// Capacity.
    pub capacity_bytes: u64,
}

/// A sandbox's network as the engine sets it up.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LaunchNetwork {
    /// What it may reach and be reached by.
    pub policy: NetworkPolicy,
    /// Who owns it (what `Tenant` rules of others' policies select).
    pub owner: String,
    /// The ports it publishes.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// One published port of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceSpec {
    /// The sandbox's port.
    pub port: u16,
    /// Its name (may be empty).
    pub name: String,
    /// How it is reached.
    pub exposure: Exposure,
}

/// How a service is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Exposure {
    /// At the sandbox's own address, from the host (and from sandboxes
    /// its ingress admits).
    Private,
    /// Plain TCP on a host port the daemon allocates.
    PublicTcp,
    /// HTTP by host name (`<port>-<id>.<domain>`) through the daemon's
    /// reverse proxy.
    PublicHttp {
        /// Requests must present the sandbox's share token.
        share_token: bool,
        /// The longest wait for a response's headers, in seconds.
        timeout_seconds: u32,
    },
    /// TLS routed by SNI (`<port>-<id>.<domain>`), not terminated.
    PublicTls,
}

/// Where an engine publishes services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicOffer {
    /// The domain of service host names.
    pub domain: String,
    /// The HTTP frontend's port, when there is one.
    pub http_port: Option<u16>,
    /// The TLS passthrough frontend's port, when there is one.
    pub tls_port: Option<u16>,
    /// Whether raw TCP ports are handed out, and on which host address.
    pub tcp_host: Option<std::net::IpAddr>,
}

/// The network an engine gives its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOffer {
    /// What a sandbox that states no egress policy may reach.
    pub default_egress: DefaultEgress,
    /// How services are published.
    pub public: PublicOffer,
}

/// A running sandbox's network, as the status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkStatus {
    /// Its addresses.
    pub alloc: Allocation,
    /// Host ports of its raw TCP services: `(sandbox port, host port)`.
    pub host_ports: Vec<(u16, u16)>,
}

impl LaunchSpec {
    /// The sandbox's whole environment, secrets included: only for handing
    /// to the sandbox's init.
    pub fn environment(&self) -> Vec<(String, String)> {
        let secrets: Vec<(String, String)> = self
            .secret_env
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_owned()))
            .collect();
        sandpit_wire::process::merge_env(&self.env, &secrets)
    }
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

/// Live figures of one running sandbox, read from its cgroup (and its
/// host link when it has a network) at the moment of asking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// CPU time used by its processes since it started.
    pub cpu_usage_ns: u64,
    /// Memory charged to it now (page cache included, as the kernel counts).
    pub memory_bytes: u64,
    /// Its memory limit; `None`: unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// The most memory charged to it so far, where the kernel keeps it.
    pub memory_peak_bytes: Option<u64>,
    /// Tasks (processes and threads) in it.
    pub pids: u64,
    /// Bytes it received and sent over its network; `None` without one.
    pub net_rx_bytes: Option<u64>,
    /// See `net_rx_bytes`.
    pub net_tx_bytes: Option<u64>,
}

/// The backend the manager drives: the control plane (images, create,
/// watch, signal, destroy, adopt, sweep) and the way into the data plane
/// ([`Engine::agent`]).
pub trait Engine: Send + Sync + 'static {
    /// How the daemon reaches a sandbox's agent: the agent protocol over
    /// this engine's transport (a Unix socket here; vsock for a microVM, an
    /// in-memory pipe in tests). Exec, files and the main output all go
    /// through a client over it.
    type Connector: Connector;

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

    /// Creates a sandbox for a warm pool: everything of `spec`'s shape
    /// (image, limits, writable layer, network) is set up and its agent
    /// listens, but nothing in it runs; its command, environment, files and
    /// user come with [`claim`](Engine::claim). On error nothing of it is
    /// left. An engine without pools answers [`EngineError::Unsupported`].
    fn create_idle(
        &self,
        _id: &SandboxId,
        _spec: LaunchSpec,
    ) -> impl Future<Output = Result<(), EngineError>> + Send {
        async { Err(EngineError::Unsupported("warm pools")) }
    }

    /// Hands idle sandbox `id` (from [`create_idle`](Engine::create_idle))
    /// its request: `spec`'s command, environment, working dir, files,
    /// user, capabilities, startup probe and network owner, applied as
    /// [`create`](Engine::create) would have; its shape must be the one it
    /// was created with. Returns like `create`; a sandbox is claimed once.
    fn claim(
        &self,
        _id: &SandboxId,
        _spec: LaunchSpec,
    ) -> impl Future<Output = Result<(), EngineError>> + Send {
        async { Err(EngineError::Unsupported("warm pools")) }
    }

    /// Waits, without polling, until the sandbox's main process ended,
    /// storing its output through `logs` on the way. A sandbox without a
    /// main command resolves only when its init dies.
    fn wait_exit(&self, id: &SandboxId, logs: LogWriter) -> impl Future<Output = MainExit> + Send;

    /// Sends a signal to the main process's process group.
    fn signal_main(
        &self,
        id: &SandboxId,
        signal: Signal,
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

    /// A client for a running sandbox's agent (the data plane's way in);
    /// `None` when the engine has no such sandbox.
    fn agent(&self, id: &SandboxId) -> Option<AsyncAgentClient<Self::Connector>>;

    /// This host's capacity.
    fn capacity(&self) -> HostCapacity;

    /// Live figures of a running sandbox (metrics, `sandpit stats`).
    fn stats(
        &self,
        _id: &SandboxId,
    ) -> impl Future<Output = Result<SandboxStats, EngineError>> + Send {
        async { Err(EngineError::Unsupported("sandbox stats")) }
    }

    /// How many processes the kernel's OOM killer killed in sandbox `id`
    /// so far (its memory cgroup's count); `None` when unknown.
    fn oom_kills(&self, _id: &SandboxId) -> Option<u64> {
        None
    }

    /// Free bytes in the file system of the data dir (for its reserve);
    /// `None` when unknown or not applicable.
    fn data_free_bytes(&self) -> Option<u64> {
        None
    }

    /// The network this engine gives sandboxes; `None`: loopback only (and
    /// a [`LaunchSpec::network`] is refused).
    fn network(&self) -> Option<NetworkOffer> {
        None
    }

    /// A sandbox's network, while it has one.
    fn network_status(&self, _id: &SandboxId) -> Option<NetworkStatus> {
        None
    }

    /// The token share-token endpoints of sandbox `id` ask for: derived
    /// from the id with a key of the engine's, so it needs no storage and
    /// every create response (replays included) shows the same one.
    fn share_token(&self, _id: &SandboxId) -> Option<String> {
        None
    }

    /// The volumes and snapshots this engine offers; `None`: none (and a
    /// [`LaunchSpec::volumes`] is refused).
    fn storage(&self) -> Option<StorageOffer> {
        None
    }

    /// Snapshots scratch volume `volume` of sandbox `id` into `bucket`
    /// (`local` or an S3 bucket), its processes frozen meanwhile so the
    /// copy is consistent.
    fn snapshot_volume(
        &self,
        _id: &SandboxId,
        _volume: &str,
        _bucket: &str,
    ) -> impl Future<Output = Result<SnapshotTaken, EngineError>> + Send {
        async { Err(EngineError::Unsupported("snapshots")) }
    }

    /// Creates (or re-attaches) the storage of a registered volume.
    fn provision_volume(
        &self,
        _key: &str,
        _capacity_bytes: u64,
    ) -> impl Future<Output = Result<VolumeUsage, EngineError>> + Send {
        async { Err(EngineError::Unsupported("volumes")) }
    }

    /// Removes the storage of a registered volume, data included.
    fn remove_volume(&self, _key: &str) -> impl Future<Output = Result<(), EngineError>> + Send {
        async { Err(EngineError::Unsupported("volumes")) }
    }

    /// Removes every archive of `bucket` that is not in `referenced`;
    /// returns how many.
    fn gc_snapshots(
        &self,
        _bucket: &str,
        _referenced: HashSet<Digest>,
    ) -> impl Future<Output = Result<usize, EngineError>> + Send {
        async { Ok(0) }
    }

    /// Checkpoints sandbox `id`'s root file system (its writable layer
    /// over `base`, its image) into image `target` in the local store, the
    /// sandbox frozen meanwhile.
    fn commit(
        &self,
        _id: &SandboxId,
        _base: &str,
        _target: &str,
    ) -> impl Future<Output = Result<Committed, EngineError>> + Send {
        async { Err(EngineError::Unsupported("commits")) }
    }

    /// Checks that snapshots can be kept in `bucket`.
    fn check_bucket(&self, _bucket: &str) -> impl Future<Output = Result<(), EngineError>> + Send {
        async { Err(EngineError::Unsupported("snapshot buckets")) }
    }
}

/// The main command, environment, working dir, files and limits of a
/// sandbox, from its image and the request. The process itself is resolved
/// where `sandpit run` and the agent resolve theirs
/// ([`sandpit_wire::process::resolve`], Kubernetes semantics: `command`
/// replaces the entrypoint, `args` the image's cmd).
pub fn launch_spec(image: &ImageInfo, req: &NewSandbox) -> LaunchSpec {
    let process = sandpit_wire::process::resolve(
        &ImageProcess {
            entrypoint: &image.entrypoint,
            cmd: &image.cmd,
            env: &image.env,
            working_dir: &image.working_dir,
        },
        &ProcessOverrides {
            command: req.command.as_deref(),
            args: &req.args,
            env: &req.env,
            working_dir: req.working_dir.as_deref(),
        },
    );
    LaunchSpec {
        lower_dirs: image.lower_dirs.clone(),
        layers: image.layers.clone(),
        argv: process.argv,
        env: process.env,
        cwd: process.cwd,
        files: req.files.clone(),
        resources: req.resources,
        run_as: run_as(&image.user, &req.security),
        capabilities: req.security.capabilities,
        read_only_root: req.security.read_only_root,
        startup_probe: req.startup_probe.clone(),
        secret_env: req.secret_values.clone(),
        network: req.network.clone(),
        volumes: req.launch_volumes.clone(),
        disk_bytes: req.disk_bytes,
    }
}

/// Who a sandbox runs as, with Kubernetes' precedence: `run_as_user`
/// replaces the image's `User` (and with it the image's group: the user's
/// primary one applies), `run_as_group` replaces the group. The agent
/// resolves names in the sandbox.
pub fn run_as(image_user: &str, security: &Security) -> RunAs {
    let (image_user, image_group) = image_user.split_once(':').unwrap_or((image_user, ""));
    match security.run_as_user {
        Some(uid) => RunAs {
            user: uid.to_string(),
            group: security
                .run_as_group
                .map(|g| g.to_string())
                .unwrap_or_default(),
        },
        None => RunAs {
            user: image_user.to_owned(),
            group: security
                .run_as_group
                .map_or_else(|| image_group.to_owned(), |g| g.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_as_of(image_user: &str, user: Option<u32>, group: Option<u32>) -> (String, String) {
        let security = Security {
            run_as_user: user,
            run_as_group: group,
            ..Default::default()
        };
        let r = run_as(image_user, &security);
        (r.user, r.group)
    }

    #[test]
    fn the_request_user_wins_over_the_images_as_in_kubernetes() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        // Nothing asked: the image's user and group, or root.
        assert_eq!(run_as_of("", None, None), s("", ""));
        assert_eq!(run_as_of("app", None, None), s("app", ""));
        assert_eq!(run_as_of("app:staff", None, None), s("app", "staff"));
        assert_eq!(run_as_of("1000:1000", None, None), s("1000", "1000"));
        // run_as_user replaces the image's user and its group.
        assert_eq!(run_as_of("app:staff", Some(7), None), s("7", ""));
        assert_eq!(run_as_of("app:staff", Some(7), Some(8)), s("7", "8"));
        // run_as_group alone replaces the group only.
        assert_eq!(run_as_of("app:staff", None, Some(8)), s("app", "8"));
        assert_eq!(run_as_of("", None, Some(8)), s("", "8"));
        // Root asked explicitly is root, whatever the image says.
        assert_eq!(run_as_of("app", Some(0), None), s("0", ""));
    }
}
