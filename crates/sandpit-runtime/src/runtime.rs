//! The engine's public face: create, adopt, list, destroy and sweep sandboxes.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sandpit_volume::disk::{self, DiskPool};
use sandpit_wire::client::AgentClient;
use sandpit_wire::InitSpec;
use serde::{Deserialize, Serialize};

use crate::binaries::is_dynamically_linked;
pub use crate::binaries::{default_agent_binary, default_spawner_binary, AGENT_ENV, SPAWNER_ENV};
use crate::cgroup::{Cgroup, CgroupError, CgroupManager, Limits};
use crate::id::SandboxId;
pub use crate::mounts::BindMount;
use crate::process::{is_zombie, process_start_time, reap, wait_gone};
use crate::spawn::{SpawnConfig, SpawnOutcome};

mod freeze;
pub use freeze::Frozen;

/// Host uids/gids a sandbox's users map to. Root inside is `host_base`.
///
/// Every sandbox shares one range (as Docker's `userns-remap` does): image
/// layers are stored pre-shifted to it, so no per-sandbox chown is needed.
/// Sandboxes are still separated from each other by their mount, PID, IPC
/// and network namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// First host id of the range.
    pub host_base: u32,
    /// Number of ids.
    pub count: u32,
}

impl Default for IdMap {
    fn default() -> Self {
        Self {
            host_base: 1_000_000_000,
            count: 65536,
        }
    }
}

/// How the engine is set up on this host.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where per-sandbox state lives (sockets, writable layers).
    pub state_dir: PathBuf,
    /// The static agent binary, bind-mounted into every sandbox.
    pub agent_binary: PathBuf,
    /// The `sandpit-spawn` helper.
    pub spawner_binary: PathBuf,
    /// User-namespace mapping.
    pub id_map: IdMap,
    /// Name of the parent cgroup that holds every sandbox's cgroup.
    pub cgroup_parent: String,
    /// Formatted images for writable layers of the pool's size (see
    /// [`SandboxSpec::disk_bytes`]); other sizes are formatted on demand.
    pub disk_pool: Option<Arc<DiskPool>>,
    /// A mounted LXCFS whose `proc` files (`meminfo`, `cpuinfo`, `stat`,
    /// `uptime`, ...) and `sys/devices/system/cpu/online` are bound over
    /// the sandbox's own, so that `free`, `top` and `os.cpu_count()` see its
    /// limits rather than the host. `None`: the host's figures show.
    pub lxcfs: Option<PathBuf>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique among the sandboxes of the runtime's state dir.
    pub id: SandboxId,
    /// Hostname inside; the id when `None`.
    pub hostname: Option<String>,
    /// Unpacked image layers, top-most first.
    pub lower_dirs: Vec<PathBuf>,
    /// Main command, environment, working dir and files, for the agent.
    pub init: InitSpec,
    /// Resource limits.
    pub limits: Limits,
    /// Mount the root file system read-only, with a writable tmpfs at
    /// `/tmp` (`/dev/shm` stays writable too).
    pub read_only_root: bool,
    /// A network namespace to join instead of a fresh loopback-only one:
    /// a path the spawner opens (`/proc/<pid>/fd/<n>` of a descriptor the
    /// caller holds, `/proc/<pid>/ns/net`, a bind mount). The namespace is
    /// the caller's: it was set up (links, addresses, routes, `lo`, the
    /// sysctls) before, it outlives the sandbox's processes if the caller
    /// holds it, and other sandboxes may join it too. `None`: a new
    /// namespace with only `lo` up.
    pub network_namespace: Option<NetworkNamespace>,
    /// Host directories (volumes) bound into the sandbox, in order, after
    /// the image and the system mounts and before a read-only root is
    /// remounted (see [`BindMount`] for what is refused).
    pub mounts: Vec<BindMount>,
    /// Size of the writable layer: the overlay's upper dir lives on an ext4
    /// file system of this size of its own (a sparse image on a loop
    /// device), so writes past it fail with `ENOSPC` inside. `None`: the
    /// upper dir is a plain directory of the state dir, unbounded.
    pub disk_bytes: Option<u64>,
}

