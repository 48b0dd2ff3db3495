//! The lifecycle of sandboxes: creation, watching, stopping, lifetimes,
//! retention and adoption after a restart.
//!
//! The manager owns the records (in memory, written through to [`Db`]
//! before any change is visible) and drives an [`Engine`]. Each state change
//! goes through [`Manager::update`], which persists the new record, then
//! publishes it to in-memory readers and to waiters (a `watch` channel per
//! sandbox). Terminal states are final: once COMPLETED, FAILED or TERMINATED
//! no later event changes a record.
//!
//! Background tasks, all owned by tokio: one watcher per running sandbox
//! (waits for the main process to end, without polling), one lifetime timer
//! per running sandbox, and the retention garbage collector.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use sandpit_wire::client::AgentClient;
use sandpit_wire::ExitStatus;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::Instrument;

use crate::clock::Clock;
use crate::db::{Db, DbError};
use crate::engine::{Adoption, Engine, EngineError, ImageInfo, LaunchSpec, MainExit};
use crate::logs::LogSink;
use crate::model::{NewSandbox, Principal, SandboxRecord, State};

/// Default `PATH` when neither the image nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The longest a caller waits for a sandbox to leave PENDING/CREATING (an
/// idempotent retry, a data-plane call, a stop racing a creation).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Extra time a second stop waits beyond its grace for the first to finish.
const STOP_SLACK: Duration = Duration::from_secs(5);

const SIGTERM: i32 = 15;

/// Policy knobs of the manager (from the daemon's config).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Lifetime of a sandbox that asks for none (seconds).
    pub default_max_lifetime_seconds: u32,
    /// Longest lifetime granted; longer requests are clamped (seconds).
    pub max_max_lifetime_seconds: u32,
    /// How long terminal sandboxes stay readable.
    pub retention: Duration,
    /// Time between SIGTERM and SIGKILL when the lifetime runs out.
    pub lifetime_grace: Duration,
    /// How often the retention garbage collector runs.
    pub gc_interval: Duration,
    /// Most non-terminal sandboxes at once.
    pub max_sandboxes: usize,
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
        }
    }
}

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No sandbox with this id (or not the caller's).
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
    /// The sandbox is not running (data-plane calls).
    #[error("sandbox {id} is {state}, not running")]
    NotRunning {
        /// The sandbox.
        id: String,
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

/// Which states a listing includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFilter {
    /// Every state (subject to `show_terminated`).
    #[default]
    Any,
    /// One state; a terminal one implies `show_terminated`.
    Only(State),
    /// A state this server never uses (e.g. PAUSED): nothing matches.
    Nothing,
}

/// A ListSandboxes query.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// The sandbox must carry every one of these.
    pub tags: Vec<String>,
    /// State filter.
    pub state: StateFilter,
    /// Include terminal sandboxes.
    pub show_terminated: bool,
    /// Page size; 0 means [`ListQuery::DEFAULT_PAGE_SIZE`].
    pub page_size: usize,
    /// Token of the previous page's last item.
    pub page_token: Option<String>,
    /// Newest first instead of oldest first.
    pub descending: bool,
}

impl ListQuery {
    /// Page size when none is given.
    pub const DEFAULT_PAGE_SIZE: usize = 100;
    /// Largest page size honoured.
    pub const MAX_PAGE_SIZE: usize = 1000;
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// The sandboxes, in order.
    pub sandboxes: Vec<SandboxRecord>,
    /// Token for the next page; `None` on the last.
    pub next_page_token: Option<String>,
}

/// What a purge did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Sandboxes stopped (or that would be).
    pub count: usize,
    /// Sandboxes whose stop failed.
    pub failed: Vec<String>,
}

struct Entry {
    record: SandboxRecord,
    changes: watch::Sender<State>,
    timer: Option<AbortHandle>,
}

impl Entry {
    fn new(record: SandboxRecord) -> Self {
        let (changes, _) = watch::channel(record.state);
        Self {
            record,
            changes,
            timer: None,
        }
    }
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    /// (principal, request id) -> sandbox id, for idempotent creation.
    requests: HashMap<(Principal, String), String>,
}

