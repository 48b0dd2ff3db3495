//! Cgroups of sandboxes: CPU, memory and pids limits, statistics, and a
//! teardown that leaves no process and no directory behind.
//!
//! Both cgroup versions are supported, chosen at run time from
//! `/proc/self/mountinfo` ([`CgroupManager::detect`]):
//! - **v2** (unified) when `/sys/fs/cgroup` is a cgroup2 mount, as on most
//!   current hosts: one directory `<root>/<parent>/<id>`; `cpu`, `memory` and
//!   `pids` are enabled in `cgroup.subtree_control` of every level above it.
//! - **v1** otherwise, when controllers are mounted as separate hierarchies
//!   (including systemd's "hybrid" layout, whose cgroup2 tree holds no
//!   controllers): one directory `<mount>/<parent>/<id>` in each hierarchy
//!   that carries `cpu`, `cpuacct`, `memory`, `pids` or `freezer` (with
//!   whatever is co-mounted there, e.g. `cpu,cpuacct`). Mount points come from
//!   mountinfo, never from a fixed list.
//! - A cgroup2 mount elsewhere is used only when no v1 controller is mounted.
//!   Mixed setups (some controllers in each) are treated as v1.
//!
//! The parent group (`sandpit` by default) is created on demand and never
//! removed: it is shared by every sandbox and costs nothing when empty.
//!
//! # Layout
//!
//! Each version's logic lives in one file, `v1.rs` and `v2.rs`, behind two
//! private traits: `TreeOps` (a mounted set of hierarchies: parent groups,
//! controllers, where a sandbox's group goes) and `GroupOps` (one
//! sandbox's group: directories, limits, statistics, how to kill and
//! freeze it). What does not depend on the version (name checks, the order
//! of creation and teardown, listing) is written once here over those
//! traits; `detect.rs` picks the version from mountinfo and `fs.rs` has the
//! file helpers both versions share.
//!
//! The two implementations are held in enums (`Tree`, `Group`) rather than
//! boxed trait objects: the set is closed (two kernel interfaces),
//! [`CgroupManager`] and [`Cgroup`] stay plain `Clone + Debug` values
//! without an allocation per sandbox, and the one `match` in each enum's
//! `ops()` is the only place that looks at the version. The traits make the
//! compiler check that every operation exists for both versions, and no
//! caller ever branches on the version.

mod detect;
mod fs;
mod stats;
mod v1;
mod v2;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use stats::CgroupStats;

use fs::{child_dirs, kill_pids, pids_below, read, read_key, read_pids, remove_tree, write};

/// Resource limits of one sandbox; `None` leaves the resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU bandwidth in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: Option<u64>,
    /// Memory in bytes (rounded down to pages by the kernel); no swap beyond it.
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: Option<u64>,
    /// The CPU the sandbox asks for, in thousandths: its share of the CPU
    /// when the host is contended (`cpu.shares` / `cpu.weight`, as
    /// Kubernetes converts a request), never a cap.
    pub cpu_request_millis: Option<u64>,
    /// The memory the sandbox asks for: reclaimed last under host memory
    /// pressure (`memory.soft_limit_in_bytes` / `memory.low`), never a cap.
    pub memory_request_bytes: Option<u64>,
    /// The CPUs the sandbox may run on (`cpuset.cpus`), where the host has
    /// a cpuset controller; `None`: all of the parent's.
    pub cpus: Option<CpuMask>,
}

/// A set of CPU numbers below 1024, as `cpuset.cpus` takes them.
#[derive(Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuMask([u64; 16]);

impl CpuMask {
    /// The set of `cpus` (numbers of 1024 and above are left out).
    pub fn of(cpus: &[usize]) -> Self {
        let mut m = [0u64; 16];
        for &c in cpus.iter().filter(|&&c| c < 1024) {
            m[c / 64] |= 1 << (c % 64);
        }
        Self(m)
    }

