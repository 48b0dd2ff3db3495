//! The real [`Engine`]: `sandpit-runtime` sandboxes from `sandpit-image`
//! images on this host.
//!
//! Engine and store calls block (spawner, file system, cgroups), so they run
//! on tokio's blocking pool. Talking to agents does not: the async agent
//! client reaches each sandbox's agent over its Unix socket; the watcher
//! follows the main output (one connection per running sandbox), and the end
//! of that stream is how the exit of the main process is noticed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sandpit_image::{IdShift, Image, ImageError, ImageStore, Reference};
use sandpit_registry::{Progress, Puller, RegistryConfig};
use sandpit_runtime::{IdMap, Runtime, RuntimeConfig, Sandbox};
use sandpit_wire::async_client::{
    AsyncAgentClient, ClientError, MainOutputEvent, OutputStream, UnixConnector,
};
use sandpit_wire::{MainStatus, Signal};

use crate::chain as describe;
use crate::engine::{
    Adoption, Committed, Engine, EngineError, HostCapacity, ImageInfo, LaunchSpec, MainExit,
    NetworkOffer, NetworkStatus, PublicOffer, PullFailure, PullFailureKind, RegistryCredentials,
    SandboxStats, SnapshotTaken, StorageOffer, VolumeUsage,
};
use crate::local_net::LocalNetwork;
use crate::local_storage::LocalStorage;
use crate::logs::{LogWriter, OutputChunk, Stream};
use crate::model::SandboxId;
use crate::netconfig::NetworkSettings;

/// Bound on request-response agent calls (ping, signal).
mod start;

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
    /// The sandbox network and where it remembers sandboxes'
    /// (`<data-dir>/network`); `None`: loopback only.
    pub network: Option<(NetworkSettings, PathBuf)>,
    /// Volumes and snapshots, and the data dir they live under
    /// (`<data-dir>/volumes`, `<data-dir>/snapshots`); `None`: refused.
    pub storage: Option<(crate::storageconfig::StorageSettings, PathBuf)>,
    /// Writable layers formatted ahead of time; `None`: each formatted
    /// when its sandbox is created.
    pub disk_pool: Option<DiskPoolConfig>,
    /// A mounted LXCFS for the sandboxes' `/proc` views; `None`: the host's.
    pub lxcfs: Option<PathBuf>,
}

/// Writable layers of the default size kept formatted (see
/// [`sandpit_volume::DiskPool`]).
#[derive(Debug, Clone)]
pub struct DiskPoolConfig {
    /// Where (on the state dir's file system: taken by `rename`).
    pub dir: PathBuf,
    /// The default writable layer's size.
    pub size_bytes: u64,
    /// How many to keep ready.
    pub ready: usize,
}

/// The engine over this host's kernel.
#[derive(Debug)]
pub struct LocalEngine {
    runtime: Arc<Runtime>,
    store: Arc<ImageStore>,
    puller: Arc<Puller>,
    pids_max: Option<u64>,
    sandboxes: Mutex<HashMap<SandboxId, Arc<Sandbox>>>,
    network: Option<Arc<LocalNetwork>>,
    storage: Option<Arc<LocalStorage>>,
    /// Where sandboxes' state and writable layers live (for free space).
    state_dir: PathBuf,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| EngineError::Task)
}

impl LocalEngine {
    /// Waits (up to `timeout`) until the networks of destroyed sandboxes
    /// are released (they go in the background: see `local_net`); whether
    /// all are. For a clean shutdown.
    pub async fn settle(&self, timeout: Duration) -> bool {
        match self.network.clone() {
            Some(net) => blocking(move || net.settle(timeout)).await.unwrap_or(false),
            None => true,
        }
    }

    /// The last step of a clean stop, after [`settle`](Self::settle): the
    /// network's queue and prepared namespaces go before the process does
    /// (see `LocalNetwork::close`).
    pub async fn close_network(&self) {
        if let Some(net) = self.network.clone() {
            let _ = blocking(move || net.close()).await;
        }
    }