impl Table {
    fn insert(&mut self, record: SandboxRecord) {
        if let Some(rid) = &record.request_id {
            self.requests
                .insert((record.principal.clone(), rid.clone()), record.id.clone());
        }
        self.entries.insert(record.id.clone(), Entry::new(record));
    }

    fn remove(&mut self, id: &str) {
        if let Some(entry) = self.entries.remove(id) {
            if let Some(rid) = entry.record.request_id {
                self.requests.remove(&(entry.record.principal, rid));
            }
            if let Some(t) = entry.timer {
                t.abort();
            }
        }
    }

    fn live(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !e.record.state.is_terminal())
            .count()
    }
}

struct Inner<E> {
    engine: E,
    db: Mutex<Db>,
    table: Mutex<Table>,
    config: ManagerConfig,
    clock: Arc<dyn Clock>,
    sink: Arc<dyn LogSink>,
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
                &self.inner.table.try_lock().map(|t| t.entries.len()).ok(),
            )
            .finish_non_exhaustive()
    }
}

/// What [`Manager::reserve`] found.
enum Reserved {
    New(Box<SandboxRecord>),
    Existing(String, watch::Receiver<State>),
}

/// The outcome of [`Manager::update`].
struct Updated {
    record: SandboxRecord,
    /// The state before, when the change was applied.
    before: Option<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A root span per sandbox: tasks spawned from a request's span must not
/// nest under it.
fn span(id: &str) -> tracing::Span {
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
        let mut table = Table::default();
        for r in &records {
            table.insert(r.clone());
        }
        let manager = Self {
            inner: Arc::new(Inner {
                engine,
                db: Mutex::new(db),
                table: Mutex::new(table),
                config,
                clock,
                sink,
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
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
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

    fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    /// Re-attaches one non-terminal record after a restart; returns whether
    /// its sandbox still runs.
    async fn adopt(&self, r: SandboxRecord) -> Result<bool, ManagerError> {
        let id = r.id.clone();
        let span = span(&id);
        let adoption = self.inner.engine.adopt(&id).instrument(span.clone()).await;
        if adoption == Adoption::Exited && r.state == State::Running {
            // Its main process ended while the daemon was down: record the
            // real outcome (and drain its output) before serving, so that
            // no client sees it RUNNING after the restart.
            let sink = Arc::clone(&self.inner.sink);
            let exit = self
                .inner
                .engine
                .wait_exit(&id, sink)
                .instrument(span.clone())
                .await;
            self.on_exit(&id, exit).instrument(span.clone()).await;
            return Ok(false);
        }
        let _enter = span.enter();
        let now = self.now();
        match adoption {
            // Exited in another state than RUNNING: the watcher (or the stop
            // in progress) finishes it like any other.
            Adoption::Running | Adoption::Exited => {
                tracing::info!(state = %r.state, "adopted running sandbox");
                match r.state {
                    State::Running => {
                        self.spawn_watcher(&id);
                        self.arm_timer(&id, r.start_time.unwrap_or(now), r.max_lifetime_seconds);
                    }
                    State::Pending | State::Creating => {
                        // Created, but the daemon died before recording it.
                        self.update(&id, |rec| {
                            rec.state = State::Running;
                            rec.start_time = Some(now);
                            true
                        })?;
                        self.spawn_watcher(&id);
                        self.arm_timer(&id, now, r.max_lifetime_seconds);
                    }
                    State::Terminating => {
                        self.spawn_watcher(&id);
                        let this = self.clone();
                        let grace = self.inner.config.lifetime_grace;
                        let task_id = id.clone();
                        tokio::spawn(
                            async move {
                                if let Err(e) = this.kill_after_grace(&task_id, grace).await {
                                    tracing::warn!(error = %e, "resume stop");
                                }
                            }
                            .instrument(span.clone()),
                        );
                    }
                    // Terminal records are not adopted.
                    State::Completed | State::Failed | State::Terminated => {}
                }
                Ok(true)
            }
            Adoption::Gone => {
                tracing::warn!(state = %r.state, "sandbox vanished while sandpitd was down");
                self.update(&id, |rec| {
                    match rec.state {
                        State::Terminating => rec.state = State::Terminated,
                        State::Pending | State::Creating => {
                            rec.state = State::Failed;
                            rec.state_reason =
                                "creation was interrupted by a sandpitd restart".into();
                        }
                        _ => {
                            rec.state = State::Failed;
                            rec.state_reason = "sandbox vanished while sandpitd was down".into();
                        }
                    }
                    rec.end_time = Some(now);
                    true
                })?;
                Ok(false)
            }
        }
    }

    /// Applies `change` to a record when it returns true, persists the
    /// result, then publishes it. Terminal records never change.
    fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRecord) -> bool,
    ) -> Result<Updated, ManagerError> {
        let mut table = lock(&self.inner.table);
        let entry = table
            .entries
            .get_mut(id)
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))?;
        let before = entry.record.state;
        let mut next = entry.record.clone();
        if before.is_terminal() || !change(&mut next) {
            return Ok(Updated {
                record: entry.record.clone(),
                before: None,
            });
        }
        lock(&self.inner.db).put(&next)?;
        if next.state != before {
            tracing::info!(from = %before, to = %next.state, reason = %next.state_reason, "state change");
        }
        if next.state.is_terminal() {
            if let Some(t) = entry.timer.take() {
                t.abort();
            }
        }
        entry.record = next.clone();
        entry.changes.send_replace(next.state);
        Ok(Updated {
            record: next,
            before: Some(before),
        })
    }

