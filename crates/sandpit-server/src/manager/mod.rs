//! The lifecycle of sandboxes: creation, watching, stopping, lifetimes,
//! retention and adoption after a restart.
//!
//! The manager owns the records and drives an [`Engine`]. Modules, one job
//! each:
//!
//! - [`lifecycle`]: the state machine as a type ([`Transition`]) and the one
//!   pure function that applies a transition to a record or refuses it.
//! - `table`: the records in memory, their request-id index, and the
//!   versions being stored.
//! - `create`, `stop`: the paths of a CreateSandbox and of a stop (delete,
//!   purge, lifetime).
//! - `startup`: sandboxes a startup probe keeps CREATING until it decides.
//! - `tasks`: what runs in the background per sandbox (the watcher of its
//!   main process, its lifetime timer) and the retention collector.
//! - `listing`: ListSandboxes' filters, order and pages.
//! - `adoption`: re-attaching to sandboxes after a restart.
//!
//! Every change goes through [`Manager::commit`]: the transition is applied
//! to the newest version of the record under the table's lock, the result
//! is queued for the database there (so changes are stored in the order
//! they were made), and the blocking pool commits it; only then is it
//! published to readers and waiters (a `watch` channel per sandbox). A
//! state is never reported before it is stored, no SQLite call runs on an
//! async worker, and a caller that goes away mid-change (a cancelled RPC)
//! cannot leave a stored change unpublished: publication happens on the
//! commit, not in the caller.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use sandpit_wire::async_client::AsyncAgentClient;
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::clock::Clock;
use crate::db::{Db, DbError, RecordWriter};
use crate::engine::{Engine, EngineError};
use crate::logs::{LogSink, LogWriter};
use crate::model::{Principal, ResourceSpec, SandboxId, SandboxRecord, State};

pub mod admission;
mod adoption;
mod cluster;
mod commands;
mod create;
pub mod lifecycle;
mod listing;
mod pool;
#[cfg(test)]
mod pool_tests;
mod startup;
mod stats;
mod stop;
mod table;
mod tasks;

pub use commands::ExecAccount;
pub use lifecycle::{outcome, ExitOutcome, Refused, Transition};
pub use listing::{ListPage, ListQuery, StateFilter};
pub use pool::{fits as pool_fits, PoolStatus, PoolTemplate, Pooled, MAX_CLAIM_FILE_BYTES};
pub use stop::PurgeOutcome;

use table::Table;

/// The longest a caller waits for a sandbox to leave PENDING/CREATING (an
/// idempotent retry, a data-plane call, a stop racing a creation).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Policy knobs of the manager (from the daemon's config).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Lifetime of a sandbox that asks for none (seconds).
    pub default_max_lifetime_seconds: u32,
    /// Longest lifetime granted (seconds): the API refuses longer requests;
    /// the manager clamps, in case one comes another way.
    pub max_max_lifetime_seconds: u32,
    /// How long terminal sandboxes stay readable.
    pub retention: Duration,
    /// Time between SIGTERM and SIGKILL when the lifetime runs out.
    pub lifetime_grace: Duration,
    /// How often the retention garbage collector runs.
    pub gc_interval: Duration,
    /// Most non-terminal sandboxes at once.
    pub max_sandboxes: usize,
    /// Requests and limits of a sandbox that asks for none.
    pub default_resources: ResourceSpec,
    /// What creates are admitted against (see [`admission`]).
    pub allocatable: admission::Allocatable,
    /// Sizes of writable layers.
    pub disk: crate::api::validate::DiskPolicy,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            default_max_lifetime_seconds: 3600,
            max_max_lifetime_seconds: 86_400,
            retention: Duration::from_secs(3600),
            lifetime_grace: Duration::from_secs(10),
            gc_interval: Duration::from_secs(60),
            max_sandboxes: 256,
            default_resources: ResourceSpec::default(),
            allocatable: admission::Allocatable::default(),
            disk: Default::default(),
        }
    }
}

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No sandbox with this id (or not the caller's). The id as given,
    /// which may not even be a valid id.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// Too many sandboxes are live.
    #[error("runner is at capacity: {live} of {max} sandboxes are live")]
    CapacityExhausted {
        /// Live sandboxes.
        live: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The request asks for more than this runner can ever allocate.
    #[error(
        "{resource} request of {requested} is more than this runner's {allocatable} allocatable"
    )]
    ResourceCeiling {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// Asked for (millicores or bytes).
        requested: u64,
        /// All the runner has.
        allocatable: u64,
    },
    /// The request does not fit next to the live sandboxes' requests.
    #[error("runner is at capacity: {resource} request of {requested} exceeds the {available} of {allocatable} not yet requested")]
    InsufficientCapacity {
        /// `cpu` or `memory`.
        resource: &'static str,
        /// Asked for (millicores or bytes).
        requested: u64,
        /// Free now.
        available: u64,
        /// All the runner has.
        allocatable: u64,
    },
    /// The data dir has less free space than its reserve.
    #[error(
        "runner is low on disk: {free} bytes free in its data dir, below the reserve of {reserve}"
    )]
    DiskLow {
        /// Free bytes now.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// The sandbox is not running (data-plane calls).
    #[error("sandbox {id} is {state}, not running")]
    NotRunning {
        /// The sandbox.
        id: SandboxId,
        /// Its state.
        state: State,
        /// Its state reason.
        reason: String,
    },
    /// A page token that this server did not hand out.
    #[error("invalid page token")]
    InvalidPageToken,
    /// The database failed.
    #[error("database")]
    Db(#[from] DbError),
    /// The engine failed.
    #[error("engine")]
    Engine(#[from] EngineError),
}

impl ManagerError {
    fn not_found(id: &SandboxId) -> Self {
        ManagerError::NotFound(id.to_string())
    }
}

struct Inner<E> {
    engine: E,
    records: RecordWriter,
    table: Mutex<Table>,
    config: ManagerConfig,
    clock: Arc<dyn Clock>,
    logs: LogWriter,
    accounting: crate::accounting::Accounting,
    pools: pool::Pools,
}

/// The sandbox manager; cheap to clone (all clones share the state).
pub struct Manager<E: Engine> {
    inner: Arc<Inner<E>>,
}

impl<E: Engine> Clone for Manager<E> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E: Engine> fmt::Debug for Manager<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("config", &self.inner.config)
            // try_lock: formatting must never deadlock a caller holding it.
            .field(
                "sandboxes",
                &self.inner.table.try_lock().map(|t| t.len()).ok(),
            )
            .finish_non_exhaustive()
    }
}

