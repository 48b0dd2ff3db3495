//! The real [`Engine`]: `sandpit-runtime` sandboxes from `sandpit-image`
//! images on this host.
//!
//! Engine and store calls block (spawner, file system, cgroups), so they run
//! on tokio's blocking pool. Watching a sandbox does not: the agent's
//! main-output stream is read asynchronously over a tokio `UnixStream`, one
//! connection per running sandbox, and its `End` frame is how the exit of the
//! main process is noticed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sandpit_image::{IdShift, Image, ImageError, ImageStore, Reference};
use sandpit_registry::{Progress, Puller, RegistryConfig};
use sandpit_runtime::{IdMap, Limits, Runtime, RuntimeConfig, Sandbox, SandboxSpec};
use sandpit_wire::client::AgentClient;
use sandpit_wire::{Frame, InitFile, InitSpec, MainStatus, WireError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::chain as describe;
use crate::engine::{
    Adoption, Engine, EngineError, HostCapacity, ImageInfo, LaunchSpec, MainExit, PullFailure,
    PullFailureKind, RegistryCredentials,
};
use crate::logs::{LogWriter, OutputChunk, Stream};
use crate::model::SandboxId;

/// Bound on request-response agent calls (ping, signal).
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the engine keeps its state and finds its helpers.
#[derive(Debug, Clone)]
pub struct LocalEngineConfig {
    /// The image store (`<data-dir>/store`).
    pub store_dir: PathBuf,
    /// Per-sandbox state (`<data-dir>/sandboxes`).
    pub state_dir: PathBuf,
    /// The static agent binary.
    pub agent_binary: PathBuf,
    /// The `sandpit-spawn` helper.
    pub spawner_binary: PathBuf,
    /// Parent cgroup of every sandbox.
    pub cgroup_parent: String,
    /// Task limit of every sandbox (fork bombs); `None`: unlimited.
    pub pids_max: Option<u64>,
    /// How images missing from the store are pulled.
    pub registry: RegistryConfig,
}

/// The engine over this host's kernel.
#[derive(Debug)]
pub struct LocalEngine {
    runtime: Arc<Runtime>,
    store: Arc<ImageStore>,
    puller: Arc<Puller>,
    pids_max: Option<u64>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| EngineError::Task)
}

impl LocalEngine {
    /// Opens the image store and sets up the runtime (checks the helper
    /// binaries, detects cgroups).
    pub fn new(config: LocalEngineConfig) -> Result<Self, EngineError> {
        let store = ImageStore::open(&config.store_dir, IdShift::default())
            .map_err(|e| EngineError::Image(e.into()))?;
        let runtime = Runtime::new(RuntimeConfig {
            state_dir: config.state_dir,
            agent_binary: config.agent_binary,
            spawner_binary: config.spawner_binary,
            id_map: IdMap::default(),
            cgroup_parent: config.cgroup_parent,
        })
        .map_err(|e| EngineError::runtime("set up the runtime", e))?;
        let store = Arc::new(store);
        let puller = Puller::new(Arc::clone(&store), config.registry)
            .map_err(|e| EngineError::Image(e.into()))?;
        Ok(Self {
            runtime: Arc::new(runtime),
            puller: Arc::new(puller),
            store,
            pids_max: config.pids_max,
            sandboxes: Mutex::new(HashMap::new()),
        })
    }

    fn table(&self) -> MutexGuard<'_, HashMap<SandboxId, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox(&self, id: &SandboxId) -> Option<Arc<Sandbox>> {
        self.table().get(id).cloned()
    }
}

async fn ping(sb: &Arc<Sandbox>) -> Result<MainStatus, EngineError> {
    let agent = sb.agent().with_timeout(AGENT_TIMEOUT);
    blocking(move || agent.ping())
        .await?
        .map_err(EngineError::Agent)
}

/// Why following the main output stopped before its `End`.
#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("wire")]
    Wire(#[from] WireError),
    #[error("agent closed the stream")]
    Closed,
    #[error("unexpected frame")]
    Unexpected,
}

/// Reads one frame from the agent (hostile input: the length is bounded
/// before anything is allocated). `Ok(None)`: clean close between frames.
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(WireError::Truncated),
            n => got += n,
        }
    }
    let mut body = vec![0u8; sandpit_wire::body_len(len)?];
    r.read_exact(&mut body)
        .await
        .map_err(WireError::reading_body)?;
    sandpit_wire::decode(&body).map(Some)
}

