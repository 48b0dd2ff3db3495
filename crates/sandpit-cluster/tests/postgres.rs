//! The store against a real PostgreSQL (tests/support): registration and
//! incarnations, placement (spread, pins, labels), no over-commit under
//! concurrent creates from two stores, lease expiry, idempotent retries,
//! a crash of PostgreSQL, concurrent migrations.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use sandpit_cluster::{
    Capacity, Error, Labels, NoFit, PlacementRequest, Registration, RunnerId, SandboxState, Store,
    StoreConfig,
};
use support::Pg;

fn id(s: &str) -> RunnerId {
    RunnerId::new(s).unwrap()
}

fn reg(name: &str, sandboxes: u32, labels: &[(&str, &str)]) -> Registration {
    Registration {
        id: id(name),
        endpoint: format!("{name}.runners:50052"),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        allocatable: Capacity {
            cpu_millis: 100_000,
            memory_bytes: 1 << 40,
            sandboxes,
        },
        direct: None,
    }
}

fn create(sandbox: &str) -> PlacementRequest {
    PlacementRequest {
        sandbox_id: sandbox.into(),
        principal: "alice".into(),
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        pins: vec![],
        selector: Labels::new(),
    }
}

fn config(lease: Duration) -> StoreConfig {
    StoreConfig {
        lease,
        ..StoreConfig::default()
    }
}

async fn store(pg: &Pg) -> Store {
    Store::connect(&pg.url(), config(Duration::from_secs(30)))
        .await
        .unwrap()
}

