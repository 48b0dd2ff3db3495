//! Networks of destroyed sandboxes, released by a background thread.
//!
//! Deleting a sandbox's veth waits for the kernel: the device is gone
//! only once every reference to it is (RCU grace periods, the dying
//! namespace's teardown holding RTNL), 2 ms when the host is quiet and
//! 30-60 ms while other namespaces come and go; the conntrack walk adds
//! ~4 ms. A delete waited for all of it. Now it waits only for what makes
//! the network unusable: its processes are dead (the runtime killed them
//! first), its address leaves the resolver's and the proxy's tables and
//! the tenants' sets; the link, its rules and flows go here, in order.
//!
//! Invariants: a slot is freed only by its release, so its addresses are
//! never handed out while anything of the old sandbox is left; the
//! sandbox's `network/<id>.json` stays until then, so a crash before it
//! leaves what the next start's sweep releases; [`Releaser::settle`] waits
//! for the queue (a clean shutdown, tests that count debris). Releases of
//! different sandboxes run side by side (`sandpit_net::RELEASE_PARALLELISM`
//! threads: their waits overlap), and at most `MAX_QUEUED` wait: beyond
//! that a delete releases its network itself.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use sandpit_net::Allocation;

use super::{Attached, LocalNetwork};
use crate::model::SandboxId;

/// Releases queued at most; past that a delete releases in place.
const MAX_QUEUED: usize = 64;

/// One network to release.
pub(super) struct Pending {
    pub(super) id: SandboxId,
    pub(super) alloc: Allocation,
    /// Keeps its namespace open until its link is deleted (see `forget`).
    pub(super) held: Option<Attached>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Queued or being released.
    busy: HashSet<SandboxId>,
    running: bool,
}

/// The queue and its thread (shared with it: the thread holds no strong
/// handle on the network while it waits, so the network's drop, which
/// removes the prepared namespaces, runs when its owner lets go).
#[derive(Default, Clone)]
pub(super) struct Releaser(Arc<Shared>);

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    settled: Condvar,
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser")
            .field("busy", &self.lock().busy.len())
            .finish()
    }
}

impl Releaser {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the threads (one per release that can wait out its link's
    /// delete beside the others); they end once `net` is dropped.
    pub(super) fn start(net: &Arc<LocalNetwork>) -> std::io::Result<()> {
        for _ in 0..sandpit_net::RELEASE_PARALLELISM {
            Self::start_one(net)?;
        }
        Ok(())
    }

    fn start_one(net: &Arc<LocalNetwork>) -> std::io::Result<()> {
        let weak: Weak<LocalNetwork> = Arc::downgrade(net);
        let this = net.releaser.clone();
        this.lock().running = true;
        std::thread::Builder::new()
            .name("sandpit-net-release".into())
            .spawn(move || loop {
                let next = {
                    let state = this.lock();
                    // Woken by a push, or now and then to notice the end.
                    let (mut state, _) = this
                        .0
                        .wake
                        .wait_timeout_while(state, Duration::from_secs(1), |s| s.queue.is_empty())
                        .unwrap_or_else(|e| e.into_inner());
                    state.queue.pop_front()
                };
                let Some(net) = weak.upgrade() else {
                    // Dropped meanwhile: its drop released what was queued;
                    // what this took is left to the next start's sweep.
                    return;
                };
                if let Some(p) = next {
                    let id = p.id.clone();
                    net.release(p);
                    this.lock().busy.remove(&id);
                    this.0.settled.notify_all();
                }
            })
            .map(drop)
    }

    /// Queues `p`; hands it back when no thread runs or [`MAX_QUEUED`] wait
    /// already (the caller releases it itself: deletes that outpace the
    /// kernel slow down rather than leave debris piling up).
    #[must_use]
    pub(super) fn push(&self, p: Pending) -> Option<Pending> {
        let mut state = self.lock();
        if !state.running || state.queue.len() >= MAX_QUEUED {
            return Some(p);
        }
        state.busy.insert(p.id.clone());
        state.queue.push_back(p);
        self.0.wake.notify_one();
        None
    }

    /// Whether `id`'s release is queued or under way.
    pub(super) fn is_pending(&self, id: &SandboxId) -> bool {
        self.lock().busy.contains(id)
    }

    /// Waits (up to `timeout`) until every queued release is done; whether
    /// they all are.
    pub(super) fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.busy.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .0
                .settled
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Takes what is still queued (the network is going away: its owner
    /// releases them in place).
    pub(super) fn take_all(&self) -> Vec<Pending> {
        let mut state = self.lock();
        state.running = false;
        let taken: Vec<Pending> = state.queue.drain(..).collect();
        for p in &taken {
            state.busy.remove(&p.id);
        }
        taken
    }
}