/// What [`Manager::commit`] did.
#[derive(Debug)]
// Returned once per change and matched at once, never stored: boxing the
// record would cost an allocation per change for nothing.
#[allow(clippy::large_enum_variant)]
enum Applied {
    /// Stored and published.
    Changed {
        /// The state before.
        before: State,
        /// The record now.
        record: SandboxRecord,
    },
    /// The transition does not apply to the newest version of the record;
    /// nothing changed.
    Refused(Refused),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A root span per sandbox: tasks spawned from a request's span must not
/// nest under it.
fn span(id: &SandboxId) -> tracing::Span {
    tracing::info_span!(parent: None, "sandbox", sandbox_id = %id)
}

impl<E: Engine> Manager<E> {
    /// Loads every record, adopts the sandboxes that outlived the previous
    /// daemon, sweeps the debris of anything else, and starts the garbage
    /// collector.
    pub async fn start(
        config: ManagerConfig,
        engine: E,
        db: Db,
        clock: Arc<dyn Clock>,
        sink: Arc<dyn LogSink>,
    ) -> Result<Self, ManagerError> {
        let records = db.load_all()?;
        let accounting = crate::accounting::Accounting::load(db.load_commands()?);
        let mut table = Table::default();
        for r in &records {
            table.insert_stored(r.clone());
        }
        let manager = Self {
            inner: Arc::new(Inner {
                engine,
                records: RecordWriter::new(db),
                table: Mutex::new(table),
                config,
                clock,
                logs: LogWriter::new(sink),
                accounting,
                pools: pool::Pools::default(),
            }),
        };
        let mut keep = HashSet::new();
        for r in records.into_iter().filter(|r| !r.state.is_terminal()) {
            let id = r.id.clone();
            if manager.adopt(r).await? {
                keep.insert(id);
            }
        }
        match manager.inner.engine.sweep(keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept debris of unknown sandboxes"),
            Err(e) => tracing::warn!(error = %crate::chain(&e), "sweep failed"),
        }
        manager.spawn_gc();
        Ok(manager)
    }

    /// The engine (the data plane reaches agents through it).
    pub fn engine(&self) -> &E {
        &self.inner.engine
    }

    /// The policy in force.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// The manager's clock.
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// Applies `t` to the newest version of the record, stores it and
    /// publishes it; returns once published. See the module docs for why
    /// publication happens on the commit.
    async fn commit(&self, id: &SandboxId, t: Transition) -> Result<Applied, ManagerError> {
        let (published, before) = {
            let mut table = lock(&self.inner.table);
            let entry = table
                .get_mut(id)
                .ok_or_else(|| ManagerError::not_found(id))?;
            let mut next = entry.latest().clone();
            let before = next.state;
            let name = t.name();
            if let Err(refused) = lifecycle::apply(&mut next, t) {
                return Ok(Applied::Refused(refused));
            }
            if next.state != before {
                tracing::info!(from = %before, to = %next.state, reason = %next.state_reason, transition = name, "state change");
            }
            if next.state.is_terminal() {
                entry.cancel_timer();
            }
            let version = entry.stage(next.clone());
            let (tx, rx) = oneshot::channel();
            let inner = Arc::clone(&self.inner);
            let record = next.clone();
            // Queued under the lock: stored in the order of the changes.
            self.inner.records.put(next, move |stored| {
                if stored.is_ok() {
                    lock(&inner.table).publish(&record, version);
                }
                let _ = tx.send(stored.map(|()| record));
            });
            (rx, before)
        };
        let record = published.await.unwrap_or(Err(DbError::Stopped))?;
        Ok(Applied::Changed { before, record })
    }

