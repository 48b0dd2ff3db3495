//! Sandboxes whose start a startup probe gates. The engine created them and
//! their main command runs, but they stay CREATING (the client polls
//! through CREATING, and data-plane calls wait on it) until the probe,
//! which the agent runs inside the sandbox, decides: RUNNING once it
//! passes, FAILED with its last output when it fails. CreateSandbox does
//! not wait for that: a probe may take longer than the client waits for an
//! answer.
//!
//! The main output is followed from the start, so what the main command
//! printed while it was probed is kept, also when the probe fails. A stop
//! meanwhile ends it at once (TERMINATED); so does the sandbox's lifetime,
//! which bounds the wait. After a daemon restart the same wait resumes: the
//! agent keeps the probe's verdict (or is still probing).

use std::time::Duration;

use tracing::Instrument;

use super::{lifecycle, span, Applied, Manager, Transition};
use crate::engine::{Engine, MainExit};
use crate::model::{SandboxId, State};
use sandpit_wire::StartupState;

/// The most bytes of a probe's verdict kept as a reason: the agent already
/// bounds the output it reports, but it is not trusted to.
const MAX_REASON_BYTES: usize = 8 << 10;

/// How long the end of a sandbox we destroyed may take to reach the
/// watcher (its output drained, its init gone).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Which transition records a passed probe.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ready {
    /// A sandbox this daemon created: `started`.
    Started,
    /// One a restarted daemon found CREATING: `adopted`.
    Adopted,
}

/// How the wait for the probe ended.
enum Verdict {
    Passed,
    Failed(String),
    MainEnded(MainExit),
    /// Stopped (or ended otherwise) meanwhile.
    Left,
    LifetimeOver(u32),
}

/// A reason of at most [`MAX_REASON_BYTES`], cut at a character boundary.
fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// Why a main process that ended before its probe passed failed the start.
fn ended_early(exit: &MainExit) -> String {
    let why = match lifecycle::outcome(exit) {
        o if o.exit_code == Some(0) => "main process exited with code 0".to_owned(),
        o => o.reason,
    };
    format!("startup probe failed: {why} before the probe succeeded")
}

impl<E: Engine> Manager<E> {
    /// Waits for the probe of a created sandbox in a task of its own.
    pub(super) fn spawn_startup(&self, id: &SandboxId, ready: Ready) {
        let this = self.clone();
        let id = id.clone();
        let span = span(&id);
        tokio::spawn(
            async move {
                if let Err(e) = this.startup(&id, ready).await {
                    tracing::error!(error = %crate::chain(&e), "startup");
                }
            }
            .instrument(span),
        );
    }

    async fn probe_verdict(&self, id: &SandboxId) -> Verdict {
        let Some(agent) = self.inner.engine.agent(id) else {
            return Verdict::Failed("startup probe: the sandbox's agent is gone".into());
        };
        match agent.await_startup().await {
            Ok(StartupState::Ready) => Verdict::Passed,
            Ok(StartupState::Failed(why)) => {
                Verdict::Failed(bounded(format!("startup probe failed: {why}")))
            }
            Err(e) => Verdict::Failed(format!(
                "startup probe: lost the sandbox's agent: {}",
                crate::chain(&e)
            )),
        }
    }

    async fn startup(&self, id: &SandboxId, ready: Ready) -> Result<(), super::ManagerError> {
        let lifetime = self.current(id)?.max_lifetime_seconds;
        let mut changes = self.changes(id)?;
        let exit = self.inner.engine.wait_exit(id, self.inner.logs.clone());
        tokio::pin!(exit);
        let verdict = tokio::select! {
            v = self.probe_verdict(id) => v,
            e = &mut exit => Verdict::MainEnded(e),
            _ = changes.wait_for(|s| !matches!(s, State::Pending | State::Creating)) => {
                Verdict::Left
            }
            _ = tokio::time::sleep(Duration::from_secs(lifetime.into())) => {
                Verdict::LifetimeOver(lifetime)
            }
        };
        let at = self.now();
        match verdict {
            Verdict::Passed => {
                let t = match ready {
                    Ready::Started => Transition::Started { at },
                    Ready::Adopted => Transition::Adopted { at },
                };
                if let Applied::Changed { record, .. } = self.commit(id, t).await? {
                    tracing::info!("startup probe passed");
                    if let Ready::Started = ready {
                        crate::metrics::create_started(
                            at.duration_since(record.create_time).unwrap_or_default(),
                        );
                    }
                    self.arm_timer(id, at, record.max_lifetime_seconds);
                    let exit = exit.await;
                    self.on_exit(id, exit).await;
                    return Ok(());
                }
                // Stopped while the verdict was on its way.
                self.release(id, exit).await;
                self.end_stopped(id).await?;
            }
            Verdict::Failed(reason) => {
                self.release(id, exit).await;
                self.fail_start(id, reason).await?;
            }
            Verdict::MainEnded(e) => {
                self.inner.logs.finish(id).await;
                if let Err(e) = self.inner.engine.destroy(id).await {
                    tracing::warn!(error = %crate::chain(&e), "destroy");
                }
                self.fail_start(id, ended_early(&e)).await?;
            }
            Verdict::Left => {
                // The stopper waits for us to finish the job.
                self.release(id, exit).await;
                self.end_stopped(id).await?;
            }
            Verdict::LifetimeOver(seconds) => {
                let reason = format!("max lifetime of {seconds} s exceeded");
                self.commit(id, Transition::Stop { reason }).await?;
                self.release(id, exit).await;
                self.end_stopped(id).await?;
            }
        }
        Ok(())
    }

    /// Destroys a sandbox that never ran, letting its watcher store the
    /// output it still had in flight.
    async fn release(
        &self,
        id: &SandboxId,
        exit: std::pin::Pin<&mut impl std::future::Future<Output = MainExit>>,
    ) {
        if let Err(e) = self.inner.engine.destroy(id).await {
            tracing::warn!(error = %crate::chain(&e), "destroy");
        }
        if tokio::time::timeout(DRAIN_TIMEOUT, exit).await.is_err() {
            tracing::warn!("main output of a destroyed sandbox did not end");
        }
        self.inner.logs.finish(id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_wire::ExitStatus;

    #[test]
    fn reasons_are_bounded_at_a_character() {
        assert_eq!(bounded("short".into()), "short");
        let long = "é".repeat(MAX_REASON_BYTES);
        let b = bounded(long);
        assert!(b.len() <= MAX_REASON_BYTES + '…'.len_utf8());
        assert!(b.ends_with("é…"));
    }

    #[test]
    fn an_early_end_says_how_the_main_process_ended() {
        let exited = |c| MainExit::Exited {
            status: ExitStatus::Code(c),
            oom_kills: 0,
        };
        assert_eq!(
            ended_early(&exited(0)),
            "startup probe failed: main process exited with code 0 before the probe succeeded"
        );
        assert_eq!(
            ended_early(&exited(3)),
            "startup probe failed: main process exited with code 3 before the probe succeeded"
        );
        assert_eq!(
            ended_early(&MainExit::InitDied { oom_kills: 1 }),
            "startup probe failed: out of memory before the probe succeeded"
        );
    }
}

#[cfg(test)]
#[path = "startup_tests.rs"]
mod gated_tests;
