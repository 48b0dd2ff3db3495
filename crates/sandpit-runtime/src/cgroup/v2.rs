//! cgroup v2, the unified hierarchy: one directory per sandbox,
//! `<root>/<parent>/<id>`, with `cpu`, `memory` and `pids` enabled in the
//! `cgroup.subtree_control` of every level above it. Teardown uses
//! `cgroup.kill` (Linux 5.14+), else `cgroup.freeze`.

use std::path::{Path, PathBuf};

use super::fs::{ensure_dir, make_group_dir, read, read_key, read_u64, wait_until, write};
use super::{
    quota_us, CgroupError, CgroupVersion, Freeze, Group as AnyGroup, GroupOps, Limits, TreeOps,
    CFS_PERIOD_US,
};

/// Controllers enabled for sandboxes.
const WANTED: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];

/// The unified hierarchy, mounted at `root`.
#[derive(Debug, Clone)]
pub(super) struct Tree {
    root: PathBuf,
}

impl Tree {
    pub(super) fn new(root: PathBuf) -> Self {
        Self { root }
    }
}

impl TreeOps for Tree {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn mounts(&self) -> Vec<&Path> {
        vec![&self.root]
    }

    fn open(&self, parent: &Path, id: &str) -> AnyGroup {
        AnyGroup::V2(Group {
            dir: self.root.join(parent).join(id),
        })
    }

    /// Creates the parent group and makes the wanted controllers available
    /// to its children: each level's `cgroup.subtree_control`, from the root
    /// down, must enable them for the next.
    fn prepare(&self, parent: &Path, needed: &[&'static str]) -> Result<(), CgroupError> {
        let mut levels = vec![self.root.clone()];
        let mut dir = self.root.clone();
        for part in parent.iter() {
            dir.push(part);
            ensure_dir(&dir)?;
            levels.push(dir.clone());
        }
        for level in &levels {
            let enabled = enable_controllers(level)?;
            if let Some(c) = needed.iter().find(|c| !enabled.iter().any(|e| e == *c)) {
                return Err(CgroupError::MissingController(c));
            }
        }
        Ok(())
    }
}

/// Enables every [`WANTED`] controller that `level` offers for its
/// children; returns the controllers enabled there afterwards.
fn enable_controllers(level: &Path) -> Result<Vec<String>, CgroupError> {
    let available = read(&level.join("cgroup.controllers"))?;
    let control = level.join("cgroup.subtree_control");
    let enabled = read(&control)?;
    let words = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .map(|w| w.trim_start_matches('+').to_string())
            .collect()
    };
    let (available, mut enabled) = (words(&available), words(&enabled));
    let missing: Vec<&str> = WANTED
        .iter()
        .copied()
        .filter(|c| available.iter().any(|a| a == c) && !enabled.iter().any(|e| e == c))
        .collect();
    if missing.is_empty() {
        return Ok(enabled);
    }
    let all = missing
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if write(&control, &all).is_ok() {
        enabled.extend(missing.iter().map(|c| c.to_string()));
    } else {
        // One refusal fails the whole write (e.g. `cpu` while a realtime
        // task runs): enable one by one, keep what works.
        for c in missing {
            match write(&control, &format!("+{c}")) {
                Ok(()) => enabled.push(c.to_string()),
                Err(e) => {
                    tracing::warn!(controller = c, error = %e, "cannot enable cgroup controller")
                }
            }
        }
    }
    Ok(enabled)
}

/// A sandbox's group: one directory holding every controller's files.
#[derive(Debug, Clone)]
pub(super) struct Group {
    dir: PathBuf,
}

impl GroupOps for Group {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn dirs(&self) -> Vec<&Path> {
        vec![&self.dir]
    }

    fn dir_of(&self, _controller: &'static str) -> Result<&Path, CgroupError> {
        Ok(&self.dir)
    }

