//! The manager's side of per-command accounting ([`crate::accounting`]):
//! an exec's account from its start to its end (recorded even when the
//! call is dropped midway), the main process's record when it ended, and
//! the records' reading.

use std::time::{Duration, Instant, SystemTime};

use sandpit_wire::Usage;

use super::{lock, Manager, ManagerError};
use crate::accounting::{
    self, attribute, truncate_argv, Accounting, CommandRecord, Ending, Outcome, MAIN_ID,
};
use crate::db::RecordWriter;
use crate::engine::{Engine, MainExit};
use crate::model::{Principal, SandboxId, State};

/// How long the main process's usage may take to come from the agent.
const MAIN_USAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// A caller that goes away this close to its deadline (or later) left
/// because of it: its clock fires about when ours does, and its
/// cancellation often arrives first.
const DEADLINE_SLACK: Duration = Duration::from_millis(500);

/// Where records go: memory, metrics, and the database.
#[derive(Debug, Clone)]
struct Recorder {
    accounting: Accounting,
    records: RecordWriter,
}

impl Recorder {
    fn record(&self, id: &SandboxId, r: CommandRecord) {
        tracing::debug!(command = %r.id, outcome = r.outcome.name(), "command ended");
        accounting::metrics::observe(&r);
        self.records.put_command(id.clone(), &r);
        self.accounting.push(id, r);
    }
}

/// An exec on its way. [`Manager::exec_end`] records how it ended; dropped
/// unrecorded (the call's future was dropped: the caller went away), it
/// records a cancellation.
#[derive(Debug)]
pub struct ExecAccount {
    recorder: Recorder,
    sandbox: SandboxId,
    argv: Vec<String>,
    start_time: SystemTime,
    started: Instant,
    oom_before: Option<u64>,
    deadline: Option<Instant>,
    done: bool,
}

impl ExecAccount {
    /// The call's deadline: a caller gone near it timed out.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// A caller gone near its deadline timed out.
    fn deadline_or(&self, ending: Ending) -> Ending {
        match ending {
            Ending::CallerGone
                if self
                    .deadline
                    .is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d) =>
            {
                Ending::DeadlinePassed
            }
            other => other,
        }
    }

    /// Drops the account without a record (the command never ran).
    pub fn discard(mut self) {
        self.done = true;
    }

    fn finish(
        &mut self,
        outcome: Outcome,
        usage: Option<Usage>,
        exit_code: Option<i32>,
        detail: String,
    ) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let record = CommandRecord {
            id: self.recorder.accounting.next_exec_id(&self.sandbox),
            argv: std::mem::take(&mut self.argv),
            start_time: self.start_time,
            end_time: SystemTime::now(),
            duration: self.started.elapsed(),
            usage: usage.map(Into::into),
            outcome,
            exit_code,
            detail,
        };
        self.recorder.record(&self.sandbox, record);
    }
}

impl Drop for ExecAccount {
    fn drop(&mut self) {
        let outcome = attribute(&self.deadline_or(Ending::CallerGone), false, false);
        self.finish(outcome, None, None, "the call was dropped".into());
    }
}

impl<E: Engine> Manager<E> {
    /// The command records.
    pub fn accounting(&self) -> &Accounting {
        &self.inner.accounting
    }

    fn recorder(&self) -> Recorder {
        Recorder {
            accounting: self.inner.accounting.clone(),
            records: self.inner.records.clone(),
        }
    }

    /// Starts accounting for an exec of `argv` in sandbox `id`, about to
    /// be started.
    pub fn exec_begin(&self, id: &SandboxId, argv: &[String]) -> ExecAccount {
        ExecAccount {
            recorder: self.recorder(),
            sandbox: id.clone(),
            argv: truncate_argv(argv),
            start_time: SystemTime::now(),
            started: Instant::now(),
            oom_before: self.inner.engine.oom_kills(id),
            deadline: None,
            done: false,
        }
    }

    /// Records how an exec ended: `exit_code` is what its caller was given,
    /// `detail` a short explanation.
    pub fn exec_end(
        &self,
        account: &mut ExecAccount,
        ending: Ending,
        usage: Option<Usage>,
        exit_code: Option<i32>,
        detail: String,
    ) {
        let id = account.sandbox.clone();
        let ending = account.deadline_or(ending);
        let oom_rose = match (account.oom_before, self.inner.engine.oom_kills(&id)) {
            (Some(before), Some(after)) => after > before,
            _ => false,
        };
        let ended = self.inner.accounting.is_ending(&id)
            || lock(&self.inner.table)
                .get(&id)
                .is_none_or(|e| e.latest().state != State::Running);
        let outcome = attribute(&ending, oom_rose, ended);
        let exit_code = exit_code.or(match ending {
            Ending::Exited(s) => Some(s.shell_code()),
            _ => None,
        });
        account.finish(outcome, usage, exit_code, detail);
    }

    /// The caller's sandbox's command records, oldest first.
    pub fn list_commands(
        &self,
        principal: &Principal,
        id: &SandboxId,
    ) -> Result<Vec<CommandRecord>, ManagerError> {
        self.get(principal, id)?;
        Ok(self.inner.accounting.list(id))
    }

    /// What the main process used, asked before the engine releases the
    /// sandbox (`None`: no agent, or it has no answer).
    pub(super) async fn main_usage(&self, id: &SandboxId) -> Option<Usage> {
        let agent = self.inner.engine.agent(id)?;
        match tokio::time::timeout(MAIN_USAGE_TIMEOUT, agent.main_usage()).await {
            Ok(Ok(u)) => Some(u),
            _ => None,
        }
    }

    /// Records how the main process ended. A sandbox without a main command
    /// (its init died) has none to record.
    pub(super) fn record_main(&self, id: &SandboxId, exit: &MainExit, usage: Option<Usage>) {
        let acct = &self.inner.accounting;
        let argv = acct.main_argv(id);
        if matches!(exit, MainExit::InitDied { .. }) && argv.as_ref().is_none_or(Vec::is_empty) {
            return;
        }
        let (start_time, stop) = {
            let table = lock(&self.inner.table);
            let latest = table.get(id).map(|e| e.latest().clone());
            match latest {
                Some(r) => (
                    r.start_time.unwrap_or(r.create_time),
                    (r.state == State::Terminating).then_some(r.state_reason),
                ),
                None => return,
            }
        };
        let (ending, detail, exit_code) = match exit {
            MainExit::Exited { status, .. } => (
                Ending::Exited(*status),
                String::new(),
                Some(status.shell_code()),
            ),
            MainExit::StartFailed(msg) => (Ending::SpawnFailed, msg.clone(), None),
            MainExit::InitDied { .. } => {
                (Ending::AgentLost, "sandbox init process died".into(), None)
            }
        };
        let oom_rose = match exit {
            MainExit::Exited { oom_kills, .. } | MainExit::InitDied { oom_kills } => *oom_kills > 0,
            MainExit::StartFailed(_) => false,
        };
        let (outcome, detail) = match stop {
            Some(reason) if acct.lifetime_expired(id) => (Outcome::TimedOut, reason),
            Some(reason) => (Outcome::SandboxStopped, reason),
            None => (attribute(&ending, oom_rose, false), detail),
        };
        let end_time = SystemTime::now();
        let record = CommandRecord {
            id: MAIN_ID.into(),
            argv: argv.unwrap_or_default(),
            start_time,
            end_time,
            duration: end_time.duration_since(start_time).unwrap_or_default(),
            usage: usage.map(Into::into),
            outcome,
            exit_code,
            detail,
        };
        self.recorder().record(id, record);
    }
}