    fn lifetime_for(&self, requested: Option<u32>) -> u32 {
        let c = &self.inner.config;
        match requested {
            None | Some(0) => c.default_max_lifetime_seconds,
            Some(n) => n.min(c.max_max_lifetime_seconds),
        }
    }

    /// Creates a sandbox. With the image in the local store it is created
    /// synchronously and returned RUNNING (or FAILED); otherwise it is
    /// returned PENDING while the image is pulled, and a failed pull makes it
    /// FAILED with the pull's reason. A retry with the same request id
    /// returns the first one.
    pub async fn create(
        &self,
        principal: &Principal,
        req: NewSandbox,
    ) -> Result<SandboxRecord, ManagerError> {
        let record = match self.reserve(principal, &req)? {
            Reserved::New(record) => *record,
            Reserved::Existing(id, rx) => {
                tracing::debug!(sandbox_id = %id, "idempotent create");
                return self.settled(&id, rx).await;
            }
        };
        let span = span(&record.id);
        tracing::info!(parent: &span, principal = %principal, image = %record.image, "create");
        self.launch(&record.id, req).instrument(span).await
    }

    /// The sandbox of an earlier request with the same id, or a new PENDING
    /// record, persisted, if capacity allows.
    fn reserve(&self, principal: &Principal, req: &NewSandbox) -> Result<Reserved, ManagerError> {
        let mut table = lock(&self.inner.table);
        if let Some(rid) = &req.request_id {
            if let Some(id) = table.requests.get(&(principal.clone(), rid.clone())) {
                let rx = table.entries[id].changes.subscribe();
                return Ok(Reserved::Existing(id.clone(), rx));
            }
        }
        let live = table.live();
        let max = self.inner.config.max_sandboxes;
        if live >= max {
            return Err(ManagerError::CapacityExhausted { live, max });
        }
        let id = loop {
            let id = new_id();
            if !table.entries.contains_key(&id) {
                break id;
            }
        };
        let record = SandboxRecord {
            id,
            principal: principal.clone(),
            request_id: req.request_id.clone(),
            state: State::Pending,
            state_reason: String::new(),
            create_time: self.now(),
            start_time: None,
            end_time: None,
            exit_code: None,
            image: req.image.clone(),
            tags: req.tags.clone(),
            annotations: req.annotations.clone(),
            display_name: req.display_name.clone(),
            limits: req.limits,
            max_lifetime_seconds: self.lifetime_for(req.max_lifetime_seconds),
            spec_echo: req.spec_echo.clone(),
        };
        lock(&self.inner.db).put(&record)?;
        table.insert(record.clone());
        Ok(Reserved::New(Box::new(record)))
    }