    /// The CPUs, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        (0..1024)
            .filter(|&c| self.0[c / 64] & (1 << (c % 64)) != 0)
            .collect()
    }

    /// The kernel's list format: `0-2,5`.
    pub fn to_list(&self) -> String {
        let cpus = self.cpus();
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            out.push(if i == j {
                cpus[i].to_string()
            } else {
                format!("{}-{}", cpus[i], cpus[j])
            });
            i = j + 1;
        }
        out.join(",")
    }
}

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuMask({})", self.to_list())
    }
}

#[cfg(test)]
mod cpumask_tests {
    use super::CpuMask;

    #[test]
    fn lists_are_written_as_the_kernel_reads_them() {
        assert_eq!(CpuMask::of(&[0]).to_list(), "0");
        assert_eq!(CpuMask::of(&[3, 0, 1, 2, 7, 9, 10]).to_list(), "0-3,7,9-10");
        assert_eq!(CpuMask::of(&[1023, 2000]).cpus(), vec![1023]);
        assert_eq!(CpuMask::default().to_list(), "");
    }
}

/// `cpu.shares` (cgroup v1) for a CPU request, as Kubernetes computes it:
/// 1024 per CPU, at least 2 (the kernel's minimum).
pub(crate) fn cpu_shares(request_millis: u64) -> u64 {
    (request_millis.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

/// `cpu.weight` (cgroup v2) for a CPU request: Kubernetes' mapping of the
/// shares range [2, 262144] onto the weights [1, 10000].
pub(crate) fn cpu_weight(request_millis: u64) -> u64 {
    let shares = cpu_shares(request_millis);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// One hierarchy per controller (or group of co-mounted controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A sandbox id or parent group name that could escape its directory.
    #[error("invalid cgroup name {0:?}")]
    InvalidName(String),
    /// Neither v1 controllers nor a cgroup2 tree are mounted.
    #[error("no cgroup file system is mounted")]
    NotMounted,
    /// A limit needs a controller the host does not offer.
    #[error("cgroup controller {0} is not available")]
    MissingController(&'static str),
    /// A file operation on the cgroup tree failed. The errno is part of the
    /// message rather than a source: it is a plain number, not an error
    /// with a chain of its own.
    #[error("{op} {}: {errno}", path.display())]
    Io {
        /// What was done (`read`, `write`, `mkdir`, ...).
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// What the kernel said.
        errno: nix::errno::Errno,
    },
    /// A control file holds something unexpected.
    #[error("unexpected contents in {}", .0.display())]
    Parse(PathBuf),
    /// Processes survived the kill for longer than the teardown waits.
    #[error("processes in {} survived SIGKILL", .0.display())]
    Busy(PathBuf),
    /// A leftover cgroup with that id still holds processes or children.
    #[error("cgroup {} already exists and is in use", .0.display())]
    InUse(PathBuf),
    /// Some task of the group did not freeze in time (the group is thawed
    /// again).
    #[error("cgroup {} did not freeze", .0.display())]
    NotFrozen(PathBuf),
}

/// CFS period; the quota is expressed against it.
const CFS_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const MIN_QUOTA_US: u64 = 1_000;
/// The kernel's largest quota (`MAX_BW`, about 203 days).
const MAX_QUOTA_US: u64 = (1 << 44) - 1;

/// How long teardown waits for killed processes to leave the cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// `(cpu quota in µs)` for `millis` thousandths of a CPU, within what the
/// kernel accepts.
fn quota_us(millis: u64) -> u64 {
    millis
        .saturating_mul(CFS_PERIOD_US / 1000)
        .clamp(MIN_QUOTA_US, MAX_QUOTA_US)
}

/// Controllers the given limits cannot do without.
fn needed_controllers(limits: &Limits) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if limits.cpu_millis.is_some() {
        needed.push("cpu");
    }
    if limits.memory_bytes.is_some() {
        needed.push("memory");
    }
    if limits.pids_max.is_some() {
        needed.push("pids");
    }
    needed
}

/// Accepts one path component that stays where it is put: no `/`, not `.`
/// or `..`, no NUL. The runtime checks ids more strictly; this is the last
/// line before a path reaches the cgroup tree.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.bytes().any(|b| b == b'/' || b == 0)
    {
        return Err(CgroupError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// The parent group: one or more valid names joined by `/`.
fn validate_parent(parent: &str) -> Result<PathBuf, CgroupError> {
    let mut path = PathBuf::new();
    for part in parent.split('/') {
        validate_name(part).map_err(|_| CgroupError::InvalidName(parent.to_string()))?;
        path.push(part);
    }
    Ok(path)
}

// ------------------------------------------------------ the version interface

/// The mounted hierarchies of one cgroup version.
trait TreeOps {
    fn version(&self) -> CgroupVersion;
    /// Where each hierarchy used is mounted.
    fn mounts(&self) -> Vec<&Path>;
    /// The group of sandbox `id` under `parent`, without touching the tree.
    fn open(&self, parent: &Path, id: &str) -> Group;
    /// Makes sure the parent group exists in every hierarchy and offers the
    /// `needed` controllers to its children; fails before creating anything
    /// when one is missing.
    fn prepare(&self, parent: &Path, needed: &[&'static str]) -> Result<(), CgroupError>;
}

/// One sandbox's group, in one version's terms. Callers have checked the
/// id (see [`Cgroup::checked`]).
trait GroupOps {
    fn version(&self) -> CgroupVersion;
    /// The group's directories, one per hierarchy.
    fn dirs(&self) -> Vec<&Path>;
    /// The directory holding `controller`'s files.
    fn dir_of(&self, controller: &'static str) -> Result<&Path, CgroupError>;
    /// Creates the directories, recording each one made in `created`.
    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError>;
    /// See [`Cgroup::write_limits`].
    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// See [`Cgroup::oom_kills`].
    fn oom_kills(&self) -> Result<u64, CgroupError>;
    /// See [`Cgroup::cpu_usage_usec`].
    fn cpu_usage_usec(&self) -> Result<u64, CgroupError>;
    /// See [`Cgroup::memory_current`].
    fn memory_current(&self) -> Result<u64, CgroupError>;
    /// The memory limit; `None`: unlimited.
    fn memory_limit(&self) -> Result<Option<u64>, CgroupError>;
    /// The most memory charged so far, where the kernel keeps it.
    fn memory_peak(&self) -> Option<u64>;
    /// A file whose write kills every process of the group at once, forks
    /// included (v2's `cgroup.kill`), where the kernel has one.
    fn kill_file(&self) -> Option<PathBuf>;
    /// The group's freezer, where there is one.
    fn freezer(&self) -> Option<Box<dyn Freeze>>;
}

/// Freezes a group so that nothing in it forks while it is being killed.
trait Freeze {
    /// Asks for a freeze and waits (briefly) until every task is frozen;
    /// says whether they were.
    fn freeze(&self) -> bool;
    /// Thaws the group: frozen tasks cannot act on SIGKILL.
    fn thaw(&self) -> Result<(), CgroupError>;
    /// The group directory the freezer controls.
    fn dir(&self) -> &Path;
}

#[derive(Debug, Clone)]
enum Tree {
    V1(v1::Tree),
    V2(v2::Tree),
}

impl Tree {
    fn ops(&self) -> &dyn TreeOps {
        match self {
            Tree::V1(t) => t,
            Tree::V2(t) => t,
        }
    }
}

#[derive(Debug, Clone)]
enum Group {
    V1(v1::Group),
    V2(v2::Group),
}

impl Group {
    fn ops(&self) -> &dyn GroupOps {
        match self {
            Group::V1(g) => g,
            Group::V2(g) => g,
        }
    }
}

// ------------------------------------------------------------------ manager

/// Creates, finds and lists the cgroups of sandboxes under one parent group.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    tree: Tree,
    parent: PathBuf,
}

/// A sandbox's cgroup: one directory (v2) or one per hierarchy (v1).
/// Holding one does not mean the directories exist.
#[derive(Debug, Clone)]
pub struct Cgroup {
    id: String,
    group: Group,
}

impl CgroupManager {
    /// Finds the host's cgroup hierarchies from `/proc/self/mountinfo`.
    /// `parent` names the group (`sandpit`, or nested `a/b`) holding every
    /// sandbox's cgroup. Reads only: nothing is created until [`create`].
    ///
    /// [`create`]: CgroupManager::create
    pub fn detect(parent: &str) -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        Self::from_mountinfo(&read(path)?, parent)
    }

    /// [`detect`](CgroupManager::detect) on given mountinfo text.
    pub fn from_mountinfo(mountinfo: &str, parent: &str) -> Result<Self, CgroupError> {
        let parent = validate_parent(parent)?;
        let tree = detect::tree(mountinfo)?;
        Ok(Self { tree, parent })
    }

    /// A manager over a tree at `root` instead of the host's mounts (for
    /// tests on plain directories). v2: `root` is the unified hierarchy. v1:
    /// every directory in `root` is a hierarchy, named after its
    /// controllers as they would be mounted (`memory`, `cpu,cpuacct`).
    pub fn with_root(
        version: CgroupVersion,
        root: &Path,
        parent: &str,
    ) -> Result<Self, CgroupError> {
        let parent = validate_parent(parent)?;
        let tree = match version {
            CgroupVersion::V1 => Tree::V1(v1::Tree::from_dirs(root)?),
            CgroupVersion::V2 => Tree::V2(v2::Tree::new(root.to_path_buf())),
        };
        Ok(Self { tree, parent })
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.tree.ops().version()
    }

    /// The parent group's directory in every hierarchy used.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.tree
            .ops()
            .mounts()
            .into_iter()
            .map(|m| m.join(&self.parent))
            .collect()
    }

    /// The cgroup of sandbox `id`, without touching the file system. Its
    /// methods refuse an invalid id.
    pub fn open(&self, id: &str) -> Cgroup {
        Cgroup {
            id: id.to_string(),
            group: self.tree.ops().open(&self.parent, id),
        }
    }

    /// Creates the cgroup of sandbox `id` (and the parent group if needed)
    /// and writes `limits`. A leftover directory of the same id is removed
    /// first if it is empty (the kernel refuses otherwise: then
    /// [`CgroupError::InUse`]). On failure nothing created here for `id`
    /// remains.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        validate_name(id)?;
        self.tree
            .ops()
            .prepare(&self.parent, &needed_controllers(limits))?;
        let cgroup = self.open(id);
        let mut created = Vec::new();
        let result = cgroup
            .group
            .ops()
            .make_dirs(&mut created)
            .and_then(|()| cgroup.write_limits(limits));
        if let Err(e) = result {
            for dir in created.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
            return Err(e);
        }
        tracing::debug!(sandbox_id = id, version = ?self.version(), "cgroup created");
        Ok(cgroup)
    }

    /// Ids of the cgroups under the parent group, in any hierarchy (sorted).
    pub fn list(&self) -> Result<Vec<String>, CgroupError> {
        let mut ids = Vec::new();
        for parent in self.parent_dirs() {
            for dir in child_dirs(&parent)? {
                if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

// ------------------------------------------------------------------- cgroup

impl Cgroup {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.group.ops().version()
    }

    /// The cgroup's directories: one per hierarchy (v1) or one (v2).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.group
            .ops()
            .dirs()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    }

    /// Every `cgroup.procs` the sandbox's PID 1 must be written to (v1: one
    /// per hierarchy; v2: one). Empty for an invalid id.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        if self.checked().is_err() {
            return vec![];
        }
        self.group
            .ops()
            .dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn checked(&self) -> Result<&dyn GroupOps, CgroupError> {
        validate_name(&self.id)?;
        Ok(self.group.ops())
    }

    /// The directory holding `controller`'s files.
    #[cfg(test)]
    fn dir_of(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.checked()?.dir_of(controller)
    }

    /// Writes `limits` into the cgroup's control files. Resources left at
    /// `None` are not touched (a new cgroup starts unlimited).
    pub fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.checked()?.write_limits(limits)
    }

    /// Host pids of the processes in the sandbox's cgroup (and any cgroup
    /// below it). v1 reads the pids hierarchy, else memory, else any.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let group = self.checked()?;
        let dir = group
            .dir_of("pids")
            .or_else(|_| group.dir_of("memory"))
            .or_else(|_| group.dirs().first().copied().ok_or(CgroupError::NotMounted))?;
        let mut pids = read_pids(&dir.join("cgroup.procs"))?;
        for child in child_dirs(dir)? {
            pids_below(&child, &mut pids)?;
        }
        Ok(pids)
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        self.checked()?.oom_kills()
    }

    /// How many times the pids limit refused a fork (`max` of `pids.events`).
    /// A steadier sign of a contained fork bomb than [`pids`](Cgroup::pids):
    /// its processes are short-lived, and tasks that are forking or not yet
    /// reaped count against the limit without being listed.
    pub fn pids_limit_hits(&self) -> Result<u64, CgroupError> {
        read_key(&self.checked()?.dir_of("pids")?.join("pids.events"), "max")
    }

    /// CPU time used by the cgroup's processes, in microseconds.
    pub fn cpu_usage_usec(&self) -> Result<u64, CgroupError> {
        self.checked()?.cpu_usage_usec()
    }

    /// Memory currently charged to the cgroup, in bytes.
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        self.checked()?.memory_current()
    }

    /// Freezes every process of the cgroup and waits (a second at most)
    /// until the kernel reports the group frozen: nothing in it runs, forks
    /// or writes until [`thaw`](Cgroup::thaw). A group that does not freeze
    /// in time is thawed again and reported as [`CgroupError::NotFrozen`];
    /// a host without a freezer as [`CgroupError::MissingController`].
    pub fn freeze(&self) -> Result<(), CgroupError> {
        let freezer = self
            .checked()?
            .freezer()
            .ok_or(CgroupError::MissingController("freezer"))?;
        if freezer.freeze() {
            return Ok(());
        }
        let _ = freezer.thaw();
        Err(CgroupError::NotFrozen(freezer.dir().to_path_buf()))
    }

    /// Thaws a group [`freeze`](Cgroup::freeze) froze (thawing a running
    /// group changes nothing).
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.checked()?
            .freezer()
            .ok_or(CgroupError::MissingController("freezer"))?
            .thaw()
    }

    /// Kills every process in the cgroup, waits for them to leave (a few
    /// seconds at most) and removes the cgroup's directories. Missing
    /// directories are fine: destroying twice, or a cgroup never created,
    /// succeeds.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.destroy_with(&|p| std::fs::remove_dir(p))
    }

    /// [`destroy`](Cgroup::destroy) with the directory removal supplied
    /// (plain directories of a test tree cannot be removed with a bare
    /// `rmdir` while they hold stand-in control files).
    fn destroy_with(&self, rmdir: &dyn Fn(&Path) -> io::Result<()>) -> Result<(), CgroupError> {
        let group = self.checked()?;
        let present: Vec<&Path> = group.dirs().into_iter().filter(|d| d.is_dir()).collect();
        if present.is_empty() {
            return Ok(());
        }
        kill_all(group, &present)?;
        for dir in present {
            remove_tree(dir, rmdir)?;
        }
        tracing::debug!(sandbox_id = %self.id, "cgroup destroyed");
        Ok(())
    }
}

