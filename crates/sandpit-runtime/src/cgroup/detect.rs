//! Which cgroup version this host offers, and where it is mounted, from
//! the lines of `/proc/self/mountinfo` (see the module above for the rules).

use std::path::{Path, PathBuf};

use super::{v1, v2, CgroupError, Tree};

/// Where a unified hierarchy lives on a pure-v2 host.
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies to use, from mountinfo text: the unified tree at
/// [`UNIFIED_ROOT`], else the v1 hierarchies, else a cgroup2 mount
/// elsewhere.
pub(super) fn tree(mountinfo: &str) -> Result<Tree, CgroupError> {
    let mounts = parse_mountinfo(mountinfo);
    let unified = |m: &&MountEntry| m.fstype == "cgroup2";
    if let Some(m) = mounts
        .iter()
        .filter(unified)
        .find(|m| m.mount_point == Path::new(UNIFIED_ROOT))
    {
        return Ok(Tree::V2(v2::Tree::new(m.mount_point.clone())));
    }
    if let Some(t) = v1::Tree::from_mounts(&mounts) {
        return Ok(Tree::V1(t));
    }
    match mounts.iter().find(unified) {
        Some(m) => Ok(Tree::V2(v2::Tree::new(m.mount_point.clone()))),
        None => Err(CgroupError::NotMounted),
    }
}

/// One line of `/proc/self/mountinfo`, the fields that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    pub(super) mount_point: PathBuf,
    pub(super) fstype: String,
    pub(super) super_options: String,
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
pub(super) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cgroup::{CgroupManager, CgroupVersion};

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
    pub(in crate::cgroup) const PURE_V2: &str = "\
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
        match &m.tree {
            Tree::V1(t) => t.mounts_and_controllers(),
            Tree::V2(_) => panic!("not v1"),
        }
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
                ("/sys/fs/cgroup/cpuset".to_string(), strings(&["cpuset"])),
                ("/sys/fs/cgroup/memory".to_string(), strings(&["memory"])),
                ("/sys/fs/cgroup/freezer".to_string(), strings(&["freezer"])),
                ("/sys/fs/cgroup/pids".to_string(), strings(&["pids"])),
            ]
        );
        let cg = m.open("sb-1");
        assert_eq!(
            cg.procs_files(),
            ["cpu", "cpuacct", "cpuset", "memory", "freezer", "pids"]
                .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/sandpit/sb-1/cgroup.procs")))
        );
        assert_eq!(
            m.parent_dirs()[3],
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
}
