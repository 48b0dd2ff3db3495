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

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

/// Resource limits of one sandbox; `None` leaves the resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// CPU bandwidth in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: Option<u64>,
    /// Memory in bytes (rounded down to pages by the kernel); no swap beyond it.
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids_max: Option<u64>,
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
    /// A file operation on the cgroup tree failed.
    #[error("{op} {}: {errno}", path.display())]
    Io {
        /// What was done (`read`, `write`, `mkdir`, ...).
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// What the kernel said.
        errno: Errno,
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
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |e| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        errno: errno_of(&e),
    }
}

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Where a unified hierarchy lives on a pure-v2 host.
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// v1 controllers a sandbox's cgroup is created in: the limits (`cpu`,
/// `memory`, `pids`), CPU accounting (`cpuacct`) and teardown (`freezer`).
const V1_USED: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// Every v1 controller name: the other words in a cgroup mount's super
/// options are flags (`rw`, `clone_children`, `name=...`, ...).
const V1_CONTROLLERS: [&str; 15] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
    "debug",
];

/// v2 controllers enabled for sandboxes.
const V2_WANTED: [&str; 3] = ["cpu", "memory", "pids"];

/// CFS period; the quota is expressed against it.
const CFS_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const MIN_QUOTA_US: u64 = 1_000;
/// The kernel's largest quota (`MAX_BW`, about 203 days).
const MAX_QUOTA_US: u64 = (1 << 44) - 1;

/// How long teardown waits for killed processes to leave the cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long teardown waits for a freeze to complete before killing anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `rmdir` may keep failing with `EBUSY` (tasks that have exited
/// but are not yet released by the kernel).
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    /// v1: the controllers mounted there; v2: empty (what is available is
    /// read from `cgroup.controllers`).
    controllers: Vec<String>,
}

/// Creates, finds and lists the cgroups of sandboxes under one parent group.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    version: CgroupVersion,
    hierarchies: Vec<Hierarchy>,
    parent: PathBuf,
}

/// A sandbox's cgroup: one directory (v2) or one per hierarchy (v1).
/// Holding one does not mean the directories exist.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    id: String,
    dirs: Vec<CgroupDir>,
}

#[derive(Debug, Clone)]
struct CgroupDir {
    path: PathBuf,
    controllers: Vec<String>,
}

impl CgroupDir {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
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

/// One line of `/proc/self/mountinfo`, the fields that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(MountEntry {
                mount_point: unescape(fields.get(4)?),
                fstype: fields.get(sep + 1)?.to_string(),
                super_options: fields.get(sep + 3)?.to_string(),
            })
        })
        .collect()
}

/// Keeps only the hierarchies with a controller we use, each once (a
/// hierarchy may be mounted several times).
fn v1_hierarchy(mount: PathBuf, controllers: Vec<String>, into: &mut Vec<Hierarchy>) {
    if !controllers.iter().any(|c| V1_USED.contains(&c.as_str())) {
        return;
    }
    if into.iter().any(|h| h.controllers == controllers) {
        return;
    }
    into.push(Hierarchy { mount, controllers });
}

fn v1_controllers<'a>(words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut controllers: Vec<String> = words
        .filter(|w| V1_CONTROLLERS.contains(w))
        .map(String::from)
        .collect();
    controllers.sort();
    controllers
}

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

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_error("read", path))
}

/// Writes a control file with a single `write(2)`, as the kernel expects.
/// `create` only matters for the plain directories of tests: every real
/// control file written here exists (controllers are checked first).
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_error("open", path))?;
    f.write_all(value.as_bytes())
        .map_err(io_error("write", path))
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    read(path)?
        .trim()
        .parse()
        .map_err(|_| CgroupError::Parse(path.to_path_buf()))
}

/// The value of `key` in a flat-keyed file (`key value` per line).
fn read_key(path: &Path, key: &str) -> Result<u64, CgroupError> {
    read(path)?
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some(key) {
                return None;
            }
            words.next()?.parse().ok()
        })
        .ok_or_else(|| CgroupError::Parse(path.to_path_buf()))
}

fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    read(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| CgroupError::Parse(path.to_path_buf()))
        })
        .collect()
}

/// Pids in `dir` and every cgroup below it; directories that vanish are
/// empty (teardown races with exiting processes).
fn pids_below(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    match read_pids(&dir.join("cgroup.procs")) {
        Ok(p) => out.extend(p),
        Err(CgroupError::Io {
            errno: Errno::ENOENT,
            ..
        }) => return Ok(()),
        Err(e) => return Err(e),
    }
    for child in child_dirs(dir)? {
        pids_below(&child, out)?;
    }
    Ok(())
}

/// Sub-cgroups of `dir` (missing `dir`: none).
fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_error("list", dir)(e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// `mkdir` that tolerates an existing directory; says whether it created one.
fn ensure_dir(path: &Path) -> Result<bool, CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("mkdir", path)(e)),
    }
}

/// A new cpuset cgroup starts with no CPUs and no memory nodes, and refuses
/// tasks until given some: inherit the parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let parent = dir.parent().unwrap_or(dir);
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = read(&parent.join(file))?;
        write(&dir.join(file), value.trim())?;
    }
    Ok(())
}

