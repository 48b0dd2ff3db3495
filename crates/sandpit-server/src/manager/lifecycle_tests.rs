use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use sandpit_wire::Signal;

use super::*;
use crate::model::{Principal, ResourceSpec, SandboxId};

fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

fn record(state: State) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::parse("0123456789ab").unwrap(),
        principal: Principal("alice".into()),
        request_id: None,
        state,
        state_reason: String::new(),
        create_time: at(1),
        start_time: None,
        end_time: None,
        exit_code: None,
        image: "docker.io/library/python:3.11".into(),
        tags: vec![],
        annotations: BTreeMap::new(),
        display_name: String::new(),
        resources: ResourceSpec::default(),
        max_lifetime_seconds: 60,
        spec_echo: vec![],
    }
}

fn completed() -> ExitOutcome {
    ExitOutcome {
        exit_code: Some(0),
        state: State::Completed,
        reason: String::new(),
    }
}

fn failed() -> ExitOutcome {
    ExitOutcome {
        exit_code: Some(1),
        state: State::Failed,
        reason: "main process exited with code 1".into(),
    }
}

/// Every transition, in the order of ARCHITECTURE.md's table: one column
/// each, with an instance of each kind of its payload that leads elsewhere
/// (a main process that exits with 0 or not).
fn every_transition() -> Vec<Vec<Transition>> {
    vec![
        vec![Transition::BeginCreate],
        vec![Transition::Started { at: at(2) }],
        vec![Transition::Adopted { at: at(2) }],
        vec![Transition::Stop {
            reason: "stopped by request".into(),
        }],
        vec![Transition::StartFailed {
            reason: "start sandbox: boom".into(),
            at: at(3),
        }],
        vec![Transition::KillRecorded],
        vec![Transition::Stopped { at: at(3) }],
        vec![
            Transition::Exited {
                outcome: completed(),
                at: at(3),
            },
            Transition::Exited {
                outcome: failed(),
                at: at(3),
            },
        ],
        vec![Transition::Vanished { at: at(3) }],
    ]
}

fn name(s: State) -> String {
    s.as_str().to_uppercase()
}

/// Every (state, transition) pair: the state it leads to, or `-` when
/// refused. Rows are states, columns transitions, as in ARCHITECTURE.md.
const TABLE: &[(State, [&str; 9])] = &[
    // begin-create, started, adopted, stop, start-failed, kill-recorded, stopped, exited, vanished
    (
        State::Pending,
        [
            "CREATING",
            "-",
            "RUNNING",
            "TERMINATING",
            "FAILED",
            "-",
            "-",
            "-",
            "FAILED",
        ],
    ),
    (
        State::Creating,
        [
            "-",
            "RUNNING",
            "RUNNING",
            "TERMINATING",
            "FAILED",
            "-",
            "-",
            "-",
            "FAILED",
        ],
    ),
    (
        State::Running,
        [
            "-",
            "-",
            "-",
            "TERMINATING",
            "-",
            "-",
            "-",
            "COMPLETED or FAILED",
            "FAILED",
        ],
    ),
    (
        State::Terminating,
        [
            "-",
            "-",
            "-",
            "-",
            "TERMINATED",
            "TERMINATING",
            "TERMINATED",
            "TERMINATED",
            "TERMINATED",
        ],
    ),
    (State::Completed, ["-"; 9]),
    (State::Failed, ["-"; 9]),
    (State::Terminated, ["-"; 9]),
];

/// What [`apply`] does to a fresh record in `state`, as a table cell: the
/// states the column's instances lead to, or `-` when refused.
fn cell(state: State, column: Vec<Transition>) -> String {
    let mut results: Vec<String> = Vec::new();
    for t in column {
        let mut r = record(state);
        let before = r.clone();
        let result = match apply(&mut r, t) {
            Ok(()) => name(r.state),
            Err(refused) => {
                assert_eq!(r, before, "a refused transition changed the record");
                assert_eq!(refused.state, state);
                "-".into()
            }
        };
        if !results.contains(&result) {
            results.push(result);
        }
    }
    results.join(" or ")
}

#[test]
fn every_state_and_transition_pair() {
    assert_eq!(TABLE.len(), State::ALL.len());
    for (state, row) in TABLE {
        let columns = every_transition();
        assert_eq!(columns.len(), row.len());
        for (column, want) in columns.into_iter().zip(row) {
            let name = column[0].name();
            assert_eq!(cell(*state, column), *want, "{state} + {name}");
        }
    }
}