/// A network namespace the sandbox joins, and how its processes find
/// names there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkNamespace {
    /// What the spawner opens (see [`SandboxSpec::network_namespace`]).
    pub path: PathBuf,
    /// `/etc/resolv.conf` inside (the resolver of this network).
    pub resolv_conf: Vec<u8>,
    /// `/etc/hosts` inside.
    pub hosts: Vec<u8>,
    /// CA certificates (PEM) the sandbox trusts besides the image's: added
    /// to the image's bundle at [`CA_BUNDLE`] and kept at
    /// [`EXTRA_CAS`] (where `update-ca-certificates` finds them). Empty:
    /// the image's bundle as it is.
    pub ca_certificates: Vec<u8>,
}

/// The CA bundle of Debian, Ubuntu and Alpine images (what OpenSSL,
/// Debian's pip and curl read).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the extra CAs are kept in the sandbox.
pub const EXTRA_CAS: &str = "/usr/local/share/ca-certificates/sandpit-extra.crt";

/// Creates `rel` (a file path, relative) in the upper dir `upper` with its
/// parent directories (0755) and `content` (0644), all owned by `base`
/// (the sandbox's root).
fn write_upper(upper: &Path, rel: &str, content: &[u8], base: u32) -> std::io::Result<()> {
    let path = upper.join(rel.trim_start_matches('/'));
    let mut dir = upper.to_path_buf();
    if let Some(parent) = Path::new(rel.trim_start_matches('/')).parent() {
        for c in parent.components() {
            dir.push(c);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    std::os::unix::fs::chown(&dir, Some(base), Some(base))?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }
    std::fs::write(&path, content)?;
    std::os::unix::fs::chown(&path, Some(base), Some(base))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
}

/// Errors of the engine. None repeats its source in its message: print
/// them with their `source()` chain (`a: b: c`).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A spec field is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidSpec {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A sandbox with that id exists already.
    #[error("sandbox {0} already exists")]
    AlreadyExists(SandboxId),
    /// No sandbox with that id.
    #[error("sandbox {0} not found")]
    NotFound(SandboxId),
    /// A host-side file operation failed.
    #[error("{step}")]
    Io {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Cgroup setup or teardown failed.
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
    /// The spawner reported a failure: its whole error chain as text (it
    /// comes from another process), e.g. `root filesystem: mount
    /// /…/rootfs: ENOENT: No such file or directory`.
    #[error("{0}")]
    Spawn(String),
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { step, source }
}

/// What is kept on disk so that a restarted daemon can adopt a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxRecord {
    /// The id, for whoever reads the file: the directory's name is what
    /// counts, and nothing in it must keep `destroy` from the pid.
    id: String,
    pid: i32,
    /// Start time of `pid` (field 22 of /proc/PID/stat): guards against pid reuse.
    start_time: u64,
}

/// A running (or recently dead) sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: SandboxId,
    pid: i32,
    start_time: u64,
    dir: PathBuf,
    cgroup: Cgroup,
}

impl Sandbox {
    /// The sandbox id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Host pid of the sandbox's PID 1 (the agent).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Path of the agent's socket on the host.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// A client for the sandbox's agent.
    pub fn agent(&self) -> AgentClient {
        AgentClient::new(self.agent_socket())
    }

    /// Whether the sandbox's PID 1 still runs.
    pub fn is_running(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    /// A pidfd (`pidfd_open(2)`) for the sandbox's PID 1. It becomes
    /// readable once that process has exited, so a caller can wait for the
    /// sandbox to end with `poll(2)`/epoll (or tokio's `AsyncFd`) instead of
    /// polling [`is_running`](Sandbox::is_running). Close-on-exec.
    ///
    /// `Ok(None)` when PID 1 no longer runs: it exited, or its pid now names
    /// another process. That is checked after opening, so a returned pidfd
    /// always refers to the sandbox's PID 1, never to a process that reused
    /// its pid. `Err` where the kernel has no pidfds (before Linux 5.3:
    /// `ENOSYS`) or refuses one; callers then fall back to polling.
    pub fn pidfd(&self) -> std::io::Result<Option<OwnedFd>> {
        // SAFETY: pidfd_open takes a pid and flags by value and returns a new
        // descriptor or -1; no memory is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No process with that pid at all.
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        let fd = RawFd::try_from(fd).map_err(std::io::Error::other)?;
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(self.is_running().then_some(fd))
    }

    /// How many processes the kernel OOM-killed in this sandbox.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills().unwrap_or(0)
    }

    /// The sandbox's cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }
}

/// Counts of what a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Sandboxes (state directory, cgroup, processes) removed.
    pub state_dirs: usize,
}