fn kill_pids(pids: &[i32]) {
    let me = std::process::id() as i32;
    for &pid in pids {
        // pid <= 0 would signal process groups or everything; never from a
        // sane cgroup.procs, but this is the line that must not be crossed.
        if pid > 0 && pid != me {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `done` until it holds or `timeout` passes; says which.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::default();
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        backoff.sleep();
    }
}

/// Sleeps that start short and double up to [`POLL`]: a killed sandbox
/// usually empties within a millisecond, and a fixed 10 ms poll would make
/// every teardown cost at least that.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_micros(200))
    }
}

impl Backoff {
    fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(POLL);
    }
}

/// Removes `dir` and the cgroups below it, deepest first. On cgroupfs,
/// `rmdir` takes the control files with it; `EBUSY` is retried briefly.
fn remove_tree(dir: &Path, rmdir: &dyn Fn(&Path) -> io::Result<()>) -> Result<(), CgroupError> {
    for child in child_dirs(dir)? {
        remove_tree(&child, rmdir)?;
    }
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    let mut backoff = Backoff::default();
    loop {
        match rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                backoff.sleep()
            }
            Err(e) => return Err(io_error("rmdir", dir)(e)),
        }
    }
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
        let mounts = parse_mountinfo(mountinfo);
        let unified = |m: &&MountEntry| m.fstype == "cgroup2";
        if let Some(m) = mounts
            .iter()
            .filter(unified)
            .find(|m| m.mount_point == Path::new(UNIFIED_ROOT))
        {
            return Ok(Self::v2(m.mount_point.clone(), parent));
        }
        let mut v1 = Vec::new();
        for m in mounts.iter().filter(|m| m.fstype == "cgroup") {
            let controllers = v1_controllers(m.super_options.split(','));
            v1_hierarchy(m.mount_point.clone(), controllers, &mut v1);
        }
        if !v1.is_empty() {
            return Ok(Self {
                version: CgroupVersion::V1,
                hierarchies: v1,
                parent,
            });
        }
        match mounts.iter().find(unified) {
            Some(m) => Ok(Self::v2(m.mount_point.clone(), parent)),
            None => Err(CgroupError::NotMounted),
        }
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
        if version == CgroupVersion::V2 {
            return Ok(Self::v2(root.to_path_buf(), parent));
        }
        let mut dirs = child_dirs(root)?;
        dirs.sort();
        let mut hierarchies = Vec::new();
        for dir in dirs {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let controllers = v1_controllers(name.split(','));
            v1_hierarchy(dir.clone(), controllers, &mut hierarchies);
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NotMounted);
        }
        Ok(Self {
            version,
            hierarchies,
            parent,
        })
    }

    fn v2(root: PathBuf, parent: PathBuf) -> Self {
        Self {
            version: CgroupVersion::V2,
            hierarchies: vec![Hierarchy {
                mount: root,
                controllers: vec![],
            }],
            parent,
        }
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The parent group's directory in every hierarchy used.
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.mount.join(&self.parent))
            .collect()
    }

    /// The cgroup of sandbox `id`, without touching the file system. Its
    /// methods refuse an invalid id.
    pub fn open(&self, id: &str) -> Cgroup {
        Cgroup {
            version: self.version,
            id: id.to_string(),
            dirs: self
                .hierarchies
                .iter()
                .map(|h| CgroupDir {
                    path: h.mount.join(&self.parent).join(id),
                    controllers: h.controllers.clone(),
                })
                .collect(),
        }
    }

    /// Creates the cgroup of sandbox `id` (and the parent group if needed)
    /// and writes `limits`. A leftover directory of the same id is removed
    /// first if it is empty (the kernel refuses otherwise: then
    /// [`CgroupError::InUse`]). On failure nothing created here for `id`
    /// remains.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Cgroup, CgroupError> {
        validate_name(id)?;
        let needed = needed_controllers(limits);
        match self.version {
            CgroupVersion::V1 => {
                for c in &needed {
                    if !self
                        .hierarchies
                        .iter()
                        .any(|h| h.controllers.iter().any(|have| have == c))
                    {
                        return Err(CgroupError::MissingController(c));
                    }
                }
                self.prepare_v1_parents()?;
            }
            CgroupVersion::V2 => self.prepare_v2_parents(&needed)?,
        }
        let cgroup = self.open(id);
        let mut created = Vec::new();
        let result = cgroup
            .make_dirs(&mut created)
            .and_then(|()| cgroup.write_limits(limits));
        if let Err(e) = result {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            return Err(e);
        }
        tracing::debug!(sandbox_id = id, version = ?self.version, "cgroup created");
        Ok(cgroup)
    }

    fn prepare_v1_parents(&self) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            let cpuset = h.controllers.iter().any(|c| c == "cpuset");
            let mut dir = h.mount.clone();
            for part in self.parent.iter() {
                dir.push(part);
                if ensure_dir(&dir)? && cpuset {
                    inherit_cpuset(&dir)?;
                }
            }
        }
        Ok(())
    }

    /// Creates the parent group and makes the wanted controllers available
    /// to its children: each level's `cgroup.subtree_control`, from the root
    /// down, must enable them for the next.
    fn prepare_v2_parents(&self, needed: &[&'static str]) -> Result<(), CgroupError> {
        let root = &self.hierarchies[0].mount;
        let mut levels = vec![root.clone()];
        let mut dir = root.clone();
        for part in self.parent.iter() {
            dir.push(part);
            ensure_dir(&dir)?;
            levels.push(dir.clone());
        }
        for level in &levels {
            let available = read(&level.join("cgroup.controllers"))?;
            let control = level.join("cgroup.subtree_control");
            let enabled = read(&control)?;
            let words = |s: &str| -> Vec<String> {
                s.split_whitespace()
                    .map(|w| w.trim_start_matches('+').to_string())
                    .collect()
            };
            let (available, mut enabled) = (words(&available), words(&enabled));
            let missing: Vec<&str> = V2_WANTED
                .iter()
                .copied()
                .filter(|c| available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c))
                .collect();
            if !missing.is_empty() {
                let all = missing
                    .iter()
                    .map(|c| format!("+{c}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if write(&control, &all).is_ok() {
                    enabled.extend(missing.iter().map(|c| c.to_string()));
                } else {
                    // One refusal fails the whole write (e.g. `cpu` while a
                    // realtime task runs): enable one by one, keep what works.
                    for c in missing {
                        match write(&control, &format!("+{c}")) {
                            Ok(()) => enabled.push(c.to_string()),
                            Err(e) => {
                                tracing::warn!(controller = c, error = %e, "cannot enable cgroup controller")
                            }
                        }
                    }
                }
            }
            if let Some(c) = needed.iter().find(|c| !enabled.iter().any(|e| e == *c)) {
                return Err(CgroupError::MissingController(c));
            }
        }
        Ok(())
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

impl Cgroup {
    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup version.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The cgroup's directories: one per hierarchy (v1) or one (v2).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    /// Every `cgroup.procs` the sandbox's PID 1 must be written to (v1: one
    /// per hierarchy; v2: one). Empty for an invalid id.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        if validate_name(&self.id).is_err() {
            return vec![];
        }
        self.dirs
            .iter()
            .map(|d| d.path.join("cgroup.procs"))
            .collect()
    }

    fn checked(&self) -> Result<(), CgroupError> {
        validate_name(&self.id)
    }

    /// The directory holding `controller`'s files.
    fn dir_of(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.checked()?;
        let dir = match self.version {
            CgroupVersion::V2 => self.dirs.first(),
            CgroupVersion::V1 => self.dirs.iter().find(|d| d.has(controller)),
        };
        dir.map(|d| d.path.as_path())
            .ok_or(CgroupError::MissingController(controller))
    }

    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        self.checked()?;
        for dir in &self.dirs {
            if dir.path.exists() {
                // A leftover of a crashed run: rmdir succeeds only when it
                // has no process and no child, and then it is safe to reuse
                // the name. Otherwise the caller must destroy it first.
                match fs::remove_dir(&dir.path) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EBUSY) | Some(libc::ENOTEMPTY)
                        ) =>
                    {
                        return Err(CgroupError::InUse(dir.path.clone()))
                    }
                    Err(e) => return Err(io_error("rmdir", &dir.path)(e)),
                }
            }
            fs::create_dir(&dir.path).map_err(io_error("mkdir", &dir.path))?;
            created.push(dir.path.clone());
            if dir.has("cpuset") {
                inherit_cpuset(&dir.path)?;
            }
        }
        Ok(())
    }

    /// Writes `limits` into the cgroup's control files. Resources left at
    /// `None` are not touched (a new cgroup starts unlimited).
    pub fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.checked()?;
        match self.version {
            CgroupVersion::V2 => {
                if let Some(millis) = limits.cpu_millis {
                    let dir = self.dir_of("cpu")?;
                    let value = format!("{} {CFS_PERIOD_US}", quota_us(millis));
                    write(&dir.join("cpu.max"), &value)?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    let dir = self.dir_of("memory")?;
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    // Without this, memory.max only bounds RAM and the
                    // sandbox could push the rest of its memory to swap.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                if let Some(n) = limits.pids_max {
                    write(&self.dir_of("pids")?.join("pids.max"), &n.to_string())?;
                }
            }
            CgroupVersion::V1 => {
                if let Some(millis) = limits.cpu_millis {
                    let dir = self.dir_of("cpu")?;
                    write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &quota_us(millis).to_string())?;
                }
                if let Some(bytes) = limits.memory_bytes {
                    let dir = self.dir_of("memory")?;
                    let bytes = bytes.to_string();
                    // The plain limit first: memsw may never be below it.
                    write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                    // memory+swap = memory: no swap beyond the limit. The
                    // file exists only with swap accounting enabled.
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &bytes)?;
                    }
                    // Without swap accounting this is the best that can be
                    // done; some kernels refuse it in a child: not fatal.
                    if let Err(e) = write(&dir.join("memory.swappiness"), "0") {
                        tracing::debug!(error = %e, "memory.swappiness not set");
                    }
                }
                if let Some(n) = limits.pids_max {
                    write(&self.dir_of("pids")?.join("pids.max"), &n.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Host pids of the processes in the sandbox's cgroup (and any cgroup
    /// below it). v1 reads the pids hierarchy, else memory, else any.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.checked()?;
        let dir = self
            .dir_of("pids")
            .or_else(|_| self.dir_of("memory"))
            .or_else(|_| {
                self.dirs
                    .first()
                    .map(|d| d.path.as_path())
                    .ok_or(CgroupError::NotMounted)
            })?;
        let mut pids = read_pids(&dir.join("cgroup.procs"))?;
        for child in child_dirs(dir)? {
            pids_below(&child, &mut pids)?;
        }
        Ok(pids)
    }

    /// How many processes the kernel's OOM killer killed in this cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let dir = self.dir_of("memory")?;
        match self.version {
            CgroupVersion::V2 => read_key(&dir.join("memory.events"), "oom_kill"),
            CgroupVersion::V1 => read_key(&dir.join("memory.oom_control"), "oom_kill"),
        }
    }

    /// How many times the pids limit refused a fork (`max` of `pids.events`).
    /// A steadier sign of a contained fork bomb than [`pids`](Cgroup::pids):
    /// its processes are short-lived, and tasks that are forking or not yet
    /// reaped count against the limit without being listed.
    pub fn pids_limit_hits(&self) -> Result<u64, CgroupError> {
        read_key(&self.dir_of("pids")?.join("pids.events"), "max")
    }

    /// CPU time used by the cgroup's processes, in microseconds.
    pub fn cpu_usage_usec(&self) -> Result<u64, CgroupError> {
        match self.version {
            // cpu.stat's usage is kept even without the cpu controller.
            CgroupVersion::V2 => read_key(&self.dir_of("cpu")?.join("cpu.stat"), "usage_usec"),
            CgroupVersion::V1 => {
                Ok(read_u64(&self.dir_of("cpuacct")?.join("cpuacct.usage"))? / 1000)
            }
        }
    }

    /// Memory currently charged to the cgroup, in bytes.
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        let dir = self.dir_of("memory")?;
        match self.version {
            CgroupVersion::V2 => read_u64(&dir.join("memory.current")),
            CgroupVersion::V1 => read_u64(&dir.join("memory.usage_in_bytes")),
        }
    }

    /// Kills every process in the cgroup, waits for them to leave (a few
    /// seconds at most) and removes the cgroup's directories. Missing
    /// directories are fine: destroying twice, or a cgroup never created,
    /// succeeds.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.destroy_with(&|p| fs::remove_dir(p))
    }

    /// [`destroy`](Cgroup::destroy) with the directory removal supplied
    /// (plain directories of a test tree cannot be removed with a bare
    /// `rmdir` while they hold stand-in control files).
    fn destroy_with(&self, rmdir: &dyn Fn(&Path) -> io::Result<()>) -> Result<(), CgroupError> {
        self.checked()?;
        let present: Vec<&CgroupDir> = self.dirs.iter().filter(|d| d.path.is_dir()).collect();
        if present.is_empty() {
            return Ok(());
        }
        self.kill_all(&present)?;
        for dir in present {
            remove_tree(&dir.path, rmdir)?;
        }
        tracing::debug!(sandbox_id = %self.id, "cgroup destroyed");
        Ok(())
    }

    fn kill_all(&self, dirs: &[&CgroupDir]) -> Result<(), CgroupError> {
        let pids_now = || -> Result<Vec<i32>, CgroupError> {
            let mut pids = Vec::new();
            for d in dirs {
                pids_below(&d.path, &mut pids)?;
            }
            pids.sort_unstable();
            pids.dedup();
            Ok(pids)
        };
        // The first pass must catch processes that fork while being
        // killed: cgroup.kill is atomic; otherwise freeze, kill, thaw.
        // Usually the sandbox's PID 1 is already gone and took its PID
        // namespace with it: nothing to freeze. Freezing a cgroup whose tasks
        // are mid-exit can stall for the whole freeze timeout.
        if pids_now()?.is_empty() {
            return Ok(());
        }
        let kill_file = match self.version {
            CgroupVersion::V2 => Some(dirs[0].path.join("cgroup.kill")).filter(|p| p.exists()),
            CgroupVersion::V1 => None,
        };
        match &kill_file {
            Some(file) => write(file, "1")?,
            None => {
                let freezer = self.freezer(dirs);
                if let Some(f) = &freezer {
                    f.freeze();
                }
                let killed = pids_now().map(|p| kill_pids(&p));
                if let Some(f) = &freezer {
                    // Always thaw: frozen tasks cannot act on SIGKILL.
                    f.thaw()?;
                }
                killed?;
            }
        }
        // Processes die asynchronously; anything that slipped through (no
        // freezer on this host) is killed again until none is left.
        let deadline = Instant::now() + KILL_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            let pids = pids_now()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy(dirs[0].path.clone()));
            }
            if let Some(file) = &kill_file {
                write(file, "1")?;
            }
            kill_pids(&pids);
            backoff.sleep();
        }
    }

    fn freezer(&self, dirs: &[&CgroupDir]) -> Option<Freezer> {
        match self.version {
            CgroupVersion::V2 => {
                let dir = &dirs[0].path;
                dir.join("cgroup.freeze")
                    .exists()
                    .then(|| Freezer::V2(dir.clone()))
            }
            CgroupVersion::V1 => dirs
                .iter()
                .find(|d| d.has("freezer"))
                .map(|d| Freezer::V1(d.path.clone())),
        }
    }
}

