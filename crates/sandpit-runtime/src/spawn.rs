//! The spawner: a short-lived, single-threaded helper process (`sandpit-spawn`)
//! that creates one sandbox and exits. The daemon is multi-threaded and async;
//! forking it to juggle namespaces would be unsound, so it starts this helper
//! instead.
//!
//! Protocol: the helper reads one JSON line ([`SpawnConfig`]) followed by the
//! raw `Init` frame for the agent on stdin, and prints one JSON line
//! ([`SpawnOutcome`]) on stdout. On success the sandbox's PID 1 (the agent) is
//! running and listening, and the helper has exited: the sandbox is not a
//! child of the daemon, so a daemon restart leaves it running.
//!
//! Steps (see ARCHITECTURE.md for the full list):
//! 1. bind the agent socket on the host, load the init spec into a memfd,
//!    build the seccomp program;
//! 2. unshare UTS, IPC, network and PID namespaces, set the hostname;
//! 3. fork the sandbox's PID 1; the parent moves it into its cgroup;
//! 4. the child, still real root, starts its own session and mount
//!    namespace, brings up loopback, assembles the root filesystem and
//!    pivots into it;
//! 5. the child unshares user and cgroup namespaces; the parent writes the uid
//!    and gid maps (root inside = an unprivileged host uid);
//! 6. the child becomes root of its user namespace, drops the capability
//!    bounding set to the default set, sets `no_new_privs`, installs seccomp
//!    and execs the agent. A close-on-exec pipe tells the parent whether the
//!    exec happened or which step failed.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use crate::chain::chain;
use crate::id::SandboxId;
use crate::mounts::BindMount;
use crate::phases::Phases;
use crate::rootfs::{self, RootfsPlan, AGENT_PATH_IN_SANDBOX};
use crate::syscalls::{LinuxSyscalls, SysError};
use crate::{caps, seccomp};

/// What the spawner needs to create one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpawnConfig {
    /// Sandbox id (for messages).
    pub(crate) id: SandboxId,
    /// Hostname inside the sandbox.
    pub(crate) hostname: String,
    /// Overlay mount point.
    pub(crate) root: PathBuf,
    /// Image layers, top-most first.
    pub(crate) lower_dirs: Vec<PathBuf>,
    /// Writable layer.
    pub(crate) upper_dir: PathBuf,
    /// Overlay work dir.
    pub(crate) work_dir: PathBuf,
    /// Host path of the static agent binary.
    pub(crate) agent_binary: PathBuf,
    /// Host path where the agent's socket is bound.
    pub(crate) agent_socket: PathBuf,
    /// First host uid/gid of the sandbox's id range (root inside).
    pub(crate) host_id_base: u32,
    /// Size of the id range.
    pub(crate) id_count: u32,
    /// `cgroup.procs` files the sandbox's PID 1 is written to.
    pub(crate) cgroup_procs: Vec<PathBuf>,
    /// Mount the root read-only (with a writable `/tmp`).
    #[serde(default)]
    pub(crate) read_only_root: bool,
    /// A network namespace to join; `None`: a new one with only `lo`.
    #[serde(default)]
    pub(crate) network_namespace: Option<PathBuf>,
    /// Volumes bound into the root, in order.
    #[serde(default)]
    pub(crate) mounts: Vec<BindMount>,
    /// The CPUs the sandbox may run on (its affinity); empty: all.
    #[serde(default)]
    pub(crate) cpus: Vec<usize>,
    /// A mounted LXCFS whose views replace the sandbox's `/proc` figures.
    #[serde(default)]
    pub(crate) lxcfs: Option<PathBuf>,
}

/// What the spawner reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(crate) enum SpawnOutcome {
    /// The agent runs as the sandbox's PID 1; `pid` is its host pid.
    Started {
        /// Host pid of the sandbox's PID 1.
        pid: i32,
        /// Where the spawn's time went: `(step, microseconds)` in order
        /// (the runtime logs them at debug level).
        #[serde(default)]
        steps: Vec<(String, u64)>,
    },
    /// Nothing runs; the message says which step failed.
    Failed {
        /// What broke.
        message: String,
    },
}