/// Streams the main process's output from `*offset` into `sink` until the
/// agent's `End` (the main process exited and its output was drained).
async fn follow_output(
    socket: &Path,
    id: &SandboxId,
    offset: &mut u64,
    logs: &LogWriter,
) -> Result<(), FollowError> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(FollowError::Connect)?;
    let mut first = Vec::new();
    sandpit_wire::encode(
        &Frame::MainOutput {
            offset: *offset,
            follow: true,
        },
        &mut first,
    );
    stream.write_all(&first).await.map_err(WireError::Io)?;
    let mut reader = BufReader::with_capacity(sandpit_wire::CHUNK_LEN + 64, stream);
    loop {
        match read_frame(&mut reader).await? {
            None => return Err(FollowError::Closed),
            Some(Frame::End) => return Ok(()),
            Some(Frame::Gap { to, .. }) => *offset = to,
            Some(Frame::MainChunk {
                offset: at,
                stream,
                time_ns,
                data,
            }) => {
                let stream = match stream {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    _ => return Err(FollowError::Unexpected),
                };
                // Offsets are the agent's word: they must not overflow ours.
                *offset = at
                    .checked_add(data.len() as u64)
                    .ok_or(FollowError::Unexpected)?;
                logs.append(
                    id,
                    OutputChunk {
                        offset: at,
                        stream,
                        time_ns,
                        data,
                    },
                )
                .await;
            }
            Some(_) => return Err(FollowError::Unexpected),
        }
    }
}