/// The freezer of one cgroup (v1 `freezer.state` or v2 `cgroup.freeze`).
enum Freezer {
    V1(PathBuf),
    V2(PathBuf),
}

impl Freezer {
    /// Freezes and waits (briefly) until every task is frozen. A failure is
    /// not fatal: killing without a freeze still converges, just with more
    /// rounds.
    fn freeze(&self) {
        let frozen = match self {
            Freezer::V1(dir) => {
                let state = dir.join("freezer.state");
                // A read error means the cgroup is gone (a concurrent
                // teardown won): nothing left to wait for.
                write(&state, "FROZEN").is_ok()
                    && wait_until(FREEZE_TIMEOUT, || {
                        read(&state).map_or(true, |s| s.trim() == "FROZEN")
                    })
            }
            Freezer::V2(dir) => {
                let events = dir.join("cgroup.events");
                write(&dir.join("cgroup.freeze"), "1").is_ok()
                    && wait_until(FREEZE_TIMEOUT, || {
                        read_key(&events, "frozen").map_or(true, |v| v == 1)
                    })
            }
        };
        if !frozen {
            tracing::debug!("cgroup did not freeze; killing anyway");
        }
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        let (dir, result) = match self {
            Freezer::V1(dir) => (dir, write(&dir.join("freezer.state"), "THAWED")),
            Freezer::V2(dir) => (dir, write(&dir.join("cgroup.freeze"), "0")),
        };
        // Removed meanwhile by a concurrent teardown: nothing is frozen.
        match result {
            Err(_) if !dir.exists() => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host: systemd's hybrid layout with each controller on its own.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A pure-v2 host (plus the usual procfs and root lines, and a legacy
    /// name=systemd hierarchy some distributions keep for old containers).
    const PURE_V2: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
24 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
50 22 0:44 / /run/legacy\\040systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
";

    /// Older distributions: cpu and cpuacct co-mounted (with symlinks next
    /// to them, which mountinfo does not list), net_cls,net_prio, and a
    /// second mount of the memory hierarchy.
    const COMOUNTED: &str = "\
25 18 0:21 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
27 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,net_cls,net_prio
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
34 25 0:30 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,freezer
90 22 0:28 / /var/lib/other/memory rw,relatime - cgroup cgroup rw,memory
";

    fn mounts(m: &CgroupManager) -> Vec<(String, Vec<String>)> {
        m.hierarchies
            .iter()
            .map(|h| (h.mount.display().to_string(), h.controllers.clone()))
            .collect()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn detects_v1_hybrid() {
        let m = CgroupManager::from_mountinfo(HYBRID, "sandpit").unwrap();
        assert_eq!(m.version(), CgroupVersion::V1);
        assert_eq!(
            mounts(&m),
            [
                ("/sys/fs/cgroup/cpu".to_string(), strings(&["cpu"])),
                ("/sys/fs/cgroup/cpuacct".to_string(), strings(&["cpuacct"])),
                ("/sys/fs/cgroup/memory".to_string(), strings(&["memory"])),
                ("/sys/fs/cgroup/freezer".to_string(), strings(&["freezer"])),
                ("/sys/fs/cgroup/pids".to_string(), strings(&["pids"])),
            ]
        );
        let cg = m.open("sb-1");
        assert_eq!(
            cg.procs_files(),
            ["cpu", "cpuacct", "memory", "freezer", "pids"]
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/sandpit/sb-1/cgroup.procs")))
        );
        assert_eq!(
            m.parent_dirs()[2],
            PathBuf::from("/sys/fs/cgroup/memory/sandpit")
        );
    }

    #[test]
    fn detects_pure_v2() {
        let m = CgroupManager::from_mountinfo(PURE_V2, "sandpit").unwrap();
        assert_eq!(m.version(), CgroupVersion::V2);
        assert_eq!(
            m.open("x").procs_files(),
            [PathBuf::from("/sys/fs/cgroup/sandpit/x/cgroup.procs")]
        );
        let nested = CgroupManager::from_mountinfo(PURE_V2, "sandpit/pool-a").unwrap();
        assert_eq!(
            nested.open("x").paths(),
            [PathBuf::from("/sys/fs/cgroup/sandpit/pool-a/x")]
        );
    }

    #[test]
    fn detects_co_mounted_controllers_once() {
        let m = CgroupManager::from_mountinfo(COMOUNTED, "sandpit").unwrap();
        assert_eq!(m.version(), CgroupVersion::V1);
        assert_eq!(
            mounts(&m),
            [
                (
                    "/sys/fs/cgroup/cpu,cpuacct".to_string(),
                    strings(&["cpu", "cpuacct"])
                ),
                ("/sys/fs/cgroup/memory".to_string(), strings(&["memory"])),
                ("/sys/fs/cgroup/pids".to_string(), strings(&["pids"])),
                ("/sys/fs/cgroup/freezer".to_string(), strings(&["freezer"])),
            ]
        );
        let cg = m.open("a");
        assert_eq!(
            cg.dir_of("cpu").unwrap(),
            cg.dir_of("cpuacct").unwrap(),
            "one directory serves both"
        );
    }

    #[test]
    fn falls_back_to_a_unified_tree_elsewhere_and_fails_without_any() {
        let text = "40 22 0:38 / /mnt/cg\\0402 rw - cgroup2 cgroup2 rw\n";
        let m = CgroupManager::from_mountinfo(text, "sandpit").unwrap();
        assert_eq!(m.version(), CgroupVersion::V2);
        assert_eq!(m.parent_dirs(), [PathBuf::from("/mnt/cg 2/sandpit")]);
        let none = "22 1 259:1 / / rw - ext4 /dev/root rw\n";
        assert!(matches!(
            CgroupManager::from_mountinfo(none, "sandpit"),
            Err(CgroupError::NotMounted)
        ));
    }

    #[test]
    fn mountinfo_escapes_and_optional_fields() {
        let e = parse_mountinfo(
            "50 22 0:44 / /a\\040b\\134c rw,relatime shared:3 master:1 - cgroup cg rw,memory\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].mount_point, PathBuf::from("/a b\\c"));
        assert_eq!(e[0].fstype, "cgroup");
        assert_eq!(e[0].super_options, "rw,memory");
        assert!(parse_mountinfo("garbage\n\n").is_empty());
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        let m = CgroupManager::from_mountinfo(PURE_V2, "sandpit").unwrap();
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
                    CgroupManager::from_mountinfo(PURE_V2, bad),
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

    // ---------------------------------------------------------- fake trees

    fn put(path: &Path, contents: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    fn get(path: &Path) -> String {
        fs::read_to_string(path).unwrap()
    }

    /// Stand-in for cgroupfs's rmdir, which takes the control files with
    /// it: removes the files, then the directory (which must hold no
    /// directory any more, so the order of removal is checked too).
    fn fake_rmdir(path: &Path) -> io::Result<()> {
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
        fs::remove_dir(path)
    }

    /// A v2 root offering `controllers`, with the parent group present.
    fn v2_tree(controllers: &str) -> (tempfile::TempDir, CgroupManager) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        put(&root.join("cgroup.controllers"), controllers);
        put(&root.join("cgroup.subtree_control"), "");
        put(&root.join("sandpit/cgroup.controllers"), "cpu memory pids");
        put(&root.join("sandpit/cgroup.subtree_control"), "");
        let m = CgroupManager::with_root(CgroupVersion::V2, root, "sandpit").unwrap();
        (t, m)
    }

    fn v1_tree() -> (tempfile::TempDir, CgroupManager) {
        let t = tempfile::tempdir().unwrap();
        for h in ["cpu,cpuacct", "memory", "pids", "freezer", "devices"] {
            fs::create_dir(t.path().join(h)).unwrap();
        }
        let m = CgroupManager::with_root(CgroupVersion::V1, t.path(), "sandpit").unwrap();
        (t, m)
    }

    const LIMITS: Limits = Limits {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
        pids_max: Some(32),
    };

    #[test]
    fn v2_create_enables_controllers_and_writes_limits() {
        let (t, m) = v2_tree("cpuset cpu io memory hugetlb pids rdma misc");
        let cg = m.create("sb1", &LIMITS).unwrap();
        let root = t.path();
        assert_eq!(
            get(&root.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            get(&root.join("sandpit/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        let dir = root.join("sandpit/sb1");
        assert_eq!(cg.paths(), std::slice::from_ref(&dir));
        assert_eq!(cg.procs_files(), [dir.join("cgroup.procs")]);
        assert_eq!(get(&dir.join("cpu.max")), "25000 100000");
        assert_eq!(get(&dir.join("memory.max")), "67108864");
        assert_eq!(get(&dir.join("pids.max")), "32");
        // Absent (no swap on the fake host): not created.
        assert!(!dir.join("memory.swap.max").exists());
        // No subtree_control in the sandbox's own group: processes live there.
        assert!(!dir.join("cgroup.subtree_control").exists());
    }

    #[test]
    fn v2_leaves_enabled_controllers_alone() {
        let (t, m) = v2_tree("cpu memory pids");
        put(&t.path().join("cgroup.subtree_control"), "cpu memory pids");
        put(&t.path().join("sandpit/cgroup.subtree_control"), "memory");
        m.create("sb1", &Limits::default()).unwrap();
        assert_eq!(
            get(&t.path().join("cgroup.subtree_control")),
            "cpu memory pids"
        );
        assert_eq!(
            get(&t.path().join("sandpit/cgroup.subtree_control")),
            "+cpu +pids"
        );
        assert_eq!(
            fs::read_dir(t.path().join("sandpit/sb1")).unwrap().count(),
            0
        );
    }

    #[test]
    fn v2_missing_controller_fails_before_creating_anything() {
        let (t, m) = v2_tree("cpu memory");
        let err = m.create("sb1", &LIMITS).unwrap_err();
        assert!(
            matches!(err, CgroupError::MissingController("pids")),
            "{err}"
        );
        assert!(!t.path().join("sandpit/sb1").exists());
        // Without a pids limit the same host is fine.
        let limits = Limits {
            pids_max: None,
            ..LIMITS
        };
        m.create("sb1", &limits).unwrap();
    }

    #[test]
    fn v2_limits_turn_swap_off_when_the_file_exists() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        put(&dir.join("memory.swap.max"), "max");
        let cg = m.open("sb1");
        cg.write_limits(&Limits {
            memory_bytes: Some(1 << 30),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(get(&dir.join("memory.max")), "1073741824");
        assert_eq!(get(&dir.join("memory.swap.max")), "0");
        assert!(!dir.join("cpu.max").exists());
        assert!(!dir.join("pids.max").exists());
    }

    #[test]
    fn v1_create_makes_a_directory_per_used_hierarchy() {
        let (t, m) = v1_tree();
        let cg = m.create("sb1", &LIMITS).unwrap();
        let root = t.path();
        let expected: Vec<PathBuf> = ["cpu,cpuacct", "freezer", "memory", "pids"]
            .iter()
            .map(|h| root.join(h).join("sandpit/sb1"))
            .collect();
        assert_eq!(cg.paths(), expected);
        assert!(!root.join("devices/sandpit").exists());
        let cpu = root.join("cpu,cpuacct/sandpit/sb1");
        assert_eq!(get(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(get(&cpu.join("cpu.cfs_quota_us")), "25000");
        let mem = root.join("memory/sandpit/sb1");
        assert_eq!(get(&mem.join("memory.limit_in_bytes")), "67108864");
        assert_eq!(get(&mem.join("memory.swappiness")), "0");
        assert!(!mem.join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(get(&root.join("pids/sandpit/sb1/pids.max")), "32");
        assert_eq!(m.list().unwrap(), ["sb1"]);
    }

    #[test]
    fn v1_limits_bound_swap_through_memsw() {
        let (t, m) = v1_tree();
        let mem = t.path().join("memory/sandpit/sb1");
        put(
            &mem.join("memory.memsw.limit_in_bytes"),
            "9223372036854771712",
        );
        m.open("sb1")
            .write_limits(&Limits {
                memory_bytes: Some(4096 * 1000),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(get(&mem.join("memory.limit_in_bytes")), "4096000");
        assert_eq!(get(&mem.join("memory.memsw.limit_in_bytes")), "4096000");
    }

    #[test]
    fn v1_cpuset_hierarchy_gets_cpus_and_mems() {
        let t = tempfile::tempdir().unwrap();
        let h = t.path().join("cpu,cpuacct,cpuset");
        put(&h.join("cpuset.cpus"), "0-3\n");
        put(&h.join("cpuset.mems"), "0\n");
        let m = CgroupManager::with_root(CgroupVersion::V1, t.path(), "sandpit").unwrap();
        m.create("sb1", &Limits::default()).unwrap();
        assert_eq!(get(&h.join("sandpit/cpuset.cpus")), "0-3");
        assert_eq!(get(&h.join("sandpit/sb1/cpuset.mems")), "0");
    }

    #[test]
    fn v1_missing_controller_is_reported() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("memory")).unwrap();
        let m = CgroupManager::with_root(CgroupVersion::V1, t.path(), "sandpit").unwrap();
        let err = m.create("sb1", &LIMITS).unwrap_err();
        assert!(
            matches!(err, CgroupError::MissingController("cpu")),
            "{err}"
        );
        assert!(!t.path().join("memory/sandpit/sb1").exists());
        assert!(m.open("sb1").cpu_usage_usec().is_err());
    }

    #[test]
    fn failed_create_leaves_no_debris() {
        let (t, m) = v1_tree();
        // The pids hierarchy's parent group is a file: mkdir of the sandbox's
        // group fails there, after the others were made.
        put(&t.path().join("pids/sandpit"), "");
        let err = m.create("sb1", &LIMITS).unwrap_err();
        assert!(matches!(err, CgroupError::Io { op: "mkdir", .. }), "{err}");
        for h in ["cpu,cpuacct", "memory", "freezer"] {
            let dir = t.path().join(h).join("sandpit/sb1");
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }

    #[test]
    fn stale_empty_group_is_replaced_and_busy_one_refused() {
        let (t, m) = v2_tree("cpu memory pids");
        let stale = t.path().join("sandpit/sb1");
        fs::create_dir(&stale).unwrap();
        m.create("sb1", &Limits::default()).unwrap();
        assert!(stale.is_dir());
        // A non-empty directory stands for a cgroup the kernel refuses to
        // remove (processes or children in it).
        put(&stale.join("sub/cgroup.procs"), "");
        let err = m.create("sb1", &Limits::default()).unwrap_err();
        assert!(matches!(err, CgroupError::InUse(_)), "{err}");
        assert!(
            stale.join("sub").is_dir(),
            "a group in use must not be touched"
        );
    }

    #[test]
    fn list_is_the_union_over_hierarchies() {
        let (t, m) = v1_tree();
        assert!(m.list().unwrap().is_empty(), "no parent group yet");
        fs::create_dir_all(t.path().join("memory/sandpit/b")).unwrap();
        fs::create_dir_all(t.path().join("pids/sandpit/a")).unwrap();
        fs::create_dir_all(t.path().join("pids/sandpit/b")).unwrap();
        put(&t.path().join("pids/sandpit/pids.max"), "max");
        // Not a hierarchy we use.
        fs::create_dir_all(t.path().join("devices/sandpit/c")).unwrap();
        assert_eq!(m.list().unwrap(), ["a", "b"]);
    }

    #[test]
    fn v2_destroy_of_an_empty_group_removes_deepest_first_and_is_idempotent() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        put(&dir.join("cgroup.procs"), "");
        put(&dir.join("cgroup.kill"), "");
        put(&dir.join("nested/cgroup.procs"), "");
        let cg = m.open("sb1");
        let seen = std::cell::RefCell::new(Vec::new());
        let record = |p: &Path| {
            let kill = fs::read_to_string(dir.join("cgroup.kill")).unwrap_or_default();
            seen.borrow_mut().push((p.to_path_buf(), kill));
            fake_rmdir(p)
        };
        cg.destroy_with(&record).unwrap();
        // Nothing was alive in the group (empty cgroup.procs), so nothing
        // was killed: an empty group goes straight to removal.
        assert_eq!(
            *seen.borrow(),
            [
                (dir.join("nested"), String::new()),
                (dir.clone(), String::new())
            ]
        );
        assert!(!dir.exists());
        assert!(t.path().join("sandpit").is_dir(), "the parent group stays");
        cg.destroy_with(&fake_rmdir).unwrap();
        cg.destroy().unwrap();
        m.open("never-made").destroy().unwrap();
    }

    #[test]
    fn v2_destroy_without_cgroup_kill_kills_and_thaws() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        // A real process of ours stands in for the sandbox's: destroy must
        // SIGKILL it while the group is frozen.
        let mut child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        put(&dir.join("cgroup.procs"), &child.id().to_string());
        put(&dir.join("cgroup.freeze"), "0");
        put(&dir.join("cgroup.events"), "populated 1\nfrozen 1\n");
        // The kernel's part: once the process died, the group is empty.
        let procs = dir.join("cgroup.procs");
        let reaper = std::thread::spawn(move || {
            let status = child.wait().unwrap();
            put(&procs, "");
            status
        });
        let freeze = std::cell::RefCell::new(String::new());
        m.open("sb1")
            .destroy_with(&|p: &Path| {
                *freeze.borrow_mut() = get(&dir.join("cgroup.freeze"));
                fake_rmdir(p)
            })
            .unwrap();
        let status = reaper.join().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Frozen around the kill (too brief to observe from here), and
        // always thawed again before removal.
        assert_eq!(*freeze.borrow(), "0", "thawed before removal");
        assert!(!dir.exists());
    }

    #[test]
    fn v1_destroy_thaws_and_removes_every_hierarchy() {
        let (t, m) = v1_tree();
        let cg = m.create("sb1", &LIMITS).unwrap();
        for d in cg.paths() {
            put(&d.join("cgroup.procs"), "\n");
        }
        let freezer = t.path().join("freezer/sandpit/sb1/freezer.state");
        put(&freezer, "THAWED");
        let states = std::cell::RefCell::new(Vec::new());
        cg.destroy_with(&|p: &Path| {
            states
                .borrow_mut()
                .push(fs::read_to_string(&freezer).unwrap_or_default());
            fake_rmdir(p)
        })
        .unwrap();
        // Thawed before the first removal (and the freezer file itself goes
        // with its directory).
        assert_eq!(states.borrow()[0], "THAWED");
        for d in cg.paths() {
            assert!(!d.exists(), "{} left", d.display());
        }
        assert!(m.list().unwrap().is_empty());
        cg.destroy().unwrap();
    }

    #[test]
    fn v2_statistics() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        put(
            &dir.join("memory.events"),
            "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n",
        );
        put(
            &dir.join("cpu.stat"),
            "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n",
        );
        put(&dir.join("memory.current"), "8192\n");
        put(&dir.join("cgroup.procs"), "10\n11\n");
        put(&dir.join("inner/cgroup.procs"), "12\n");
        let cg = m.open("sb1");
        assert_eq!(cg.oom_kills().unwrap(), 2);
        assert_eq!(cg.cpu_usage_usec().unwrap(), 1_234_567);
        assert_eq!(cg.memory_current().unwrap(), 8192);
        assert_eq!(cg.pids().unwrap(), [10, 11, 12]);
        put(&dir.join("pids.events"), "max 17\nmax.imposed 3\n");
        assert_eq!(cg.pids_limit_hits().unwrap(), 17);
        put(&dir.join("memory.events"), "low 0\n");
        assert!(matches!(cg.oom_kills(), Err(CgroupError::Parse(_))));
        assert!(matches!(
            m.open("gone").memory_current(),
            Err(CgroupError::Io {
                errno: Errno::ENOENT,
                ..
            })
        ));
    }

    #[test]
    fn v1_statistics() {
        let (t, m) = v1_tree();
        let root = t.path();
        put(
            &root.join("memory/sandpit/sb1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        );
        put(
            &root.join("memory/sandpit/sb1/memory.usage_in_bytes"),
            "4096\n",
        );
        put(&root.join("memory/sandpit/sb1/cgroup.procs"), "7\n");
        put(
            &root.join("cpu,cpuacct/sandpit/sb1/cpuacct.usage"),
            "5000999\n",
        );
        put(&root.join("pids/sandpit/sb1/cgroup.procs"), "7\n8\n");
        let cg = m.open("sb1");
        assert_eq!(cg.oom_kills().unwrap(), 4);
        assert_eq!(cg.memory_current().unwrap(), 4096);
        assert_eq!(cg.cpu_usage_usec().unwrap(), 5000);
        put(&root.join("pids/sandpit/sb1/pids.events"), "max 5\n");
        assert_eq!(cg.pids_limit_hits().unwrap(), 5);
        // From the pids hierarchy when there is one.
        assert_eq!(cg.pids().unwrap(), [7, 8]);
        put(&root.join("pids/sandpit/sb1/cgroup.procs"), "7\nx\n");
        assert!(matches!(cg.pids(), Err(CgroupError::Parse(_))));
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