/// Why the spawner failed. Reported to the runtime as text: the whole
/// chain ([`chain`]), since no variant repeats its source.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    /// The request has no config line.
    #[error("invalid spawn request: missing config line")]
    MissingConfig,
    /// The config line is not a [`SpawnConfig`].
    #[error("invalid spawn request")]
    BadConfig(#[source] serde_json::Error),
    /// A host-side step failed.
    #[error("{step}")]
    Host {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The sandbox's PID 1 reported a failure before exec (already a
    /// whole chain, see [`step_failed`]).
    #[error("{0}")]
    Child(String),
    /// Seccomp filter construction failed.
    #[error("seccomp")]
    Seccomp(#[from] seccomp::SeccompError),
    /// Capability setup failed.
    #[error("capabilities")]
    Caps(#[from] caps::CapsError),
}

fn host(step: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |source| SpawnError::Host { step, source }
}

fn host_nix(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> SpawnError {
    move |e| SpawnError::Host {
        step,
        source: std::io::Error::from_raw_os_error(e as i32),
    }
}

/// How the sandbox's PID 1 reports a failed step: `step: error chain`,
/// e.g. `root filesystem: mount /…/rootfs: ENOENT: No such file or directory`.
fn step_failed(step: &str, e: &dyn std::error::Error) -> String {
    format!("{step}: {}", chain(e))
}

/// Entry point of the `sandpit-spawn` binary. Returns the process exit code.
pub(crate) fn spawner_main() -> i32 {
    let outcome = match spawn_from_stdin() {
        Ok((pid, phases)) => SpawnOutcome::Started {
            pid,
            steps: phases
                .steps()
                .iter()
                .map(|(n, us)| (n.to_string(), *us))
                .collect(),
        },
        Err(e) => SpawnOutcome::Failed { message: chain(&e) },
    };
    let ok = matches!(outcome, SpawnOutcome::Started { .. });
    let line = serde_json::to_string(&outcome).unwrap_or_else(|_| "{}".into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if ok {
        0
    } else {
        1
    }
}

fn spawn_from_stdin() -> Result<(i32, Phases), SpawnError> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(host("read request"))?;
    let nl = input
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(SpawnError::MissingConfig)?;
    let config: SpawnConfig =
        serde_json::from_slice(&input[..nl]).map_err(SpawnError::BadConfig)?;
    spawn(&config, &input[nl + 1..])
}

/// Creates the sandbox described by `config`; `init_frame` is handed to the agent.
pub(crate) fn spawn(config: &SpawnConfig, init_frame: &[u8]) -> Result<(i32, Phases), SpawnError> {
    let mut phases = Phases::start("spawn");
    // 1. Everything that allocates or touches host paths happens up front.
    let listener = UnixListener::bind(&config.agent_socket).map_err(host("bind agent socket"))?;
    std::fs::set_permissions(&config.agent_socket, std::fs::Permissions::from_mode(0o600))
        .map_err(host("chmod agent socket"))?;
    let init = memfd_with(init_frame)?;
    let devnull = File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(host("open /dev/null"))?;
    let filter = seccomp::default_filter()?;
    let last_cap = caps::last_cap()?;
    let mut procs = Vec::with_capacity(config.cgroup_procs.len());
    for p in &config.cgroup_procs {
        procs.push(
            File::options()
                .write(true)
                .open(p)
                .map_err(host("open cgroup.procs"))?,
        );
    }
    let plan = RootfsPlan {
        root: config.root.clone(),
        lower_dirs: config.lower_dirs.clone(),
        upper_dir: config.upper_dir.clone(),
        work_dir: config.work_dir.clone(),
        lxcfs: config.lxcfs.clone(),
        agent_binary: config.agent_binary.clone(),
        root_id: config.host_id_base,
        read_only: config.read_only_root,
        mounts: config.mounts.clone(),
    };
    let agent_path = CString::new(AGENT_PATH_IN_SANDBOX).expect("no nul");
    let agent_argv: Vec<CString> = [
        "sandpit-agent",
        "serve",
        "--listen-fd",
        "3",
        "--init-fd",
        "4",
    ]
    .iter()
    .map(|s| CString::new(*s).expect("no nul"))
    .collect();
    // Opened now, before any namespace changes, like every host path.
    let netns = match &config.network_namespace {
        Some(path) => Some(
            File::options()
                .read(true)
                .open(path)
                .map_err(host("open network namespace"))?,
        ),
        None => None,
    };
    let (to_parent_r, to_parent_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host_nix("pipe"))?;
    let (to_child_r, to_child_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host_nix("pipe"))?;
    phases.mark("prepare");

    // 2. Namespaces that need real root to create and that the sandbox's
    // root must not own: it gets capabilities only over its user namespace.
    // The mount namespace is the child's alone (see `child`): pivot_root
    // would otherwise swap this process's root too, and with it the /proc
    // through which the id maps are written.
    // A given network namespace is joined instead (it was set up by its
    // owner, and is owned by the host's user namespace like a new one).
    let mut flags = CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWPID;
    match &netns {
        Some(ns) => nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
            .map_err(host_nix("join network namespace"))?,
        None => flags |= CloneFlags::CLONE_NEWNET,
    }
    drop(netns);
    nix::sched::unshare(flags).map_err(host_nix("unshare"))?;
    nix::unistd::sethostname(&config.hostname).map_err(host_nix("sethostname"))?;
    phases.mark("namespaces");

    // 3. Fork PID 1. This process is single-threaded, so the child may allocate.
    // SAFETY: the spawner is single-threaded (a fresh process reading stdin), so
    // the child inherits no lock held by another thread.
    match unsafe { nix::unistd::fork() }.map_err(host_nix("fork"))? {
        ForkResult::Child => {
            drop(to_parent_r);
            drop(to_child_w);
            let mut report = File::from(to_parent_w);
            let err = child(ChildArgs {
                plan: &plan,
                listener: listener.as_raw_fd(),
                init: init.as_raw_fd(),
                devnull: devnull.as_raw_fd(),
                filter: &filter,
                last_cap,
                from_parent: File::from(to_child_r),
                report: &mut report,
                agent_path: &agent_path,
                agent_argv: &agent_argv,
                own_network: config.network_namespace.is_none(),
                cpus: &config.cpus,
            });
            let _ = report.write_all(format!("E{err}").as_bytes());
            // SAFETY: _exit is async-signal-safe and skips atexit handlers and
            // destructors that belong to the parent's state.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            drop(to_parent_w);
            drop(to_child_r);
            let result = parent(
                config,
                child,
                procs,
                File::from(to_parent_r),
                File::from(to_child_w),
                &mut phases,
            );
            if result.is_err() {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
            }
            result.map(|()| (child.as_raw(), phases))
        }
    }
}

fn parent(
    config: &SpawnConfig,
    child: Pid,
    procs: Vec<File>,
    mut from_child: File,
    mut to_child: File,
    phases: &mut Phases,
) -> Result<(), SpawnError> {
    let pid = child.as_raw().to_string();
    // Each first write after a quiet moment waits for an RCU grace period
    // (the kernel's cgroup_threadgroup_rwsem; 7-15 ms on a small VM) unless
    // the hierarchy is mounted with `favordynmods`: see docs/performance.md.
    for mut f in procs {
        f.write_all(pid.as_bytes()).map_err(host("join cgroup"))?;
    }
    phases.mark("cgroup_join");
    let mut tag = [0u8; 1];
    if let Err(e) = to_child.write_all(b"G") {
        // The child died first: its own report says why.
        return match from_child.read(&mut tag) {
            Ok(1) => Err(child_error(tag[0], &mut from_child)),
            _ => Err(host("signal child")(e)),
        };
    }

    match from_child.read(&mut tag).map_err(host("read child"))? {
        1 if tag[0] == b'U' => {}
        1 => return Err(child_error(tag[0], &mut from_child)),
        _ => return Err(SpawnError::Child("sandbox init exited early".into())),
    }
    let map = format!("0 {} {}\n", config.host_id_base, config.id_count);
    std::fs::write(format!("/proc/{pid}/uid_map"), &map).map_err(host("write uid_map"))?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &map).map_err(host("write gid_map"))?;
    to_child.write_all(b"M").map_err(host("signal child"))?;

    phases.mark("id_maps");
    // EOF without a message means the exec succeeded (the pipe is close-on-exec).
    let read = from_child.read(&mut tag);
    phases.mark("child_until_exec");
    match read.map_err(host("read child"))? {
        0 => Ok(()),
        _ => Err(child_error(tag[0], &mut from_child)),
    }
}

fn child_error(tag: u8, from_child: &mut File) -> SpawnError {
    let mut msg = Vec::new();
    let _ = from_child.take(4096).read_to_end(&mut msg);
    let msg = String::from_utf8_lossy(&msg).into_owned();
    if tag == b'E' {
        SpawnError::Child(msg)
    } else {
        SpawnError::Child(format!("unexpected report from sandbox init: {msg}"))
    }
}

struct ChildArgs<'a> {
    plan: &'a RootfsPlan,
    listener: RawFd,
    init: RawFd,
    devnull: RawFd,
    filter: &'a seccompiler::BpfProgram,
    last_cap: u32,
    from_parent: File,
    report: &'a mut File,
    agent_path: &'a CString,
    agent_argv: &'a [CString],
    /// The network namespace is new (not joined): bring up `lo` and set
    /// its sysctls here.
    own_network: bool,
    /// CPUs to confine the sandbox to; empty: all.
    cpus: &'a [usize],
}

/// Runs in the sandbox's PID 1 until it execs the agent; returns only on failure.
fn child(mut a: ChildArgs<'_>) -> String {
    macro_rules! step {
        ($what:expr, $e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return step_failed($what, &e),
            }
        };
    }
    // Its own session: a terminal's job-control signals to the daemon's
    // process group never reach the sandbox.
    step!("setsid", nix::unistd::setsid());
    step!(
        "unshare mount namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWNS)
    );
    // Nothing mounted from here on may propagate back to the host.
    step!(
        "make / private",
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    );
    // 4. Network: loopback only, and the sysctls that let an unprivileged
    // namespace root bind low ports and ping (as Docker sets them). A
    // joined namespace was set up by its owner.
    if a.own_network {
        step!("bring up loopback", loopback_up());
        for (key, value) in [
            ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
            ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
        ] {
            step!(key, std::fs::write(key, value));
        }
    }
    // The overlay's layers by descriptor: its options (which
    // `/proc/self/mountinfo` shows inside) then name `/proc/self/fd/N`, not
    // the data dir's paths and the sandbox's id. Opened here, in the new
    // mount namespace: overlayfs clones each layer's mount, which must be
    // one of this namespace. Close-on-exec: gone once the agent runs.
    let (plan, _layer_fds) = step!("root filesystem", by_descriptor(a.plan));
    step!(
        "root filesystem",
        rootfs::build_and_enter(&LinuxSyscalls, &plan)
    );

    // The parent moves us into the sandbox's cgroup meanwhile: on cgroup v1
    // the first migration after a quiet spell waits for an RCU grace period
    // (~10 ms), so the mount work above overlaps it rather than following
    // it. Nothing sandboxed has run yet; from here on everything is charged.
    let mut byte = [0u8; 1];
    step!("wait for cgroup", a.from_parent.read_exact(&mut byte));
    if !a.cpus.is_empty() {
        // Inherited by everything the agent starts: `nproc` and thread
        // pools see the CPU limit (the CFS quota still caps the time).
        let mut set = nix::sched::CpuSet::new();
        for &c in a.cpus {
            step!("cpu affinity", set.set(c));
        }
        step!(
            "cpu affinity",
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        );
    }

    // 5. The user namespace comes last, after every mount: the mount, network
    // and PID namespaces stay owned by the host's user namespace.
    step!(
        "unshare user namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWCGROUP)
    );
    step!("report", a.report.write_all(b"U"));
    step!("wait for id maps", a.from_parent.read_exact(&mut byte));

    // 6. Become root of the new user namespace and lock it down.
    step!("setgroups", nix::unistd::setgroups(&[]));
    let root_gid = nix::unistd::Gid::from_raw(0);
    let root_uid = nix::unistd::Uid::from_raw(0);
    step!(
        "setresgid",
        nix::unistd::setresgid(root_gid, root_gid, root_gid)
    );
    step!(
        "setresuid",
        nix::unistd::setresuid(root_uid, root_uid, root_uid)
    );
    step!(
        "capabilities",
        caps::restrict_bounding_set(caps::DEFAULT_CAPS, a.last_cap)
    );
    // Effective and permitted too, not only the bounding set: nothing runs
    // with more than the default set even before the exec.
    step!(
        "process capabilities",
        caps::restrict_process_caps(caps::DEFAULT_CAPS)
    );
    step!("ambient capabilities", caps::clear_ambient());
    step!("no_new_privs", caps::set_no_new_privs());

    // fds 0-2 -> /dev/null, 3 -> agent listener, 4 -> init spec. Move sources
    // out of the way first so a dup2 never clobbers one still needed.
    let high = |fd: RawFd| -> std::io::Result<RawFd> {
        // SAFETY: F_DUPFD_CLOEXEC only creates a new descriptor from one we own.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if new < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(new)
        }
    };
    let listener = step!("dup", high(a.listener));
    let init = step!("dup", high(a.init));
    let devnull = step!("dup", high(a.devnull));
    for (src, dst) in [
        (devnull, 0),
        (devnull, 1),
        (devnull, 2),
        (listener, 3),
        (init, 4),
    ] {
        // SAFETY: dup2 on descriptors we own; the targets are fixed slots the
        // agent expects, and nothing else uses them in this process.
        if unsafe { libc::dup2(src, dst) } < 0 {
            return step_failed("dup2", &std::io::Error::last_os_error());
        }
    }
    // Everything else (including the report pipe) closes at exec.
    // SAFETY: close_range with CLOEXEC only flags descriptors; no memory is touched.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            5u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    step!("seccomp", seccomp::install(a.filter));

    let argv: Vec<*const libc::c_char> = a
        .agent_argv
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are NUL-terminated arrays of pointers to live CStrings.
    unsafe { libc::execve(a.agent_path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    step_failed("exec agent", &std::io::Error::last_os_error())
}

/// `plan` with its layers named `/proc/self/fd/N`, and the descriptors.
fn by_descriptor(plan: &RootfsPlan) -> Result<(RootfsPlan, Vec<OwnedFd>), SysError> {
    let mut fds = Vec::with_capacity(plan.lower_dirs.len() + 2);
    let mut open = |p: &PathBuf| -> Result<PathBuf, SysError> {
        let fd = nix::fcntl::open(
            p.as_path(),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|errno| SysError {
            op: "open",
            path: p.clone(),
            errno,
        })?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        fds.push(fd);
        Ok(path)
    };
    let lower_dirs = plan
        .lower_dirs
        .iter()
        .map(&mut open)
        .collect::<Result<Vec<_>, _>>()?;
    let upper_dir = open(&plan.upper_dir)?;
    let work_dir = open(&plan.work_dir)?;
    Ok((
        RootfsPlan {
            lower_dirs,
            upper_dir,
            work_dir,
            ..plan.clone()
        },
        fds,
    ))
}

fn memfd_with(data: &[u8]) -> Result<OwnedFd, SpawnError> {
    let fd = nix::sys::memfd::memfd_create(c"sandpit-init", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(host_nix("memfd_create"))?;
    let mut f = File::from(fd);
    f.write_all(data).map_err(host("write init spec"))?;
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0))
        .map_err(host("rewind init spec"))?;
    // SAFETY: into_raw_fd hands over ownership of a valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(f.into_raw_fd()) })
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned only here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::RootfsError;
    use crate::syscalls::SysError;

    #[test]
    fn failed_steps_read_step_then_cause() {
        let e = RootfsError::Sys(SysError {
            op: "mount",
            path: "/s/x/rootfs".into(),
            errno: nix::errno::Errno::ENOENT,
        });
        assert_eq!(
            step_failed("root filesystem", &e),
            "root filesystem: mount /s/x/rootfs: ENOENT: No such file or directory"
        );
        assert_eq!(
            step_failed("setsid", &nix::errno::Errno::EPERM),
            "setsid: EPERM: Operation not permitted"
        );
    }
}
