//! The two cluster roles in-process against a real PostgreSQL: three
//! runners over the in-memory engine, each registered with its own
//! membership, and a gateway in front, driven through the generated
//! clients. Spread, pins, tenancy, refusals, exec and files through the
//! gateway, merged listings, a runner that stops answering, capacity
//! given back. The same through the real client, with real sandboxes and
//! runners in network namespaces, is tests/e2e/cluster.

// The store's own harness; this test uses part of it.
#[allow(dead_code)]
#[path = "../../sandpit-cluster/tests/support/mod.rs"]
mod pg;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sandpit_cluster::Capacity;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::discovery_service_client::DiscoveryServiceClient;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_server::auth::{ApiKey, Auth};
use sandpit_server::clock::SystemClock;
use sandpit_server::clusterconfig::{ClusterSettings, Role};
use sandpit_server::config::DEFAULT_RESOURCES;
use sandpit_server::db::Db;
use sandpit_server::fake::FakeEngine;
use sandpit_server::gateway::GatewayOptions;
use sandpit_server::logs::NullSink;
use sandpit_server::manager::{Manager, ManagerConfig};
use sandpit_server::membership::{connect, Membership};
use sandpit_server::secrets::SecretStores;
use sandpit_server::server::{serve, ServerOptions};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

const ALICE: &str = "alice-key";
const BOB: &str = "bob-key";
const LEASE: Duration = Duration::from_secs(2);

fn auth() -> Auth {
    Auth::new(&[
        ApiKey {
            key: ALICE.into(),
            name: Some("alice".into()),
            organization: None,
        },
        ApiKey {
            key: BOB.into(),
            name: Some("bob".into()),
            organization: None,
        },
    ])
}

fn settings(pg: &pg::Pg, role: Role, advertise: Option<String>) -> ClusterSettings {
    ClusterSettings {
        role,
        database_url: pg.url(),
        advertise,
        labels: BTreeMap::new(),
        lease: LEASE,
        direct: None,
        ca: None,
    }
}

/// One runner: a daemon over the fake engine, its membership heartbeating.
struct Runner {
    server: tokio::task::JoinHandle<()>,
    membership: tokio::task::JoinHandle<()>,
    /// Where it serves (`http://127.0.0.1:PORT`).
    url: String,
    /// Its sync of the store's principals, if it was started with one.
    principals: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Stops answering at once, like `kill -9`: no more calls, no more
    /// heartbeats, nothing released.
    fn kill(&self) {
        self.server.abort();
        self.membership.abort();
        if let Some(p) = &self.principals {
            p.abort();
        }
    }
}

async fn runner(pg: &pg::Pg, id: &str, max_sandboxes: usize) -> Runner {
    runner_with(pg, id, max_sandboxes, auth(), false).await
}