    /// PENDING -> CREATING -> RUNNING, or FAILED with what broke. An image
    /// missing from the local store is pulled in the background: the caller
    /// gets the PENDING record at once and the sandbox starts (or fails with
    /// the pull's reason) when the pull ends.
    async fn launch(&self, id: &str, req: NewSandbox) -> Result<SandboxRecord, ManagerError> {
        let image = match self.inner.engine.image(&req.image).await {
            Ok(Some(image)) => image,
            Ok(None) => {
                self.spawn_pull(id, req);
                return self.current(id);
            }
            Err(e) => return self.fail_start(id, e.to_string()),
        };
        self.start_from(id, &req, &image).await
    }

    fn spawn_pull(&self, id: &str, mut req: NewSandbox) {
        let this = self.clone();
        let id = id.to_owned();
        let span = span(&id);
        tokio::spawn(
            async move {
                tracing::info!(image = %req.image, "pulling");
                let started = std::time::Instant::now();
                let credentials = req.pull_credentials.take();
                let result = match this.inner.engine.pull(&req.image, credentials).await {
                    Ok(image) => {
                        tracing::info!(
                            image = %req.image,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "pulled"
                        );
                        this.start_from(&id, &req, &image).await
                    }
                    Err(failure) => this.fail_start(&id, failure.message),
                };
                if let Err(e) = result {
                    tracing::error!(error = %e, "start after pull");
                }
            }
            .instrument(span),
        );
    }

    async fn start_from(
        &self,
        id: &str,
        req: &NewSandbox,
        image: &ImageInfo,
    ) -> Result<SandboxRecord, ManagerError> {
        let spec = launch_spec(image, req);
        let up = self.update(id, |r| {
            if r.state != State::Pending {
                return false;
            }
            r.state = State::Creating;
            true
        })?;
        if up.before.is_none() {
            // Stopped while PENDING.
            return self.end_stopped(id, None);
        }
        match self.inner.engine.create(id, spec).await {
            Ok(()) => {
                let now = self.now();
                let up = self.update(id, |r| {
                    if r.state != State::Creating {
                        return false;
                    }
                    r.state = State::Running;
                    r.start_time = Some(now);
                    true
                })?;
                if up.before.is_some() {
                    self.spawn_watcher(id);
                    self.arm_timer(id, now, up.record.max_lifetime_seconds);
                    return Ok(up.record);
                }
                // Stopped while CREATING: nothing ran yet, no grace to give.
                if let Err(e) = self.inner.engine.destroy(id).await {
                    tracing::warn!(error = %e, "destroy");
                }
                self.end_stopped(id, None)
            }
            Err(e @ EngineError::StartFailed(_)) => self.fail_start(id, e.to_string()),
            Err(e) => self.fail_start(id, format!("start sandbox: {e}")),
        }
    }

    /// A start-up failure: FAILED with `reason`, or TERMINATED if it was
    /// being stopped anyway.
    fn fail_start(&self, id: &str, reason: String) -> Result<SandboxRecord, ManagerError> {
        let now = self.now();
        tracing::warn!(sandbox_id = %id, %reason, "start failed");
        Ok(self
            .update(id, |r| {
                if r.state == State::Terminating {
                    r.state = State::Terminated;
                } else {
                    r.state = State::Failed;
                    r.state_reason = reason;
                }
                r.end_time = Some(now);
                true
            })?
            .record)
    }

    /// TERMINATING -> TERMINATED (keeping the reason set when stopping began).
    fn end_stopped(&self, id: &str, exit_code: Option<i32>) -> Result<SandboxRecord, ManagerError> {
        let now = self.now();
        Ok(self
            .update(id, |r| {
                r.state = State::Terminated;
                if r.exit_code.is_none() {
                    r.exit_code = exit_code;
                }
                r.end_time = Some(now);
                true
            })?
            .record)
    }

