//! Stopping sandboxes: DeleteSandbox, purges and the end of a lifetime all
//! come here. SIGTERM to the main process, a grace period for it to exit,
//! then everything is killed and the engine releases the sandbox.

use std::time::Duration;

use tracing::Instrument;

use sandpit_wire::Signal;

use super::listing::PageKey;
use super::{lock, span, Applied, Manager, ManagerError, Transition, SETTLE_TIMEOUT};
use crate::engine::Engine;
use crate::model::{Principal, SandboxId, SandboxRecord, State};

/// Extra time a second stop waits beyond its grace for the first to finish.
const STOP_SLACK: Duration = Duration::from_secs(5);

/// What a purge did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Sandboxes stopped (or that would be).
    pub count: usize,
    /// Sandboxes whose stop failed.
    pub failed: Vec<SandboxId>,
}

impl<E: Engine> Manager<E> {
    /// Stops the caller's sandbox: SIGTERM to the main process, up to
    /// `grace` for it to exit, then everything is killed. Returns once the
    /// sandbox is terminal, or after the grace period. A sandbox that already
    /// ended stays as it is. `Ok(None)`: missing and `allow_missing`.
    pub async fn delete(
        &self,
        principal: &Principal,
        id: &SandboxId,
        grace: Duration,
        allow_missing: bool,
    ) -> Result<Option<SandboxRecord>, ManagerError> {
        match self.get(principal, id) {
            Ok(_) => {}
            Err(ManagerError::NotFound(_)) if allow_missing => return Ok(None),
            Err(e) => return Err(e),
        }
        let this = self.clone();
        let owned = id.clone();
        self.detached(id, async move {
            this.stop(&owned, grace, "stopped by request".into()).await
        })
        .await
        .map(Some)
    }

    pub(super) async fn stop(
        &self,
        id: &SandboxId,
        grace: Duration,
        reason: String,
    ) -> Result<SandboxRecord, ManagerError> {
        // Execs that lose the agent from now on went with the sandbox.
        self.inner.accounting.mark_ending(id);
        match self.commit(id, Transition::Stop { reason }).await? {
            // Ended already.
            Applied::Refused(r) if r.state.is_terminal() => self.after_refusal(id, r).await,
            // Someone else is stopping it.
            Applied::Refused(_) => self.wait_terminal(id, grace + STOP_SLACK).await,
            // Nothing was created yet (its image may be being pulled): the
            // launching task finds it terminal and starts nothing.
            Applied::Changed {
                before: State::Pending,
                ..
            } => self.end_stopped(id).await,
            // The creating task sees TERMINATING and finishes the job.
            Applied::Changed {
                before: State::Creating,
                ..
            } => self.wait_terminal(id, SETTLE_TIMEOUT).await,
            Applied::Changed { .. } => self.kill_after_grace(id, grace).await,
        }
    }

    pub(super) async fn kill_after_grace(
        &self,
        id: &SandboxId,
        grace: Duration,
    ) -> Result<SandboxRecord, ManagerError> {
        let mut phases = sandpit_runtime::phases::Phases::start("stop");
        let mut rx = self.changes(id)?;
        // Without a main process to signal (none, or gone) there is nothing
        // to wait for.
        let signalled = match self.inner.engine.signal_main(id, Signal::TERM).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %crate::chain(&e), "SIGTERM not delivered");
                false
            }
        };
        phases.mark("sigterm");
        if signalled && !grace.is_zero() {
            let ended = tokio::time::timeout(grace, rx.wait_for(|s| s.is_terminal())).await;
            if matches!(ended, Ok(Ok(_))) {
                return self.current(id);
            }
            tracing::info!(grace_s = grace.as_secs_f64(), "grace period over, killing");
        }
        if signalled {
            // A main process still running dies of SIGKILL: reported the
            // way a shell (and the client) expects. Refused when the main
            // process reported its own end meanwhile.
            self.commit(id, Transition::KillRecorded).await?;
        }
        phases.mark("kill_recorded");
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(error = %crate::chain(&e), "destroy");
        }
        phases.mark("destroy");
        let ended = self.end_stopped(id).await;
        phases.mark("end_stopped");
        phases.log(id);
        ended
    }

    /// Stops every live sandbox of the caller that carries all `tags` (any
    /// when `tags` is empty), or only counts them with `dry_run`.
    pub async fn purge(
        &self,
        principal: &Principal,
        tags: &[String],
        dry_run: bool,
    ) -> PurgeOutcome {
        let ids: Vec<SandboxId> = {
            let table = lock(&self.inner.table);
            let mut v: Vec<&SandboxRecord> = table
                .records()
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
        // Tasks of their own (not a JoinSet, which would abort them if this
        // call is cancelled): each stop runs to its end.
        let tasks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let this = self.clone();
                let task_span = span(&id);
                tokio::spawn(async move {
                    let r = this
                        .stop(&id, Duration::ZERO, "purged by request".into())
                        .instrument(task_span)
                        .await;
                    (id, r)
                })
            })
            .collect();
        let mut outcome = PurgeOutcome::default();
        for task in tasks {
            match task.await {
                Ok((_, Ok(_))) => outcome.count += 1,
                Ok((id, Err(e))) => {
                    tracing::warn!(sandbox_id = %id, error = %crate::chain(&e), "purge");
                    outcome.failed.push(id);
                }
                Err(e) => tracing::warn!(error = %e, "purge task"),
            }
        }
        outcome.failed.sort();
        outcome
    }
}
