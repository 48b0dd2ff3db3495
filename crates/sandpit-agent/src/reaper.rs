//! The single owner of `waitpid`: reaps every child (PID 1's duty, and ours as
//! a subreaper on the host) and routes exit statuses to whoever waits for them.
//!
//! Two races are closed here. A child that exits before its spawner registered
//! it must not be lost: `spawn` holds the registry lock across fork and
//! registration, and the reaper only reaps while holding it. And a pid must not
//! be recycled between "reaped" and "routed": the reaper first peeks with
//! `WNOWAIT` (the zombie keeps its pid), then reaps and routes under the lock.
//!
//! Reaping is `wait4`, so each status comes with the child's resource usage
//! (CPU times and the largest resident set among it and the descendants it
//! waited for), which the agent reports after an exec's exit and for the
//! main process.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sandpit_wire::{ExitStatus, Signal, Usage};

/// Where the exit status of one child lands.
#[derive(Debug)]
pub(crate) struct ExitCell {
    status: Mutex<Option<(ExitStatus, Usage)>>,
    /// Write end of a pipe, dropped at exit: the read end then polls as hung up,
    /// so threads can wait for the exit and for output in one `poll`.
    notify_w: Mutex<Option<OwnedFd>>,
    notify_r: OwnedFd,
}

impl ExitCell {
    /// A cell for a child about to be spawned.
    pub(crate) fn new() -> std::io::Result<Self> {
        let (r, w) = crate::sys::pipe()?;
        Ok(Self {
            status: Mutex::new(None),
            notify_w: Mutex::new(Some(w)),
            notify_r: r,
        })
    }

    fn set(&self, status: ExitStatus, usage: Usage) {
        *lock(&self.status) = Some((status, usage));
        lock(&self.notify_w).take();
    }

    /// The exit status, once the child was reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        lock(&self.status).map(|(s, _)| s)
    }

    /// What the child used, once it was reaped.
    pub(crate) fn usage(&self) -> Option<Usage> {
        lock(&self.status).map(|(_, u)| u)
    }

    /// Polls readable (hung up) once the child was reaped.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.notify_r.as_fd()
    }
}

/// Locks a mutex, ignoring poisoning: a panicked connection thread must not
/// take the agent's shared state down with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Registry {
    waiters: HashMap<i32, Arc<ExitCell>>,
    /// Bumped at each registration, to wake a reaper that found no child.
    generation: u64,
}

/// The reaper's shared state.
#[derive(Debug, Default)]
pub(crate) struct Reaper {
    registry: Mutex<Registry>,
    wake: Condvar,
}

/// Held across `fork`: the reaper cannot route a status until it is dropped.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    guard: MutexGuard<'a, Registry>,
    reaper: &'a Reaper,
}

impl Registration<'_> {
    /// Routes `pid`'s exit status to `cell`.
    pub(crate) fn register(mut self, pid: i32, cell: Arc<ExitCell>) {
        self.guard.waiters.insert(pid, cell);
        self.guard.generation += 1;
        self.reaper.wake.notify_all();
    }
}

impl Reaper {
    /// Starts the reaper thread.
    pub(crate) fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let r = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(128 * 1024)
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    /// Takes the registry lock; hold it across fork and register the child.
    pub(crate) fn lock(&self) -> Registration<'_> {
        Registration {
            guard: lock(&self.registry),
            reaper: self,
        }
    }

    fn run(&self) {
        loop {
            let generation = lock(&self.registry).generation;
            // SAFETY: siginfo_t is plain data; all-zero is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Peek only: the zombie keeps its pid until we reap it under the lock.
            // __WALL: orphans may have been cloned with another exit signal.
            // SAFETY: waitid writes into `info`, which outlives the call.
            let r = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT | libc::__WALL,
                )
            };
            if r < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ECHILD) => self.wait_for_children(generation),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
                continue;
            }
            // SAFETY: waitid filled a SIGCHLD siginfo, whose si_pid is valid.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 {
                continue;
            }
            let mut registry = lock(&self.registry);
            let mut raw = 0;
            // SAFETY: rusage is plain data; all-zero is a valid value.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 writes into `raw` and `ru`, which outlive the
            // call; `pid` is a zombie child of ours.
            let reaped =
                unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG | libc::__WALL, &mut ru) };
            if reaped != pid {
                continue;
            }
            let cell = registry.waiters.remove(&pid);
            drop(registry);
            // Orphans re-parented to us have no cell: reaping them is all.
            if let Some(cell) = cell {
                cell.set(decode(raw), usage(&ru));
            }
        }
    }

    /// No children at all: sleep until a spawn registers one. Orphans cannot
    /// appear meanwhile, as they would descend from a child of ours.
    fn wait_for_children(&self, generation: u64) {
        let mut registry = lock(&self.registry);
        while registry.generation == generation {
            let (g, timeout) = self
                .wake
                .wait_timeout(registry, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner());
            registry = g;
            if timeout.timed_out() {
                break;
            }
        }
    }
}

/// The usage `wait4` reported: times to microseconds, `ru_maxrss` (KiB on
/// Linux) to bytes. Negative fields (never from the kernel) count as 0.
pub(crate) fn usage(ru: &libc::rusage) -> Usage {
    let us = |t: libc::timeval| {
        u64::try_from(t.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Usage {
        user_us: us(ru.ru_utime),
        sys_us: us(ru.ru_stime),
        max_rss_bytes: u64::try_from(ru.ru_maxrss)
            .unwrap_or(0)
            .saturating_mul(1024),
    }
}

/// Decodes a raw wait status.
pub(crate) fn decode(raw: libc::c_int) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        let sig = libc::WTERMSIG(raw);
        // The kernel's signals are 1..=64; anything else would be a broken
        // status word: report what a shell would.
        Signal::new(sig).map_or(ExitStatus::Code(128 + sig), ExitStatus::Signal)
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode_to_codes_and_signals() {
        // The kernel's encoding: exit code in bits 8-15, signal in bits 0-6.
        assert_eq!(decode(3 << 8), ExitStatus::Code(3));
        assert_eq!(decode(0), ExitStatus::Code(0));
        assert_eq!(decode(libc::SIGKILL), ExitStatus::Signal(Signal::KILL));
        // With the core-dump bit.
        assert_eq!(
            decode(libc::SIGSEGV | 0x80),
            ExitStatus::Signal(Signal::new(libc::SIGSEGV).unwrap())
        );
        assert_eq!(decode(64), ExitStatus::Signal(Signal::new(64).unwrap()));
    }

    #[test]
    fn rusage_converts_to_microseconds_and_bytes() {
        // SAFETY: rusage is plain data; all-zero is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        ru.ru_utime = libc::timeval {
            tv_sec: 2,
            tv_usec: 500_000,
        };
        ru.ru_stime = libc::timeval {
            tv_sec: 0,
            tv_usec: 7,
        };
        ru.ru_maxrss = 1024;
        assert_eq!(
            usage(&ru),
            Usage {
                user_us: 2_500_000,
                sys_us: 7,
                max_rss_bytes: 1 << 20,
            }
        );
        ru.ru_maxrss = -1;
        assert_eq!(usage(&ru).max_rss_bytes, 0);
    }
}