    fn spawn_watcher(&self, id: &str) {
        let this = self.clone();
        let id = id.to_owned();
        let span = span(&id);
        tokio::spawn(
            async move {
                let sink = Arc::clone(&this.inner.sink);
                let exit = this.inner.engine.wait_exit(&id, sink).await;
                this.on_exit(&id, exit).await;
            }
            .instrument(span),
        );
    }

    /// Records how the main process ended and releases the engine's
    /// resources; the record stays.
    async fn on_exit(&self, id: &str, exit: MainExit) {
        let (exit_code, state, reason) = outcome(&exit);
        tracing::debug!(?exit, "main process ended");
        self.inner.sink.finish(id);
        // Released before the terminal state is recorded: whoever sees a
        // terminal state can rely on nothing of the sandbox being left.
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(error = %e, "destroy");
        }
        let now = self.now();
        let result = self.update(id, |r| {
            if r.state == State::Terminating {
                r.state = State::Terminated;
                // A code recorded by the stopper (SIGKILL) unless the main
                // process reported its own.
                r.exit_code = exit_code.or(r.exit_code);
            } else {
                r.state = state;
                r.state_reason = reason;
                r.exit_code = exit_code;
            }
            r.end_time = Some(now);
            true
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "record exit");
        }
    }

    fn arm_timer(&self, id: &str, start: SystemTime, lifetime_seconds: u32) {
        let deadline = start + Duration::from_secs(lifetime_seconds.into());
        let wait = deadline
            .duration_since(self.now())
            .unwrap_or(Duration::ZERO);
        let this = self.clone();
        let task_id = id.to_owned();
        let span = span(id);
        let handle = tokio::spawn(
            async move {
                tokio::time::sleep(wait).await;
                let reason = format!("max lifetime of {lifetime_seconds} s exceeded");
                let grace = this.inner.config.lifetime_grace;
                // A task of its own: reaching TERMINATED aborts this timer.
                tokio::spawn(
                    async move {
                        if let Err(e) = this.stop(&task_id, grace, reason).await {
                            tracing::warn!(error = %e, "stop at end of lifetime");
                        }
                    }
                    .in_current_span(),
                );
            }
            .instrument(span),
        );
        let mut table = lock(&self.inner.table);
        match table.entries.get_mut(id) {
            Some(e) if !e.record.state.is_terminal() => {
                if let Some(old) = e.timer.replace(handle.abort_handle()) {
                    old.abort();
                }
            }
            _ => handle.abort(),
        }
    }

    /// The caller's sandbox.
    pub fn get(&self, principal: &Principal, id: &str) -> Result<SandboxRecord, ManagerError> {
        let table = lock(&self.inner.table);
        match table.entries.get(id) {
            Some(e) if &e.record.principal == principal => Ok(e.record.clone()),
            _ => Err(ManagerError::NotFound(id.to_owned())),
        }
    }

    fn subscribe(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<watch::Receiver<State>, ManagerError> {
        let table = lock(&self.inner.table);
        match table.entries.get(id) {
            Some(e) if &e.record.principal == principal => Ok(e.changes.subscribe()),
            _ => Err(ManagerError::NotFound(id.to_owned())),
        }
    }

    fn current(&self, id: &str) -> Result<SandboxRecord, ManagerError> {
        let table = lock(&self.inner.table);
        table
            .entries
            .get(id)
            .map(|e| e.record.clone())
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))
    }

    /// Waits (bounded) until the sandbox left PENDING/CREATING; returns the
    /// record as it is then.
    async fn settled(
        &self,
        id: &str,
        mut rx: watch::Receiver<State>,
    ) -> Result<SandboxRecord, ManagerError> {
        let _ = tokio::time::timeout(
            SETTLE_TIMEOUT,
            rx.wait_for(|s| !matches!(s, State::Pending | State::Creating)),
        )
        .await;
        self.current(id)
    }

    /// A receiver of the sandbox's state changes, whoever owns it.
    fn changes(&self, id: &str) -> Result<watch::Receiver<State>, ManagerError> {
        let table = lock(&self.inner.table);
        table
            .entries
            .get(id)
            .map(|e| e.changes.subscribe())
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))
    }

    /// Waits up to `limit` for a terminal state; returns the record as it is
    /// then.
    async fn wait_terminal(
        &self,
        id: &str,
        limit: Duration,
    ) -> Result<SandboxRecord, ManagerError> {
        let mut rx = self.changes(id)?;
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.is_terminal())).await;
        self.current(id)
    }

    /// The caller's sandboxes matching `query`, one page.
    pub fn list(&self, principal: &Principal, query: &ListQuery) -> Result<ListPage, ManagerError> {
        let after = query
            .page_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|t| PageKey::parse(t).ok_or(ManagerError::InvalidPageToken))
            .transpose()?;
        let show_terminated =
            query.show_terminated || matches!(query.state, StateFilter::Only(s) if s.is_terminal());
        let table = lock(&self.inner.table);
        let mut matching: Vec<&SandboxRecord> = table
            .entries
            .values()
            .map(|e| &e.record)
            .filter(|r| &r.principal == principal)
            .filter(|r| show_terminated || !r.state.is_terminal())
            .filter(|r| match query.state {
                StateFilter::Any => true,
                StateFilter::Only(s) => r.state == s,
                StateFilter::Nothing => false,
            })
            .filter(|r| r.has_all_tags(&query.tags))
            .collect();
        matching.sort_by_key(|r| PageKey::of(r));
        if query.descending {
            matching.reverse();
        }
        if let Some(after) = &after {
            matching.retain(|r| {
                let key = PageKey::of(r);
                if query.descending {
                    key < *after
                } else {
                    key > *after
                }
            });
        }
        let size = match query.page_size {
            0 => ListQuery::DEFAULT_PAGE_SIZE,
            n => n.min(ListQuery::MAX_PAGE_SIZE),
        };
        let more = matching.len() > size;
        matching.truncate(size);
        let next_page_token = if more {
            matching.last().map(|r| PageKey::of(r).token())
        } else {
            None
        };
        Ok(ListPage {
            sandboxes: matching.into_iter().cloned().collect(),
            next_page_token,
        })
    }

    /// Stops the caller's sandbox: SIGTERM to the main process, up to
    /// `grace` for it to exit, then everything is killed. Returns once the
    /// sandbox is terminal, or after the grace period. A sandbox that already
    /// ended stays as it is. `Ok(None)`: missing and `allow_missing`.
    pub async fn delete(
        &self,
        principal: &Principal,
        id: &str,
        grace: Duration,
        allow_missing: bool,
    ) -> Result<Option<SandboxRecord>, ManagerError> {
        match self.get(principal, id) {
            Ok(_) => {}
            Err(ManagerError::NotFound(_)) if allow_missing => return Ok(None),
            Err(e) => return Err(e),
        }
        self.stop(id, grace, "stopped by request".into())
            .instrument(span(id))
            .await
            .map(Some)
    }

    async fn stop(
        &self,
        id: &str,
        grace: Duration,
        reason: String,
    ) -> Result<SandboxRecord, ManagerError> {
        let up = self.update(id, |r| {
            if !matches!(r.state, State::Pending | State::Creating | State::Running) {
                return false;
            }
            r.state = State::Terminating;
            r.state_reason = reason;
            true
        })?;
        match up.before {
            // Terminal already, or someone else is stopping it.
            None if up.record.state.is_terminal() => Ok(up.record),
            None => self.wait_terminal(id, grace + STOP_SLACK).await,
            // Nothing was created yet (its image may be being pulled): the
            // launching task finds it terminal and starts nothing.
            Some(State::Pending) => self.end_stopped(id, None),
            // The creating task sees TERMINATING and finishes the job.
            Some(State::Creating) => self.wait_terminal(id, SETTLE_TIMEOUT).await,
            Some(_) => self.kill_after_grace(id, grace).await,
        }
    }

    async fn kill_after_grace(
        &self,
        id: &str,
        grace: Duration,
    ) -> Result<SandboxRecord, ManagerError> {
        let mut rx = self.changes(id)?;
        // Without a main process to signal (none, or gone) there is nothing
        // to wait for.
        let signalled = match self.inner.engine.signal_main(id, SIGTERM).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "SIGTERM not delivered");
                false
            }
        };
        if signalled && !grace.is_zero() {
            let ended = tokio::time::timeout(grace, rx.wait_for(|s| s.is_terminal())).await;
            if matches!(ended, Ok(Ok(_))) {
                return self.current(id);
            }
            tracing::info!(grace_s = grace.as_secs_f64(), "grace period over, killing");
        }
        if signalled {
            // A main process still running dies of SIGKILL: report it the
            // way a shell (and the client) expects. Recorded before the
            // kill, because the watcher may record the death first.
            self.update(id, |r| {
                if r.state != State::Terminating || r.exit_code.is_some() {
                    return false;
                }
                r.exit_code = Some(128 + 9);
                true
            })?;
        }
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(error = %e, "destroy");
        }
        self.end_stopped(id, None)
    }

    /// Stops every live sandbox of the caller that carries all `tags` (any
    /// when `tags` is empty), or only counts them with `dry_run`.
    pub async fn purge(
        &self,
        principal: &Principal,
        tags: &[String],
        dry_run: bool,
    ) -> PurgeOutcome {
        let ids: Vec<String> = {
            let table = lock(&self.inner.table);
            let mut v: Vec<&SandboxRecord> = table
                .entries
                .values()
                .map(|e| &e.record)
                .filter(|r| &r.principal == principal && !r.state.is_terminal())
                .filter(|r| r.has_all_tags(tags))
                .collect();
            v.sort_by_key(|r| PageKey::of(r));
            v.into_iter().map(|r| r.id.clone()).collect()
        };
        if dry_run {
            return PurgeOutcome {
                count: ids.len(),
                failed: vec![],
            };
        }
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let this = self.clone();
            tasks.spawn(async move {
                let r = this
                    .stop(&id, Duration::ZERO, "purged by request".into())
                    .instrument(span(&id))
                    .await;
                (id, r)
            });
        }
        let mut outcome = PurgeOutcome::default();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(_))) => outcome.count += 1,
                Ok((id, Err(e))) => {
                    tracing::warn!(sandbox_id = %id, error = %e, "purge");
                    outcome.failed.push(id);
                }
                Err(e) => tracing::warn!(error = %e, "purge task"),
            }
        }
        outcome.failed.sort();
        outcome
    }

    /// A client for the caller's running sandbox's agent; waits while the
    /// sandbox is being created. The data-plane RPCs start here.
    pub async fn agent_for(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<AgentClient, ManagerError> {
        let rx = self.subscribe(principal, id)?;
        let record = self.settled(id, rx).await?;
        if record.state == State::Running {
            if let Some(agent) = self.inner.engine.agent(id) {
                return Ok(agent);
            }
        }
        Err(ManagerError::NotRunning {
            id: id.to_owned(),
            state: record.state,
            reason: record.state_reason,
        })
    }

    /// Sandboxes in RUNNING (or being stopped) now.
    pub fn running_count(&self) -> usize {
        lock(&self.inner.table)
            .entries
            .values()
            .filter(|e| matches!(e.record.state, State::Running | State::Terminating))
            .count()
    }

    /// Deletes the records of sandboxes that ended longer than the retention
    /// period ago; returns how many.
    pub fn collect_garbage(&self) -> usize {
        let now = self.now();
        let retention = self.inner.config.retention;
        let expired: Vec<String> = lock(&self.inner.table)
            .entries
            .values()
            .filter(|e| e.record.state.is_terminal())
            .filter(|e| {
                e.record
                    .end_time
                    .unwrap_or(e.record.create_time)
                    .checked_add(retention)
                    .is_some_and(|until| until <= now)
            })
            .map(|e| e.record.id.clone())
            .collect();
        let mut removed = 0;
        for id in expired {
            let mut table = lock(&self.inner.table);
            if let Err(e) = lock(&self.inner.db).delete(&id) {
                tracing::warn!(sandbox_id = %id, error = %e, "delete record");
                continue;
            }
            table.remove(&id);
            drop(table);
            self.inner.sink.remove(&id);
            tracing::debug!(sandbox_id = %id, "record expired");
            removed += 1;
        }
        removed
    }

    fn spawn_gc(&self) {
        // A weak reference: the collector must not keep a dropped manager
        // (and its engine) alive.
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.config.gc_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let n = Manager { inner }.collect_garbage();
                if n > 0 {
                    tracing::info!(removed = n, "expired records collected");
                }
            }
        });
    }
}

