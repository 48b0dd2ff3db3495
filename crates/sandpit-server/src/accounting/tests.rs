//! Attribution, bounds and metrics of the accounting.

use std::time::{Duration, SystemTime};

use sandpit_wire::{ExitStatus, Signal};

use super::*;

fn sig(n: i32) -> Signal {
    Signal::new(n).unwrap()
}

#[test]
fn every_ending_is_attributed_precisely() {
    let exited = |s| Ending::Exited(s);
    // Exits and signals as the agent reported them.
    assert_eq!(
        attribute(&exited(ExitStatus::Code(3)), false, false),
        Outcome::Exited { code: 3 }
    );
    assert_eq!(
        attribute(&exited(ExitStatus::Signal(Signal::TERM)), false, false),
        Outcome::Signaled { signal: 15 }
    );
    assert_eq!(
        attribute(&exited(ExitStatus::Signal(Signal::KILL)), false, false),
        Outcome::Signaled { signal: 9 }
    );
    // SIGKILL while the cgroup counted an OOM kill; a shell's 137 too.
    assert_eq!(
        attribute(&exited(ExitStatus::Signal(Signal::KILL)), true, false),
        Outcome::OomKilled
    );
    assert_eq!(
        attribute(&exited(ExitStatus::Code(137)), true, false),
        Outcome::OomKilled
    );
    // Another signal, or a plain exit, is not the OOM killer's doing.
    assert_eq!(
        attribute(&exited(ExitStatus::Signal(sig(11))), true, false),
        Outcome::Signaled { signal: 11 }
    );
    assert_eq!(
        attribute(&exited(ExitStatus::Code(1)), true, false),
        Outcome::Exited { code: 1 }
    );
    // What the daemon knows.
    assert_eq!(
        attribute(&Ending::DeadlinePassed, false, false),
        Outcome::TimedOut
    );
    assert_eq!(
        attribute(&Ending::CallerGone, false, false),
        Outcome::Cancelled
    );
    assert_eq!(
        attribute(&Ending::AgentLost, false, true),
        Outcome::SandboxStopped
    );
    for e in [
        Ending::AgentLost,
        Ending::DaemonShutdown,
        Ending::SpawnFailed,
    ] {
        assert_eq!(
            attribute(&e, false, false),
            Outcome::InfrastructureError,
            "{e:?}"
        );
    }
    // A stop does not turn a reported exit into something else.
    assert_eq!(
        attribute(&exited(ExitStatus::Code(0)), false, true),
        Outcome::Exited { code: 0 }
    );
}

#[test]
fn outcome_names_are_the_documented_labels() {
    let all = [
        Outcome::Exited { code: 0 },
        Outcome::Signaled { signal: 1 },
        Outcome::OomKilled,
        Outcome::TimedOut,
        Outcome::SandboxStopped,
        Outcome::Cancelled,
        Outcome::InfrastructureError,
    ];
    let names: Vec<_> = all.iter().map(|o| o.name()).collect();
    assert_eq!(names, Outcome::NAMES);
}

#[test]
fn command_lines_are_cut_at_character_boundaries() {
    let long = "é".repeat(MAX_ARG_BYTES);
    let argv: Vec<String> = std::iter::repeat_n(long, MAX_ARGS + 3).collect();
    let cut = truncate_argv(&argv);
    assert_eq!(cut.len(), MAX_ARGS);
    assert!(cut
        .iter()
        .all(|a| a.len() == MAX_ARG_BYTES && a.chars().all(|c| c == 'é')));
    let odd = "a".to_string() + &"é".repeat(MAX_ARG_BYTES);
    assert_eq!(truncate_argv(&[odd])[0].len(), MAX_ARG_BYTES - 1);
}

fn record(id: &str, outcome: Outcome, usage: Option<CommandUsage>) -> CommandRecord {
    CommandRecord {
        id: id.into(),
        argv: vec!["x".into()],
        start_time: SystemTime::UNIX_EPOCH,
        end_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
        duration: Duration::from_secs(1),
        usage,
        outcome,
        exit_code: None,
        detail: String::new(),
    }
}

#[test]
fn records_are_bounded_per_sandbox_and_numbered_across_a_restart() {
    let a = SandboxId::parse("a").unwrap();
    let b = SandboxId::parse("b").unwrap();
    let acct = Accounting::default();
    for _ in 0..MAX_RECORDS + 2 {
        let id = acct.next_exec_id(&a);
        acct.push(&a, record(&id, Outcome::Exited { code: 0 }, None));
    }
    acct.push(&b, record("exec-1", Outcome::TimedOut, None));
    let kept = acct.list(&a);
    assert_eq!(kept.len(), MAX_RECORDS);
    assert_eq!(kept[0].id, "exec-3");
    // Loaded back (a restart), numbering goes on after the last.
    let stored: Vec<_> = kept.into_iter().map(|r| (a.clone(), r)).collect();
    let again = Accounting::load(stored);
    assert_eq!(again.next_exec_id(&a), format!("exec-{}", MAX_RECORDS + 3));
    assert_eq!(again.next_exec_id(&b), "exec-1");
    acct.remove(&a);
    assert!(acct.list(&a).is_empty());
    assert_eq!(acct.list(&b).len(), 1);
}

#[test]
fn records_round_trip_through_json() {
    let r = record(
        "main",
        Outcome::Signaled { signal: 15 },
        Some(CommandUsage {
            user_us: 1,
            sys_us: 2,
            max_rss_bytes: 3,
        }),
    );
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<CommandRecord>(&json).unwrap(), r);
}

fn gathered(name: &str) -> Vec<prometheus::proto::Metric> {
    prometheus::default_registry()
        .gather()
        .into_iter()
        .find(|f| f.name() == name)
        .map(|f| f.get_metric().to_vec())
        .unwrap_or_default()
}

fn count_of(outcome: &str) -> u64 {
    gathered("sandpit_commands_total")
        .iter()
        .find(|m| m.get_label().iter().any(|l| l.value() == outcome))
        .map_or(0, |m| m.get_counter().get_value() as u64)
}

#[test]
fn metrics_count_outcomes_and_observe_usage() {
    // Other tests of this process may observe too: compare before and after.
    let oom_before = count_of("oom_killed");
    let samples = |name| {
        gathered(name)
            .first()
            .map_or(0, |m| m.get_histogram().get_sample_count())
    };
    let cpu_before = samples("sandpit_command_cpu_seconds");
    let mem_before = samples("sandpit_command_peak_memory_bytes");
    metrics::observe(&record(
        "exec-1",
        Outcome::OomKilled,
        Some(CommandUsage {
            user_us: 2_000_000,
            sys_us: 500_000,
            max_rss_bytes: 64 << 20,
        }),
    ));
    metrics::observe(&record("exec-2", Outcome::Cancelled, None));
    assert!(count_of("oom_killed") > oom_before);
    assert!(samples("sandpit_command_cpu_seconds") > cpu_before);
    assert!(samples("sandpit_command_peak_memory_bytes") > mem_before);
    // Every outcome is exported, even at 0.
    for name in Outcome::NAMES {
        assert!(
            gathered("sandpit_commands_total")
                .iter()
                .any(|m| m.get_label().iter().any(|l| l.value() == name)),
            "{name}"
        );
    }
}
