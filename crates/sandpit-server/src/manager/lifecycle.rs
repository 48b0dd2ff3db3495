//! The lifecycle as a type: every change of a sandbox's state is a
//! [`Transition`], and [`apply`] is the one function that decides whether it
//! applies to a record and what it changes. It is pure (no clock, no I/O):
//! the manager persists and publishes what it returns, and a table test
//! covers every (state, transition) pair.
//!
//! Terminal states (COMPLETED, FAILED, TERMINATED) are final: every
//! transition is refused there, so no late event (a watcher, a timer, a
//! second stop) can rewrite how a sandbox ended.

use std::fmt;
use std::time::SystemTime;

use sandpit_wire::ExitStatus;

use crate::engine::MainExit;
use crate::model::{SandboxRecord, State};

/// Exit code a shell reports for a process killed by SIGKILL.
const SIGKILL_CODE: i32 = 128 + 9;

/// Something that happened to a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Its image is in the store: the engine starts creating it.
    BeginCreate,
    /// The engine created it and its main command started.
    Started {
        /// When it started running.
        at: SystemTime,
    },
    /// A restarted daemon found it running while its record still says it
    /// was being created (the daemon died before recording the start).
    Adopted {
        /// When the daemon found it.
        at: SystemTime,
    },
    /// A stop was asked for: by a request, a purge or its lifetime.
    Stop {
        /// Why (kept as the state reason).
        reason: String,
    },
    /// Creating it failed (image store, pull, engine, main command).
    StartFailed {
        /// What broke.
        reason: String,
        /// When.
        at: SystemTime,
    },
    /// Its stopper is about to SIGKILL a main process that outlived the
    /// grace period: recorded first, because the watcher may record the
    /// death before the stopper returns.
    KillRecorded,
    /// The engine released it after a stop.
    Stopped {
        /// When.
        at: SystemTime,
    },
    /// Its main process ended (or its init died).
    Exited {
        /// How, as [`outcome`] reads it.
        outcome: ExitOutcome,
        /// When.
        at: SystemTime,
    },
    /// A restarted daemon found nothing of it.
    Vanished {
        /// When.
        at: SystemTime,
    },
}

impl Transition {
    /// The transition's name in logs and in ARCHITECTURE.md's table.
    pub fn name(&self) -> &'static str {
        match self {
            Transition::BeginCreate => "begin-create",
            Transition::Started { .. } => "started",
            Transition::Adopted { .. } => "adopted",
            Transition::Stop { .. } => "stop",
            Transition::StartFailed { .. } => "start-failed",
            Transition::KillRecorded => "kill-recorded",
            Transition::Stopped { .. } => "stopped",
            Transition::Exited { .. } => "exited",
            Transition::Vanished { .. } => "vanished",
        }
    }
}

/// Why a transition does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{transition} does not apply to a {state} sandbox")]
pub struct Refused {
    /// The transition's name.
    pub transition: &'static str,
    /// The state it found.
    pub state: State,
}

/// How a main process ended, as the record keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitOutcome {
    /// Shell-style exit code, when there is one.
    pub exit_code: Option<i32>,
    /// COMPLETED or FAILED.
    pub state: State,
    /// Empty for COMPLETED; what went wrong otherwise.
    pub reason: String,
}

/// The final state, reason and exit code for how a main process ended.
pub fn outcome(exit: &MainExit) -> ExitOutcome {
    let (exit_code, state, reason) = match exit {
        MainExit::Exited {
            status: ExitStatus::Code(0),
            ..
        } => (Some(0), State::Completed, String::new()),
        // The OOM killer may have picked a child: the main process then
        // fails with its status, but memory is what broke.
        MainExit::Exited { status, oom_kills } if *oom_kills > 0 => (
            Some(status.shell_code()),
            State::Failed,
            "out of memory".into(),
        ),
        MainExit::Exited {
            status: ExitStatus::Code(c),
            ..
        } => (
            Some(*c),
            State::Failed,
            format!("main process exited with code {c}"),
        ),
        MainExit::Exited {
            status: s @ ExitStatus::Signal(sig),
            ..
        } => (
            Some(s.shell_code()),
            State::Failed,
            format!(
                "main process was killed by signal {} ({})",
                sig.number(),
                sig.name()
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
    };
    ExitOutcome {
        exit_code,
        state,
        reason,
    }
}

/// Applies `t` to `r`, or refuses it (leaving `r` untouched).
pub fn apply(r: &mut SandboxRecord, t: Transition) -> Result<(), Refused> {
    use State::*;
    let refused = Refused {
        transition: t.name(),
        state: r.state,
    };
    if r.state.is_terminal() {
        return Err(refused);
    }
    match (r.state, t) {
        (Pending, Transition::BeginCreate) => r.state = Creating,
        (Creating, Transition::Started { at }) => {
            r.state = Running;
            r.start_time = Some(at);
        }
        (Pending | Creating, Transition::Adopted { at }) => {
            r.state = Running;
            r.start_time = Some(at);
        }
        (Pending | Creating | Running, Transition::Stop { reason }) => {
            r.state = Terminating;
            r.state_reason = reason;
        }
        (Pending | Creating, Transition::StartFailed { reason, at }) => {
            r.state = Failed;
            r.state_reason = reason;
            r.end_time = Some(at);
        }
        // Stopped while it was being created: the stop's reason stays.
        (Terminating, Transition::StartFailed { at, .. }) => {
            r.state = Terminated;
            r.end_time = Some(at);
        }
        (Terminating, Transition::KillRecorded) if r.exit_code.is_none() => {
            r.exit_code = Some(SIGKILL_CODE);
        }
        (Terminating, Transition::Stopped { at }) => {
            r.state = Terminated;
            r.end_time = Some(at);
        }
        (Running, Transition::Exited { outcome, at }) => {
            r.state = outcome.state;
            r.state_reason = outcome.reason;
            r.exit_code = outcome.exit_code;
            r.end_time = Some(at);
        }
        // Being stopped: the stop's reason stays; the process's own code
        // wins over the SIGKILL code recorded by the stopper.
        (Terminating, Transition::Exited { outcome, at }) => {
            r.state = Terminated;
            r.exit_code = outcome.exit_code.or(r.exit_code);
            r.end_time = Some(at);
        }
        (Pending | Creating, Transition::Vanished { at }) => {
            r.state = Failed;
            r.state_reason = "creation was interrupted by a sandpitd restart".into();
            r.end_time = Some(at);
        }
        (Running, Transition::Vanished { at }) => {
            r.state = Failed;
            r.state_reason = "sandbox vanished while sandpitd was down".into();
            r.end_time = Some(at);
        }
        (Terminating, Transition::Vanished { at }) => {
            r.state = Terminated;
            r.end_time = Some(at);
        }
        _ => return Err(refused),
    }
    Ok(())
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