/// Resolves when the sandbox's PID 1 exits: a pidfd becomes readable then,
/// so nothing polls. Falls back to checking once a second where pidfds are
/// unavailable (kernels before 5.3).
async fn wait_init_exit(sb: &Sandbox) {
    match sb.pidfd() {
        // Not the process it recorded any more: ended already.
        Ok(None) => return,
        Ok(Some(fd)) => {
            // SAFETY: the AsyncFd takes the OwnedFd over: the descriptor stays
            // open, and names the same pidfd, for as long as it is
            // registered (until the AsyncFd is dropped).
            let registered = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            };
            if let Ok(afd) = registered {
                let _ = afd.readable().await;
                return;
            }
        }
        Err(e) => tracing::debug!(error = %e, "no pidfd; polling"),
    }
    while sb.is_running() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Engine for LocalEngine {
    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, EngineError> {
        let store = Arc::clone(&self.store);
        let reference = reference.to_owned();
        blocking(move || {
            let parsed = Reference::parse(&reference).map_err(|e| EngineError::Image(e.into()))?;
            match store.get(&parsed) {
                Ok(image) => Ok(Some(image_info(&store, &image))),
                Err(ImageError::NotFound(_)) => Ok(None),
                Err(e) => Err(EngineError::Image(e.into())),
            }
        })
        .await?
    }

    async fn pull(
        &self,
        reference: &str,
        credentials: Option<RegistryCredentials>,
    ) -> Result<ImageInfo, PullFailure> {
        let puller = Arc::clone(&self.puller);
        let store = Arc::clone(&self.store);
        let reference = reference.to_owned();
        let task = blocking(move || {
            let parsed = Reference::parse(&reference).map_err(|e| PullFailure {
                kind: PullFailureKind::Invalid,
                message: describe(&e),
            })?;
            // Like Docker's and Kubernetes' pull secrets, credentials are for
            // one registry: never sent to another.
            let credentials = credentials
                .filter(|c| c.registry == parsed.registry)
                .map(|c| c.credentials);
            let image = puller
                .pull_if_missing(&parsed, credentials.as_ref(), &|p: &Progress| {
                    if let Progress::LayerDone { index } = p {
                        tracing::debug!(layer = index, "layer pulled");
                    }
                })
                .map_err(|e| PullFailure {
                    kind: e.kind(),
                    message: e.to_string(),
                })?;
            Ok(image_info(&store, &image))
        });
        task.await.map_err(|_| PullFailure {
            kind: PullFailureKind::Store,
            message: "pull task failed".into(),
        })?
    }

    async fn create(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        let runtime = Arc::clone(&self.runtime);
        let spec_layers = spec.layers;
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: None,
            lower_dirs: spec.lower_dirs,
            init: InitSpec {
                argv: spec.argv,
                env: spec.env,
                cwd: spec.cwd,
                files: spec
                    .files
                    .into_iter()
                    .map(|f| InitFile {
                        path: f.path,
                        mode: 0o644,
                        content: f.content,
                    })
                    .collect(),
            },
            limits: Limits {
                cpu_millis: spec.limits.cpu_millis,
                memory_bytes: spec.limits.memory_bytes,
                pids_max: self.pids_max,
            },
        };
        let store = Arc::clone(&self.store);
        let layers = spec_layers;
        let sandbox = blocking(move || {
            // Leased before mounting: `sandpit image rm` or a gc in another
            // process must not collect a layer under a running sandbox. The
            // guard releases it on every way out but the ones that keep it.
            let lease = store
                .lease_guard_owned(spec.id.as_str(), &layers)
                .map_err(|e| EngineError::Start(Box::new(EngineError::Image(e.into()))))?;
            let sandbox = runtime
                .create(&spec)
                .map_err(|e| EngineError::Start(e.into()))?;
            // The agent starts the main command before it serves its first
            // connection, so one ping tells whether it started: a client
            // then sees FAILED from CreateSandbox itself, never a RUNNING
            // that turns FAILED a few milliseconds later.
            let verdict = match sandbox.agent().with_timeout(AGENT_TIMEOUT).ping() {
                Ok(MainStatus::StartFailed(msg)) => Err(EngineError::StartFailed(msg)),
                Ok(_) => Ok(()),
                Err(e) => Err(EngineError::Start(Box::new(EngineError::Agent(e)))),
            };
            match verdict {
                Ok(()) => {
                    lease.keep();
                    Ok(sandbox)
                }
                Err(e) => {
                    if let Err(d) = runtime.destroy(sandbox.id()) {
                        // Still mounted: the layers stay leased.
                        tracing::warn!(error = %describe(&d), "destroy after failed start");
                        lease.keep();
                    }
                    Err(e)
                }
            }
        })
        .await??;
        self.table().insert(id.clone(), Arc::new(sandbox));
        Ok(())
    }

    async fn wait_exit(&self, id: &SandboxId, logs: LogWriter) -> MainExit {
        let Some(sb) = self.sandbox(id) else {
            return MainExit::InitDied { oom_kills: 0 };
        };
        let socket = sb.agent_socket();
        let mut offset = logs.resume_offset(id).await;
        loop {
            if let Err(e) = follow_output(&socket, id, &mut offset, &logs).await {
                tracing::debug!(error = %describe(&e), "main output stream ended early");
            }
            match ping(&sb).await {
                Ok(MainStatus::Exited(status)) => {
                    return MainExit::Exited {
                        status,
                        oom_kills: sb.oom_kills(),
                    }
                }
                Ok(MainStatus::StartFailed(msg)) => return MainExit::StartFailed(msg),
                // No main command: the sandbox lives until its init dies.
                Ok(MainStatus::Idle) => {
                    wait_init_exit(&sb).await;
                    return MainExit::InitDied {
                        oom_kills: sb.oom_kills(),
                    };
                }
                // The stream broke while the main process runs: follow again.
                Ok(MainStatus::Running { .. }) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "ping after main output");
                    // The agent is gone, or alive but not answering: either
                    // way the main process's status is lost with it.
                    wait_init_exit(&sb).await;
                    return MainExit::InitDied {
                        oom_kills: sb.oom_kills(),
                    };
                }
            }
        }
    }

    async fn signal_main(&self, id: &SandboxId, signal: i32) -> Result<(), EngineError> {
        let sb = self
            .sandbox(id)
            .ok_or_else(|| EngineError::Unknown(id.clone()))?;
        let agent = sb.agent().with_timeout(AGENT_TIMEOUT);
        blocking(move || agent.signal_main(signal))
            .await?
            .map_err(EngineError::Agent)
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), EngineError> {
        self.table().remove(id);
        let runtime = Arc::clone(&self.runtime);
        let store = Arc::clone(&self.store);
        let id = id.clone();
        blocking(move || {
            runtime.destroy(&id)?;
            // Only once nothing is mounted any more.
            release_lease(&store, id.as_str());
            Ok(())
        })
        .await?
        .map_err(|e: sandpit_runtime::RuntimeError| EngineError::runtime("destroy sandbox", e))
    }

    async fn adopt(&self, id: &SandboxId) -> Adoption {
        let runtime = Arc::clone(&self.runtime);
        let owned = id.clone();
        let opened = blocking(move || runtime.open(&owned)).await;
        match opened {
            Ok(Ok(sb)) if sb.is_running() => {
                let agent = sb.agent().with_timeout(AGENT_TIMEOUT);
                let status = blocking(move || agent.ping()).await;
                self.table().insert(id.clone(), Arc::new(sb));
                match status {
                    Ok(Ok(MainStatus::Exited(_) | MainStatus::StartFailed(_))) => Adoption::Exited,
                    _ => Adoption::Running,
                }
            }
            // Debris, if any, goes with the sweep that follows adoption.
            _ => Adoption::Gone,
        }
    }

    async fn sweep(&self, keep: HashSet<SandboxId>) -> Result<usize, EngineError> {
        // Only this daemon's own ids: `sandpit run` shares the state dir
        // with ids of another shape (`run-...`), and its sandboxes are not
        // ours to remove.
        let runtime = Arc::clone(&self.runtime);
        let store = Arc::clone(&self.store);
        blocking(move || {
            let ours = |id: &SandboxId| id.is_generated() && !keep.contains(id);
            let report = runtime.sweep(ours)?;
            // Leases of sandboxes that are gone (a crash between destroy and
            // release) would pin their layers forever.
            match store.lease_holders() {
                Ok(holders) => {
                    for holder in holders {
                        if SandboxId::parse(&holder).is_ok_and(|id| ours(&id)) {
                            release_lease(&store, &holder);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %describe(&e), "list image leases"),
            }
            Ok(report.state_dirs)
        })
        .await?
        .map_err(|e: sandpit_runtime::RuntimeError| EngineError::runtime("sweep", e))
    }

    fn agent(&self, id: &SandboxId) -> Option<AgentClient> {
        self.sandbox(id).map(|sb| sb.agent())
    }

    fn capacity(&self) -> HostCapacity {
        host_capacity()
    }
}

fn image_info(store: &ImageStore, image: &Image) -> ImageInfo {
    ImageInfo {
        reference: image.reference.clone(),
        entrypoint: image.config.entrypoint.clone(),
        cmd: image.config.cmd.clone(),
        env: image.config.env.clone(),
        working_dir: image.config.working_dir.clone(),
        lower_dirs: store.lower_dirs(image),
        layers: image.layers.clone(),
    }
}

fn release_lease(store: &ImageStore, holder: &str) {
    if let Err(e) = store.release(holder) {
        tracing::warn!(error = %describe(&e), "release image lease");
    }
}

/// CPUs this process may use, memory from `/proc/meminfo`.
pub fn host_capacity() -> HostCapacity {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (total, available) = parse_meminfo(&meminfo);
    HostCapacity {
        cpu_millis: cpus * 1000,
        memory_total_bytes: total,
        memory_available_bytes: available,
        architecture: std::env::consts::ARCH.to_owned(),
    }
}

/// `MemTotal` and `MemAvailable` in bytes (0 when missing).
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal"), field("MemAvailable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       16318412 kB\nMemFree:  1 kB\nMemAvailable:   8000000 kB\n";
        assert_eq!(parse_meminfo(text), (16318412 * 1024, 8000000 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0));
        let cap = host_capacity();
        assert!(cap.cpu_millis >= 1000);
        assert!(cap.memory_total_bytes > 0);
    }

    #[tokio::test]
    async fn frames_are_read_and_bounded() {
        let mut bytes = Vec::new();
        sandpit_wire::encode(&Frame::End, &mut bytes);
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(Frame::End));
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
        let huge = ((sandpit_wire::MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]).await,
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &bytes[..2]).await,
            Err(WireError::Truncated)
        ));
    }

    #[test]
    fn engine_errors_keep_their_sources() {
        let io = || Box::new(std::io::Error::other("disk on fire"));
        let spawn = sandpit_runtime::RuntimeError::Spawn("root filesystem: mount: ENOENT".into());
        for (e, text) in [
            (EngineError::Image(io()), "image store: disk on fire"),
            (
                EngineError::Start(Box::new(spawn)),
                "start sandbox: root filesystem: mount: ENOENT",
            ),
            (EngineError::runtime("sweep", io()), "sweep: disk on fire"),
        ] {
            let source = std::error::Error::source(&e).unwrap().to_string();
            assert!(!e.to_string().contains(&source), "{e}");
            assert_eq!(crate::chain(&e), text);
        }
    }

    #[test]
    fn describe_adds_sources_once() {
        let io = std::io::Error::other("disk on fire");
        let e = ImageError::Io {
            op: "read",
            path: "/x".into(),
            source: io,
        };
        assert_eq!(describe(&e), "read /x: disk on fire");
    }
}
