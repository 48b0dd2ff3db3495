//! LXCFS: the FUSE file system (Debian's `lxcfs`) whose `/proc/meminfo`,
//! `/proc/cpuinfo`, `/proc/stat`, `/sys/devices/system/cpu/online`, ...
//! show the reading process's cgroup limits instead of the host's. The
//! engine binds those files over each sandbox's own, so `free`, `top`,
//! `os.cpu_count()` and the thread pools of pip, torch and `make -j` size
//! themselves to the sandbox.
//!
//! One LXCFS serves the whole host (it answers any reader from its
//! cgroup), mounted at [`HOST_MOUNT`] and started detached: it outlives the
//! daemon, since running sandboxes hold binds of its files across a daemon
//! restart; a restarted daemon finds it mounted and reuses it. A stale
//! mount (LXCFS died) is detached and LXCFS started again. A lock file keeps
//! two daemons from starting it at once.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::limitsconfig::LxcfsMode;

/// Where the host's LXCFS is mounted.
pub const HOST_MOUNT: &str = "/run/sandpit/lxcfs";

/// The LXCFS to bind into sandboxes for `mode`; `None` (logged) when there
/// is none to use.
pub fn ensure(mode: &LxcfsMode) -> Option<PathBuf> {
    match mode {
        LxcfsMode::Off => None,
        LxcfsMode::At(path) => {
            if serves(path) {
                Some(path.clone())
            } else {
                tracing::warn!(path = %path.display(), "limits.lxcfs is not a working LXCFS mount: sandboxes see the host's /proc figures");
                None
            }
        }
        LxcfsMode::Auto => {
            let Some(binary) = binary() else {
                tracing::warn!("lxcfs is not installed: sandboxes see the host's memory and CPUs in /proc (install the lxcfs package)");
                return None;
            };
            match start(&binary, Path::new(HOST_MOUNT)) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::warn!(error = %e, "lxcfs: sandboxes see the host's /proc figures");
                    None
                }
            }
        }
    }
}

fn binary() -> Option<PathBuf> {
    ["/usr/bin/lxcfs", "/usr/local/bin/lxcfs", "/bin/lxcfs"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether `dir` is a mounted LXCFS that answers.
fn serves(dir: &Path) -> bool {
    is_lxcfs_mount(dir)
        && std::fs::read(dir.join("proc/meminfo")).is_ok_and(|b| b.starts_with(b"MemTotal:"))
}

/// Whether `dir` is a `fuse.lxcfs` mount point (from mountinfo).
fn is_lxcfs_mount(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    text.lines().any(|line| {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4);
        let fstype = line.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        mount_point == Some(&*want) && fstype == Some("fuse.lxcfs")
    })
}

/// Reuses the LXCFS mounted at `dir`, or starts one there.
fn start(binary: &Path, dir: &Path) -> Result<PathBuf, String> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    // Not `dir` itself yet: on a stale mount even `stat` fails (ENOTCONN),
    // so it is made only once the mount is known gone.
    std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let lock_path = parent.join("lxcfs.lock");
    let lock =
        File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; blocks until the lock is ours
    // and is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    if serves(dir) {
        return Ok(dir.to_path_buf());
    }
    if is_lxcfs_mount(dir) {
        // Its process is gone: reads would fail with ENOTCONN.
        tracing::warn!(path = %dir.display(), "lxcfs mount is stale: mounting it again");
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| format!("unmount the stale {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let cgroup = own_cgroup();
    let log_path = parent.join("lxcfs.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("open {}: {e}", log_path.display()))?;
    // LXCFS daemonizes itself (no `-f`): the child we wait for exits at
    // once and the daemon is nobody's child. `--enable-cfs` makes the CPU
    // views follow the CFS quota (the CPU limit), not only the cpuset.
    let mut command = Command::new(binary);
    let cgroup_fds: Vec<i32> = cgroup.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the hook runs in the forked child before exec and only calls
    // write(2) on descriptors opened above (no allocation, no locks).
    // Writing "0" to a cgroup.procs moves the writer, so LXCFS and the
    // daemon it forks live in a cgroup of their own: stopping the unit or
    // the cgroup sandpitd runs in does not take the views of running
    // sandboxes down with it.
    unsafe {
        command.pre_exec(move || {
            for fd in &cgroup_fds {
                libc::write(*fd, b"0".as_ptr().cast(), 1);
            }
            Ok(())
        });
    }
    let mut child = command
        .arg("--enable-cfs")
        .arg("-p")
        .arg(parent.join("lxcfs.pid"))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("run {}: {e}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if serves(dir) {
            let _ = child.try_wait();
            tracing::info!(path = %dir.display(), "lxcfs started");
            return Ok(dir.to_path_buf());
        }
        if let Ok(Some(status)) = child.try_wait() {
            if !status.success() {
                return Err(format!(
                    "lxcfs exited with {status}; see {}",
                    log_path.display()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut tail = String::new();
    if let Ok(mut f) = File::open(&log_path) {
        let _ = f.read_to_string(&mut tail);
    }
    Err(format!(
        "lxcfs did not come up at {} within 5 s: {}",
        dir.display(),
        tail.lines().last().unwrap_or("")
    ))
}

/// The cgroup LXCFS is started in.
pub const CGROUP: &str = "sandpit-lxcfs";

/// `cgroup.procs` of [`CGROUP`] in every mounted hierarchy (v2, and each
/// v1 one of a hybrid host), created as needed; the ones that cannot be
/// made are left out (LXCFS then stays in the daemon's cgroup there).
fn own_cgroup() -> Vec<File> {
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = Vec::new();
    if root.join("cgroup.controllers").is_file() {
        hierarchies.push(root.to_path_buf());
    } else if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let path = entry.path();
            // Co-mounted controllers (cpu -> cpu,cpuacct) appear as links.
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && path.join("cgroup.procs").is_file() {
                hierarchies.push(path);
            }
        }
    }
    hierarchies
        .into_iter()
        .filter_map(|h| {
            let dir = h.join(CGROUP);
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::debug!(path = %dir.display(), error = %e, "lxcfs cgroup");
                return None;
            }
            // A new v1 cpuset starts empty, and nothing can join it then.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let mine = dir.join(file);
                if std::fs::read_to_string(&mine).is_ok_and(|v| v.trim().is_empty()) {
                    if let Ok(all) = std::fs::read_to_string(h.join(file)) {
                        let _ = std::fs::write(&mine, all.trim());
                    }
                }
            }
            File::options()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .ok()
        })
        .collect()
}

/// Restarts the LXCFS at `path` when it no longer answers (killed, or
/// crashed): sandboxes created from then on get working views again.
/// Those already running read `ENOTCONN` from their binds until they are
/// recreated; a FUSE connection cannot be taken over.
pub fn revive(path: &Path) {
    if serves(path) {
        return;
    }
    let Some(binary) = binary() else { return };
    tracing::warn!(path = %path.display(), "lxcfs stopped answering: starting it again");
    if let Err(e) = start(&binary, path) {
        tracing::warn!(error = %e, "lxcfs: sandboxes see the host's /proc figures");
    }
}