/// The sandbox engine.
#[derive(Debug)]
pub struct Runtime {
    config: RuntimeConfig,
    cgroups: CgroupManager,
    /// One lock per sandbox being destroyed: a daemon may tear a sandbox
    /// down from two places at once (a stop request and the watcher that
    /// saw its main process end); the second waits for the first and then
    /// finds nothing left, instead of racing it through the cgroup.
    destroying: std::sync::Mutex<
        std::collections::HashMap<SandboxId, std::sync::Arc<std::sync::Mutex<()>>>,
    >,
    /// Where the next CPU-limited sandbox's CPU set starts, so that
    /// sandboxes limited to fewer CPUs than the host has spread over them.
    next_cpu: AtomicUsize,
    /// The CPUs this process may run on, read once (not per create).
    allowed_cpus: Vec<usize>,
}

impl Runtime {
    /// Sets up the state dir and detects the cgroup version.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(io("create state dir"))?;
        for (what, path) in [
            ("agent binary", &config.agent_binary),
            ("spawner binary", &config.spawner_binary),
        ] {
            if !path.is_file() {
                return Err(RuntimeError::InvalidSpec {
                    field: what,
                    reason: format!("{} is not a file", path.display()),
                });
            }
        }
        // A dynamically linked agent would fail inside images without the
        // host's loader (busybox, distroless) with a baffling ENOENT at exec.
        if is_dynamically_linked(&config.agent_binary).map_err(io("read agent binary"))? {
            return Err(RuntimeError::InvalidSpec {
                field: "agent binary",
                reason: format!(
                    "{} is dynamically linked; build it with scripts/build-agent.sh",
                    config.agent_binary.display()
                ),
            });
        }
        let cgroups = CgroupManager::detect(&config.cgroup_parent)?;
        Ok(Self::with_cgroups(config, cgroups))
    }

    /// A runtime over given cgroups, without the checks of [`Runtime::new`]
    /// (for tests of what needs no sandbox to start: listing, sweeping).
    fn with_cgroups(config: RuntimeConfig, cgroups: CgroupManager) -> Self {
        Self {
            config,
            cgroups,
            destroying: Default::default(),
            next_cpu: AtomicUsize::new(0),
            allowed_cpus: allowed_cpus(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The cgroup manager (version, parent group).
    pub fn cgroups(&self) -> &CgroupManager {
        &self.cgroups
    }

    fn dir_of(&self, id: &SandboxId) -> PathBuf {
        self.config.state_dir.join(id.as_str())
    }

    /// Creates a sandbox and returns once its agent is listening.
    pub fn create(&self, spec: &SandboxSpec) -> Result<Sandbox, RuntimeError> {
        self.create_as(spec, false)
    }

    /// Creates a sandbox whose agent listens but starts nothing: `spec.init`
    /// is ignored, and the user, files, working dir and main command come
    /// with the agent's claim ([`AgentClient::claim`]). Everything else
    /// (root file system, writable layer, cgroup and its limits, namespaces,
    /// network) is set up as [`create`](Runtime::create) does. A warm
    /// pool's sandbox.
    pub fn create_idle(&self, spec: &SandboxSpec) -> Result<Sandbox, RuntimeError> {
        self.create_as(spec, true)
    }

    fn create_as(&self, spec: &SandboxSpec, idle: bool) -> Result<Sandbox, RuntimeError> {
        if spec.lower_dirs.is_empty() {
            return Err(RuntimeError::InvalidSpec {
                field: "image",
                reason: "no layers".into(),
            });
        }
        if spec.init.argv.first().is_some_and(|a| a.is_empty()) {
            return Err(RuntimeError::InvalidSpec {
                field: "command",
                reason: "empty program name".into(),
            });
        }
        check_mounts(&spec.mounts)?;
        let hostname = spec.hostname.clone().unwrap_or_else(|| spec.id.to_string());
        if hostname.is_empty() || hostname.len() > 63 {
            return Err(RuntimeError::InvalidSpec {
                field: "hostname",
                reason: "must be 1 to 63 characters".into(),
            });
        }
        let dir = self.dir_of(&spec.id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => return Err(io("create sandbox dir")(e)),
        }
        let result = self.create_in(spec, &dir, hostname, idle);
        if result.is_err() {
            let _ = self.cgroups.open(spec.id.as_str()).destroy();
            let _ = remove_state_dir(&dir);
        }
        result
    }

    fn create_in(
        &self,
        spec: &SandboxSpec,
        dir: &Path,
        hostname: String,
        idle: bool,
    ) -> Result<Sandbox, RuntimeError> {
        let base = self.config.id_map.host_base;
        let mut phases = crate::phases::Phases::start("runtime create");
        std::fs::create_dir(dir.join("rootfs")).map_err(io("create sandbox dir"))?;
        // The writable layer: on a file system of its own when sized.
        let layer = match spec.disk_bytes {
            Some(size) => self.attach_disk(dir, size)?,
            None => dir.to_path_buf(),
        };
        phases.mark("disk");
        let (upper, work) = (layer.join("upper"), layer.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir(d).map_err(io("create sandbox dir"))?;
        }
        // The overlay's root directory takes its owner from the upper dir:
        // make it the sandbox's root.
        std::os::unix::fs::chown(&upper, Some(base), Some(base)).map_err(io("chown upper dir"))?;
        std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod upper dir"))?;

        if let Some(net) = &spec.network_namespace {
            // Written from here, into the upper layer, before anything is
            // mounted: they are there with a read-only root too, and a
            // symlink in the image (`/etc/resolv.conf` ->
            // `/run/systemd/...`) is covered, never followed. Like Docker's,
            // they are the sandbox's to edit afterwards: the firewall, not
            // this file, decides where DNS goes.
            for (name, content) in [
                ("etc/resolv.conf", &net.resolv_conf),
                ("etc/hosts", &net.hosts),
            ] {
                write_upper(&upper, name, content, base).map_err(io("write network files"))?;
            }
            if !net.ca_certificates.is_empty() {
                // The image's bundle (read through its own layers and
                // symlinks, never the host's), then ours.
                let mut bundle =
                    crate::layered::read_image_file(&spec.lower_dirs, CA_BUNDLE, 16 << 20)
                        .unwrap_or_default();
                if !bundle.is_empty() && !bundle.ends_with(b"\n") {
                    bundle.push(b'\n');
                }
                bundle.extend_from_slice(&net.ca_certificates);
                write_upper(&upper, CA_BUNDLE, &bundle, base).map_err(io("write the CA bundle"))?;
                write_upper(&upper, EXTRA_CAS, &net.ca_certificates, base)
                    .map_err(io("write the CA bundle"))?;
            }
        }
        let cpus = self.cpus_for(spec.limits.cpu_millis);
        let limits = Limits {
            cpus: (!cpus.is_empty()).then(|| crate::cgroup::CpuMask::of(&cpus)),
            ..spec.limits
        };
        phases.mark("files");
        let cgroup = self.cgroups.create(spec.id.as_str(), &limits)?;
        phases.mark("cgroup");
        let config = SpawnConfig {
            id: spec.id.clone(),
            hostname,
            root: dir.join("rootfs"),
            lower_dirs: spec.lower_dirs.clone(),
            upper_dir: upper,
            work_dir: work,
            agent_binary: self.config.agent_binary.clone(),
            agent_socket: dir.join("agent.sock"),
            host_id_base: base,
            id_count: self.config.id_map.count,
            cgroup_procs: cgroup.procs_files(),
            read_only_root: spec.read_only_root,
            network_namespace: spec.network_namespace.as_ref().map(|n| n.path.clone()),
            mounts: spec.mounts.clone(),
            cpus,
            lxcfs: self.config.lxcfs.clone(),
        };
        let mut input = serde_json::to_vec(&config).expect("serializable");
        input.push(b'\n');
        let init = if idle {
            sandpit_wire::Frame::Idle
        } else {
            sandpit_wire::Frame::Init(spec.init.clone())
        };
        sandpit_wire::encode(&init, &mut input);

        let mut child = Command::new(&self.config.spawner_binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io("run spawner"))?;
        {
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(&input).map_err(io("write to spawner"))?;
        }
        let output = child.wait_with_output().map_err(io("wait for spawner"))?;
        let line = String::from_utf8_lossy(&output.stdout);
        let outcome: SpawnOutcome = serde_json::from_str(line.trim()).map_err(|_| {
            RuntimeError::Spawn(format!(
                "spawner exited with {} and no report",
                output.status
            ))
        })?;
        let pid = match outcome {
            SpawnOutcome::Started { pid, steps } => {
                tracing::debug!(sandbox_id = %spec.id, ?steps, "spawn phases");
                pid
            }
            SpawnOutcome::Failed { message } => return Err(RuntimeError::Spawn(message)),
        };
        phases.mark("spawn");
        let start_time = process_start_time(pid)
            .ok_or_else(|| RuntimeError::Spawn("sandbox init exited right after start".into()))?;
        let record = SandboxRecord {
            id: spec.id.to_string(),
            pid,
            start_time,
        };
        write_atomic(
            &dir.join("state.json"),
            &serde_json::to_vec(&record).expect("serializable"),
        )
        .map_err(io("write sandbox state"))?;
        phases.mark("record");
        phases.log(&spec.id);
        tracing::debug!(sandbox_id = %spec.id, pid, "sandbox started");
        Ok(Sandbox {
            id: spec.id.clone(),
            pid,
            start_time,
            dir: dir.to_path_buf(),
            cgroup,
        })
    }

    /// Formats (or takes from the pool) and mounts a writable layer of
    /// `size` bytes at `dir/disk`, the image at `dir/disk.img`.
    fn attach_disk(&self, dir: &Path, size: u64) -> Result<PathBuf, RuntimeError> {
        let image = dir.join(DISK_IMAGE);
        let mnt = dir.join(DISK_MOUNT);
        std::fs::create_dir(&mnt).map_err(io("create sandbox dir"))?;
        let pooled = self
            .config
            .disk_pool
            .as_ref()
            .is_some_and(|p| p.size_bytes() == size && p.take_into(&image));
        if !pooled {
            disk::format_disk(&image, size).map_err(disk_error("format writable layer"))?;
        }
        disk::attach_disk(&image, &mnt).map_err(disk_error("mount writable layer"))?;
        Ok(mnt)
    }

    /// The CPUs a sandbox limited to `cpu_millis` may run on: as many as
    /// its limit rounded up, taken in turn from those this process may use,
    /// so that `nproc` and thread pools inside size themselves to the
    /// limit. Empty (no change) without a limit or when it covers them all.
    fn cpus_for(&self, cpu_millis: Option<u64>) -> Vec<usize> {
        let Some(millis) = cpu_millis else {
            return Vec::new();
        };
        let allowed = &self.allowed_cpus;
        let want = usize::try_from(millis.div_ceil(1000).max(1)).unwrap_or(usize::MAX);
        if want >= allowed.len() {
            return Vec::new();
        }
        let start = self.next_cpu.fetch_add(want, Ordering::Relaxed);
        (0..want)
            .map(|i| allowed[(start + i) % allowed.len()])
            .collect()
    }

    /// Adopts an existing sandbox (after a daemon restart).
    pub fn open(&self, id: &SandboxId) -> Result<Sandbox, RuntimeError> {
        let dir = self.dir_of(id);
        let record = read_record(&dir).ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        Ok(Sandbox {
            id: id.clone(),
            pid: record.pid,
            start_time: record.start_time,
            dir,
            cgroup: self.cgroups.open(id.as_str()),
        })
    }

    /// Ids of every sandbox with state in this runtime's state dir, sorted.
    /// Entries whose names are not ids are skipped (and logged at debug
    /// level): nothing of ours.
    pub fn list(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.config.state_dir).map_err(io("list state dir"))? {
            let entry = entry.map_err(io("list state dir"))?;
            let name = entry.file_name();
            match name.to_str().map(SandboxId::parse) {
                Some(Ok(id)) => ids.push(id),
                _ => tracing::debug!(
                    name = %name.to_string_lossy(),
                    state_dir = %self.config.state_dir.display(),
                    "not a sandbox id: skipped"
                ),
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Kills every process of the sandbox and removes all its state.
    /// Destroying a sandbox that is already gone is not an error.
    pub fn destroy(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        let lock = {
            let mut map = self.destroying.lock().unwrap_or_else(|e| e.into_inner());
            std::sync::Arc::clone(map.entry(id.clone()).or_default())
        };
        let result = {
            let _serialised = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.destroy_locked(id)
        };
        let mut map = self.destroying.lock().unwrap_or_else(|e| e.into_inner());
        // Only the last one out removes the entry (the map holds one handle).
        if map
            .get(id)
            .is_some_and(|l| std::sync::Arc::strong_count(l) <= 2)
        {
            map.remove(id);
        }
        result
    }

    fn destroy_locked(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        let dir = self.dir_of(id);
        let mut phases = crate::phases::Phases::start("runtime destroy");
        if let Some(record) = read_record(&dir) {
            // PID 1 dying takes the whole PID namespace with it.
            if process_start_time(record.pid) == Some(record.start_time) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(record.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            reap(record.pid);
            wait_gone(record.pid, record.start_time);
        }
        phases.mark("kill");
        // Catches anything that was mid-fork or otherwise outlived PID 1.
        self.cgroups.open(id.as_str()).destroy()?;
        phases.mark("cgroup");
        remove_state_dir(&dir)?;
        phases.mark("state_dir");
        phases.log(id);
        tracing::debug!(sandbox_id = %id, "sandbox destroyed");
        Ok(())
    }

    /// Destroys (processes, cgroup, state dir: see [`destroy`]) every
    /// sandbox of this runtime's state dir whose id `remove` picks, e.g. the
    /// debris a crashed daemon left: `sweep(|id| id.is_generated() &&
    /// !keep.contains(id))` takes the daemon's own sandboxes that it does not
    /// know any more, and leaves those of `sandpit run` (`run-…`) sharing
    /// the state dir alone. Stops at the first sandbox that cannot be
    /// destroyed.
    ///
    /// [`destroy`]: Runtime::destroy
    pub fn sweep(&self, remove: impl Fn(&SandboxId) -> bool) -> Result<SweepReport, RuntimeError> {
        let mut report = SweepReport::default();
        for id in self.list()? {
            if remove(&id) {
                self.destroy(&id)?;
                report.state_dirs += 1;
            }
        }
        // Cgroups are not swept on their own: the parent group is shared
        // with other engines (another daemon's data dir, `sandpit run`), and
        // a sandbox's cgroup never exists without its state dir (created
        // first, removed last), so `destroy` above took every one picked.
        Ok(report)
    }
}

/// Image file and mount point of a sized writable layer, in the state dir.
const DISK_IMAGE: &str = "disk.img";
const DISK_MOUNT: &str = "disk";

fn disk_error(step: &'static str) -> impl FnOnce(sandpit_volume::VolumeError) -> RuntimeError {
    move |e| RuntimeError::Io {
        step,
        source: std::io::Error::other(sandpit_errors::chain(&e)),
    }
}

/// Removes a sandbox's state dir: its writable layer's file system
/// unmounted first (lazily when a dying sandbox still holds it), so the
/// recursive delete below never runs through a mounted file system.
fn remove_state_dir(dir: &Path) -> Result<(), RuntimeError> {
    let mnt = dir.join(DISK_MOUNT);
    if disk::is_mounted(&mnt) {
        disk::detach_disk(&mnt).map_err(disk_error("unmount writable layer"))?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove sandbox dir")(e)),
    }
}

/// The CPUs this process may run on (its affinity), in order.
fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The spec's mounts, checked before anything is created: paths (the
/// spawner checks them again) and sources that are directories.
fn check_mounts(mounts: &[BindMount]) -> Result<(), RuntimeError> {
    let invalid = |reason: String| RuntimeError::InvalidSpec {
        field: "mounts",
        reason,
    };
    crate::mounts::check(mounts).map_err(|e| invalid(e.to_string()))?;
    for m in mounts {
        if !m.source.is_dir() {
            return Err(invalid(format!(
                "source {} of target {} is not a directory",
                m.source.display(),
                m.target
            )));
        }
    }
    Ok(())
}

fn read_record(dir: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(dir.join("state.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A runtime over a state dir and a fake v2 cgroup tree, both in `t`.
    fn fake_runtime(t: &Path) -> Runtime {
        let state_dir = t.join("state");
        std::fs::create_dir(&state_dir).unwrap();
        let cgroup_root = t.join("cgroup");
        std::fs::create_dir_all(cgroup_root.join("sandpit")).unwrap();
        let cgroups =
            CgroupManager::with_root(crate::cgroup::CgroupVersion::V2, &cgroup_root, "sandpit")
                .unwrap();
        Runtime::with_cgroups(
            RuntimeConfig {
                state_dir,
                agent_binary: "/nonexistent/agent".into(),
                spawner_binary: "/nonexistent/spawner".into(),
                id_map: IdMap::default(),
                cgroup_parent: "sandpit".into(),
                disk_pool: None,
                lxcfs: None,
            },
            cgroups,
        )
    }

    /// A sandbox's leftovers: its state dir and an empty cgroup directory.
    fn debris(rt: &Runtime, id: &str) -> SandboxId {
        let id = SandboxId::parse(id).unwrap();
        std::fs::create_dir_all(rt.dir_of(&id).join("upper")).unwrap();
        for dir in rt.cgroups.open(id.as_str()).paths() {
            std::fs::create_dir(dir).unwrap();
        }
        id
    }

    fn has_cgroup(rt: &Runtime, id: &SandboxId) -> bool {
        rt.cgroups.open(id.as_str()).paths()[0].is_dir()
    }

    #[test]
    fn list_skips_names_that_are_not_ids() {
        let t = tempfile::tempdir().unwrap();
        let rt = fake_runtime(t.path());
        let b = debris(&rt, "b-1");
        let a = debris(&rt, "a.1");
        std::fs::create_dir(rt.config.state_dir.join("Not-An-Id")).unwrap();
        std::fs::write(rt.config.state_dir.join(".hidden"), "").unwrap();
        assert_eq!(rt.list().unwrap(), [a, b]);
    }

    #[test]
    fn sweep_removes_exactly_what_the_predicate_picks() {
        let t = tempfile::tempdir().unwrap();
        let rt = fake_runtime(t.path());
        let lost = debris(&rt, "0123456789ab");
        let kept = debris(&rt, "abcdef012345");
        let run = debris(&rt, "run-0123456789ab");
        let stranger = rt.config.state_dir.join("Not-An-Id");
        std::fs::create_dir(&stranger).unwrap();
        // What the daemon asks for: its own ids that it does not know.
        let keep = HashSet::from([kept.clone()]);
        let report = rt
            .sweep(|id| id.is_generated() && !keep.contains(id))
            .unwrap();
        assert_eq!(report, SweepReport { state_dirs: 1 });
        assert_eq!(rt.list().unwrap(), [kept.clone(), run.clone()]);
        assert!(!rt.dir_of(&lost).exists());
        assert!(!has_cgroup(&rt, &lost), "the swept sandbox's cgroup stays");
        assert!(has_cgroup(&rt, &kept) && has_cgroup(&rt, &run));
        assert!(stranger.is_dir(), "not an id: not ours to remove");
        // Everything goes when everything is picked; nothing is left to do.
        assert_eq!(rt.sweep(|_| true).unwrap().state_dirs, 2);
        assert!(rt.list().unwrap().is_empty());
        assert!(!has_cgroup(&rt, &kept) && !has_cgroup(&rt, &run));
        assert_eq!(rt.sweep(|_| true).unwrap(), SweepReport::default());
    }

    /// A `Sandbox` whose PID 1 is `pid`, recorded with `start_time`.
    fn sandbox_of(pid: i32, start_time: u64) -> Sandbox {
        let t = tempfile::tempdir().unwrap();
        let rt = fake_runtime(t.path());
        Sandbox {
            id: SandboxId::parse("sb").unwrap(),
            pid,
            start_time,
            dir: t.path().join("state/sb"),
            cgroup: rt.cgroups.open("sb"),
        }
    }

    fn readable(fd: &OwnedFd, timeout_ms: u16) -> bool {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, timeout_ms).unwrap() == 1
    }

    #[test]
    fn pidfd_is_readable_once_init_exits_and_guards_pid_reuse() {
        let mut child = Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = child.id() as i32;
        let start_time = process_start_time(pid).unwrap();
        let sb = sandbox_of(pid, start_time);
        let fd = match sb.pidfd() {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                eprintln!("skipped: no pidfds on this kernel");
                child.kill().unwrap();
                child.wait().unwrap();
                return;
            }
            other => other.unwrap().expect("init runs"),
        };
        assert!(!readable(&fd, 0), "readable while init runs");
        // The same pid recorded with another start time is another process.
        assert!(sandbox_of(pid, start_time + 1).pidfd().unwrap().is_none());
        child.kill().unwrap();
        assert!(readable(&fd, 5000), "not readable after init exited");
        child.wait().unwrap();
        assert!(readable(&fd, 0), "still readable once reaped");
        assert!(sb.pidfd().unwrap().is_none(), "init is gone");
        // No such process at all.
        assert!(sandbox_of(i32::MAX, 1).pidfd().unwrap().is_none());
    }
}
