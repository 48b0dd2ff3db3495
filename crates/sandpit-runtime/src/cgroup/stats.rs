//! A sandbox's live figures, read at once from its cgroup: what metrics
//! and `sandpit stats` show. Version-specific files are behind `GroupOps`;
//! `pids.current` is the same file in both versions.

use super::fs::read_u64;
use super::{Cgroup, CgroupError};

/// What a cgroup says about its processes now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: u64,
    /// Memory charged now, in bytes.
    pub memory_bytes: u64,
    /// The memory limit; `None`: unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// The most memory charged so far, where the kernel keeps it (v1, and
    /// v2 from Linux 5.19).
    pub memory_peak_bytes: Option<u64>,
    /// Tasks in it (0 where there is no pids controller).
    pub pids: u64,
}

impl Cgroup {
    /// CPU, memory and tasks of the cgroup now.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        let group = self.checked()?;
        let pids = match group.dir_of("pids") {
            Ok(dir) => read_u64(&dir.join("pids.current"))?,
            Err(_) => 0,
        };
        Ok(CgroupStats {
            cpu_usage_usec: group.cpu_usage_usec()?,
            memory_bytes: group.memory_current()?,
            memory_limit_bytes: group.memory_limit()?,
            memory_peak_bytes: group.memory_peak(),
            pids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{put, v1_tree, v2_tree};
    use super::super::CgroupError;
    use super::CgroupStats;

    #[test]
    fn v2_stats_come_from_the_unified_files() {
        let (t, m) = v2_tree("cpu memory pids");
        let dir = t.path().join("sandpit/sb1");
        put(&dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n");
        put(&dir.join("memory.current"), "8192\n");
        put(&dir.join("memory.max"), "max\n");
        put(&dir.join("pids.current"), "3\n");
        let cg = m.open("sb1");
        assert_eq!(
            cg.stats().unwrap(),
            CgroupStats {
                cpu_usage_usec: 1500,
                memory_bytes: 8192,
                memory_limit_bytes: None,
                memory_peak_bytes: None,
                pids: 3,
            }
        );
        put(&dir.join("memory.max"), "1073741824\n");
        put(&dir.join("memory.peak"), "16384\n");
        let s = cg.stats().unwrap();
        assert_eq!(s.memory_limit_bytes, Some(1 << 30));
        assert_eq!(s.memory_peak_bytes, Some(16384));
        put(&dir.join("memory.max"), "lots\n");
        assert!(matches!(cg.stats(), Err(CgroupError::Parse(_))));
    }

    #[test]
    fn v1_stats_come_from_each_hierarchy() {
        let (t, m) = v1_tree();
        let root = t.path();
        put(
            &root.join("cpu,cpuacct/sandpit/sb1/cpuacct.usage"),
            "7000000\n",
        );
        let mem = root.join("memory/sandpit/sb1");
        put(&mem.join("memory.usage_in_bytes"), "4096\n");
        put(&mem.join("memory.max_usage_in_bytes"), "65536\n");
        put(&mem.join("memory.limit_in_bytes"), "9223372036854771712\n");
        put(&root.join("pids/sandpit/sb1/pids.current"), "2\n");
        let cg = m.open("sb1");
        assert_eq!(
            cg.stats().unwrap(),
            CgroupStats {
                cpu_usage_usec: 7000,
                memory_bytes: 4096,
                memory_limit_bytes: None,
                memory_peak_bytes: Some(65536),
                pids: 2,
            }
        );
        put(&mem.join("memory.limit_in_bytes"), "67108864\n");
        assert_eq!(cg.stats().unwrap().memory_limit_bytes, Some(64 << 20));
    }

    #[test]
    fn a_missing_group_is_an_error_not_zeros() {
        let (_t, m) = v2_tree("cpu memory pids");
        assert!(m.open("gone").stats().is_err());
        assert!(m.open("../x").stats().is_err());
    }
}