/// Kills every process in `dirs` (the group's directories that exist) and
/// waits until none is left.
fn kill_all(group: &dyn GroupOps, dirs: &[&Path]) -> Result<(), CgroupError> {
    let pids_now = || -> Result<Vec<i32>, CgroupError> {
        let mut pids = Vec::new();
        for d in dirs {
            pids_below(d, &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    };
    // The first pass must catch processes that fork while being killed:
    // cgroup.kill is atomic; otherwise freeze, kill, thaw. Usually the
    // sandbox's PID 1 is already gone and took its PID namespace with it:
    // nothing to freeze. Freezing a cgroup whose tasks are mid-exit can
    // stall for the whole freeze timeout.
    if pids_now()?.is_empty() {
        return Ok(());
    }
    let kill_file = group.kill_file();
    match &kill_file {
        Some(file) => write(file, "1")?,
        None => {
            let freezer = group.freezer();
            if let Some(f) = &freezer {
                if !f.freeze() {
                    tracing::debug!("cgroup did not freeze; killing anyway");
                }
            }
            let killed = pids_now().map(|p| kill_pids(&p));
            if let Some(f) = &freezer {
                // Always thaw: frozen tasks cannot act on SIGKILL.
                match f.thaw() {
                    // Removed meanwhile by a concurrent teardown: nothing
                    // is frozen.
                    Err(_) if !f.dir().exists() => {}
                    other => other?,
                }
            }
            killed?;
        }
    }
    // Processes die asynchronously; anything that slipped through (no
    // freezer on this host) is killed again until none is left.
    let deadline = Instant::now() + KILL_TIMEOUT;
    let mut backoff = fs::Backoff::default();
    loop {
        let pids = pids_now()?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Busy(dirs[0].to_path_buf()));
        }
        if let Some(file) = &kill_file {
            write(file, "1")?;
        }
        kill_pids(&pids);
        backoff.sleep();
    }
}

