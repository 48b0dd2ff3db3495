//! Warm pools: per configured shape (image, resources, writable layer,
//! network), sandboxes created ahead and held idle (namespaces, cgroup,
//! root file system, network attached, agent listening, nothing started),
//! so that a create of that shape only hands one its request.
//!
//! Guarantees, each tested (`pool_tests`):
//! - A pooled sandbox is handed to one request at most: a claim moves it
//!   out of the pool under the pool's lock; its id then names that
//!   request's sandbox for good.
//! - Nothing runs in it before its claim: its agent starts nothing and
//!   refuses every operation but a ping until the claim brings the init
//!   (`Frame::Idle`).
//! - Refills never starve on-demand creates: the refiller makes one sandbox
//!   at a time and waits while any create is in flight.
//! - Pooled sandboxes have no record: a restart sweeps them as debris and
//!   the pool is filled again; a shutdown destroys them ([`Manager::drain_pool`]).
//!
//! Pooled sandboxes are not admitted against the runner's allocatable (they
//! request nothing until claimed) and do not count towards `max_sandboxes`;
//! their memory is reported (`sandpit_pool_memory_bytes`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use sandpit_image::Digest;
use tokio::sync::Notify;
use tracing::Instrument;

use super::{lock, Manager};
use crate::engine::{launch_spec, Engine, LaunchNetwork};
use crate::model::{NewSandbox, SandboxId};

/// The largest file payload a claim carries (it travels in one agent
/// frame); a request with more starts cold.
pub const MAX_CLAIM_FILE_BYTES: usize = 1 << 20;

/// How long a failed fill waits before the next try (an image that cannot
/// be pulled must not spin the refiller).
const FILL_RETRY: Duration = Duration::from_secs(2);

/// How long the refiller waits after the last on-demand create ended: the
/// sandbox it made usually runs its first exec right then, and a fill (a
/// whole sandbox start) beside it on a small host doubles that exec's time.
pub(super) const QUIET: Duration = Duration::from_millis(50);

/// One configured pool: what its sandboxes are made from.
#[derive(Debug, Clone)]
pub struct PoolTemplate {
    /// How it is named in metrics and logs (its image).
    pub name: String,
    /// Sandboxes kept ready.
    pub size: usize,
    /// The create it stands for, as the API validated it (image, resources,
    /// writable layer and network with the runner's defaults filled in).
    pub request: NewSandbox,
}

/// A pooled sandbox taken for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pooled {
    /// Its id, the request's sandbox's from now on.
    pub id: SandboxId,
    /// The image layers it was made from (a tag moved since: not used).
    pub layers: Vec<Digest>,
    /// Which pool.
    pub pool: usize,
}

#[derive(Debug)]
struct Shape {
    template: PoolTemplate,
    ready: Mutex<VecDeque<Pooled>>,
    filling: AtomicUsize,
}

/// The pools of a manager (none until [`Manager::start_pool`]).
#[derive(Debug, Default)]
pub(super) struct Pools {
    shapes: OnceLock<Vec<Shape>>,
    wake: Notify,
    closed: AtomicBool,
    /// Creates in flight: the refiller waits while there are any.
    on_demand: AtomicUsize,
    /// When the last one ended (the refiller waits [`QUIET`] after it).
    last_end: Mutex<Option<tokio::time::Instant>>,
}

/// Counts an on-demand create while it lives.
pub(super) struct OnDemand<'a>(&'a Pools);

impl Drop for OnDemand<'_> {
    fn drop(&mut self) {
        if self.0.on_demand.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.last_end) = Some(tokio::time::Instant::now());
            self.0.wake.notify_one();
        }
    }
}

/// What a pool reports (metrics, `sandpit stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The pool's name (its image).
    pub name: String,
    /// Sandboxes it keeps ready.
    pub size: usize,
    /// Ready now.
    pub ready: Vec<SandboxId>,
}

