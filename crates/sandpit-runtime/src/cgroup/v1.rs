//! cgroup v1: controllers mounted as separate hierarchies (including
//! systemd's "hybrid" layout). A sandbox gets one directory
//! `<mount>/<parent>/<id>` in each hierarchy that carries a controller it
//! uses, with whatever is co-mounted there (e.g. `cpu,cpuacct`). Teardown
//! freezes with the `freezer` hierarchy.

use std::path::{Path, PathBuf};

use super::detect::MountEntry;
use super::fs::{
    child_dirs, ensure_dir, make_group_dir, read, read_key, read_u64, wait_until, write,
};
use super::{
    quota_us, CgroupError, CgroupVersion, Freeze, Group as AnyGroup, GroupOps, Limits, TreeOps,
    CFS_PERIOD_US,
};

/// v1 memory limits at or above this are "unlimited" (the kernel shows
/// `PAGE_COUNTER_MAX` pages: 0x7FFFFFFFFFFFF000 with 4 KiB pages).
const V1_UNLIMITED: u64 = 1 << 62;

/// Controllers a sandbox's cgroup is created in: the limits (`cpu`,
/// `memory`, `pids`, `cpuset` where mounted), CPU accounting (`cpuacct`)
/// and teardown (`freezer`).
const USED: [&str; 6] = ["cpu", "cpuacct", "cpuset", "memory", "pids", "freezer"];

/// Every v1 controller name: the other words in a cgroup mount's super
/// options are flags (`rw`, `clone_children`, `name=...`, ...).
const CONTROLLERS: [&str; 15] = [
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

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    /// The controllers mounted there.
    controllers: Vec<String>,
}

/// The hierarchies that carry a controller in [`USED`].
#[derive(Debug, Clone)]
pub(super) struct Tree {
    hierarchies: Vec<Hierarchy>,
}

impl Tree {
    /// The v1 hierarchies among `mounts`; `None` when no controller we use
    /// is mounted.
    pub(super) fn from_mounts(mounts: &[MountEntry]) -> Option<Self> {
        let mut hierarchies = Vec::new();
        for m in mounts.iter().filter(|m| m.fstype == "cgroup") {
            let controllers = controllers_in(m.super_options.split(','));
            add_hierarchy(m.mount_point.clone(), controllers, &mut hierarchies);
        }
        (!hierarchies.is_empty()).then_some(Self { hierarchies })
    }

    /// Every directory in `root` is a hierarchy, named after its
    /// controllers as they would be mounted (`memory`, `cpu,cpuacct`).
    pub(super) fn from_dirs(root: &Path) -> Result<Self, CgroupError> {
        let mut dirs = child_dirs(root)?;
        dirs.sort();
        let mut hierarchies = Vec::new();
        for dir in dirs {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            let controllers = controllers_in(name.split(','));
            add_hierarchy(dir.clone(), controllers, &mut hierarchies);
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NotMounted);
        }
        Ok(Self { hierarchies })
    }

    /// `(mount point, controllers)` of each hierarchy used, for tests.
    #[cfg(test)]
    pub(super) fn mounts_and_controllers(&self) -> Vec<(String, Vec<String>)> {
        self.hierarchies
            .iter()
            .map(|h| (h.mount.display().to_string(), h.controllers.clone()))
            .collect()
    }
}

/// Keeps only the hierarchies with a controller we use, each once (a
/// hierarchy may be mounted several times).
fn add_hierarchy(mount: PathBuf, controllers: Vec<String>, into: &mut Vec<Hierarchy>) {
    if !controllers.iter().any(|c| USED.contains(&c.as_str())) {
        return;
    }
    if into.iter().any(|h| h.controllers == controllers) {
        return;
    }
    into.push(Hierarchy { mount, controllers });
}

fn controllers_in<'a>(words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut controllers: Vec<String> = words
        .filter(|w| CONTROLLERS.contains(w))
        .map(String::from)
        .collect();
    controllers.sort();
    controllers
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

/// Whether a cpuset cgroup has no CPUs yet (just made, not yet inherited).
fn cpuset_empty(dir: &Path) -> bool {
    read(&dir.join("cpuset.cpus")).is_ok_and(|v| v.trim().is_empty())
}

impl TreeOps for Tree {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn mounts(&self) -> Vec<&Path> {
        self.hierarchies.iter().map(|h| h.mount.as_path()).collect()
    }

    fn open(&self, parent: &Path, id: &str) -> AnyGroup {
        AnyGroup::V1(Group {
            dirs: self
                .hierarchies
                .iter()
                .map(|h| GroupDir {
                    path: h.mount.join(parent).join(id),
                    controllers: h.controllers.clone(),
                })
                .collect(),
        })
    }

