//! What runs in the background: per running sandbox a watcher (waits for
//! its main process to end, without polling) and a lifetime timer; once per
//! manager the retention garbage collector.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tracing::Instrument;

use super::{lifecycle, lock, span, Inner, Manager, Transition};
use crate::db::DbError;
use crate::engine::{Engine, MainExit};
use crate::model::SandboxId;

impl<E: Engine> Manager<E> {
    pub(super) fn spawn_watcher(&self, id: &SandboxId) {
        let this = self.clone();
        let id = id.clone();
        let span = span(&id);
        tokio::spawn(
            async move {
                let exit = this
                    .inner
                    .engine
                    .wait_exit(&id, this.inner.logs.clone())
                    .await;
                this.on_exit(&id, exit).await;
            }
            .instrument(span),
        );
    }

    /// Records how the main process ended and releases the engine's
    /// resources; the record stays.
    pub(super) async fn on_exit(&self, id: &SandboxId, exit: MainExit) {
        let outcome = lifecycle::outcome(&exit);
        tracing::debug!(?exit, "main process ended");
        // Execs that lose the agent from now on went with the sandbox.
        self.inner.accounting.mark_ending(id);
        let usage = self.main_usage(id).await;
        self.record_main(id, &exit, usage);
        // Everything it printed is stored before its end is: a follower that
        // sees the end has seen all of it.
        self.inner.logs.finish(id).await;
        // Released before the terminal state is recorded: whoever sees a
        // terminal state can rely on nothing of the sandbox being left.
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(error = %crate::chain(&e), "destroy");
        }
        let at = self.now();
        if let Err(e) = self.commit(id, Transition::Exited { outcome, at }).await {
            tracing::error!(error = %crate::chain(&e), "record exit");
        }
    }

    pub(super) fn arm_timer(&self, id: &SandboxId, start: SystemTime, lifetime_seconds: u32) {
        let deadline = start + Duration::from_secs(lifetime_seconds.into());
        let wait = deadline
            .duration_since(self.now())
            .unwrap_or(Duration::ZERO);
        let this = self.clone();
        let task_id = id.clone();
        let handle = tokio::spawn(
            async move {
                tokio::time::sleep(wait).await;
                let reason = format!("max lifetime of {lifetime_seconds} s exceeded");
                this.inner.accounting.mark_lifetime_expired(&task_id);
                let grace = this.inner.config.lifetime_grace;
                // A task of its own: reaching TERMINATED aborts this timer.
                tokio::spawn(
                    async move {
                        if let Err(e) = this.stop(&task_id, grace, reason).await {
                            tracing::warn!(error = %crate::chain(&e), "stop at end of lifetime");
                        }
                    }
                    .in_current_span(),
                );
            }
            .instrument(span(id)),
        );
        match lock(&self.inner.table).get_mut(id) {
            Some(e) => e.set_timer(handle.abort_handle()),
            None => handle.abort(),
        }
    }

    /// Deletes the records of sandboxes that ended longer than the retention
    /// period ago; returns how many.
    pub async fn collect_garbage(&self) -> usize {
        let now = self.now();
        let retention = self.inner.config.retention;
        let expired: Vec<SandboxId> = lock(&self.inner.table)
            .records()
            .filter(|r| r.state.is_terminal())
            .filter(|r| {
                r.end_time
                    .unwrap_or(r.create_time)
                    .checked_add(retention)
                    .is_some_and(|until| until <= now)
            })
            .map(|r| r.id.clone())
            .collect();
        let mut removed = 0;
        for id in expired {
            let (tx, rx) = oneshot::channel();
            let inner = Arc::clone(&self.inner);
            let gone = id.clone();
            // Forgotten in memory once the database forgot it: a restart in
            // between loads it again and collects it again.
            self.inner.records.delete(id.clone(), move |result| {
                if result.is_ok() {
                    lock(&inner.table).remove(&gone);
                    inner.accounting.remove(&gone);
                }
                let _ = tx.send(result);
            });
            if let Err(e) = rx.await.unwrap_or(Err(DbError::Stopped)) {
                tracing::warn!(sandbox_id = %id, error = %crate::chain(&e), "delete record");
                continue;
            }
            self.inner.logs.remove(&id).await;
            tracing::debug!(sandbox_id = %id, "record expired");
            removed += 1;
        }
        removed
    }

    pub(super) fn spawn_gc(&self) {
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
                let n = Manager::<E>::from_inner(inner).collect_garbage().await;
                if n > 0 {
                    tracing::info!(removed = n, "expired records collected");
                }
            }
        });
    }

    fn from_inner(inner: Arc<Inner<E>>) -> Self {
        Self { inner }
    }
}
