//! The resource usage of a reaped process, as `wait4` reports it.

/// What a process and the descendants it waited for used, from the
/// `rusage` of its `wait4`. Children it did not wait for (orphans
/// re-parented to the agent) are not included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// CPU time in user mode, in microseconds (`ru_utime`).
    pub user_us: u64,
    /// CPU time in kernel mode, in microseconds (`ru_stime`).
    pub sys_us: u64,
    /// The largest resident set of any single process among it and the
    /// descendants it waited for, in bytes (`ru_maxrss`, KiB on Linux):
    /// not a sum over processes that ran at once.
    pub max_rss_bytes: u64,
}