    /// The caller's sandbox.
    pub fn get(
        &self,
        principal: &Principal,
        id: &SandboxId,
    ) -> Result<SandboxRecord, ManagerError> {
        let table = lock(&self.inner.table);
        match table.published(id) {
            Some(r) if &r.principal == principal => Ok(r.clone()),
            _ => Err(ManagerError::not_found(id)),
        }
    }

    fn subscribe(
        &self,
        principal: &Principal,
        id: &SandboxId,
    ) -> Result<watch::Receiver<State>, ManagerError> {
        let table = lock(&self.inner.table);
        match table.get(id) {
            Some(e) if &e.latest().principal == principal && e.is_published() => Ok(e.subscribe()),
            _ => Err(ManagerError::not_found(id)),
        }
    }

    /// The record as published now, whoever owns it.
    fn current(&self, id: &SandboxId) -> Result<SandboxRecord, ManagerError> {
        lock(&self.inner.table)
            .published(id)
            .cloned()
            .ok_or_else(|| ManagerError::not_found(id))
    }

    /// Waits (bounded) until the sandbox left PENDING/CREATING; returns the
    /// record as it is then.
    async fn settled(
        &self,
        id: &SandboxId,
        mut rx: watch::Receiver<State>,
    ) -> Result<SandboxRecord, ManagerError> {
        let _ = tokio::time::timeout(
            SETTLE_TIMEOUT,
            rx.wait_for(|s| !matches!(s, State::Pending | State::Creating)),
        )
        .await;
        self.current(id)
    }

    /// A receiver of the sandbox's published states, whoever owns it.
    fn changes(&self, id: &SandboxId) -> Result<watch::Receiver<State>, ManagerError> {
        lock(&self.inner.table)
            .get(id)
            .map(|e| e.subscribe())
            .ok_or_else(|| ManagerError::not_found(id))
    }

    /// Waits up to `limit` for a terminal state to be published; returns the
    /// record as it is then.
    async fn wait_terminal(
        &self,
        id: &SandboxId,
        limit: Duration,
    ) -> Result<SandboxRecord, ManagerError> {
        let mut rx = self.changes(id)?;
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.is_terminal())).await;
        self.current(id)
    }

    /// A client for the caller's running sandbox's agent; waits while the
    /// sandbox is being created. The data-plane RPCs start here.
    pub async fn agent_for(
        &self,
        principal: &Principal,
        id: &SandboxId,
    ) -> Result<AsyncAgentClient<E::Connector>, ManagerError> {
        let rx = self.subscribe(principal, id)?;
        let record = self.settled(id, rx).await?;
        if record.state == State::Running {
            if let Some(agent) = self.inner.engine.agent(id) {
                return Ok(agent);
            }
        }
        Err(ManagerError::NotRunning {
            id: id.clone(),
            state: record.state,
            reason: record.state_reason,
        })
    }

    /// The published records of `principal` that are not terminal (what
    /// storage asks when a registered volume is to be deleted).
    pub fn live_records(&self, principal: &Principal) -> Vec<SandboxRecord> {
        lock(&self.inner.table)
            .records()
            .filter(|r| &r.principal == principal && !r.state.is_terminal())
            .cloned()
            .collect()
    }

    /// Sandboxes in RUNNING (or being stopped) now.
    pub fn running_count(&self) -> usize {
        lock(&self.inner.table).count(|r| matches!(r.state, State::Running | State::Terminating))
    }

    /// The sum of the live sandboxes' requests (what admission holds
    /// against [`ManagerConfig::allocatable`]).
    pub fn committed(&self) -> crate::model::Resources {
        lock(&self.inner.table).committed()
    }

    /// Runs `work` as a task of its own in the sandbox's span, and waits for
    /// it: a caller that goes away (a cancelled RPC) does not cut a
    /// creation or a stop in half.
    async fn detached<T: Send + 'static>(
        &self,
        id: &SandboxId,
        work: impl std::future::Future<Output = Result<T, ManagerError>> + Send + 'static,
    ) -> Result<T, ManagerError> {
        tokio::spawn(work.instrument(span(id)))
            .await
            .map_err(|_| ManagerError::Engine(EngineError::Task))?
    }
}

#[cfg(test)]
mod tests;
