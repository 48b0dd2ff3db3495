//! Admission: a create is accepted only when the runner can give what it
//! asks for. As Kubernetes' scheduler does, the sum of the *requests* of the
//! live sandboxes (PENDING to TERMINATING) is held against what the host
//! can allocate; limits may overcommit (CPU time is shared, memory above a
//! request is reclaimed first). A request larger than the whole host can
//! never fit: INVALID_ARGUMENT with CWSANDBOX_RESOURCE_CEILING_EXCEEDED. One
//! that fits an empty host but not now: RESOURCE_EXHAUSTED with
//! CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED and a RetryInfo, which the client
//! retries. Below the data dir's reserve of free space, every create is
//! refused the same way: logs, records and running sandboxes keep that
//! space.

use crate::model::Resources;

/// What the runner can allocate to sandboxes (from the config, else the
/// host less a share for the system).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocatable {
    /// CPU in thousandths.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Free bytes the data dir keeps for the daemon: creates stop below.
    pub disk_reserve_bytes: u64,
}

impl Default for Allocatable {
    /// Unbounded: what the manager's unit tests run with.
    fn default() -> Self {
        Self {
            cpu_millis: u64::MAX,
            memory_bytes: u64::MAX,
            disk_reserve_bytes: 0,
        }
    }
}

impl Allocatable {
    /// The host's: its CPUs, and its memory less what the system keeps
    /// (a tenth, at least 512 MiB and at most 4 GiB, as kubelet's
    /// `system-reserved` is typically sized); `reserve` of the data dir.
    pub fn of_host(cpu_millis: u64, memory_total: u64, disk_reserve_bytes: u64) -> Self {
        let system = (memory_total / 10).clamp(512 << 20, 4 << 30);
        Self {
            cpu_millis,
            memory_bytes: memory_total.saturating_sub(system),
            disk_reserve_bytes,
        }
    }
}

/// Why a create does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// More than the whole runner has.
    Ceiling {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// Asked for.
        requested: u64,
        /// All the runner can allocate.
        allocatable: u64,
    },
    /// More than is free now.
    Exhausted {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// Asked for.
        requested: u64,
        /// Free now.
        available: u64,
        /// All the runner can allocate.
        allocatable: u64,
    },
}

/// Whether `request` fits next to `committed` (the sum of the live
/// sandboxes' requests) within `alloc`.
pub fn fit(request: &Resources, committed: &Resources, alloc: &Allocatable) -> Result<(), Misfit> {
    for (resource, want, used, all) in [
        (
            "cpu",
            request.cpu_millis.unwrap_or(0),
            committed.cpu_millis.unwrap_or(0),
            alloc.cpu_millis,
        ),
        (
            "memory",
            request.memory_bytes.unwrap_or(0),
            committed.memory_bytes.unwrap_or(0),
            alloc.memory_bytes,
        ),
    ] {
        if want > all {
            return Err(Misfit::Ceiling {
                resource,
                requested: want,
                allocatable: all,
            });
        }
        let available = all.saturating_sub(used);
        if want > available {
            return Err(Misfit::Exhausted {
                resource,
                requested: want,
                available,
                allocatable: all,
            });
        }
    }
    Ok(())
}

/// `a + b`, resource by resource (a missing one counts as 0).
pub fn add(a: &Resources, b: &Resources) -> Resources {
    let sum = |x: Option<u64>, y: Option<u64>| Some(x.unwrap_or(0).saturating_add(y.unwrap_or(0)));
    Resources {
        cpu_millis: sum(a.cpu_millis, b.cpu_millis),
        memory_bytes: sum(a.memory_bytes, b.memory_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cpu: u64, mem: u64) -> Resources {
        Resources {
            cpu_millis: Some(cpu),
            memory_bytes: Some(mem),
        }
    }

    #[test]
    fn requests_are_held_against_what_is_left() {
        let alloc = Allocatable {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            disk_reserve_bytes: 0,
        };
        assert_eq!(fit(&r(1000, 1 << 30), &r(1000, 3 << 30), &alloc), Ok(()));
        assert_eq!(
            fit(&r(1001, 1), &r(1000, 0), &alloc),
            Err(Misfit::Exhausted {
                resource: "cpu",
                requested: 1001,
                available: 1000,
                allocatable: 2000
            })
        );
        assert_eq!(
            fit(&r(0, 2 << 30), &r(0, 3 << 30), &alloc),
            Err(Misfit::Exhausted {
                resource: "memory",
                requested: 2 << 30,
                available: 1 << 30,
                allocatable: 4 << 30
            })
        );
        // Never fits, whatever runs.
        assert_eq!(
            fit(&r(3000, 0), &Resources::default(), &alloc),
            Err(Misfit::Ceiling {
                resource: "cpu",
                requested: 3000,
                allocatable: 2000
            })
        );
        // Nothing asked for always fits.
        assert_eq!(
            fit(&Resources::default(), &r(2000, 4 << 30), &alloc),
            Ok(())
        );
    }

    #[test]
    fn the_host_keeps_a_share_of_its_memory() {
        let a = Allocatable::of_host(2000, 24 << 30, 1 << 30);
        assert_eq!(a.memory_bytes, (24u64 << 30) - (24u64 << 30) / 10);
        assert_eq!(
            Allocatable::of_host(1000, 2 << 30, 0).memory_bytes,
            1536 << 20
        );
        assert_eq!(
            Allocatable::of_host(1000, 128 << 30, 0).memory_bytes,
            124 << 30
        );
        assert_eq!(add(&r(1, 2), &Resources::default()), r(1, 2));
    }
}