fn files_bytes(req: &NewSandbox) -> usize {
    req.files
        .iter()
        .map(|f| f.content.len() + f.path.len())
        .sum()
}

fn same_network(a: &Option<LaunchNetwork>, b: &Option<LaunchNetwork>) -> bool {
    match (a, b) {
        (None, None) => true,
        // The owner is the claimer's, set at claim time.
        (Some(a), Some(b)) => a.policy == b.policy && a.services == b.services,
        _ => false,
    }
}

/// Whether a pooled sandbox made from `template` can serve `req`: the
/// parts fixed when a sandbox is made (image, resources, writable layer,
/// root file system, volumes, network policy) are the same; the rest
/// (command, environment, files, user, probe, labels) comes with the claim.
pub fn fits(template: &NewSandbox, req: &NewSandbox) -> bool {
    req.image == template.image
        && req.resources == template.resources
        && req.disk_bytes == template.disk_bytes
        && req.security.read_only_root == template.security.read_only_root
        && req.volumes.is_empty()
        && req.launch_volumes.is_empty()
        && same_network(&req.network, &template.network)
        && files_bytes(req) <= MAX_CLAIM_FILE_BYTES
}

impl Pools {
    fn shapes(&self) -> &[Shape] {
        self.shapes.get().map_or(&[], Vec::as_slice)
    }

    /// Returns once no on-demand create is in flight and none ended in
    /// the last [`QUIET`] (or the pools are closed). On-demand creates
    /// first: the machine's cores are theirs.
    async fn quiet(&self) {
        while !self.closed.load(Ordering::Acquire) {
            if self.on_demand.load(Ordering::Acquire) > 0 {
                // Woken when the last one ends (a permit is kept if that
                // happens before this waits); the timeout is a safety net.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                continue;
            }
            let since = *lock(&self.last_end);
            match since.map(|t| t + QUIET) {
                Some(until) if until > tokio::time::Instant::now() => {
                    tokio::time::sleep_until(until).await
                }
                _ => return,
            }
        }
    }

    pub(super) fn on_demand(&self) -> OnDemand<'_> {
        self.on_demand.fetch_add(1, Ordering::AcqRel);
        OnDemand(self)
    }

    /// A ready sandbox for `req`, moved out of its pool (never handed out
    /// again), or `None` when no pool fits or the fitting one is empty.
    pub(super) fn take(&self, req: &NewSandbox) -> Option<Pooled> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let (i, shape) = self
            .shapes()
            .iter()
            .enumerate()
            .find(|(_, s)| fits(&s.template.request, req))?;
        let taken = lock(&shape.ready).pop_front();
        crate::metrics::pool_claim(&shape.template.name, taken.is_some());
        self.wake.notify_one();
        debug_assert!(taken.as_ref().is_none_or(|p| p.pool == i));
        taken
    }

    /// Whether `id` is a pooled sandbox's (ids must not collide).
    pub(super) fn holds(&self, id: &SandboxId) -> bool {
        self.shapes()
            .iter()
            .any(|s| lock(&s.ready).iter().any(|p| &p.id == id))
    }

    pub(super) fn status(&self) -> Vec<PoolStatus> {
        self.shapes()
            .iter()
            .map(|s| PoolStatus {
                name: s.template.name.clone(),
                size: s.template.size,
                ready: lock(&s.ready).iter().map(|p| p.id.clone()).collect(),
            })
            .collect()
    }
}

impl<E: Engine> Manager<E> {
    /// Starts the warm pools (once; later calls change nothing) and their
    /// refiller.
    pub fn start_pool(&self, templates: Vec<PoolTemplate>) {
        let pools = &self.inner.pools;
        let shapes = templates
            .into_iter()
            .filter(|t| t.size > 0)
            .map(|template| Shape {
                template,
                ready: Mutex::default(),
                filling: AtomicUsize::new(0),
            })
            .collect::<Vec<_>>();
        if shapes.is_empty() || pools.shapes.set(shapes).is_err() {
            return;
        }
        for s in pools.shapes() {
            tracing::info!(pool = %s.template.name, size = s.template.size, "warm pool");
        }
        let this = self.clone();
        tokio::spawn(
            async move { this.refill().await }
                .instrument(tracing::info_span!(parent: None, "pool")),
        );
    }