    fn make_dirs(&self, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        make_group_dir(&self.dir)?;
        created.push(self.dir.clone());
        Ok(())
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let dir = &self.dir;
        if let Some(cpus) = limits.cpus {
            // Only where the cpuset controller is enabled for us; the
            // spawner's affinity confines the sandbox either way.
            let file = dir.join("cpuset.cpus");
            if file.exists() {
                write(&file, &cpus.to_list())?;
            }
        }
        if let Some(millis) = limits.cpu_millis {
            let value = format!("{} {CFS_PERIOD_US}", quota_us(millis));
            write(&dir.join("cpu.max"), &value)?;
        }
        if let Some(bytes) = limits.memory_bytes {
            write(&dir.join("memory.max"), &bytes.to_string())?;
            // Without this, memory.max only bounds RAM and the sandbox
            // could push the rest of its memory to swap.
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                write(&swap, "0")?;
            }
        }
        if let Some(n) = limits.pids_max {
            write(&dir.join("pids.max"), &n.to_string())?;
        }
        if let Some(millis) = limits.cpu_request_millis {
            write(
                &dir.join("cpu.weight"),
                &super::cpu_weight(millis).to_string(),
            )?;
        }
        if let Some(bytes) = limits.memory_request_bytes {
            write(&dir.join("memory.low"), &bytes.to_string())?;
        }
        Ok(())
    }

    fn oom_kills(&self) -> Result<u64, CgroupError> {
        read_key(&self.dir.join("memory.events"), "oom_kill")
    }

    fn cpu_usage_usec(&self) -> Result<u64, CgroupError> {
        // cpu.stat's usage is kept even without the cpu controller.
        read_key(&self.dir.join("cpu.stat"), "usage_usec")
    }

    fn memory_current(&self) -> Result<u64, CgroupError> {
        read_u64(&self.dir.join("memory.current"))
    }

    fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let path = self.dir.join("memory.max");
        match read(&path)?.trim() {
            "max" => Ok(None),
            n => n
                .parse()
                .map(Some)
                .map_err(|_| CgroupError::Parse(path.clone())),
        }
    }

    fn memory_peak(&self) -> Option<u64> {
        // Linux 5.19+.
        read_u64(&self.dir.join("memory.peak")).ok()
    }

    fn kill_file(&self) -> Option<PathBuf> {
        Some(self.dir.join("cgroup.kill")).filter(|p| p.exists())
    }

    fn freezer(&self) -> Option<Box<dyn Freeze>> {
        self.dir
            .join("cgroup.freeze")
            .exists()
            .then(|| Box::new(Freezer(self.dir.clone())) as Box<dyn Freeze>)
    }
}

/// `cgroup.freeze`, with `frozen` of `cgroup.events` saying when it is done.
struct Freezer(PathBuf);

impl Freeze for Freezer {
    fn freeze(&self) -> bool {
        let events = self.0.join("cgroup.events");
        // A read error means the cgroup is gone (a concurrent teardown
        // won): nothing left to wait for.
        write(&self.0.join("cgroup.freeze"), "1").is_ok()
            && wait_until(super::fs::FREEZE_TIMEOUT, || {
                read_key(&events, "frozen").map_or(true, |v| v == 1)
            })
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        write(&self.0.join("cgroup.freeze"), "0")
    }

    fn dir(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use nix::errno::Errno;

    use super::super::fake::{fake_rmdir, get, put, v2_tree, LIMITS};
    use super::super::{CgroupError, Limits};
    use std::path::Path;

    #[test]
    fn v2_create_enables_controllers_and_writes_limits() {
        let (t, m) = v2_tree("cpuset cpu io memory hugetlb pids rdma misc");
        let cg = m.create("sb1", &LIMITS).unwrap();
        let root = t.path();
        assert_eq!(
            get(&root.join("cgroup.subtree_control")),
            "+cpu +cpuset +memory +pids"
        );
        assert_eq!(
            get(&root.join("sandpit/cgroup.subtree_control")),
            // The fake's parent group offers only what the limits need.
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
    fn v2_requests_become_a_weight_and_a_floor() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        m.create(
            "sb1",
            &Limits {
                cpu_request_millis: Some(1000),
                memory_request_bytes: Some(256 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        // 1024 shares: Kubernetes' weight for one CPU.
        assert_eq!(get(&dir.join("cpu.weight")), "39");
        assert_eq!(get(&dir.join("memory.low")), "268435456");
        assert!(!dir.join("memory.max").exists());
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
    fn v2_freeze_waits_for_frozen_and_thaws() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        put(&dir.join("cgroup.freeze"), "0");
        put(&dir.join("cgroup.events"), "populated 1\nfrozen 1\n");
        let cg = m.open("sb1");
        cg.freeze().unwrap();
        assert_eq!(get(&dir.join("cgroup.freeze")), "1");
        cg.thaw().unwrap();
        assert_eq!(get(&dir.join("cgroup.freeze")), "0");

        // Tasks that never report frozen: refused, and thawed again.
        put(&dir.join("cgroup.events"), "populated 1\nfrozen 0\n");
        assert!(matches!(cg.freeze(), Err(CgroupError::NotFrozen(d)) if d == dir));
        assert_eq!(get(&dir.join("cgroup.freeze")), "0");

        // No freezer at all (a group that was never created).
        assert!(matches!(
            m.open("sb2").freeze(),
            Err(CgroupError::MissingController("freezer"))
        ));
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
}