    /// Opens the image store and sets up the runtime (checks the helper
    /// binaries, detects cgroups).
    pub fn new(config: LocalEngineConfig) -> Result<Self, EngineError> {
        let store = ImageStore::open(&config.store_dir, IdShift::default())
            .map_err(|e| EngineError::Image(e.into()))?;
        let disk_pool = match &config.disk_pool {
            Some(p) if p.ready > 0 => {
                let pool = sandpit_volume::DiskPool::open(&p.dir, p.size_bytes, p.ready)
                    .map_err(|e| EngineError::runtime("open the disk pool", e))?;
                pool.start_refiller()
                    .map_err(|e| EngineError::runtime("start the disk pool", e))?;
                Some(pool)
            }
            _ => None,
        };
        let state_dir = config.state_dir.clone();
        let runtime = Runtime::new(RuntimeConfig {
            state_dir: config.state_dir,
            agent_binary: config.agent_binary,
            spawner_binary: config.spawner_binary,
            id_map: IdMap::default(),
            cgroup_parent: config.cgroup_parent,
            disk_pool,
            lxcfs: config.lxcfs,
        })
        .map_err(|e| EngineError::runtime("set up the runtime", e))?;
        let network = match config.network {
            Some((settings, dir)) => {
                let net = Arc::new(LocalNetwork::setup(settings, &dir)?);
                net.start_releaser()
                    .map_err(|e| EngineError::runtime("start the network releaser", e))?;
                Some(net)
            }
            None => None,
        };
        let storage = match config.storage {
            Some((settings, data_dir)) => Some(Arc::new(LocalStorage::open(
                settings,
                &data_dir,
                store.shift(),
            )?)),
            None => None,
        };
        let store = Arc::new(store);
        let puller = Puller::new(Arc::clone(&store), config.registry)
            .map_err(|e| EngineError::Image(e.into()))?;
        Ok(Self {
            runtime: Arc::new(runtime),
            puller: Arc::new(puller),
            store,
            pids_max: config.pids_max,
            sandboxes: Mutex::new(HashMap::new()),
            network,
            storage,
            state_dir,
        })
    }

