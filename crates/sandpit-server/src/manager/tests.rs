use std::time::UNIX_EPOCH;

use sandpit_wire::{ExitStatus, Signal};

use super::*;
use crate::clock::{SystemClock, TokioClock};
use sandpit_wire::process::DEFAULT_PATH;

use crate::engine::{launch_spec, ImageInfo, MainExit};
use crate::fake::FakeEngine;
use crate::logs::NullSink;
use crate::model::{MountedFile, NewSandbox};

pub(super) const IMAGE: &str = "docker.io/library/python:3.11";

pub(super) fn alice() -> Principal {
    Principal("alice".into())
}

fn bob() -> Principal {
    Principal("bob".into())
}

pub(super) fn engine() -> FakeEngine {
    let e = FakeEngine::new();
    e.add_image(IMAGE, &[], &["python3"]);
    e
}

pub(super) async fn manager_with(
    config: ManagerConfig,
    engine: &FakeEngine,
) -> Manager<FakeEngine> {
    Manager::start(
        config,
        engine.clone(),
        Db::in_memory().unwrap(),
        Arc::new(TokioClock::new(
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )),
        Arc::new(NullSink),
    )
    .await
    .unwrap()
}

async fn manager(engine: &FakeEngine) -> Manager<FakeEngine> {
    manager_with(ManagerConfig::default(), engine).await
}

fn req(request_id: Option<&str>) -> NewSandbox {
    NewSandbox {
        request_id: request_id.map(str::to_owned),
        image: IMAGE.into(),
        command: Some("sleep".into()),
        args: vec!["infinity".into()],
        ..Default::default()
    }
}

