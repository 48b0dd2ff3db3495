//! Per-command accounting: for every exec and the main process of a
//! sandbox, its CPU time, peak memory and how it ended.
//!
//! The agent reaps each process with `wait4` and reports its usage after
//! the exit ([`sandpit_wire::Usage`]); the daemon knows what the agent
//! cannot (a deadline it enforced, a caller gone, a stop, a lost agent) and
//! the engine counts OOM kills in the sandbox's memory cgroup. [`attribute`]
//! combines them into one [`Outcome`]. Records are kept per sandbox, the
//! last [`MAX_RECORDS`] ([`Accounting`]), stored with the sandbox's record
//! in the daemon's database and removed with it; [`metrics`] counts them.
//! See `docs/ops/accounting.md`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use sandpit_wire::{ExitStatus, Signal, Usage};
use serde::{Deserialize, Serialize};

use crate::model::SandboxId;

pub mod metrics;
#[cfg(test)]
mod tests;

/// Records kept per sandbox: the oldest exec's goes first (the main
/// process's too, once it is the oldest).
pub const MAX_RECORDS: usize = 1000;
/// Arguments of a command line kept in its record.
pub const MAX_ARGS: usize = 32;
/// Bytes kept of each argument (cut at a character boundary).
pub const MAX_ARG_BYTES: usize = 256;
/// The id of the main process's record.
pub const MAIN_ID: &str = "main";

/// How a command ended, as far as anyone can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// It exited by itself with this code.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// A signal killed it, not the OOM killer.
    Signaled {
        /// The signal's number.
        signal: i32,
    },
    /// It died of SIGKILL (or a shell reported 137 for its child) while the
    /// sandbox's memory cgroup counted an OOM kill.
    OomKilled,
    /// Its timeout passed (an exec's call deadline, the main process's
    /// lifetime) and the daemon killed it.
    TimedOut,
    /// The sandbox was stopped, deleted or ended while it ran.
    SandboxStopped,
    /// The caller went away and the daemon killed it.
    Cancelled,
    /// It could not start, the agent was lost, or the daemon shut down.
    InfrastructureError,
}

impl Outcome {
    /// The label of metrics and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Exited { .. } => "exited",
            Outcome::Signaled { .. } => "signaled",
            Outcome::OomKilled => "oom_killed",
            Outcome::TimedOut => "timed_out",
            Outcome::SandboxStopped => "sandbox_stopped",
            Outcome::Cancelled => "cancelled",
            Outcome::InfrastructureError => "infrastructure_error",
        }
    }

    /// Every outcome's label.
    pub const NAMES: [&'static str; 7] = [
        "exited",
        "signaled",
        "oom_killed",
        "timed_out",
        "sandbox_stopped",
        "cancelled",
        "infrastructure_error",
    ];
}

/// How a command's run ended, from where the daemon stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The agent reported its exit.
    Exited(ExitStatus),
    /// The daemon's deadline for it passed (the daemon killed it).
    DeadlinePassed,
    /// The caller went away (the daemon killed it).
    CallerGone,
    /// The daemon shut down under it.
    DaemonShutdown,
    /// The agent's connection broke before the exit.
    AgentLost,
    /// It could not be started.
    SpawnFailed,
}

/// The outcome of a command that ended as `ending`; `oom_rose`: the
/// sandbox's OOM kill count grew while it ran; `sandbox_ended`: the
/// sandbox was being stopped or had ended when the command's end was seen.
pub fn attribute(ending: &Ending, oom_rose: bool, sandbox_ended: bool) -> Outcome {
    match ending {
        Ending::Exited(ExitStatus::Signal(s)) if *s == Signal::KILL && oom_rose => {
            Outcome::OomKilled
        }
        // A shell's report of its child's SIGKILL.
        Ending::Exited(ExitStatus::Code(137)) if oom_rose => Outcome::OomKilled,
        Ending::Exited(ExitStatus::Code(code)) => Outcome::Exited { code: *code },
        Ending::Exited(ExitStatus::Signal(s)) => Outcome::Signaled { signal: s.number() },
        Ending::DeadlinePassed => Outcome::TimedOut,
        Ending::CallerGone => Outcome::Cancelled,
        // The agent dies with its sandbox: a lost agent is a stop then.
        Ending::AgentLost if sandbox_ended => Outcome::SandboxStopped,
        Ending::AgentLost | Ending::DaemonShutdown | Ending::SpawnFailed => {
            Outcome::InfrastructureError
        }
    }
}

/// One command's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// [`MAIN_ID`], or `exec-N` (the sandbox's N-th exec, from 1).
    pub id: String,
    /// The command line, cut to [`MAX_ARGS`] of [`MAX_ARG_BYTES`].
    pub argv: Vec<String>,
    /// When it was started.
    pub start_time: SystemTime,
    /// When its end was seen.
    pub end_time: SystemTime,
    /// From start to end (monotonic).
    pub duration: Duration,
    /// What it used, when the agent reported it.
    pub usage: Option<CommandUsage>,
    /// How it ended.
    pub outcome: Outcome,
    /// The exit code the caller was given, if any.
    pub exit_code: Option<i32>,
    /// A short explanation (infrastructure errors, stops).
    pub detail: String,
}