#[cfg(test)]
mod fake;

#[cfg(test)]
mod tests {
    #[test]
    fn requests_convert_as_kubernetes_does() {
        use super::{cpu_shares, cpu_weight};
        assert_eq!(cpu_shares(1), 2);
        assert_eq!(cpu_shares(250), 256);
        assert_eq!(cpu_shares(1000), 1024);
        assert_eq!(cpu_shares(1_000_000), 262_144);
        assert_eq!(cpu_weight(1), 1);
        assert_eq!(cpu_weight(1000), 39);
        assert_eq!(cpu_weight(1_000_000), 10_000);
    }

    use super::*;
    use nix::errno::Errno;

    #[test]
    fn names_that_could_escape_are_refused() {
        let m = CgroupManager::from_mountinfo(detect::tests::PURE_V2, "sandpit").unwrap();
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(
                matches!(
                    m.create(bad, &Limits::default()),
                    Err(CgroupError::InvalidName(_))
                ),
                "{bad:?}"
            );
            assert!(matches!(
                m.open(bad).destroy(),
                Err(CgroupError::InvalidName(_))
            ));
            assert!(m.open(bad).pids().is_err());
            assert!(m.open(bad).procs_files().is_empty());
        }
        for bad in ["", "..", "/abs", "a//b", "a/../b", "a/"] {
            assert!(
                matches!(
                    CgroupManager::from_mountinfo(detect::tests::PURE_V2, bad),
                    Err(CgroupError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cpu_quota_is_kept_within_kernel_bounds() {
        assert_eq!(quota_us(1000), 100_000);
        assert_eq!(quota_us(250), 25_000);
        assert_eq!(quota_us(2500), 250_000);
        assert_eq!(quota_us(0), MIN_QUOTA_US);
        assert_eq!(quota_us(5), MIN_QUOTA_US);
        assert_eq!(quota_us(u64::MAX), MAX_QUOTA_US);
    }

    #[test]
    fn error_messages_are_short_and_carry_the_errno() {
        let e = CgroupError::Io {
            op: "write",
            path: "/sys/fs/cgroup/x/memory.max".into(),
            errno: Errno::EBUSY,
        };
        assert_eq!(
            e.to_string(),
            "write /sys/fs/cgroup/x/memory.max: EBUSY: Device or resource busy"
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