fn tagged(tags: &[&str]) -> NewSandbox {
    NewSandbox {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..req(None)
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
async fn create_returns_running_and_a_clean_exit_completes() {
    let e = engine();
    let m = manager(&e).await;
    let r = m.create(&alice(), req(None)).await.unwrap();
    assert_eq!(r.state, State::Running);
    assert_eq!(r.id.as_str().len(), 12);
    assert!(r.start_time.is_some() && r.end_time.is_none() && r.exit_code.is_none());
    assert_eq!(e.spec(&r.id).unwrap().argv, ["sleep", "infinity"]);
    e.exit(
        &r.id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    let r = wait_for(&m, &r.id, State::Completed).await;
    assert_eq!(r.exit_code, Some(0));
    assert!(r.end_time.is_some());
    // The engine's resources go, the record stays.
    assert!(e.destroyed(&r.id));
    assert_eq!(m.get(&alice(), &r.id).unwrap().state, State::Completed);
}

#[tokio::test(start_paused = true)]
async fn exits_map_to_failures_with_reasons() {
    let e = engine();
    let m = manager(&e).await;
    let cases = [
        (
            MainExit::Exited {
                status: ExitStatus::Code(3),
                oom_kills: 0,
            },
            Some(3),
            "main process exited with code 3",
        ),
        (
            MainExit::Exited {
                status: ExitStatus::Code(137),
                oom_kills: 1,
            },
            Some(137),
            "out of memory",
        ),
        (
            MainExit::Exited {
                status: ExitStatus::Signal(Signal::KILL),
                oom_kills: 1,
            },
            Some(137),
            "out of memory",
        ),
        (
            MainExit::Exited {
                status: ExitStatus::Signal(Signal::new(11).unwrap()),
                oom_kills: 0,
            },
            Some(139),
            "main process was killed by signal 11 (SIGSEGV)",
        ),
        (
            MainExit::StartFailed("exec /nope: not found".into()),
            None,
            "main command failed to start: exec /nope: not found",
        ),
        (
            MainExit::InitDied { oom_kills: 0 },
            None,
            "sandbox init process died",
        ),
        (MainExit::InitDied { oom_kills: 2 }, None, "out of memory"),
    ];
    for (exit, code, reason) in cases {
        let r = m.create(&alice(), req(None)).await.unwrap();
        e.exit(&r.id, exit);
        let r = wait_for(&m, &r.id, State::Failed).await;
        assert_eq!(r.exit_code, code, "{reason}");
        assert_eq!(r.state_reason, reason);
    }
}

/// The record once it left PENDING/CREATING.
async fn settled(m: &Manager<FakeEngine>, id: &SandboxId) -> SandboxRecord {
    for _ in 0..1000 {
        let r = m.get(&alice(), id).unwrap();
        if !matches!(r.state, State::Pending | State::Creating) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{id} did not settle");
}

#[tokio::test(start_paused = true)]
async fn start_up_errors_fail_with_what_broke() {
    let e = engine();
    let m = manager(&e).await;
    let r = m
        .create(
            &alice(),
            NewSandbox {
                image: "docker.io/library/nope:1".into(),
                ..req(None)
            },
        )
        .await
        .unwrap();
    // Not in the store: PENDING while it is pulled, then FAILED with the
    // pull's reason.
    assert_eq!(r.state, State::Pending);
    let r = settled(&m, &r.id).await;
    assert_eq!(r.state, State::Failed);
    assert_eq!(
        r.state_reason,
        "pull docker.io/library/nope:1: manifest unknown (not found)"
    );
    assert!(r.start_time.is_none() && r.end_time.is_some() && r.exit_code.is_none());

    e.fail_create(Some("root filesystem: mount: ENOENT"));
    let r = m.create(&alice(), req(None)).await.unwrap();
    assert_eq!(r.state, State::Failed);
    assert_eq!(
        r.state_reason,
        "start sandbox: root filesystem: mount: ENOENT"
    );
}

#[tokio::test(start_paused = true)]
async fn create_is_idempotent_per_principal_and_request_id() {
    let e = engine();
    let m = manager(&e).await;
    let a = m.create(&alice(), req(Some("r1"))).await.unwrap();
    let again = m.create(&alice(), req(Some("r1"))).await.unwrap();
    assert_eq!(a.id, again.id);
    let other = m.create(&bob(), req(Some("r1"))).await.unwrap();
    assert_ne!(a.id, other.id);
    let fresh = m.create(&alice(), req(Some("r2"))).await.unwrap();
    assert_ne!(a.id, fresh.id);
    assert_eq!(e.alive().len(), 3);

    // A retry while the first attempt is still creating waits for it.
    e.set_create_delay(Duration::from_secs(1));
    let (m1, m2) = (m.clone(), m.clone());
    let first = tokio::spawn(async move { m1.create(&alice(), req(Some("r3"))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::spawn(async move { m2.create(&alice(), req(Some("r3"))).await });
    let (first, second) = (
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    );
    assert_eq!(first.id, second.id);
    assert_eq!(second.state, State::Running);
}

#[tokio::test(start_paused = true)]
async fn delete_waits_the_grace_then_kills() {
    let e = engine();
    let m = manager(&e).await;
    let r = m.create(&alice(), req(None)).await.unwrap();
    let t = tokio::time::Instant::now();
    let d = m
        .delete(&alice(), &r.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    // SIGTERM is ignored by this main process: killed when the grace ran out.
    assert!(t.elapsed() >= Duration::from_secs(10));
    assert_eq!(d.state, State::Terminated);
    assert_eq!(d.state_reason, "stopped by request");
    assert_eq!(d.exit_code, Some(137));
    assert_eq!(e.signals(&r.id), [15]);
    assert!(e.destroyed(&r.id));

    // One that exits on SIGTERM ends at once, with its own exit code.
    e.set_sigterm_exits(true);
    let r = m.create(&alice(), req(None)).await.unwrap();
    let t = tokio::time::Instant::now();
    let d = m
        .delete(&alice(), &r.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(d.state, State::Terminated);
    assert_eq!(d.exit_code, Some(0));
}

#[tokio::test(start_paused = true)]
async fn delete_edge_cases() {
    let e = engine();
    let m = manager(&e).await;
    let nope = SandboxId::parse("nope").unwrap();
    assert!(matches!(
        m.delete(&alice(), &nope, Duration::ZERO, false).await,
        Err(ManagerError::NotFound(_))
    ));
    assert!(m
        .delete(&alice(), &nope, Duration::ZERO, true)
        .await
        .unwrap()
        .is_none());

    let r = m.create(&alice(), req(None)).await.unwrap();
    // Another principal cannot see it, let alone stop it.
    assert!(matches!(
        m.get(&bob(), &r.id),
        Err(ManagerError::NotFound(_))
    ));
    assert!(matches!(
        m.delete(&bob(), &r.id, Duration::ZERO, false).await,
        Err(ManagerError::NotFound(_))
    ));
    assert!(m
        .delete(&bob(), &r.id, Duration::ZERO, true)
        .await
        .unwrap()
        .is_none());
    assert_eq!(m.get(&alice(), &r.id).unwrap().state, State::Running);

    // A finished sandbox stays as it is.
    e.exit(
        &r.id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    wait_for(&m, &r.id, State::Completed).await;
    let d = m
        .delete(&alice(), &r.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.state, State::Completed);

    // Without a main process there is nothing to wait for.
    let idle = m
        .create(
            &alice(),
            NewSandbox {
                command: None,
                args: vec![],
                image: "docker.io/library/idle:1".into(),
                ..req(None)
            },
        )
        .await
        .unwrap();
    assert_eq!(settled(&m, &idle.id).await.state, State::Failed);
    e.add_image("docker.io/library/idle:1", &[], &[]);
    let idle = m
        .create(
            &alice(),
            NewSandbox {
                command: None,
                args: vec![],
                image: "docker.io/library/idle:1".into(),
                ..req(None)
            },
        )
        .await
        .unwrap();
    assert!(e.spec(&idle.id).unwrap().argv.is_empty());
    let t = tokio::time::Instant::now();
    let d = m
        .delete(&alice(), &idle.id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(d.state, State::Terminated);
    assert_eq!(d.exit_code, None);
}

#[tokio::test(start_paused = true)]
async fn delete_while_creating_terminates_after_creation() {
    let e = engine();
    e.set_create_delay(Duration::from_secs(1));
    let m = manager(&e).await;
    let m1 = m.clone();
    let create = tokio::spawn(async move { m1.create(&alice(), req(Some("x"))).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = m.list(&alice(), &ListQuery::default()).unwrap().sandboxes[0]
        .id
        .clone();
    assert_eq!(m.get(&alice(), &id).unwrap().state, State::Creating);
    let d = m
        .delete(&alice(), &id, Duration::from_secs(10), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.state, State::Terminated);
    let c = create.await.unwrap().unwrap();
    assert_eq!(c.state, State::Terminated);
    assert!(e.destroyed(&id));
}

#[tokio::test(start_paused = true)]
async fn lifetimes_are_defaulted_clamped_and_enforced() {
    let e = engine();
    let m = manager(&e).await;
    let default = m.create(&alice(), req(None)).await.unwrap();
    assert_eq!(default.max_lifetime_seconds, 3600);
    let clamped = m
        .create(
            &alice(),
            NewSandbox {
                max_lifetime_seconds: Some(12 * 3600 * 10),
                ..req(None)
            },
        )
        .await
        .unwrap();
    assert_eq!(clamped.max_lifetime_seconds, 86_400);
    let twelve_hours = m
        .create(
            &alice(),
            NewSandbox {
                max_lifetime_seconds: Some(12 * 3600),
                ..req(None)
            },
        )
        .await
        .unwrap();
    assert_eq!(twelve_hours.max_lifetime_seconds, 43_200);

    let short = m
        .create(
            &alice(),
            NewSandbox {
                max_lifetime_seconds: Some(30),
                ..req(None)
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert_eq!(m.get(&alice(), &short.id).unwrap().state, State::Running);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = m.get(&alice(), &short.id).unwrap();
    assert_eq!(r.state, State::Terminating);
    assert_eq!(r.state_reason, "max lifetime of 30 s exceeded");
    // SIGTERM is ignored: killed after the 10 s lifetime grace.
    let r = wait_for(&m, &short.id, State::Terminated).await;
    assert_eq!(r.state_reason, "max lifetime of 30 s exceeded");
    assert_eq!(r.exit_code, Some(137));
    assert!(e.destroyed(&short.id));
    // The others still run.
    assert_eq!(m.get(&alice(), &default.id).unwrap().state, State::Running);
}

#[tokio::test(start_paused = true)]
async fn list_filters_and_pages() {
    let e = engine();
    let m = manager(&e).await;
    let mut ids = vec![];
    for tags in [&["a", "b"][..], &["a"], &["b"], &["a", "b", "c"], &[]] {
        ids.push(m.create(&alice(), tagged(tags)).await.unwrap().id);
        // Distinct creation times.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    m.create(&bob(), tagged(&["a"])).await.unwrap();
    e.exit(
        &ids[1],
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    wait_for(&m, &ids[1], State::Completed).await;

    let pick =
        |ids: &[SandboxId], at: &[usize]| at.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>();
    let list = |q: ListQuery| -> Vec<SandboxId> {
        m.list(&alice(), &q)
            .unwrap()
            .sandboxes
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Terminal ones are hidden by default; order is creation order.
    assert_eq!(list(ListQuery::default()), pick(&ids, &[0, 2, 3, 4]));
    assert_eq!(
        list(ListQuery {
            show_terminated: true,
            ..Default::default()
        }),
        ids
    );
    assert_eq!(
        list(ListQuery {
            tags: tags(&["a", "b"]),
            ..Default::default()
        }),
        pick(&ids, &[0, 3])
    );
    assert_eq!(
        list(ListQuery {
            tags: tags(&["a"]),
            show_terminated: true,
            ..Default::default()
        }),
        pick(&ids, &[0, 1, 3])
    );
    // A terminal state filter implies show_terminated.
    assert_eq!(
        list(ListQuery {
            state: StateFilter::Only(State::Completed),
            ..Default::default()
        }),
        pick(&ids, &[1])
    );
    assert!(list(ListQuery {
        state: StateFilter::Nothing,
        ..Default::default()
    })
    .is_empty());
    assert_eq!(
        list(ListQuery {
            descending: true,
            ..Default::default()
        }),
        pick(&ids, &[4, 3, 2, 0])
    );

    // Paging visits everything once, in order.
    let mut seen = vec![];
    let mut token = None;
    loop {
        let page = m
            .list(
                &alice(),
                &ListQuery {
                    show_terminated: true,
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(page.sandboxes.len() <= 2);
        seen.extend(page.sandboxes.into_iter().map(|r| r.id));
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert!(matches!(
        m.list(
            &alice(),
            &ListQuery {
                page_token: Some("garbage".into()),
                ..Default::default()
            }
        ),
        Err(ManagerError::InvalidPageToken)
    ));
    // Bob sees only his own.
    assert_eq!(
        m.list(&bob(), &ListQuery::default())
            .unwrap()
            .sandboxes
            .len(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn purge_stops_tagged_sandboxes() {
    let e = engine();
    let m = manager(&e).await;
    let a = m.create(&alice(), tagged(&["batch", "x"])).await.unwrap();
    let b = m.create(&alice(), tagged(&["batch"])).await.unwrap();
    let c = m.create(&alice(), tagged(&["other"])).await.unwrap();
    let bobs = m.create(&bob(), tagged(&["batch"])).await.unwrap();
    let tags = vec!["batch".to_string()];
    let dry = m.purge(&alice(), &tags, true).await;
    assert_eq!(dry.count, 2);
    assert_eq!(m.get(&alice(), &a.id).unwrap().state, State::Running);
    let done = m.purge(&alice(), &tags, false).await;
    assert_eq!(
        done,
        PurgeOutcome {
            count: 2,
            failed: vec![]
        }
    );
    for id in [&a.id, &b.id] {
        let r = m.get(&alice(), id).unwrap();
        assert_eq!(r.state, State::Terminated);
        assert_eq!(r.state_reason, "purged by request");
    }
    assert_eq!(m.get(&alice(), &c.id).unwrap().state, State::Running);
    assert_eq!(m.get(&bob(), &bobs.id).unwrap().state, State::Running);
    // Already terminated ones are not counted again.
    assert_eq!(m.purge(&alice(), &tags, false).await.count, 0);
}

#[tokio::test(start_paused = true)]
async fn terminal_records_expire_after_the_retention() {
    let e = engine();
    let m = manager_with(
        ManagerConfig {
            retention: Duration::from_secs(600),
            ..Default::default()
        },
        &e,
    )
    .await;
    let r = m.create(&alice(), req(Some("keep-me"))).await.unwrap();
    let live = m.create(&alice(), req(None)).await.unwrap();
    e.exit(
        &r.id,
        MainExit::Exited {
            status: ExitStatus::Code(0),
            oom_kills: 0,
        },
    );
    wait_for(&m, &r.id, State::Completed).await;
    tokio::time::sleep(Duration::from_secs(599)).await;
    assert_eq!(m.collect_garbage().await, 0);
    assert!(m.get(&alice(), &r.id).is_ok());
    // The periodic collector (every 60 s) removes it.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(matches!(
        m.get(&alice(), &r.id),
        Err(ManagerError::NotFound(_))
    ));
    assert_eq!(m.get(&alice(), &live.id).unwrap().state, State::Running);
    // Its request id is free again.
    let again = m.create(&alice(), req(Some("keep-me"))).await.unwrap();
    assert_ne!(again.id, r.id);
}

#[tokio::test(start_paused = true)]
async fn capacity_is_enforced() {
    let e = engine();
    let m = manager_with(
        ManagerConfig {
            max_sandboxes: 2,
            ..Default::default()
        },
        &e,
    )
    .await;
    let a = m.create(&alice(), req(None)).await.unwrap();
    m.create(&bob(), req(None)).await.unwrap();
    assert!(matches!(
        m.create(&alice(), req(None)).await,
        Err(ManagerError::CapacityExhausted { live: 2, max: 2 })
    ));
    m.delete(&alice(), &a.id, Duration::ZERO, false)
        .await
        .unwrap();
    m.create(&alice(), req(None)).await.unwrap();
    assert_eq!(m.running_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn agent_for_waits_while_creating_and_refuses_ended_sandboxes() {
    let e = engine();
    let m = manager(&e).await;
    e.set_create_delay(Duration::from_secs(1));
    let m1 = m.clone();
    let create = tokio::spawn(async move { m1.create(&alice(), req(None)).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let id = m.list(&alice(), &ListQuery::default()).unwrap().sandboxes[0]
        .id
        .clone();
    let agent = m.agent_for(&alice(), &id).await.unwrap();
    // The sandbox's own agent answers.
    assert_eq!(
        agent.ping().await.unwrap(),
        sandpit_wire::MainStatus::Running { pid: 1 }
    );
    create.await.unwrap().unwrap();
    assert!(matches!(
        m.agent_for(&bob(), &id).await,
        Err(ManagerError::NotFound(_))
    ));
    e.exit(
        &id,
        MainExit::Exited {
            status: ExitStatus::Code(1),
            oom_kills: 0,
        },
    );
    wait_for(&m, &id, State::Failed).await;
    match m.agent_for(&alice(), &id).await {
        Err(ManagerError::NotRunning { state, reason, .. }) => {
            assert_eq!(state, State::Failed);
            assert_eq!(reason, "main process exited with code 1");
        }
        other => panic!("{other:?}"),
    }
}

/// A daemon "killed -9" (its runtime dropped with every task) and started
/// again on the same database and engine.
#[test]
fn restart_adopts_running_sandboxes_and_records_what_happened_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("sandpitd.db");
    let e = engine();
    let start = |e: &FakeEngine| {
        let db = Db::open(&db_path).unwrap();
        let e = e.clone();
        async move {
            Manager::start(
                ManagerConfig {
                    lifetime_grace: Duration::from_millis(100),
                    ..Default::default()
                },
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
    let (a, b, c, d) = rt1.block_on(async {
        let m = start(&e).await;
        let a = m.create(&alice(), req(None)).await.unwrap().id;
        let b = m.create(&alice(), req(None)).await.unwrap().id;
        let c = m.create(&alice(), req(None)).await.unwrap().id;
        let d = m.create(&alice(), req(None)).await.unwrap().id;
        let stopping = m.clone();
        let d2 = d.clone();
        // Interrupted mid-stop (SIGTERM ignored, long grace).
        tokio::spawn(async move {
            stopping
                .delete(&alice(), &d2, Duration::from_secs(3600), false)
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(m.get(&alice(), &d).unwrap().state, State::Terminating);
        (a, b, c, d)
    });
    drop(rt1);

    // While the daemon is down: b's main process exits, c vanishes.
    e.exit(
        &b,
        MainExit::Exited {
            status: ExitStatus::Code(4),
            oom_kills: 0,
        },
    );
    e.vanish(&c);

    let rt2 = rt();
    rt2.block_on(async {
        let m = start(&e).await;
        assert_eq!(m.get(&alice(), &a).unwrap().state, State::Running);
        let r = m.get(&alice(), &c).unwrap();
        assert_eq!(r.state, State::Failed);
        assert_eq!(r.state_reason, "sandbox vanished while sandpitd was down");
        // Everything still there was kept by the sweep.
        let keep = e.swept_keep().unwrap();
        assert!(keep.contains(&a) && keep.contains(&b) && !keep.contains(&c));
        for _ in 0..100 {
            let b = m.get(&alice(), &b).unwrap();
            let d = m.get(&alice(), &d).unwrap();
            if b.state.is_terminal() && d.state.is_terminal() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The watcher re-attached to b found its real exit status.
        let rb = m.get(&alice(), &b).unwrap();
        assert_eq!(rb.state, State::Failed);
        assert_eq!(rb.exit_code, Some(4));
        // d's stop resumes.
        let rd = m.get(&alice(), &d).unwrap();
        assert_eq!(rd.state, State::Terminated);
        assert_eq!(rd.state_reason, "stopped by request");
        // a is watched again.
        e.exit(
            &a,
            MainExit::Exited {
                status: ExitStatus::Code(0),
                oom_kills: 0,
            },
        );
        for _ in 0..100 {
            if m.get(&alice(), &a).unwrap().state == State::Completed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("a was not watched after the restart");
    });
}

#[test]
fn launch_spec_follows_kubernetes_semantics() {
    let image = ImageInfo {
        reference: IMAGE.into(),
        entrypoint: vec!["/entry".into()],
        cmd: vec!["default-arg".into()],
        env: vec!["LANG=C.UTF-8".into(), "HOME=/root".into()],
        working_dir: "/app".into(),
        user: String::new(),
        lower_dirs: vec!["/l1".into()],
        layers: vec![],
    };
    let base = NewSandbox {
        image: IMAGE.into(),
        ..Default::default()
    };
    let argv = |r: &NewSandbox| launch_spec(&image, r).argv;
    assert_eq!(argv(&base), ["/entry", "default-arg"]);
    let args_only = NewSandbox {
        args: vec!["x".into()],
        ..base.clone()
    };
    assert_eq!(argv(&args_only), ["/entry", "x"]);
    let command = NewSandbox {
        command: Some("sh".into()),
        args: vec!["-c".into(), "true".into()],
        ..base.clone()
    };
    assert_eq!(argv(&command), ["sh", "-c", "true"]);

    let full = NewSandbox {
        env: vec![("HOME".into(), "/home/me".into()), ("X".into(), "1".into())],
        working_dir: Some("/work".into()),
        files: vec![MountedFile {
            path: "/etc/x".into(),
            content: b"x".to_vec(),
        }],
        resources: crate::model::ResourceSpec {
            limits: crate::model::Resources {
                cpu_millis: Some(500),
                memory_bytes: None,
            },
            ..Default::default()
        },
        ..base.clone()
    };
    let spec = launch_spec(&image, &full);
    assert_eq!(
        spec.env,
        [
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("HOME".into(), "/home/me".into()),
            ("X".into(), "1".into()),
            ("PATH".into(), DEFAULT_PATH.into()),
        ]
    );
    assert_eq!(spec.cwd, "/work");
    assert_eq!(spec.files.len(), 1);
    assert_eq!(spec.resources.limits.cpu_millis, Some(500));
    assert_eq!(spec.lower_dirs, image.lower_dirs);
    assert_eq!(launch_spec(&image, &base).cwd, "/app");
    let bare = ImageInfo {
        working_dir: String::new(),
        ..image.clone()
    };
    assert_eq!(launch_spec(&bare, &base).cwd, "/");
}