    fn prepare(&self, parent: &Path, needed: &[&'static str]) -> Result<(), CgroupError> {
        for c in needed {
            if !self
                .hierarchies
                .iter()
                .any(|h| h.controllers.iter().any(|have| have == c))
            {
                return Err(CgroupError::MissingController(c));
            }
        }
        for h in &self.hierarchies {
            let cpuset = h.controllers.iter().any(|c| c == "cpuset");
            let mut dir = h.mount.clone();
            for part in parent.iter() {
                dir.push(part);
                let created = ensure_dir(&dir)?;
                // Not only when this call made it: a concurrent create that
                // finds the directory just made by another must not go on
                // before it has CPUs (a child's write is refused, EACCES).
                if cpuset && (created || cpuset_empty(&dir)) {
                    inherit_cpuset(&dir)?;
                }
            }
        }
        Ok(())
    }
}

/// A sandbox's group: one directory per hierarchy.
#[derive(Debug, Clone)]
pub(super) struct Group {
    dirs: Vec<GroupDir>,
}

#[derive(Debug, Clone)]
struct GroupDir {
    path: PathBuf,
    controllers: Vec<String>,
}

impl GroupDir {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

impl GroupOps for Group {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    fn dir_of(&self, controller: &'static str) -> Result<&Path, CgroupError> {
        self.dirs
            .iter()
            .find(|d| d.has(controller))
            .map(|d| d.path.as_path())
            .ok_or(CgroupError::MissingController(controller))
    }

    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            make_group_dir(&dir.path)?;
            created.push(dir.path.clone());
            if dir.has("cpuset") {
                inherit_cpuset(&dir.path)?;
            }
        }
        Ok(())
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let Some(cpus) = limits.cpus {
            // Optional: a host without a cpuset hierarchy still confines
            // the sandbox by affinity (see the spawner).
            if let Some(dir) = self.dirs.iter().find(|d| d.has("cpuset")) {
                write(&dir.path.join("cpuset.cpus"), &cpus.to_list())?;
            }
        }
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
            // memory+swap = memory: no swap beyond the limit. The file
            // exists only with swap accounting enabled.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes)?;
            }
            // Without swap accounting this is the best that can be done;
            // some kernels refuse it in a child: not fatal.
            if let Err(e) = write(&dir.join("memory.swappiness"), "0") {
                tracing::debug!(error = %e, "memory.swappiness not set");
            }
        }
        if let Some(n) = limits.pids_max {
            write(&self.dir_of("pids")?.join("pids.max"), &n.to_string())?;
        }
        if let Some(millis) = limits.cpu_request_millis {
            let shares = super::cpu_shares(millis).to_string();
            write(&self.dir_of("cpu")?.join("cpu.shares"), &shares)?;
        }
        if let Some(bytes) = limits.memory_request_bytes {
            let dir = self.dir_of("memory")?;
            write(&dir.join("memory.soft_limit_in_bytes"), &bytes.to_string())?;
        }
        Ok(())
    }

    fn oom_kills(&self) -> Result<u64, CgroupError> {
        read_key(
            &self.dir_of("memory")?.join("memory.oom_control"),
            "oom_kill",
        )
    }

    fn cpu_usage_usec(&self) -> Result<u64, CgroupError> {
        Ok(read_u64(&self.dir_of("cpuacct")?.join("cpuacct.usage"))? / 1000)
    }

    fn memory_current(&self) -> Result<u64, CgroupError> {
        read_u64(&self.dir_of("memory")?.join("memory.usage_in_bytes"))
    }

    fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let limit = read_u64(&self.dir_of("memory")?.join("memory.limit_in_bytes"))?;
        // Unlimited reads as the largest page-aligned i64 (platform-dependent).
        Ok(Some(limit).filter(|l| *l < V1_UNLIMITED))
    }

    fn memory_peak(&self) -> Option<u64> {
        read_u64(
            &self
                .dir_of("memory")
                .ok()?
                .join("memory.max_usage_in_bytes"),
        )
        .ok()
    }

    /// v1 has no `cgroup.kill`: teardown freezes, kills and thaws.
    fn kill_file(&self) -> Option<PathBuf> {
        None
    }

    fn freezer(&self) -> Option<Box<dyn Freeze>> {
        self.dirs
            .iter()
            .find(|d| d.has("freezer") && d.path.is_dir())
            .map(|d| Box::new(Freezer(d.path.clone())) as Box<dyn Freeze>)
    }
}

/// The freezer hierarchy's `freezer.state`.
struct Freezer(PathBuf);

/// Polls of a stuck `FREEZING` between two thaw-and-refreeze rounds (runc
/// uses 25 of its 10 µs polls; these back off to 10 ms).
const REFREEZE_EVERY: u32 = 8;

impl Freeze for Freezer {
    /// The v1 freezer can stay `FREEZING` for good when tasks fork or sit
    /// in I/O while it sweeps them (seen under CI load during a snapshot):
    /// like runc, `FROZEN` is written again on every poll, and every
    /// [`REFREEZE_EVERY`] polls the group is thawed and frozen afresh.
    fn freeze(&self) -> bool {
        let state = self.0.join("freezer.state");
        if write(&state, "FROZEN").is_err() {
            return false;
        }
        let mut polls = 0u32;
        wait_until(super::fs::FREEZE_TIMEOUT, || {
            // A read error means the cgroup is gone (a concurrent teardown
            // won): nothing left to wait for.
            if read(&state).map_or(true, |s| s.trim() == "FROZEN") {
                return true;
            }
            polls += 1;
            if polls.is_multiple_of(REFREEZE_EVERY) {
                let _ = write(&state, "THAWED");
            }
            let _ = write(&state, "FROZEN");
            false
        })
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        write(&self.0.join("freezer.state"), "THAWED")
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::super::fake::{fake_rmdir, get, put, v1_tree, LIMITS};
    use super::super::{CgroupError, CgroupManager, CgroupVersion, Limits};

    #[test]
    fn v1_requests_become_shares_and_a_soft_limit() {
        let (t, m) = v1_tree();
        let limits = Limits {
            cpu_request_millis: Some(500),
            memory_request_bytes: Some(32 << 20),
            ..LIMITS
        };
        m.create("sb1", &limits).unwrap();
        let cpu = t.path().join("cpu,cpuacct/sandpit/sb1");
        assert_eq!(get(&cpu.join("cpu.shares")), "512");
        // The cap stays the limit's.
        assert_eq!(get(&cpu.join("cpu.cfs_quota_us")), "25000");
        let mem = t.path().join("memory/sandpit/sb1");
        assert_eq!(get(&mem.join("memory.soft_limit_in_bytes")), "33554432");
        assert_eq!(get(&mem.join("memory.limit_in_bytes")), "67108864");
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
}