/// What a command used ([`Usage`] as records keep it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandUsage {
    /// CPU time in user mode, microseconds.
    pub user_us: u64,
    /// CPU time in kernel mode, microseconds.
    pub sys_us: u64,
    /// The largest resident set of one process among it and the
    /// descendants it waited for, bytes.
    pub max_rss_bytes: u64,
}

impl From<Usage> for CommandUsage {
    fn from(u: Usage) -> Self {
        Self {
            user_us: u.user_us,
            sys_us: u.sys_us,
            max_rss_bytes: u.max_rss_bytes,
        }
    }
}

impl CommandUsage {
    /// User plus system CPU time, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        (self.user_us.saturating_add(self.sys_us)) as f64 / 1e6
    }
}

/// A command line as its record keeps it.
pub fn truncate_argv(argv: &[String]) -> Vec<String> {
    argv.iter()
        .take(MAX_ARGS)
        .map(|a| {
            let mut end = a.len().min(MAX_ARG_BYTES);
            while !a.is_char_boundary(end) {
                end -= 1;
            }
            a[..end].to_owned()
        })
        .collect()
}

#[derive(Debug, Default)]
struct Sandbox {
    records: VecDeque<CommandRecord>,
    /// Execs numbered so far.
    execs: u64,
    /// The sandbox is being stopped or its main process ended: an agent
    /// lost now went with it.
    ending: bool,
    /// Its lifetime ran out (the stop that follows is a timeout).
    lifetime: bool,
    /// The main command line, from its launch.
    main_argv: Option<Vec<String>>,
}

/// The command records of every sandbox, in memory. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Accounting {
    sandboxes: Arc<Mutex<HashMap<SandboxId, Sandbox>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn exec_number(id: &str) -> Option<u64> {
    id.strip_prefix("exec-")?.parse().ok()
}

impl Accounting {
    /// Records as stored, oldest first per sandbox (a restart).
    pub fn load(stored: Vec<(SandboxId, CommandRecord)>) -> Self {
        let this = Self::default();
        {
            let mut all = lock(&this.sandboxes);
            for (id, r) in stored {
                let sb = all.entry(id).or_default();
                if let Some(n) = exec_number(&r.id) {
                    sb.execs = sb.execs.max(n);
                }
                if r.id == MAIN_ID {
                    sb.ending = true;
                }
                sb.records.push_back(r);
                if sb.records.len() > MAX_RECORDS {
                    sb.records.pop_front();
                }
            }
        }
        this
    }

    /// The next exec's record id in sandbox `id`.
    pub fn next_exec_id(&self, id: &SandboxId) -> String {
        let mut all = lock(&self.sandboxes);
        let sb = all.entry(id.clone()).or_default();
        sb.execs += 1;
        format!("exec-{}", sb.execs)
    }

    /// Adds a record, dropping the oldest beyond [`MAX_RECORDS`].
    pub fn push(&self, id: &SandboxId, record: CommandRecord) {
        let mut all = lock(&self.sandboxes);
        let sb = all.entry(id.clone()).or_default();
        sb.records.push_back(record);
        if sb.records.len() > MAX_RECORDS {
            sb.records.pop_front();
        }
    }

    /// The records of sandbox `id`, oldest first.
    pub fn list(&self, id: &SandboxId) -> Vec<CommandRecord> {
        lock(&self.sandboxes)
            .get(id)
            .map(|sb| sb.records.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets sandbox `id` (its record was deleted).
    pub fn remove(&self, id: &SandboxId) {
        lock(&self.sandboxes).remove(id);
    }

    /// Notes that sandbox `id` is being stopped or ended.
    pub fn mark_ending(&self, id: &SandboxId) {
        lock(&self.sandboxes).entry(id.clone()).or_default().ending = true;
    }

    /// Whether [`Accounting::mark_ending`] was called for `id`.
    pub fn is_ending(&self, id: &SandboxId) -> bool {
        lock(&self.sandboxes).get(id).is_some_and(|sb| sb.ending)
    }

    /// Notes that sandbox `id` is stopped because its lifetime ran out.
    pub fn mark_lifetime_expired(&self, id: &SandboxId) {
        let mut all = lock(&self.sandboxes);
        let sb = all.entry(id.clone()).or_default();
        sb.lifetime = true;
        sb.ending = true;
    }

    /// Whether [`Accounting::mark_lifetime_expired`] was called for `id`.
    pub fn lifetime_expired(&self, id: &SandboxId) -> bool {
        lock(&self.sandboxes).get(id).is_some_and(|sb| sb.lifetime)
    }

    /// Keeps the main command line of sandbox `id` for its record.
    pub fn set_main_argv(&self, id: &SandboxId, argv: &[String]) {
        lock(&self.sandboxes)
            .entry(id.clone())
            .or_default()
            .main_argv = Some(truncate_argv(argv));
    }

    /// The main command line, when this daemon launched it (`None` after
    /// a restart, or for a sandbox without a main command).
    pub fn main_argv(&self, id: &SandboxId) -> Option<Vec<String>> {
        lock(&self.sandboxes).get(id)?.main_argv.clone()
    }
}
