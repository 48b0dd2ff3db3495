//! The life of a CreateSandbox in the manager: reserve the record
//! (idempotent per principal and request id), find or pull the image, have
//! the engine create the sandbox, start watching it.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use super::admission::{self, Misfit};
use super::pool::Pooled;
use super::startup::Ready;
use super::{lock, span, Applied, Manager, ManagerError, Transition, SETTLE_TIMEOUT};
use crate::db::DbError;
use crate::engine::{launch_spec, Engine, EngineError, ImageInfo};
use crate::model::{NewSandbox, Principal, SandboxId, SandboxRecord, State};

/// What [`Manager::reserve`] found.
enum Reserved {
    /// A new record, and the pooled sandbox it takes (its id is the
    /// record's).
    New(Box<SandboxRecord>, Option<Pooled>),
    Existing(SandboxId, watch::Receiver<State>),
}

impl<E: Engine> Manager<E> {
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
        // The pools' refiller waits while this runs.
        let _on_demand = self.inner.pools.on_demand();
        let arrived = std::time::Instant::now();
        let reserved = self.reserve(principal, &req).await;
        let reserve_us = arrived.elapsed().as_micros() as u64;
        if reserved.is_err() {
            crate::metrics::create_answered("refused");
        }
        let (record, pooled) = match reserved? {
            Reserved::New(record, pooled) => (*record, pooled),
            Reserved::Existing(id, rx) => {
                tracing::debug!(sandbox_id = %id, "idempotent create");
                return self.settled(&id, rx).await;
            }
        };
        tracing::info!(parent: &span(&record.id), principal = %principal, image = %record.image, pooled = pooled.is_some(), reserve_us, "create");
        let this = self.clone();
        let id = record.id.clone();
        let answer = self
            .detached(
                &record.id,
                async move { this.launch(&id, req, pooled).await },
            )
            .await;
        crate::metrics::create_answered(match &answer {
            Ok(r) => r.state.as_str(),
            Err(_) => "failed",
        });
        answer
    }

    /// The sandbox of an earlier request with the same id, or a new PENDING
    /// record, stored, if capacity allows.
    async fn reserve(
        &self,
        principal: &Principal,
        req: &NewSandbox,
    ) -> Result<Reserved, ManagerError> {
        let alloc = self.inner.config.allocatable;
        if alloc.disk_reserve_bytes > 0 {
            if let Some(free) = self.inner.engine.data_free_bytes() {
                if free < alloc.disk_reserve_bytes {
                    return Err(ManagerError::DiskLow {
                        free,
                        reserve: alloc.disk_reserve_bytes,
                    });
                }
            }
        }
        let reserved = {
            let mut table = lock(&self.inner.table);
            if let Some(rid) = &req.request_id {
                if let Some(id) = table.by_request(principal, rid).cloned() {
                    let rx = table.get(&id).expect("indexed ids exist").subscribe();
                    return Ok(Reserved::Existing(id, rx));
                }
            }
            let live = table.live();
            let max = self.inner.config.max_sandboxes;
            if live >= max {
                return Err(ManagerError::CapacityExhausted { live, max });
            }
            // Under the table's lock: two creates racing never both take
            // the last of it.
            admission::fit(&req.resources.requests, &table.committed(), &alloc).map_err(
                |m| match m {
                    Misfit::Ceiling {
                        resource,
                        requested,
                        allocatable,
                    } => ManagerError::ResourceCeiling {
                        resource,
                        requested,
                        allocatable,
                    },
                    Misfit::Exhausted {
                        resource,
                        requested,
                        available,
                        allocatable,
                    } => ManagerError::InsufficientCapacity {
                        resource,
                        requested,
                        available,
                        allocatable,
                    },
                },
            )?;
            // A pooled sandbox of this shape, if one is ready: its id is
            // the new sandbox's.
            let pooled = self.inner.pools.take(req);
            let id = match &pooled {
                Some(p) => p.id.clone(),
                None => loop {
                    let id = SandboxId::generate();
                    if table.get(&id).is_none() && !self.inner.pools.holds(&id) {
                        break id;
                    }
                },
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
                resources: req.resources,
                max_lifetime_seconds: self.lifetime_for(req.max_lifetime_seconds),
                spec_echo: req.spec_echo.clone(),
            };
            let version = table.insert_new(record.clone());
            let (tx, rx) = oneshot::channel();
            let inner = Arc::clone(&self.inner);
            let stored = record.clone();
            self.inner.records.put(record.clone(), move |result| {
                let mut table = lock(&inner.table);
                match &result {
                    Ok(()) => table.publish(&stored, version),
                    // Never seen by anyone: forget it (a retry waiting on it
                    // finds nothing).
                    Err(_) => table.remove(&stored.id),
                }
                let _ = tx.send(result);
            });
            (record, rx, pooled)
        };
        let (record, stored, pooled) = reserved;
        if let Err(e) = stored.await.unwrap_or(Err(DbError::Stopped)) {
            if let Some(p) = pooled {
                self.discard(&p.id).await;
            }
            return Err(e.into());
        }
        Ok(Reserved::New(Box::new(record), pooled))
    }

    /// PENDING -> CREATING -> RUNNING, or FAILED with what broke. An image
    /// missing from the local store is pulled in the background: the caller
    /// gets the PENDING record at once and the sandbox starts (or fails with
    /// the pull's reason) when the pull ends.
    async fn launch(
        &self,
        id: &SandboxId,
        req: NewSandbox,
        pooled: Option<Pooled>,
    ) -> Result<SandboxRecord, ManagerError> {
        let image = match self.inner.engine.image(&req.image).await {
            Ok(Some(image)) => image,
            found => {
                // The pool's image is gone from the store: so is the point
                // of its sandbox.
                if pooled.is_some() {
                    self.discard(id).await;
                }
                return match found {
                    Ok(_) => {
                        self.spawn_pull(id, req);
                        self.current(id)
                    }
                    Err(e) => self.fail_start(id, crate::chain(&e)).await,
                };
            }
        };
        self.start_from(id, &req, &image, pooled).await
    }

    fn spawn_pull(&self, id: &SandboxId, mut req: NewSandbox) {
        let this = self.clone();
        let id = id.clone();
        let span = span(&id);
        tokio::spawn(
            async move {
                tracing::info!(image = %req.image, "pulling");
                let started = std::time::Instant::now();
                let credentials = req.pull_credentials.take();
                let pulled = this.inner.engine.pull(&req.image, credentials).await;
                crate::metrics::pull_done(pulled.is_ok(), started.elapsed());
                let result = match pulled {
                    Ok(image) => {
                        tracing::info!(
                            image = %req.image,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "pulled"
                        );
                        this.start_from(&id, &req, &image, None).await
                    }
                    Err(failure) => this.fail_start(&id, failure.message).await,
                };
                if let Err(e) = result {
                    tracing::error!(error = %crate::chain(&e), "start after pull");
                }
            }
            .instrument(span),
        );
    }

    async fn start_from(
        &self,
        id: &SandboxId,
        req: &NewSandbox,
        image: &ImageInfo,
        mut pooled: Option<Pooled>,
    ) -> Result<SandboxRecord, ManagerError> {
        let spec = launch_spec(image, req);
        if pooled.as_ref().is_some_and(|p| p.layers != spec.layers) {
            // The tag moved since the sandbox was pooled.
            self.discard(id).await;
            pooled = None;
        }
        if !spec.argv.is_empty() {
            self.inner.accounting.set_main_argv(id, &spec.argv);
        }
        let gated = spec.startup_probe.is_some();
        let t0 = std::time::Instant::now();
        if let Applied::Refused(_) = self.commit(id, Transition::BeginCreate).await? {
            // Stopped while PENDING.
            if pooled.is_some() {
                self.discard(id).await;
            }
            return self.end_stopped(id).await;
        }
        let begin_us = t0.elapsed().as_micros() as u64;
        let claimed = pooled.is_some();
        let created = match pooled {
            Some(_) => self.claim(id, spec, image, req).await,
            None => self.inner.engine.create(id, spec).await,
        };
        // Where a create's time goes (`RUST_LOG=sandpit_server=debug`).
        tracing::debug!(
            begin_us,
            engine_us = t0.elapsed().as_micros() as u64 - begin_us,
            claimed,
            "create phases"
        );
        match created {
            // CREATING until the probe decides (see `startup`).
            Ok(()) if gated => {
                self.spawn_startup(id, Ready::Started);
                self.current(id)
            }
            Ok(()) => {
                let at = self.now();
                match self.commit(id, Transition::Started { at }).await? {
                    Applied::Changed { record, .. } => {
                        crate::metrics::create_started(
                            at.duration_since(record.create_time).unwrap_or_default(),
                        );
                        self.spawn_watcher(id);
                        self.arm_timer(id, at, record.max_lifetime_seconds);
                        Ok(record)
                    }
                    // Stopped while CREATING: nothing ran yet, no grace to
                    // give.
                    Applied::Refused(_) => {
                        if let Err(e) = self.inner.engine.destroy(id).await {
                            tracing::warn!(error = %crate::chain(&e), "destroy");
                        }
                        self.end_stopped(id).await
                    }
                }
            }
            // These say what they were doing themselves.
            Err(e @ (EngineError::StartFailed(_) | EngineError::Start(_))) => {
                self.fail_start(id, crate::chain(&e)).await
            }
            Err(e) => {
                self.fail_start(id, format!("start sandbox: {}", crate::chain(&e)))
                    .await
            }
        }
    }

    /// Hands pooled sandbox `id` its request. A claim that fails for the
    /// engine's reasons (its agent died, say) costs the caller nothing: the
    /// sandbox is made cold under the same id. One whose command cannot
    /// start fails the create as a cold start would (and the sandbox goes).
    async fn claim(
        &self,
        id: &SandboxId,
        spec: crate::engine::LaunchSpec,
        image: &ImageInfo,
        req: &NewSandbox,
    ) -> Result<(), EngineError> {
        match self.inner.engine.claim(id, spec).await {
            Ok(()) => Ok(()),
            Err(e @ EngineError::StartFailed(_)) => {
                self.discard(id).await;
                Err(e)
            }
            Err(e) => {
                tracing::warn!(error = %crate::chain(&e), "claim a pooled sandbox; creating it cold");
                self.discard(id).await;
                self.inner.engine.create(id, launch_spec(image, req)).await
            }
        }
    }

    /// A start-up failure: FAILED with `reason`, or TERMINATED if it was
    /// being stopped anyway.
    pub(super) async fn fail_start(
        &self,
        id: &SandboxId,
        reason: String,
    ) -> Result<SandboxRecord, ManagerError> {
        tracing::warn!(sandbox_id = %id, %reason, "start failed");
        let at = self.now();
        match self
            .commit(id, Transition::StartFailed { reason, at })
            .await?
        {
            Applied::Changed { record, .. } => Ok(record),
            Applied::Refused(r) => self.after_refusal(id, r).await,
        }
    }

    /// TERMINATING -> TERMINATED (keeping the reason set when stopping began).
    pub(super) async fn end_stopped(&self, id: &SandboxId) -> Result<SandboxRecord, ManagerError> {
        let at = self.now();
        match self.commit(id, Transition::Stopped { at }).await? {
            Applied::Changed { record, .. } => Ok(record),
            Applied::Refused(r) => self.after_refusal(id, r).await,
        }
    }

    /// The record to answer with when a transition found the sandbox
    /// elsewhere: once its end is published if it ended (someone else's
    /// change may still be being stored), as it is otherwise.
    pub(super) async fn after_refusal(
        &self,
        id: &SandboxId,
        refused: super::Refused,
    ) -> Result<SandboxRecord, ManagerError> {
        if refused.state.is_terminal() {
            self.wait_terminal(id, SETTLE_TIMEOUT).await
        } else {
            self.current(id)
        }
    }
}