    /// The sandbox network, when sandboxes get one (the daemon serves its
    /// resolver and proxy).
    pub fn local_network(&self) -> Option<&Arc<LocalNetwork>> {
        self.network.as_ref()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<SandboxId, Arc<Sandbox>>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox(&self, id: &SandboxId) -> Option<Arc<Sandbox>> {
        self.table().get(id).cloned()
    }
}

/// A bounded client for request-response calls (ping, signal).
fn agent_of(sb: &Sandbox) -> AsyncAgentClient {
    AsyncAgentClient::unix(sb.agent_socket()).with_timeout(AGENT_TIMEOUT)
}

/// Streams the main process's output from `*offset` into `logs` until the
/// agent's end of it (the main process exited and its output was drained).
async fn follow_output(
    agent: &AsyncAgentClient,
    id: &SandboxId,
    offset: &mut u64,
    logs: &LogWriter,
) -> Result<(), ClientError> {
    let mut output = agent.main_output(*offset, true).await?;
    while let Some(event) = output.next().await {
        match event? {
            MainOutputEvent::Gap { to, .. } => *offset = to,
            MainOutputEvent::Chunk {
                offset: at,
                stream,
                time_ns,
                data,
            } => {
                // Offsets are the agent's word: they must not overflow ours.
                *offset = at
                    .checked_add(data.len() as u64)
                    .ok_or_else(|| ClientError::Protocol("output offset overflows".into()))?;
                let stream = match stream {
                    OutputStream::Stdout => Stream::Stdout,
                    OutputStream::Stderr => Stream::Stderr,
                };
                let chunk = OutputChunk {
                    offset: at,
                    stream,
                    time_ns,
                    data,
                };
                logs.append(id, chunk).await;
            }
        }
    }
    Ok(())
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
    type Connector = UnixConnector;

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
            let sizes = std::sync::Mutex::new(Vec::new());
            let image = puller
                .pull_if_missing(&parsed, credentials.as_ref(), &|p: &Progress| match p {
                    Progress::Resolved { layers, .. } => {
                        *sizes.lock().unwrap_or_else(|e| e.into_inner()) =
                            layers.iter().map(|l| l.size).collect();
                    }
                    Progress::LayerDone { index } => {
                        tracing::debug!(layer = index, "layer pulled");
                        let sizes = sizes.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(size) = sizes.get(*index) {
                            crate::metrics::PULLED_BYTES.inc_by(*size);
                        }
                    }
                    _ => {}
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
        self.start(id, spec, false).await
    }

    async fn create_idle(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        self.start(id, spec, true).await
    }

    async fn claim(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        self.claim_idle(id, spec).await
    }

    async fn wait_exit(&self, id: &SandboxId, logs: LogWriter) -> MainExit {
        let Some(sb) = self.sandbox(id) else {
            return MainExit::InitDied { oom_kills: 0 };
        };
        // Unbounded: the main output may stay silent for as long as it runs.
        let follower = AsyncAgentClient::unix(sb.agent_socket());
        let agent = agent_of(&sb);
        let mut offset = logs.resume_offset(id).await;
        loop {
            if let Err(e) = follow_output(&follower, id, &mut offset, &logs).await {
                tracing::debug!(error = %describe(&e), "main output stream ended early");
            }
            match agent.ping().await {
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
                    tracing::debug!(error = %describe(&e), "ping after main output");
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

    async fn signal_main(&self, id: &SandboxId, signal: Signal) -> Result<(), EngineError> {
        let sb = self
            .sandbox(id)
            .ok_or_else(|| EngineError::Unknown(id.clone()))?;
        agent_of(&sb)
            .signal_main(signal)
            .await
            .map_err(EngineError::Agent)
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), EngineError> {
        self.table().remove(id);
        let runtime = Arc::clone(&self.runtime);
        let store = Arc::clone(&self.store);
        let id = id.clone();
        let network = self.network.clone();
        let storage = self.storage.clone();
        blocking(move || {
            let mut phases = sandpit_runtime::phases::Phases::start("engine destroy");
            runtime.destroy(&id)?;
            phases.mark("runtime");
            // Only once nothing of the sandbox mounts them.
            if let Some(storage) = &storage {
                storage.release(&id);
            }
            // Only once nothing is mounted any more.
            release_lease(&store, id.as_str());
            phases.mark("volumes_lease");
            // Only once no process of the sandbox is left.
            if let Some(net) = network {
                net.detach(&id);
            }
            phases.mark("network");
            phases.log(&id);
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
                if let Some(net) = self.network.clone() {
                    let (id, pid) = (id.clone(), sb.pid());
                    match blocking(move || net.adopt(&id, pid)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) | Err(e) => {
                            tracing::warn!(error = %describe(&e), "adopt the sandbox network")
                        }
                    }
                }
                let status = agent_of(&sb).ping().await;
                self.table().insert(id.clone(), Arc::new(sb));
                match status {
                    Ok(MainStatus::Exited(_) | MainStatus::StartFailed(_)) => Adoption::Exited,
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
        let network = self.network.clone();
        let storage = self.storage.clone();
        blocking(move || {
            let ours = |id: &SandboxId| id.is_generated() && !keep.contains(id);
            let report = runtime.sweep(ours)?;
            if let Some(storage) = &storage {
                let removed = storage.sweep(&keep);
                if removed > 0 {
                    tracing::info!(removed, "orphaned scratch volumes removed");
                }
            }
            if let Some(net) = network {
                // After the runtime's: no process is left in what it removes.
                if let Err(e) = net.sweep(|id| !ours(id)) {
                    tracing::warn!(error = %describe(&e), "sweep the sandbox network");
                }
            }
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

    fn agent(&self, id: &SandboxId) -> Option<AsyncAgentClient> {
        self.sandbox(id)
            .map(|sb| AsyncAgentClient::unix(sb.agent_socket()))
    }

    fn capacity(&self) -> HostCapacity {
        host_capacity()
    }

    async fn stats(&self, id: &SandboxId) -> Result<SandboxStats, EngineError> {
        let sb = self
            .sandbox(id)
            .ok_or_else(|| EngineError::Unknown(id.clone()))?;
        let link = self.network.as_ref().and_then(|n| n.host_link(id));
        blocking(move || {
            let cg = sb
                .cgroup()
                .stats()
                .map_err(|e| EngineError::runtime("read the sandbox's cgroup", e))?;
            // The host end of the veth: what it receives the sandbox sent.
            let (tx, rx) = link
                .map(|l| crate::local_net::link_counters(&l))
                .unwrap_or((None, None));
            Ok(SandboxStats {
                cpu_usage_ns: cg.cpu_usage_usec.saturating_mul(1000),
                memory_bytes: cg.memory_bytes,
                memory_limit_bytes: cg.memory_limit_bytes,
                memory_peak_bytes: cg.memory_peak_bytes,
                pids: cg.pids,
                net_rx_bytes: rx,
                net_tx_bytes: tx,
            })
        })
        .await?
    }

    fn oom_kills(&self, id: &SandboxId) -> Option<u64> {
        // One small cgroup file read: cheap enough for an async worker.
        self.sandbox(id).map(|sb| sb.oom_kills())
    }

    fn data_free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.state_dir).ok()?;
        Some(st.blocks_available().saturating_mul(st.fragment_size()))
    }

    fn network(&self) -> Option<NetworkOffer> {
        self.network.as_ref().map(|n| {
            let s = n.settings();
            NetworkOffer {
                default_egress: s.net.default_egress,
                public: PublicOffer {
                    domain: s.public.domain.clone(),
                    http_port: s.public.http.map(|a| a.port()),
                    tls_port: s.public.tls.map(|a| a.port()),
                    tcp_host: s.public.tcp_ports.as_ref().map(|_| s.public.tcp_bind),
                },
            }
        })
    }

    fn network_status(&self, id: &SandboxId) -> Option<NetworkStatus> {
        self.network.as_ref()?.status(id)
    }

    fn share_token(&self, id: &SandboxId) -> Option<String> {
        Some(self.network.as_ref()?.share_token(id))
    }

    fn storage(&self) -> Option<StorageOffer> {
        self.storage.as_ref().map(|s| s.offer())
    }

    async fn snapshot_volume(
        &self,
        id: &SandboxId,
        volume: &str,
        bucket: &str,
    ) -> Result<SnapshotTaken, EngineError> {
        let storage = self
            .storage
            .clone()
            .ok_or(EngineError::Unsupported("snapshots"))?;
        let runtime = Arc::clone(&self.runtime);
        let (id, volume, bucket) = (id.clone(), volume.to_owned(), bucket.to_owned());
        blocking(move || {
            storage.snapshot(&id, &volume, &bucket, || {
                // Frozen while the copy is taken: what a process writes
                // meanwhile is in the snapshot entirely or not at all.
                runtime
                    .freeze(&id)
                    .map_err(|e| EngineError::runtime("freeze the sandbox", e))
            })
        })
        .await?
    }

    async fn provision_volume(
        &self,
        key: &str,
        capacity_bytes: u64,
    ) -> Result<VolumeUsage, EngineError> {
        let storage = self
            .storage
            .clone()
            .ok_or(EngineError::Unsupported("volumes"))?;
        let key = key.to_owned();
        blocking(move || storage.provision_registered(&key, capacity_bytes)).await?
    }

    async fn remove_volume(&self, key: &str) -> Result<(), EngineError> {
        let storage = self
            .storage
            .clone()
            .ok_or(EngineError::Unsupported("volumes"))?;
        let key = key.to_owned();
        blocking(move || storage.remove_registered(&key)).await?
    }

    async fn gc_snapshots(
        &self,
        bucket: &str,
        referenced: HashSet<sandpit_image::Digest>,
    ) -> Result<usize, EngineError> {
        let Some(storage) = self.storage.clone() else {
            return Ok(0);
        };
        let bucket = bucket.to_owned();
        blocking(move || storage.gc(&bucket, &referenced)).await?
    }

    async fn commit(
        &self,
        id: &SandboxId,
        base: &str,
        target: &str,
    ) -> Result<Committed, EngineError> {
        let (runtime, store) = (Arc::clone(&self.runtime), Arc::clone(&self.store));
        let (id, base, target) = (id.clone(), base.to_owned(), target.to_owned());
        blocking(move || {
            let image_err = |e: ImageError| EngineError::Image(e.into());
            let base = store
                .get(&Reference::parse(&base).map_err(image_err)?)
                .map_err(image_err)?;
            let target = Reference::parse(&target).map_err(image_err)?;
            let started = std::time::Instant::now();
            // Frozen while the writable layer is copied: the checkpoint is
            // one moment of the sandbox, not a mix of two.
            let frozen = runtime
                .freeze(&id)
                .map_err(|e| EngineError::runtime("freeze the sandbox", e))?;
            let committed = store.commit(&base, &runtime.upper_dir(&id), &target);
            drop(frozen);
            let frozen_for = started.elapsed();
            let (image, layer) = committed.map_err(image_err)?;
            Ok(Committed {
                reference: image.reference.clone(),
                image_id: image.id.to_string(),
                layer_digest: layer.layer.diff_id.to_string(),
                layer_size_bytes: layer.layer.size,
                files: layer.entries,
                frozen: frozen_for,
            })
        })
        .await?
    }

    async fn check_bucket(&self, bucket: &str) -> Result<(), EngineError> {
        let storage = self
            .storage
            .clone()
            .ok_or(EngineError::Unsupported("snapshot buckets"))?;
        let bucket = bucket.to_owned();
        blocking(move || storage.check_bucket(&bucket)).await?
    }
}

fn image_info(store: &ImageStore, image: &Image) -> ImageInfo {
    ImageInfo {
        reference: image.reference.clone(),
        entrypoint: image.config.entrypoint.clone(),
        cmd: image.config.cmd.clone(),
        env: image.config.env.clone(),
        working_dir: image.config.working_dir.clone(),
        user: image.config.user.clone(),
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
