//! An in-memory [`Engine`] for tests (feature `testing`, never in a
//! release build): sandboxes are records, main processes end when the test
//! says so (or on SIGTERM, if configured), every call is remembered for
//! assertions, and each sandbox has an in-memory agent ([`FakeAgent`]) that
//! speaks the real agent protocol, so the data plane runs without root.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sandpit_image::Digest;
use sandpit_wire::async_client::{AsyncAgentClient, Connector};
use sandpit_wire::{ExecRequest, ExitStatus, MainStatus, Signal, StartupState};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;

use crate::engine::{
    Adoption, Engine, EngineError, HostCapacity, ImageInfo, LaunchSpec, MainExit, PullFailure,
    RegistryCredentials, SandboxStats,
};
use crate::logs::{LogWriter, OutputChunk, Stream};
use crate::model::SandboxId;

mod agent;

pub use agent::{FakeAgent, FAKE_USAGE};

/// Connects to a [`FakeAgent`]: every connection is an in-memory pipe whose
/// far end the agent serves on a task of its own.
#[derive(Debug, Clone)]
pub struct FakeConnector {
    agent: FakeAgent,
}

impl FakeConnector {
    /// Connections to `agent`.
    pub fn new(agent: FakeAgent) -> Self {
        Self { agent }
    }
}

/// Room in each direction of a connection (the agent's writes wait beyond
/// it, as on a socket).
const PIPE_BYTES: usize = 64 << 10;

impl Connector for FakeConnector {
    type Reader = ReadHalf<DuplexStream>;
    type Writer = WriteHalf<DuplexStream>;

    async fn connect(&self) -> std::io::Result<(Self::Reader, Self::Writer)> {
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let (r, w) = tokio::io::split(theirs);
        tokio::spawn(self.agent.clone().serve(r, w));
        Ok(tokio::io::split(ours))
    }
}

/// One fake sandbox.
#[derive(Debug)]
struct FakeSandbox {
    spec: LaunchSpec,
    agent: FakeAgent,
    exit: watch::Sender<Option<MainExit>>,
    destroyed: bool,
    signals: Vec<i32>,
    /// What [`Engine::stats`] reports; set by [`FakeEngine::set_stats`].
    stats: Option<SandboxStats>,
    /// Created for a pool and not claimed yet.
    idle: bool,
    /// Claims it got.
    claims: u32,
}

/// The agent of a sandbox started from `spec`.
fn agent_for(spec: &LaunchSpec) -> FakeAgent {
    let agent = FakeAgent::new(spec.environment(), spec.cwd.clone());
    for f in &spec.files {
        agent.put_file(&f.path, 0o644, f.content.clone());
    }
    // A probe decides when the test says so (`finish_startup`).
    if spec.startup_probe.is_some() {
        agent.set_startup(None);
    }
    // Without a main command the sandbox idles until destroyed.
    agent.set_main(if spec.argv.is_empty() {
        MainStatus::Idle
    } else {
        MainStatus::Running { pid: 1 }
    });
    agent
}

#[derive(Debug, Default)]
struct FakeState {
    images: HashMap<String, ImageInfo>,
    sandboxes: HashMap<SandboxId, FakeSandbox>,
    fail_create: Option<String>,
    fail_claim: Option<String>,
    create_delay: Duration,
    sigterm_exits: bool,
    output: Vec<u8>,
    swept_keep: Option<HashSet<SandboxId>>,
    /// What a pull of a reference yields; unknown references are not found.
    remote: HashMap<String, Result<ImageInfo, PullFailure>>,
    /// Pulls asked for, with their credentials.
    pulls: Vec<(String, Option<RegistryCredentials>)>,
    /// While `false`, pulls wait (a slow registry).
    pulls_open: Option<watch::Sender<bool>>,
}

/// The fake engine; clones share their state.
#[derive(Debug, Clone, Default)]
pub struct FakeEngine {
    state: Arc<Mutex<FakeState>>,
}

impl FakeEngine {
    /// An engine with no images; SIGTERM is ignored by main processes.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What [`Engine::stats`] reports for sandbox `id` from now on.
    pub fn set_stats(&self, id: &SandboxId, stats: SandboxStats) {
        if let Some(sb) = self.lock().sandboxes.get_mut(id) {
            sb.stats = Some(stats);
        }
    }