    /// The pools and what they hold.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        self.inner.pools.status()
    }

    /// Stops refilling and destroys every pooled sandbox (the daemon's
    /// shutdown: pooled sandboxes are not adopted by the next start).
    pub async fn drain_pool(&self) {
        let pools = &self.inner.pools;
        pools.closed.store(true, Ordering::Release);
        pools.wake.notify_one();
        // A fill in progress finishes first (and destroys what it made).
        for _ in 0..3000 {
            if pools
                .shapes()
                .iter()
                .all(|s| s.filling.load(Ordering::Acquire) == 0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for s in pools.shapes() {
            let drained: Vec<Pooled> = lock(&s.ready).drain(..).collect();
            for p in drained {
                self.discard(&p.id).await;
            }
        }
    }

    /// Destroys a pooled sandbox that will not be used.
    pub(super) async fn discard(&self, id: &SandboxId) {
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(sandbox_id = %id, error = %crate::chain(&e), "destroy a pooled sandbox");
        }
    }

    async fn refill(&self) {
        let pools = &self.inner.pools;
        loop {
            if pools.closed.load(Ordering::Acquire) {
                return;
            }
            let mut made = false;
            for (i, s) in pools.shapes().iter().enumerate() {
                let have = lock(&s.ready).len();
                if have >= s.template.size {
                    continue;
                }
                pools.quiet().await;
                if pools.closed.load(Ordering::Acquire) {
                    return;
                }
                s.filling.fetch_add(1, Ordering::AcqRel);
                let filled = self.fill(i, s).await;
                s.filling.fetch_sub(1, Ordering::AcqRel);
                match filled {
                    Some(p) if !pools.closed.load(Ordering::Acquire) => {
                        lock(&s.ready).push_back(p);
                        made = true;
                    }
                    // Closed meanwhile: what was made goes.
                    Some(p) => self.discard(&p.id).await,
                    None => tokio::time::sleep(FILL_RETRY).await,
                }
            }
            if !made {
                let _ = tokio::time::timeout(Duration::from_secs(5), pools.wake.notified()).await;
            }
        }
    }

    /// Makes one idle sandbox of pool `i`, `s` (pulling its image when
    /// missing).
    async fn fill(&self, i: usize, s: &Shape) -> Option<Pooled> {
        let t = &s.template.request;
        let engine = &self.inner.engine;
        let image = match engine.image(&t.image).await {
            Ok(Some(image)) => image,
            Ok(None) => match engine.pull(&t.image, None).await {
                Ok(image) => image,
                Err(f) => {
                    tracing::warn!(pool = %s.template.name, error = %f.message, "pull the pool's image");
                    return None;
                }
            },
            Err(e) => {
                tracing::warn!(pool = %s.template.name, error = %crate::chain(&e), "look the pool's image up");
                return None;
            }
        };
        let id = loop {
            let id = SandboxId::generate();
            if lock(&self.inner.table).get(&id).is_none() && !self.inner.pools.holds(&id) {
                break id;
            }
        };
        let spec = launch_spec(&image, t);
        let layers = spec.layers.clone();
        let started = std::time::Instant::now();
        match engine.create_idle(&id, spec).await {
            Ok(()) => {
                tracing::debug!(sandbox_id = %id, pool = %s.template.name, elapsed_ms = started.elapsed().as_millis() as u64, "pooled");
                Some(Pooled {
                    id,
                    layers,
                    pool: i,
                })
            }
            Err(e) => {
                tracing::warn!(pool = %s.template.name, error = %crate::chain(&e), "make a pooled sandbox");
                None
            }
        }
    }
}
