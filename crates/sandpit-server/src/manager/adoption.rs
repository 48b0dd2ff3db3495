//! After a restart (also after `kill -9`): every record that was not
//! terminal is re-attached to what the engine still has of its sandbox,
//! before the daemon serves anyone.

use tracing::Instrument;

use super::startup::Ready;
use super::{span, Manager, ManagerError, Transition};
use crate::engine::{Adoption, Engine};
use crate::model::{SandboxRecord, State};

impl<E: Engine> Manager<E> {
    /// Re-attaches one non-terminal record after a restart; returns whether
    /// its sandbox still runs.
    pub(super) async fn adopt(&self, r: SandboxRecord) -> Result<bool, ManagerError> {
        let span = span(&r.id);
        self.adopt_in_span(r).instrument(span).await
    }

    async fn adopt_in_span(&self, r: SandboxRecord) -> Result<bool, ManagerError> {
        let id = r.id.clone();
        let adoption = self.inner.engine.adopt(&id).await;
        if adoption == Adoption::Exited && r.state == State::Running {
            // Its main process ended while the daemon was down: record the
            // real outcome (and drain its output) before serving, so that
            // no client sees it RUNNING after the restart.
            let exit = self
                .inner
                .engine
                .wait_exit(&id, self.inner.logs.clone())
                .await;
            self.on_exit(&id, exit).await;
            return Ok(false);
        }
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
                        // Created, but the daemon died before recording it
                        // started: RUNNING once its agent says the start is
                        // decided (at once without a startup probe; a probe
                        // in progress is waited for again).
                        self.spawn_startup(&id, Ready::Adopted);
                    }
                    State::Terminating => {
                        self.spawn_watcher(&id);
                        let this = self.clone();
                        let grace = self.inner.config.lifetime_grace;
                        tokio::spawn(
                            async move {
                                if let Err(e) = this.kill_after_grace(&id, grace).await {
                                    tracing::warn!(error = %crate::chain(&e), "resume stop");
                                }
                            }
                            .in_current_span(),
                        );
                    }
                    // Terminal records are not adopted.
                    State::Completed | State::Failed | State::Terminated => {}
                }
                Ok(true)
            }
            Adoption::Gone => {
                tracing::warn!(state = %r.state, "sandbox vanished while sandpitd was down");
                self.commit(&id, Transition::Vanished { at: now }).await?;
                Ok(false)
            }
        }
    }
}