    /// Adds an image (by normalised reference) with this entrypoint and cmd.
    pub fn add_image(&self, reference: &str, entrypoint: &[&str], cmd: &[&str]) {
        let info = ImageInfo {
            reference: reference.to_owned(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into(), "LANG=C.UTF-8".into()],
            working_dir: String::new(),
            user: String::new(),
            lower_dirs: vec![PathBuf::from("/fake/layer")],
            layers: vec![Digest::from_sha256_hex(&"a".repeat(64)).expect("a digest")],
        };
        self.lock().images.insert(reference.to_owned(), info);
    }

    /// Puts an image in the fake registry: a pull of `reference` adds it to
    /// the local images.
    pub fn add_remote_image(&self, reference: &str, entrypoint: &[&str], cmd: &[&str]) {
        let info = ImageInfo {
            reference: reference.to_owned(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/usr/bin:/bin".into()],
            working_dir: String::new(),
            user: String::new(),
            lower_dirs: vec![PathBuf::from("/fake/pulled")],
            layers: vec![Digest::from_sha256_hex(&"b".repeat(64)).expect("a digest")],
        };
        self.lock().remote.insert(reference.to_owned(), Ok(info));
    }

    /// Makes a pull of `reference` fail with `failure`.
    pub fn fail_pull(&self, reference: &str, failure: PullFailure) {
        self.lock()
            .remote
            .insert(reference.to_owned(), Err(failure));
    }

    /// Holds every pull until [`FakeEngine::open_pulls`].
    pub fn hold_pulls(&self) {
        let (tx, _) = watch::channel(false);
        self.lock().pulls_open = Some(tx);
    }

    /// Lets held pulls finish.
    pub fn open_pulls(&self) {
        if let Some(tx) = &self.lock().pulls_open {
            tx.send_replace(true);
        }
    }

    /// Pulls asked for so far (reference, credentials).
    pub fn pulls(&self) -> Vec<(String, Option<RegistryCredentials>)> {
        self.lock().pulls.clone()
    }

    /// Makes every later `create` fail with `message` (`None`: succeed).
    pub fn fail_create(&self, message: Option<&str>) {
        self.lock().fail_create = message.map(str::to_owned);
    }

    /// Makes `create` take this long.
    pub fn set_create_delay(&self, delay: Duration) {
        self.lock().create_delay = delay;
    }

    /// Whether SIGTERM makes a main process exit with code 0 (like the
    /// client's default `trap "exit 0" TERM`), instead of being ignored.
    pub fn set_sigterm_exits(&self, exits: bool) {
        self.lock().sigterm_exits = exits;
    }

    /// Output every main process "prints" when watched.
    pub fn set_output(&self, output: &[u8]) {
        self.lock().output = output.to_vec();
    }

    /// Ends a sandbox's main process.
    pub fn exit(&self, id: impl AsRef<str>, exit: MainExit) {
        if let Some(sb) = self.lock().sandboxes.get(id.as_ref()) {
            if let MainExit::Exited { status, .. } = &exit {
                sb.agent.set_main(MainStatus::Exited(*status));
            }
            sb.exit.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some(exit);
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Decides a sandbox's startup probe, as its agent would.
    pub fn finish_startup(&self, id: impl AsRef<str>, state: StartupState) {
        if let Some(sb) = self.lock().sandboxes.get(id.as_ref()) {
            sb.agent.set_startup(Some(state));
        }
    }

    /// Makes a sandbox vanish (as if its init was killed while the daemon
    /// was down).
    pub fn vanish(&self, id: impl AsRef<str>) {
        if let Some(sb) = self.lock().sandboxes.get_mut(id.as_ref()) {
            sb.destroyed = true;
        }
    }

    /// The spec a sandbox was created with.
    pub fn spec(&self, id: impl AsRef<str>) -> Option<LaunchSpec> {
        self.lock()
            .sandboxes
            .get(id.as_ref())
            .map(|s| s.spec.clone())
    }

    /// Signals sent to a sandbox's main process.
    pub fn signals(&self, id: impl AsRef<str>) -> Vec<i32> {
        self.lock()
            .sandboxes
            .get(id.as_ref())
            .map(|s| s.signals.clone())
            .unwrap_or_default()
    }

    /// A file in a sandbox, as its agent has it.
    pub fn agent_file(&self, id: impl AsRef<str>, path: &str) -> Option<Vec<u8>> {
        self.lock().sandboxes.get(id.as_ref())?.agent.file(path)
    }

    /// Commands a sandbox's agent was asked to run.
    pub fn execs(&self, id: impl AsRef<str>) -> Vec<ExecRequest> {
        self.lock()
            .sandboxes
            .get(id.as_ref())
            .map(|s| s.agent.execs())
            .unwrap_or_default()
    }

    /// Whether a sandbox was destroyed.
    pub fn destroyed(&self, id: impl AsRef<str>) -> bool {
        self.lock()
            .sandboxes
            .get(id.as_ref())
            .is_some_and(|s| s.destroyed)
    }

    async fn insert(
        &self,
        id: &SandboxId,
        spec: LaunchSpec,
        idle: bool,
    ) -> Result<(), EngineError> {
        let delay = self.lock().create_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut st = self.lock();
        if let Some(msg) = &st.fail_create {
            return Err(EngineError::Start(msg.clone().into()));
        }
        if st.sandboxes.get(id).is_some_and(|s| !s.destroyed) {
            return Err(EngineError::Start(
                format!("sandbox {id} already exists").into(),
            ));
        }
        let (exit, _) = watch::channel(None);
        let agent = if idle {
            let agent = FakeAgent::new(Vec::new(), String::new());
            agent.set_main(MainStatus::Idle);
            agent
        } else {
            agent_for(&spec)
        };
        st.sandboxes.insert(
            id.clone(),
            FakeSandbox {
                spec,
                agent,
                exit,
                destroyed: false,
                signals: vec![],
                stats: None,
                idle,
                claims: 0,
            },
        );
        Ok(())
    }

    /// Ids of idle sandboxes (created for a pool, not claimed, not
    /// destroyed).
    pub fn idle(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .sandboxes
            .iter()
            .filter(|(_, s)| s.idle && !s.destroyed)
            .map(|(id, _)| id.to_string())
            .collect();
        v.sort();
        v
    }

    /// How many times sandbox `id` was claimed.
    pub fn claims(&self, id: impl AsRef<str>) -> u32 {
        self.lock()
            .sandboxes
            .get(id.as_ref())
            .map_or(0, |s| s.claims)
    }

    /// Makes every claim fail with `message` (`None`: succeed again).
    pub fn fail_claim(&self, message: Option<&str>) {
        self.lock().fail_claim = message.map(str::to_owned);
    }

    /// Ids of sandboxes that were created and not destroyed.
    pub fn alive(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .sandboxes
            .iter()
            .filter(|(_, s)| !s.destroyed)
            .map(|(id, _)| id.to_string())
            .collect();
        v.sort();
        v
    }

    /// The `keep` set of the last sweep.
    pub fn swept_keep(&self) -> Option<HashSet<SandboxId>> {
        self.lock().swept_keep.clone()
    }
}

impl Engine for FakeEngine {
    type Connector = FakeConnector;

    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, EngineError> {
        Ok(self.lock().images.get(reference).cloned())
    }

    async fn pull(
        &self,
        reference: &str,
        credentials: Option<RegistryCredentials>,
    ) -> Result<ImageInfo, PullFailure> {
        let gate = {
            let mut st = self.lock();
            st.pulls.push((reference.to_owned(), credentials));
            st.pulls_open.as_ref().map(|tx| tx.subscribe())
        };
        if let Some(mut gate) = gate {
            let _ = gate.wait_for(|open| *open).await;
        }
        let mut st = self.lock();
        let outcome = st.remote.get(reference).cloned().unwrap_or_else(|| {
            Err(PullFailure {
                kind: crate::engine::PullFailureKind::NotFound,
                message: format!("pull {reference}: manifest unknown (not found)"),
            })
        });
        if let Ok(image) = &outcome {
            st.images.insert(reference.to_owned(), image.clone());
        }
        outcome
    }

    async fn create(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        self.insert(id, spec, false).await
    }

    async fn create_idle(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        self.insert(id, spec, true).await
    }

    async fn claim(&self, id: &SandboxId, spec: LaunchSpec) -> Result<(), EngineError> {
        let mut st = self.lock();
        if let Some(msg) = &st.fail_claim {
            return Err(EngineError::Start(msg.clone().into()));
        }
        let Some(sb) = st.sandboxes.get_mut(id).filter(|s| !s.destroyed) else {
            return Err(EngineError::Start(format!("no idle sandbox {id}").into()));
        };
        if !sb.idle {
            return Err(EngineError::Start(
                format!("sandbox {id} was claimed already").into(),
            ));
        }
        sb.idle = false;
        sb.claims += 1;
        sb.agent = agent_for(&spec);
        sb.spec = spec;
        Ok(())
    }

    async fn wait_exit(&self, id: &SandboxId, logs: LogWriter) -> MainExit {
        let (mut rx, output) = {
            let st = self.lock();
            match st.sandboxes.get(id) {
                Some(sb) if !sb.destroyed => (sb.exit.subscribe(), st.output.clone()),
                _ => return MainExit::InitDied { oom_kills: 0 },
            }
        };
        if !output.is_empty() {
            let offset = logs.resume_offset(id).await;
            logs.append(
                id,
                OutputChunk {
                    offset,
                    stream: Stream::Stdout,
                    time_ns: 0,
                    data: output,
                },
            )
            .await;
        }
        let ended = rx.wait_for(|e| e.is_some()).await.map(|e| e.clone());
        match ended {
            Ok(e) => e.expect("waited for Some"),
            Err(_) => MainExit::InitDied { oom_kills: 0 },
        }
    }

    async fn signal_main(&self, id: &SandboxId, signal: Signal) -> Result<(), EngineError> {
        let mut st = self.lock();
        let exits = st.sigterm_exits;
        let sb = st
            .sandboxes
            .get_mut(id)
            .filter(|s| !s.destroyed)
            .ok_or_else(|| EngineError::Unknown(id.clone()))?;
        if sb.spec.argv.is_empty() || sb.exit.borrow().is_some() {
            return Err(EngineError::Agent(
                sandpit_wire::client::ClientError::Agent {
                    kind: sandpit_wire::ErrorKind::NotRunning,
                    message: "main process is not running".into(),
                },
            ));
        }
        sb.signals.push(signal.number());
        if exits && signal == Signal::TERM {
            sb.exit.send_replace(Some(MainExit::Exited {
                status: ExitStatus::Code(0),
                oom_kills: 0,
            }));
        }
        Ok(())
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), EngineError> {
        if let Some(sb) = self.lock().sandboxes.get_mut(id) {
            sb.destroyed = true;
            sb.exit.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some(MainExit::InitDied { oom_kills: 0 });
                    true
                } else {
                    false
                }
            });
        }
        Ok(())
    }