/// The table as ARCHITECTURE.md shows it.
fn markdown() -> String {
    let transitions = every_transition();
    let mut out = String::from("| from \\ transition |");
    for column in &transitions {
        out.push_str(&format!(" {} |", column[0].name()));
    }
    out.push_str("\n| --- |");
    out.push_str(&" --- |".repeat(transitions.len()));
    out.push('\n');
    for state in State::ALL {
        out.push_str(&format!("| {} |", name(state)));
        for column in every_transition() {
            out.push_str(&format!(" {} |", cell(state, column)));
        }
        out.push('\n');
    }
    out
}

#[test]
fn the_documented_table_is_the_code() {
    let doc = include_str!("../../../../ARCHITECTURE.md");
    let table = markdown();
    assert!(
        doc.contains(&table),
        "ARCHITECTURE.md's lifecycle table is out of date; it should read:\n{table}"
    );
}

#[test]
fn transitions_set_the_fields_they_own() {
    let mut r = record(State::Creating);
    apply(&mut r, Transition::Started { at: at(5) }).unwrap();
    assert_eq!(r.start_time, Some(at(5)));

    let mut r = record(State::Running);
    apply(
        &mut r,
        Transition::Stop {
            reason: "max lifetime of 60 s exceeded".into(),
        },
    )
    .unwrap();
    assert_eq!(r.state_reason, "max lifetime of 60 s exceeded");
    // A stopper's SIGKILL code, once.
    apply(&mut r, Transition::KillRecorded).unwrap();
    assert_eq!(r.exit_code, Some(137));
    assert!(apply(&mut r, Transition::KillRecorded).is_err());
    // The process's own code wins; the stop's reason stays.
    let mut killed = r.clone();
    apply(
        &mut killed,
        Transition::Exited {
            outcome: ExitOutcome {
                exit_code: None,
                state: State::Failed,
                reason: "sandbox init process died".into(),
            },
            at: at(9),
        },
    )
    .unwrap();
    assert_eq!(
        (killed.state, killed.exit_code, killed.end_time),
        (State::Terminated, Some(137), Some(at(9)))
    );
    assert_eq!(killed.state_reason, "max lifetime of 60 s exceeded");
    let mut own = r.clone();
    apply(
        &mut own,
        Transition::Exited {
            outcome: completed(),
            at: at(9),
        },
    )
    .unwrap();
    assert_eq!(own.exit_code, Some(0));

    // A start failure while being stopped keeps the stop's reason.
    let mut r = record(State::Terminating);
    r.state_reason = "stopped by request".into();
    apply(
        &mut r,
        Transition::StartFailed {
            reason: "start sandbox: boom".into(),
            at: at(4),
        },
    )
    .unwrap();
    assert_eq!(
        (r.state, r.state_reason.as_str()),
        (State::Terminated, "stopped by request")
    );

    let mut r = record(State::Running);
    let failed = ExitOutcome {
        exit_code: Some(3),
        state: State::Failed,
        reason: "main process exited with code 3".into(),
    };
    apply(
        &mut r,
        Transition::Exited {
            outcome: failed,
            at: at(7),
        },
    )
    .unwrap();
    assert_eq!(
        (r.state, r.exit_code, r.state_reason.as_str()),
        (State::Failed, Some(3), "main process exited with code 3")
    );

    for (state, reason) in [
        (
            State::Pending,
            "creation was interrupted by a sandpitd restart",
        ),
        (
            State::Creating,
            "creation was interrupted by a sandpitd restart",
        ),
        (State::Running, "sandbox vanished while sandpitd was down"),
    ] {
        let mut r = record(state);
        apply(&mut r, Transition::Vanished { at: at(8) }).unwrap();
        assert_eq!(r.state_reason, reason, "{state}");
        assert_eq!(r.end_time, Some(at(8)));
    }
}

#[test]
fn refusals_name_the_transition_and_state() {
    let mut r = record(State::Completed);
    let e = apply(&mut r, Transition::BeginCreate).unwrap_err();
    assert_eq!(
        e.to_string(),
        "begin-create does not apply to a completed sandbox"
    );
}

#[test]
fn exits_map_to_outcomes() {
    let o = outcome(&MainExit::Exited {
        status: ExitStatus::Code(0),
        oom_kills: 2,
    });
    assert_eq!(o, completed());
    let o = outcome(&MainExit::Exited {
        status: ExitStatus::Signal(Signal::KILL),
        oom_kills: 1,
    });
    assert_eq!(
        (o.exit_code, o.state, o.reason.as_str()),
        (Some(137), State::Failed, "out of memory")
    );
}
