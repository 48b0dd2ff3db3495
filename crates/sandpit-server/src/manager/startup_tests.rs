//! Sandboxes gated by a startup probe, over the in-memory engine (whose
//! agent decides the probe when the test says so).

use std::sync::Arc;
use std::time::Duration;

use sandpit_wire::{ExitStatus, Probe, ProbeCheck, StartupState};

use super::super::{Manager, ManagerConfig};
use crate::clock::SystemClock;
use crate::db::Db;
use crate::engine::MainExit;
use crate::fake::FakeEngine;
use crate::logs::NullSink;
use crate::model::{NewSandbox, SandboxId, SandboxRecord, State};

// The manager tests' fixtures: one image, one principal, a manager over
// an in-memory database.
use super::super::tests::{alice, engine, manager_with, IMAGE};

fn gated() -> NewSandbox {
    NewSandbox {
        image: IMAGE.into(),
        command: Some("sleep".into()),
        args: vec!["infinity".into()],
        startup_probe: Some(Probe {
            check: ProbeCheck::Tcp { port: 8080 },
            initial_delay_ms: 0,
            period_ms: 1000,
            timeout_ms: 1000,
            failure_threshold: 3,
        }),
        ..Default::default()
    }
}

/// Waits (in paused time: instantly) until the sandbox is in `state`.
async fn wait_for(m: &Manager<FakeEngine>, id: &SandboxId, state: State) -> SandboxRecord {
    for _ in 0..1000 {
        let r = m.get(&alice(), id).unwrap();
        if r.state == state {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never reached {state}: {:?}", m.get(&alice(), id));
}

#[tokio::test(start_paused = true)]
async fn a_probe_keeps_the_sandbox_creating_until_it_passes() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    let r = m.create(&alice(), gated()).await.unwrap();
    // Created (the main command runs), but not RUNNING: answered at once.
    assert_eq!(r.state, State::Creating);
    assert!(r.start_time.is_none());
    assert_eq!(e.spec(&r.id).unwrap().startup_probe, gated().startup_probe);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(m.get(&alice(), &r.id).unwrap().state, State::Creating);
    e.finish_startup(&r.id, StartupState::Ready);
    let running = wait_for(&m, &r.id, State::Running).await;
    assert!(running.start_time.is_some());
    // Watched from then on like any other.
    e.exit(
        &r.id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    let done = wait_for(&m, &r.id, State::Completed).await;
    assert_eq!(done.exit_code, Some(0));
    assert!(e.destroyed(&r.id));
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_fails_the_sandbox_with_its_output() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    let r = m.create(&alice(), gated()).await.unwrap();
    e.finish_startup(
        &r.id,
        StartupState::Failed(
            "3 consecutive checks failed; last: tcp connect 127.0.0.1:8080: connection refused"
                .into(),
        ),
    );
    let r = wait_for(&m, &r.id, State::Failed).await;
    assert_eq!(
        r.state_reason,
        "startup probe failed: 3 consecutive checks failed; last: tcp connect \
         127.0.0.1:8080: connection refused"
    );
    assert!(r.start_time.is_none() && r.end_time.is_some());
    // Nothing left of it.
    assert!(e.destroyed(&r.id));
    // A hostile agent's endless verdict is cut.
    let r = m.create(&alice(), gated()).await.unwrap();
    e.finish_startup(&r.id, StartupState::Failed("x".repeat(1 << 20)));
    let r = wait_for(&m, &r.id, State::Failed).await;
    assert!(r.state_reason.len() < 9 << 10, "{}", r.state_reason.len());
}

#[tokio::test(start_paused = true)]
async fn a_main_process_that_ends_first_fails_the_start() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    let r = m.create(&alice(), gated()).await.unwrap();
    e.exit(
        &r.id,
        MainExit::Exited {
            status: ExitStatus::Code(3),
            oom_kills: 0,
        },
    );
    let r = wait_for(&m, &r.id, State::Failed).await;
    assert_eq!(
        r.state_reason,
        "startup probe failed: main process exited with code 3 before the probe succeeded"
    );
    assert!(e.destroyed(&r.id));
}

#[tokio::test(start_paused = true)]
async fn a_stop_or_the_lifetime_ends_a_probing_sandbox() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    let r = m.create(&alice(), gated()).await.unwrap();
    let stopped = m
        .delete(&alice(), &r.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped.state, State::Terminated);
    assert_eq!(stopped.state_reason, "stopped by request");
    assert!(e.destroyed(&r.id));

    let r = m
        .create(
            &alice(),
            NewSandbox {
                max_lifetime_seconds: Some(30),
                ..gated()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(m.get(&alice(), &r.id).unwrap().state, State::Creating);
    let r = wait_for(&m, &r.id, State::Terminated).await;
    assert_eq!(r.state_reason, "max lifetime of 30 s exceeded");
    assert!(e.destroyed(&r.id));
}

#[tokio::test(start_paused = true)]
async fn data_plane_calls_wait_for_the_probe() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    let r = m.create(&alice(), gated()).await.unwrap();
    let waiting = {
        let m = m.clone();
        let id = r.id.clone();
        tokio::spawn(async move { m.agent_for(&alice(), &id).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished());
    e.finish_startup(&r.id, StartupState::Ready);
    assert!(waiting.await.unwrap());
}

#[test]
fn a_restart_waits_for_the_probe_again() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("sandpitd.db");
    let e = engine();
    let start = |e: &FakeEngine| {
        let db = Db::open(&db_path).unwrap();
        let e = e.clone();
        async move {
            Manager::start(
                ManagerConfig::default(),
                e,
                db,
                Arc::new(SystemClock),
                Arc::new(NullSink),
            )
            .await
            .unwrap()
        }
    };
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let rt1 = rt();
    let (probing, plain) = rt1.block_on(async {
        let m = start(&e).await;
        let probing = m.create(&alice(), gated()).await.unwrap().id;
        let plain = m.create(&alice(), gated()).await.unwrap().id;
        (probing, plain)
    });
    drop(rt1);
    // While the daemon is down, one probe passes; the other is still going.
    e.finish_startup(&plain, StartupState::Ready);
    rt().block_on(async {
        let m = start(&e).await;
        let mut seen = None;
        for _ in 0..200 {
            let r = m.get(&alice(), &plain).unwrap();
            if r.state == State::Running {
                seen = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seen.is_some(), "the passed probe was not adopted");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(m.get(&alice(), &probing).unwrap().state, State::Creating);
        e.finish_startup(&probing, StartupState::Ready);
        for _ in 0..200 {
            if m.get(&alice(), &probing).unwrap().state == State::Running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the probe's verdict after the restart was not seen");
    });
}