/// Sort key and page token: creation time, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PageKey {
    create_ns: u128,
    id: String,
}

impl PageKey {
    fn of(r: &SandboxRecord) -> Self {
        Self {
            create_ns: r
                .create_time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            id: r.id.clone(),
        }
    }

    fn token(&self) -> String {
        format!("{}.{}", self.create_ns, self.id)
    }

    fn parse(token: &str) -> Option<Self> {
        let (ns, id) = token.split_once('.')?;
        sandpit_runtime::runtime::validate_id(id).ok()?;
        Some(Self {
            create_ns: ns.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

/// 12 random lowercase hex characters.
fn new_id() -> String {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    hex::encode(bytes)
}

/// The final state, reason and exit code for how a main process ended.
fn outcome(exit: &MainExit) -> (Option<i32>, State, String) {
    match exit {
        MainExit::Exited {
            status: ExitStatus::Code(0),
            ..
        } => (Some(0), State::Completed, String::new()),
        // The OOM killer may have picked a child: the main process then
        // fails with its status, but memory is what broke.
        MainExit::Exited {
            status: ExitStatus::Code(c),
            oom_kills,
        } if *oom_kills > 0 => (Some(*c), State::Failed, "out of memory".into()),
        MainExit::Exited {
            status: ExitStatus::Code(c),
            ..
        } => (
            Some(*c),
            State::Failed,
            format!("main process exited with code {c}"),
        ),
        MainExit::Exited {
            status: s @ ExitStatus::Signal(_),
            oom_kills,
        } if *oom_kills > 0 => (Some(s.shell_code()), State::Failed, "out of memory".into()),
        MainExit::Exited {
            status: s @ ExitStatus::Signal(sig),
            ..
        } => (
            Some(s.shell_code()),
            State::Failed,
            format!(
                "main process was killed by signal {sig} ({})",
                signal_name(*sig)
            ),
        ),
        MainExit::StartFailed(msg) => (
            None,
            State::Failed,
            format!("main command failed to start: {msg}"),
        ),
        MainExit::InitDied { oom_kills } if *oom_kills > 0 => {
            (None, State::Failed, "out of memory".into())
        }
        MainExit::InitDied { .. } => (None, State::Failed, "sandbox init process died".into()),
    }
}

fn signal_name(sig: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(sig).map_or("unknown", |s| s.as_str())
}

/// The main command, environment, working dir, files and limits of a
/// sandbox, from its image and the request (Kubernetes semantics: `command`
/// replaces the entrypoint, `args` the image's cmd).
pub fn launch_spec(image: &ImageInfo, req: &NewSandbox) -> LaunchSpec {
    let argv = match (&req.command, req.args.is_empty()) {
        (Some(c), _) => std::iter::once(c.clone())
            .chain(req.args.iter().cloned())
            .collect(),
        (None, false) => image
            .entrypoint
            .iter()
            .chain(req.args.iter())
            .cloned()
            .collect(),
        (None, true) => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        env.retain(|(existing, _)| existing != k);
        env.push((k.to_owned(), v.to_owned()));
    };
    for kv in &image.env {
        match kv.split_once('=') {
            Some((k, v)) => set(k, v),
            None => set(kv, ""),
        }
    }
    for (k, v) in &req.env {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let cwd = req
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());
    LaunchSpec {
        lower_dirs: image.lower_dirs.clone(),
        layers: image.layers.clone(),
        argv,
        env,
        cwd,
        files: req.files.clone(),
        limits: req.limits,
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