    async fn adopt(&self, id: &SandboxId) -> Adoption {
        match self.lock().sandboxes.get(id) {
            Some(sb) if !sb.destroyed => Adoption::Running,
            _ => Adoption::Gone,
        }
    }

    async fn sweep(&self, keep: HashSet<SandboxId>) -> Result<usize, EngineError> {
        let mut st = self.lock();
        let mut n = 0;
        for (id, sb) in st.sandboxes.iter_mut() {
            if !keep.contains(id) && !sb.destroyed {
                sb.destroyed = true;
                n += 1;
            }
        }
        st.swept_keep = Some(keep);
        Ok(n)
    }

    fn agent(&self, id: &SandboxId) -> Option<AsyncAgentClient<FakeConnector>> {
        let st = self.lock();
        st.sandboxes
            .get(id)
            .filter(|s| !s.destroyed)
            .map(|s| AsyncAgentClient::new(FakeConnector::new(s.agent.clone())))
    }

    async fn stats(&self, id: &SandboxId) -> Result<SandboxStats, EngineError> {
        let st = self.lock();
        let sb = st
            .sandboxes
            .get(id)
            .filter(|s| !s.destroyed)
            .ok_or_else(|| EngineError::Unknown(id.clone()))?;
        Ok(sb.stats.unwrap_or(SandboxStats {
            cpu_usage_ns: 0,
            memory_bytes: 1 << 20,
            memory_limit_bytes: sb.spec.resources.limits.memory_bytes,
            memory_peak_bytes: None,
            pids: 1,
            net_rx_bytes: None,
            net_tx_bytes: None,
        }))
    }

    fn capacity(&self) -> HostCapacity {
        HostCapacity {
            cpu_millis: 4000,
            memory_total_bytes: 8 << 30,
            memory_available_bytes: 6 << 30,
            architecture: "x86_64".into(),
        }
    }
}
