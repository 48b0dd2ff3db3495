//! Warm pools over the fake engine: claims, refill, no reuse, drain, and
//! the creates that must not be served from a pool.

use super::tests::{alice, engine, manager_with, IMAGE};
use super::*;
use crate::fake::FakeEngine;
use crate::model::{MountedFile, NewSandbox, Resources};

fn template(size: usize) -> PoolTemplate {
    PoolTemplate {
        name: IMAGE.into(),
        size,
        request: NewSandbox {
            image: IMAGE.into(),
            ..Default::default()
        },
    }
}

fn req() -> NewSandbox {
    NewSandbox {
        image: IMAGE.into(),
        command: Some("sleep".into()),
        args: vec!["infinity".into()],
        env: vec![("GREETING".into(), "hi".into())],
        files: vec![MountedFile {
            path: "/work/a.txt".into(),
            content: b"a".to_vec(),
        }],
        tags: vec!["t".into()],
        ..Default::default()
    }
}

/// Waits (paused time: instantly) until `n` pooled sandboxes are ready.
async fn ready(m: &Manager<FakeEngine>, n: usize) -> Vec<SandboxId> {
    for _ in 0..2000 {
        let ready: Vec<SandboxId> = m.pool_status().into_iter().flat_map(|p| p.ready).collect();
        if ready.len() == n {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("pool never had {n} ready: {:?}", m.pool_status());
}

async fn pooled_manager(e: &FakeEngine, size: usize) -> Manager<FakeEngine> {
    let m = manager_with(ManagerConfig::default(), e).await;
    m.start_pool(vec![template(size)]);
    m
}

#[tokio::test(start_paused = true)]
async fn a_fitting_create_claims_a_pooled_sandbox_with_its_own_request() {
    let e = engine();
    let m = pooled_manager(&e, 2).await;
    let pooled = ready(&m, 2).await;
    // Idle in the engine, nothing of any request in them.
    assert_eq!(e.idle(), {
        let mut v: Vec<String> = pooled.iter().map(|i| i.to_string()).collect();
        v.sort();
        v
    });
    for id in &pooled {
        assert!(e.execs(id).is_empty());
        assert_eq!(e.claims(id), 0);
    }
    let r = m.create(&alice(), req()).await.unwrap();
    assert_eq!(r.state, State::Running);
    // The oldest pooled sandbox is the new one, claimed once with the
    // request's command, environment and files.
    assert_eq!(r.id, pooled[0]);
    assert_eq!(e.claims(&r.id), 1);
    let spec = e.spec(&r.id).unwrap();
    assert_eq!(spec.argv, ["sleep", "infinity"]);
    assert!(spec.env.contains(&("GREETING".into(), "hi".into())));
    assert_eq!(e.agent_file(&r.id, "/work/a.txt").unwrap(), b"a");
    assert_eq!(r.tags, ["t"]);
    assert_eq!(r.principal, alice());
    // Listed as the caller's, like any sandbox; the pool refills behind it.
    assert_eq!(m.live_records(&alice()).len(), 1);
    let again = ready(&m, 2).await;
    assert!(
        !again.contains(&r.id),
        "a claimed sandbox is never pooled again"
    );
}

#[tokio::test(start_paused = true)]
async fn no_pooled_sandbox_is_handed_out_twice() {
    let e = engine();
    let m = pooled_manager(&e, 3).await;
    ready(&m, 3).await;
    // Ten creates at once against three ready: every id is distinct and
    // each pooled sandbox is claimed exactly once.
    let creates = (0..10).map(|_| {
        let m = m.clone();
        tokio::spawn(async move { m.create(&alice(), req()).await.unwrap() })
    });
    let mut ids = Vec::new();
    for c in creates {
        let r = c.await.unwrap();
        assert_eq!(r.state, State::Running);
        ids.push(r.id);
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 10);
    for id in &ids {
        assert!(e.claims(id) <= 1, "{id} claimed {} times", e.claims(id));
    }
    // At least the three ready (the refiller may add one between creates).
    assert!(ids.iter().filter(|id| e.claims(id) == 1).count() >= 3);
}

#[tokio::test(start_paused = true)]
async fn creates_that_do_not_fit_the_shape_start_cold() {
    let e = engine();
    e.add_image("docker.io/library/other:1", &[], &["sh"]);
    let m = pooled_manager(&e, 1).await;
    ready(&m, 1).await;
    let unfit = [
        NewSandbox {
            image: "docker.io/library/other:1".into(),
            ..req()
        },
        NewSandbox {
            resources: ResourceSpec {
                requests: Resources {
                    cpu_millis: Some(2000),
                    memory_bytes: None,
                },
                limits: Resources::default(),
            },
            ..req()
        },
        NewSandbox {
            disk_bytes: Some(1 << 30),
            ..req()
        },
        NewSandbox {
            security: crate::model::Security {
                read_only_root: true,
                ..Default::default()
            },
            ..req()
        },
        NewSandbox {
            files: vec![MountedFile {
                path: "/big".into(),
                content: vec![0; MAX_CLAIM_FILE_BYTES + 1],
            }],
            ..req()
        },
    ];
    for r in unfit {
        let got = m.create(&alice(), r).await.unwrap();
        assert_eq!(got.state, State::Running);
        assert_eq!(e.claims(&got.id), 0, "made cold");
    }
    // The pooled one is still there, untouched.
    assert_eq!(ready(&m, 1).await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_claim_the_engine_fails_falls_back_to_a_cold_create_under_the_same_id() {
    let e = engine();
    let m = pooled_manager(&e, 1).await;
    let pooled = ready(&m, 1).await;
    e.fail_claim(Some("agent gone"));
    let r = m.create(&alice(), req()).await.unwrap();
    assert_eq!(r.state, State::Running);
    assert_eq!(r.id, pooled[0]);
    assert_eq!(e.spec(&r.id).unwrap().argv, ["sleep", "infinity"]);
    assert_eq!(e.claims(&r.id), 0);
}

#[tokio::test(start_paused = true)]
async fn the_refill_waits_for_on_demand_creates() {
    let e = engine();
    let m = manager_with(ManagerConfig::default(), &e).await;
    // A create in flight (slow engine) while the pool starts: nothing is
    // pooled until it is done.
    e.set_create_delay(Duration::from_secs(5));
    let slow = {
        let m = m.clone();
        tokio::spawn(async move {
            m.create(
                &alice(),
                NewSandbox {
                    disk_bytes: Some(1),
                    ..req()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    m.start_pool(vec![template(1)]);
    // A fill takes 5 s too: begun at once it would be done by now; begun
    // after the create (at 5 s) it is not.
    assert_eq!(slow.await.unwrap().unwrap().state, State::Running);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(e.idle().is_empty(), "refilled during an on-demand create");
    assert_eq!(ready(&m, 1).await.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_destroys_the_pooled_sandboxes_and_stops_refilling() {
    let e = engine();
    let m = pooled_manager(&e, 2).await;
    let pooled = ready(&m, 2).await;
    let claimed = m.create(&alice(), req()).await.unwrap();
    m.drain_pool().await;
    for id in &pooled[1..] {
        assert!(e.destroyed(id), "{id} left after the drain");
    }
    // The claimed one is a sandbox like any other: it stays.
    assert!(!e.destroyed(&claimed.id));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(e.idle().is_empty(), "refilled after the drain");
    // And a create after the drain starts cold.
    let cold = m.create(&alice(), req()).await.unwrap();
    assert_eq!(e.claims(&cold.id), 0);
}

#[test]
fn fits_ignores_what_a_claim_applies_and_the_network_owner() {
    let t = template(1).request;
    assert!(pool::fits(&t, &req()));
    let net = |owner: &str| crate::engine::LaunchNetwork {
        policy: Default::default(),
        owner: owner.into(),
        services: vec![],
    };
    let with_net = |owner: &str| NewSandbox {
        network: Some(net(owner)),
        ..req()
    };
    let t_net = NewSandbox {
        network: Some(net("")),
        ..t.clone()
    };
    assert!(pool::fits(&t_net, &with_net("alice")));
    assert!(
        !pool::fits(&t, &with_net("alice")),
        "a network where the pool has none"
    );
    assert!(
        !pool::fits(&t_net, &req()),
        "no network where the pool has one"
    );
}

#[tokio::test(start_paused = true)]
async fn the_refill_waits_a_quiet_moment_after_the_last_create() {
    let e = engine();
    let m = pooled_manager(&e, 1).await;
    let first = ready(&m, 1).await;
    let claimed = m.create(&alice(), req()).await.unwrap();
    assert_eq!(claimed.id, first[0]);
    // The claimed sandbox's first exec runs now: nothing is made beside it.
    assert!(pool::QUIET > Duration::from_millis(25));
    tokio::time::sleep(Duration::from_millis(25)).await;
    assert!(e.idle().is_empty(), "refilled right after a create");
    let again = ready(&m, 1).await;
    assert_ne!(again, first);
}
