//! Fake cgroup trees on plain directories, for the unit tests of both
//! versions.

use std::fs;
use std::io;
use std::path::Path;

use super::{CgroupManager, CgroupVersion, Limits};

pub(super) fn put(path: &Path, contents: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
}

pub(super) fn get(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

/// Stand-in for cgroupfs's rmdir, which takes the control files with
/// it: removes the files, then the directory (which must hold no
/// directory any more, so the order of removal is checked too).
pub(super) fn fake_rmdir(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
        }
    }
    fs::remove_dir(path)
}

/// A v2 root offering `controllers`, with the parent group present.
pub(super) fn v2_tree(controllers: &str) -> (tempfile::TempDir, CgroupManager) {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    put(&root.join("cgroup.controllers"), controllers);
    put(&root.join("cgroup.subtree_control"), "");
    put(&root.join("sandpit/cgroup.controllers"), "cpu memory pids");
    put(&root.join("sandpit/cgroup.subtree_control"), "");
    let m = CgroupManager::with_root(CgroupVersion::V2, root, "sandpit").unwrap();
    (t, m)
}

pub(super) fn v1_tree() -> (tempfile::TempDir, CgroupManager) {
    let t = tempfile::tempdir().unwrap();
    for h in ["cpu,cpuacct", "memory", "pids", "freezer", "devices"] {
        fs::create_dir(t.path().join(h)).unwrap();
    }
    let m = CgroupManager::with_root(CgroupVersion::V1, t.path(), "sandpit").unwrap();
    (t, m)
}

pub(super) const LIMITS: Limits = Limits {
    cpu_millis: Some(250),
    memory_bytes: Some(64 << 20),
    pids_max: Some(32),
    cpu_request_millis: None,
    memory_request_bytes: None,
    cpus: None,
};