/// A runner serving `auth`'s keys; with `sync`, the store's principals
/// too, as `sandpitd` syncs them (load once, then every quarter lease).
async fn runner_with(
    pg: &pg::Pg,
    id: &str,
    max_sandboxes: usize,
    auth: Auth,
    sync: bool,
) -> Runner {
    let engine = FakeEngine::new();
    engine.add_image("docker.io/library/python:3.11", &[], &["python3"]);
    let config = ManagerConfig {
        max_sandboxes,
        ..ManagerConfig::default()
    };
    let alloc = config.allocatable;
    let manager = Manager::start(
        config,
        engine,
        Db::in_memory().unwrap(),
        Arc::new(SystemClock),
        Arc::new(NullSink),
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let runner_url = url.clone();
    let cluster = settings(pg, Role::Runner, Some(url));
    let store = connect(&cluster).await.unwrap();
    let principals = if sync {
        Some(sandpit_server::principals::start(&store, &auth, LEASE).await)
    } else {
        None
    };
    let offered = Capacity {
        cpu_millis: alloc.cpu_millis,
        memory_bytes: alloc.memory_bytes,
        sandboxes: max_sandboxes as u32,
    };
    let member = Membership::join(store, &cluster, id, offered, None, &manager)
        .await
        .unwrap();
    let membership = tokio::spawn({
        let manager = manager.clone();
        async move {
            let why = member.run(manager).await;
            panic!("membership ended: {why}");
        }
    });
    let runner_id = id.to_owned();
    let server = tokio::spawn(async move {
        serve(
            listener,
            manager,
            auth,
            ServerOptions {
                max_message_bytes: 16 << 20,
                tls: None,
                runner_id,
                organization_id: "org".into(),
                started: SystemTime::now(),
                max_file_bytes: 8 << 20,
                logs: None,
                secret_stores: SecretStores::new(Default::default()),
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    Runner {
        server,
        membership,
        url: runner_url,
        principals,
    }
}

async fn gateway(pg: &pg::Pg) -> (String, tokio::task::JoinHandle<()>) {
    gateway_with(pg, auth(), false).await
}

/// A gateway serving `auth`'s keys; with `sync`, the store's principals
/// too (the sync ends with the gateway's task).
async fn gateway_with(
    pg: &pg::Pg,
    auth: Auth,
    sync: bool,
) -> (String, tokio::task::JoinHandle<()>) {
    let cluster = settings(pg, Role::Gateway, None);
    let store = connect(&cluster).await.unwrap();
    let principals = if sync {
        Some(AbortOnDrop(
            sandpit_server::principals::start(&store, &auth, LEASE).await,
        ))
    } else {
        None
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _principals = principals;
        sandpit_server::gateway::serve(
            listener,
            store,
            auth,
            GatewayOptions {
                max_message_bytes: 16 << 20,
                tls: None,
                default_resources: DEFAULT_RESOURCES,
                lease: LEASE,
                ca: None,
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (url, task)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn client(url: &str) -> SandboxServiceClient<Channel> {
    SandboxServiceClient::new(
        Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    r
}

fn create(tag: &str, pins: &[&str]) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(pb::SandboxSpec {
                containers: vec![pb::Container {
                    name: "main".into(),
                    image: "python:3.11".into(),
                    command: "/bin/sh".into(),
                    args: vec!["-c".into(), "sleep infinity".into()],
                    ..Default::default()
                }],
                tags: vec![tag.into()],
                runner_ids: pins.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

fn runner_of(sb: &pb::Sandbox) -> String {
    sb.status.as_ref().unwrap().runner_id.clone()
}

fn reason(s: &Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_spreads_routes_and_refuses_over_three_runners() {
    let Some(pg) = pg::Pg::start() else { return };
    let runners = [
        runner(&pg, "r1", 3).await,
        runner(&pg, "r2", 3).await,
        runner(&pg, "r3", 3).await,
    ];
    let (url, _gw) = gateway(&pg).await;
    let mut c = client(&url).await;

    // Spread: six creates, two on each runner.
    let mut ids = Vec::new();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..6 {
        let sb = c
            .create_sandbox(with_key(create("spread", &[]), ALICE))
            .await
            .unwrap()
            .into_inner();
        *per.entry(runner_of(&sb)).or_default() += 1;
        ids.push(sb.sandbox_id);
    }
    assert_eq!(
        per.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{per:?}"
    );

    // Exec and files reach the sandbox's own runner.
    let out = c
        .exec(with_key(
            pb::ExecRequest {
                sandbox_id: ids[0].clone(),
                command: vec!["echo".into(), "through".into(), "the gateway".into()],
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.stdout, b"through the gateway\n");
    c.write_file(with_key(
        pb::WriteFileRequest {
            sandbox_id: ids[1].clone(),
            path: "/tmp/f".into(),
            content: b"bytes".to_vec(),
            ..Default::default()
        },
        ALICE,
    ))
    .await
    .unwrap();
    let read = c
        .read_file(with_key(
            pb::ReadFileRequest {
                sandbox_id: ids[1].clone(),
                path: "/tmp/f".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.content, b"bytes");

    // Tenancy: bob sees none of alice's sandboxes, on any runner.
    let e = c
        .get_sandbox(with_key(
            pb::GetSandboxRequest {
                sandbox_id: ids[2].clone(),
            },
            BOB,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let bobs = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), BOB))
        .await
        .unwrap()
        .into_inner();
    assert!(bobs.sandboxes.is_empty());

    // The listing merges all runners, and pages across them.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_sandboxes(with_key(
                pb::ListSandboxesRequest {
                    page_size: 4,
                    page_token: token.clone(),
                    ..Default::default()
                },
                ALICE,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.sandboxes.len() <= 4);
        seen.extend(page.sandboxes.into_iter().map(|s| s.sandbox_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut want = ids.clone();
    want.sort();
    seen.sort();
    assert_eq!(seen, want);

    // Pins: honoured; an unknown runner is refused naming the field.
    let pinned = c
        .create_sandbox(with_key(create("pin", &["r2"]), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(runner_of(&pinned), "r2");
    let e = c
        .create_sandbox(with_key(create("pin", &["nope"]), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("runner_ids[0]"), "{}", e.message());

    // r2 is full now (3 of 3): a pin to it is refused with RetryInfo.
    let e = c
        .create_sandbox(with_key(create("pin", &["r2"]), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason(&e), "CWSANDBOX_RUNNER_CAPACITY_EXHAUSTED");
    assert!(e.get_error_details().retry_info().is_some());

    // A delete through the gateway gives the slot back at once.
    c.delete_sandbox(with_key(
        pb::DeleteSandboxRequest {
            sandbox_id: pinned.sandbox_id.clone(),
            ..Default::default()
        },
        ALICE,
    ))
    .await
    .unwrap();
    let again = c
        .create_sandbox(with_key(create("pin", &["r2"]), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(runner_of(&again), "r2");

    // Discovery lists every runner, each describing itself.
    let mut d = DiscoveryServiceClient::new(
        Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let listed = d
        .list_available_runners(with_key(pb::ListAvailableRunnersRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed
        .runners
        .iter()
        .map(|r| r.runner_id.as_str())
        .collect();
    assert_eq!(names, ["r1", "r2", "r3"]);

    // r3 stops answering: after its lease its sandboxes read FAILED with
    // the reason, data-plane calls are refused as not running, and new
    // creates go elsewhere.
    let on_r3: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            let sb = c
                .get_sandbox(with_key(
                    pb::GetSandboxRequest {
                        sandbox_id: id.clone(),
                    },
                    ALICE,
                ))
                .await
                .unwrap()
                .into_inner();
            if runner_of(&sb) == "r3" {
                v.push(id.clone());
            }
        }
        v
    };
    assert_eq!(on_r3.len(), 2);
    runners[2].kill();
    let deadline = tokio::time::Instant::now() + LEASE * 5;
    let failed = loop {
        let sb = c
            .get_sandbox(with_key(
                pb::GetSandboxRequest {
                    sandbox_id: on_r3[0].clone(),
                },
                ALICE,
            ))
            .await;
        if let Ok(sb) = sb {
            let st = sb.into_inner().status.unwrap();
            if st.state == pb::State::Failed as i32 {
                break st;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "r3's sandbox never failed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        failed.state_reason.contains("r3"),
        "{}",
        failed.state_reason
    );
    assert!(
        failed.state_reason.contains("lease"),
        "{}",
        failed.state_reason
    );
    let e = c
        .exec(with_key(
            pb::ExecRequest {
                sandbox_id: on_r3[1].clone(),
                command: vec!["true".into()],
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason(&e), "CWSANDBOX_SANDBOX_NOT_RUNNING");
    // r1 holds 2 of 3 and r2 3 of 3: the next create fits r1 only, and the
    // one after it nowhere (r3 is gone).
    let sb = c
        .create_sandbox(with_key(create("after", &[]), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(runner_of(&sb), "r1");
    let e = c
        .create_sandbox(with_key(create("after", &[]), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Listings leave the silent runner out instead of failing.
    let listed = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.iter().all(|s| runner_of(s) != "r3"));
    for r in &runners {
        r.kill();
    }
}

/// Waits until `auth` holds `n` of the store's principals: its sync ran.
async fn synced(auth: &Auth, n: usize) {
    let deadline = tokio::time::Instant::now() + LEASE * 5;
    while auth.shared_len() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sync never installed {n} principals: {auth:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_principal_in_the_store_is_accepted_everywhere_until_revoked() {
    let Some(pg) = pg::Pg::start() else { return };
    // The runner's config has alice and bob; the gateway's has no key.
    let runner_auth = auth();
    let r1 = runner_with(&pg, "r1", 3, runner_auth.clone(), true).await;
    let gateway_auth = Auth::new(&[]);
    let (url, _gw) = gateway_with(&pg, gateway_auth.clone(), true).await;
    let mut c = client(&url).await;
    let mut direct = client(&r1.url).await;
    let admin = connect(&settings(&pg, Role::Gateway, None)).await.unwrap();

    // A gateway without configured keys knows none before the store has one.
    let e = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let carol = admin.add_principal("carol", Some("acme")).await.unwrap();
    let e = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), &carol))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "before any sync");
    synced(&gateway_auth, 1).await;
    synced(&runner_auth, 1).await;

    // Created through the gateway: the runner checks carol's key again.
    let sb = c
        .create_sandbox(with_key(create("store-key", &[]), &carol))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(runner_of(&sb), "r1");
    let get = || pb::GetSandboxRequest {
        sandbox_id: sb.sandbox_id.clone(),
    };
    let got = c
        .get_sandbox(with_key(get(), &carol))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.sandbox_id, sb.sandbox_id);
    direct.get_sandbox(with_key(get(), &carol)).await.unwrap();
    // Tenancy holds for store principals: alice (the runner's own key)
    // does not see carol's sandbox.
    let e = direct
        .get_sandbox(with_key(get(), ALICE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Revoked: refused at the gateway and at the runner after a sync.
    assert!(admin.revoke_principal("carol").await.unwrap());
    synced(&gateway_auth, 0).await;
    synced(&runner_auth, 0).await;
    let e = c.get_sandbox(with_key(get(), &carol)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = direct
        .get_sandbox(with_key(get(), &carol))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // The runner's configured keys never depended on the store.
    direct
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
        .await
        .unwrap();

    // PostgreSQL away: the last good set stays (a principal added just
    // before is still let in once the server is gone).
    let dave = admin.add_principal("dave", None).await.unwrap();
    synced(&gateway_auth, 1).await;
    synced(&runner_auth, 1).await;
    drop(pg);
    tokio::time::sleep(LEASE).await;
    assert_eq!(gateway_auth.shared_len(), 1);
    direct
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), &dave))
        .await
        .unwrap();
    r1.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_principal_commands_manage_the_store() {
    use sandpit_server::principals::{run_command, PrincipalCommand};
    let Some(pg) = pg::Pg::start() else { return };
    let cluster = settings(&pg, Role::Gateway, None);
    let run = |cmd: PrincipalCommand| {
        let cluster = cluster.clone();
        async move {
            let mut out = Vec::new();
            let r = run_command(&cmd, &cluster, &mut out).await;
            (
                r.map_err(|e| e.exit_code()),
                String::from_utf8(out).unwrap(),
            )
        }
    };
    let add = |name: &str| PrincipalCommand::Add {
        name: name.into(),
        organization: Some("acme".into()),
    };
    let (r, key) = run(add("alice")).await;
    assert_eq!(r, Ok(()));
    let key = key.trim().to_owned();
    assert_eq!(key.len(), 64, "{key:?}");
    // The name is taken: refused, exit 1.
    assert_eq!(run(add("alice")).await.0, Err(1));
    // A bad name is a usage error.
    assert_eq!(run(add("has space")).await.0, Err(2));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "an-existing-key-0123456789\n").unwrap();
    let import = |name: &str, key_file: std::path::PathBuf| PrincipalCommand::Import {
        name: name.into(),
        key_file,
        organization: None,
    };
    assert_eq!(
        run(import("bob", file.clone())).await,
        (Ok(()), String::new())
    );
    assert_eq!(
        run(import("carol", file.clone())).await.0,
        Err(1),
        "key taken"
    );
    assert_eq!(
        run(import("carol", dir.path().join("missing"))).await.0,
        Err(2)
    );

    let revoke = |name: &str| PrincipalCommand::Revoke { name: name.into() };
    assert_eq!(run(revoke("bob")).await.0, Ok(()));
    assert_eq!(run(revoke("bob")).await.0, Err(1), "revoked already");
    assert_eq!(run(revoke("nobody")).await.0, Err(1));

    let (r, listing) = run(PrincipalCommand::List).await;
    assert_eq!(r, Ok(()));
    let lines: Vec<_> = listing.lines().collect();
    assert_eq!(lines.len(), 3, "{listing}");
    assert!(lines[0].starts_with("NAME"), "{listing}");
    assert!(lines[1].starts_with("alice") && lines[1].contains("acme"));
    assert!(
        lines[1].trim_end().ends_with('-'),
        "alice is live: {listing}"
    );
    assert!(lines[2].starts_with("bob") && !lines[2].trim_end().ends_with('-'));
    assert!(!listing.contains(&key) && !listing.contains("an-existing-key"));
}