async fn requested(store: &Store, runner: &str) -> Capacity {
    let all = store.runners().await.unwrap();
    all.into_iter()
        .find(|r| r.id == id(runner))
        .unwrap()
        .requested
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_registered_again_is_a_new_incarnation_and_the_old_one_is_refused() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    let first = s.register(&reg("r1", 10, &[])).await.unwrap();
    assert_eq!(first.incarnation, 1);
    assert!(first.live.is_empty());
    let cap = reg("r1", 10, &[]).allocatable;
    s.heartbeat(&id("r1"), 1, cap).await.unwrap();
    let second = s.register(&reg("r1", 10, &[])).await.unwrap();
    assert_eq!(second.incarnation, 2);
    assert!(matches!(
        s.heartbeat(&id("r1"), 1, cap).await,
        Err(Error::Superseded(r)) if r == id("r1")
    ));
    s.heartbeat(&id("r1"), 2, cap).await.unwrap();
    assert!(matches!(
        s.heartbeat(&id("nobody"), 1, cap).await,
        Err(Error::Superseded(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_spread_and_honour_pins_and_labels() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    s.register(&reg("r1", 10, &[])).await.unwrap();
    s.register(&reg("r2", 10, &[("gpu", "h200")]))
        .await
        .unwrap();
    s.register(&reg("r3", 10, &[])).await.unwrap();

    let mut per: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..6 {
        let p = s.place(&create(&format!("spread-{i}"))).await.unwrap();
        assert_eq!(p.endpoint, format!("{}.runners:50052", p.runner));
        *per.entry(p.runner.to_string()).or_default() += 1;
    }
    assert_eq!(
        per.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per:?}"
    );

    let pinned = PlacementRequest {
        pins: vec![id("r3")],
        ..create("pinned")
    };
    assert_eq!(s.place(&pinned).await.unwrap().runner, id("r3"));

    let gpu = PlacementRequest {
        selector: [("gpu".to_string(), "h200".to_string())].into(),
        ..create("gpu")
    };
    assert_eq!(s.place(&gpu).await.unwrap().runner, id("r2"));

    let other = PlacementRequest {
        selector: [("gpu".to_string(), "a100".to_string())].into(),
        ..create("a100")
    };
    assert!(matches!(
        s.place(&other).await,
        Err(Error::NoCapacity(NoFit::NoLabelMatch))
    ));
    let nowhere = PlacementRequest {
        pins: vec![id("r9")],
        ..create("nowhere")
    };
    assert!(matches!(
        s.place(&nowhere).await,
        Err(Error::NoCapacity(NoFit::NoLiveRunner))
    ));
    // A refused create leaves no row.
    assert!(s.sandbox("a100").await.unwrap().is_none());
    assert!(s.sandbox("nowhere").await.unwrap().is_none());
    assert_eq!(requested(&s, "r3").await.sandboxes, 3);
    assert_eq!(requested(&s, "r3").await.cpu_millis, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_through_two_stores_at_once_never_over_commit_a_runner() {
    let Some(pg) = Pg::start() else { return };
    let gateways = [store(&pg).await, store(&pg).await];
    // 300 slots over three runners of unequal size, 500 creates at once.
    for (name, slots) in [("r1", 50), ("r2", 100), ("r3", 150)] {
        gateways[0].register(&reg(name, slots, &[])).await.unwrap();
    }
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let s = gateways[i % 2].clone();
            tokio::spawn(async move { s.place(&create(&format!("c-{i}"))).await })
        })
        .collect();
    let (mut placed, mut full) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => placed += 1,
            Err(Error::NoCapacity(NoFit::Full)) => full += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!((placed, full), (300, 200));
    for (name, slots) in [("r1", 50u32), ("r2", 100), ("r3", 150)] {
        let rows = gateways[1].sandboxes_on(&id(name)).await.unwrap();
        let req = requested(&gateways[1], name).await;
        assert_eq!(rows.len() as u32, slots, "{name}");
        assert_eq!(req.sandboxes, slots, "{name}");
        assert_eq!(req.cpu_millis, 100 * u64::from(slots), "{name}");
        assert_eq!(req.memory_bytes, (64 << 20) * u64::from(slots), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_stops_heartbeating_loses_its_sandboxes_with_a_reason() {
    let Some(pg) = Pg::start() else { return };
    // Long enough that a loaded CI host does not end it before the first
    // check; r2 heartbeats well within it while r1's runs out.
    let s = Store::connect(&pg.url(), config(Duration::from_secs(3)))
        .await
        .unwrap();
    s.register(&reg("r1", 10, &[])).await.unwrap();
    for i in 0..2 {
        let pinned = PlacementRequest {
            pins: vec![id("r1")],
            ..create(&format!("gone-{i}"))
        };
        s.place(&pinned).await.unwrap();
    }
    assert!(s.mark_running("gone-0").await.unwrap());
    // Within the lease nothing expires.
    assert!(s.expire_leases().await.unwrap().is_empty());
    let r2 = s.register(&reg("r2", 10, &[])).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.heartbeat(&id("r2"), r2.incarnation, reg("r2", 10, &[]).allocatable)
            .await
            .unwrap();
    }
    let failed = s.expire_leases().await.unwrap();
    assert_eq!(
        failed.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["gone-0", "gone-1"]
    );
    for f in &failed {
        assert_eq!(f.state, SandboxState::Failed);
        assert!(
            f.reason.contains("runner r1") && f.reason.contains("lease"),
            "{}",
            f.reason
        );
    }
    let row = s.sandbox("gone-0").await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Failed);
    assert_eq!(requested(&s, "r1").await, Capacity::default());
    // Expiring again fails nothing twice.
    assert!(s.expire_leases().await.unwrap().is_empty());
    let runners = s.runners().await.unwrap();
    assert!(!runners.iter().find(|r| r.id == id("r1")).unwrap().live);
    assert!(runners.iter().find(|r| r.id == id("r2")).unwrap().live);
    // Placement no longer picks it.
    assert_eq!(s.place(&create("after")).await.unwrap().runner, id("r2"));
    let pinned = PlacementRequest {
        pins: vec![id("r1")],
        ..create("pinned-dead")
    };
    assert!(matches!(
        s.place(&pinned).await,
        Err(Error::NoCapacity(NoFit::NoLiveRunner))
    ));
    // Back, it holds nothing (what it still runs of those it destroys).
    let back = s.register(&reg("r1", 10, &[])).await.unwrap();
    assert_eq!(back.incarnation, 2);
    assert!(back.live.is_empty());
    assert_eq!(s.place(&pinned).await.unwrap().runner, id("r1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_back_within_its_lease_adopts_its_sandboxes_and_release_frees_once() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    s.register(&reg("r1", 10, &[])).await.unwrap();
    s.place(&create("kept")).await.unwrap();
    s.place(&create("ended")).await.unwrap();
    assert!(s
        .release("ended", SandboxState::Terminated, "stopped by request")
        .await
        .unwrap());
    assert!(!s
        .release("ended", SandboxState::Terminated, "again")
        .await
        .unwrap());
    let ended = s.sandbox("ended").await.unwrap().unwrap();
    assert_eq!(
        (ended.state, ended.reason.as_str()),
        (SandboxState::Terminated, "stopped by request")
    );
    let back = s.register(&reg("r1", 10, &[])).await.unwrap();
    assert_eq!(
        back.live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["kept"]
    );
    let req = requested(&s, "r1").await;
    assert_eq!((req.sandboxes, req.cpu_millis), (1, 100));
    assert!(matches!(
        s.release("kept", SandboxState::Running, "").await,
        Err(Error::Corrupt(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_binds_to_the_runners_id_once_and_unbound_ones_expire() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    s.register(&reg("r1", 10, &[])).await.unwrap();
    s.place(&create("rsv-1")).await.unwrap();
    assert!(s.bind("rsv-1", "sb-1").await.unwrap());
    // Bound once: the reservation is gone, the row is the sandbox's.
    assert!(!s.bind("rsv-1", "sb-2").await.unwrap());
    // A second reservation answered with the same sandbox (a retried
    // create) does not bind over it.
    s.place(&create("rsv-2")).await.unwrap();
    assert!(!s.bind("rsv-2", "sb-1").await.unwrap());
    assert!(s
        .release("rsv-2", SandboxState::Terminated, "duplicate")
        .await
        .unwrap());
    assert!(s.sandbox("rsv-1").await.unwrap().is_none());
    let row = s.sandbox("sb-1").await.unwrap().unwrap();
    assert_eq!((row.state, row.runner), (SandboxState::Running, id("r1")));
    // A placement its gateway never bound: kept while young, failed and
    // freed once old; a bound sandbox is never touched.
    s.place(&create("rsv-lost")).await.unwrap();
    assert!(!s
        .expire_placements(&id("r1"), Duration::from_secs(60))
        .await
        .unwrap());
    assert_eq!(requested(&s, "r1").await.sandboxes, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s
        .expire_placements(&id("r1"), Duration::from_millis(200))
        .await
        .unwrap());
    let lost = s.sandbox("rsv-lost").await.unwrap().unwrap();
    assert_eq!(lost.state, SandboxState::Failed);
    assert!(
        lost.reason.contains("never reached the runner"),
        "{}",
        lost.reason
    );
    let req = requested(&s, "r1").await;
    assert_eq!((req.sandboxes, req.cpu_millis), (1, 100));
    assert_eq!(
        s.sandbox("sb-1").await.unwrap().unwrap().state,
        SandboxState::Running
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_answers_the_first_placement_and_another_principal_conflicts() {
    let Some(pg) = Pg::start() else { return };
    let s = store(&pg).await;
    for r in ["r1", "r2"] {
        s.register(&reg(r, 10, &[])).await.unwrap();
    }
    let first = s.place(&create("once")).await.unwrap();
    let again = s.place(&create("once")).await.unwrap();
    assert_eq!(first, again);
    let total: u32 = s
        .runners()
        .await
        .unwrap()
        .iter()
        .map(|r| r.requested.sandboxes)
        .sum();
    assert_eq!(total, 1);
    let mallory = PlacementRequest {
        principal: "mallory".into(),
        ..create("once")
    };
    assert!(matches!(s.place(&mallory).await, Err(Error::Conflict(i)) if i == "once"));
    // A retry still answers once the runner it went to is full.
    s.register(&reg("tiny", 1, &[])).await.unwrap();
    let pinned = PlacementRequest {
        pins: vec![id("tiny")],
        ..create("last-slot")
    };
    let first = s.place(&pinned).await.unwrap();
    assert_eq!(s.place(&pinned).await.unwrap(), first);
    assert_eq!(requested(&s, "tiny").await.sandboxes, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_postgres_loses_no_record_and_the_store_reconnects() {
    let Some(mut pg) = Pg::start() else { return };
    let s = store(&pg).await;
    s.register(&reg("r1", 100, &[])).await.unwrap();
    for i in 0..20 {
        s.place(&create(&format!("p-{i}"))).await.unwrap();
    }
    pg.crash_and_restart();
    // Connections the pool held died with the server: the first uses may
    // fail, as transient, until the pool has replaced them.
    let mut transient = 0;
    let rows = loop {
        match s.sandboxes_on(&id("r1")).await {
            Ok(rows) => break rows,
            Err(e) if e.is_transient() && transient < 50 => {
                transient += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not transient, or for too long: {e:?}\n{}", pg.log()),
        }
    };
    assert_eq!(rows.len(), 20);
    assert_eq!(requested(&s, "r1").await.sandboxes, 20);
    s.place(&create("after")).await.unwrap();
    assert_eq!(requested(&s, "r1").await.sandboxes, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_starts_migrate_once_and_a_newer_schema_is_refused() {
    let Some(pg) = Pg::start() else { return };
    let url = pg.url();
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { Store::connect(&url, StoreConfig::default()).await })
        })
        .collect();
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query("SELECT version FROM sandpit_schema ORDER BY version", &[])
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=Store::schema_version()).collect::<Vec<_>>());
    client
        .execute(
            "INSERT INTO sandpit_schema (version, name) VALUES (999, 'from the future')",
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(
        Store::connect(&url, StoreConfig::default()).await,
        Err(Error::SchemaNewer { found: 999, .. })
    ));
}
