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
    }
}

/// One runner: a daemon over the fake engine, its membership heartbeating.
struct Runner {
    server: tokio::task::JoinHandle<()>,
    membership: tokio::task::JoinHandle<()>,
}

impl Runner {
    /// Stops answering at once, like `kill -9`: no more calls, no more
    /// heartbeats, nothing released.
    fn kill(&self) {
        self.server.abort();
        self.membership.abort();
    }
}

async fn runner(pg: &pg::Pg, id: &str, max_sandboxes: usize) -> Runner {
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
    let cluster = settings(pg, Role::Runner, Some(url));
    let store = connect(&cluster).await.unwrap();
    let offered = Capacity {
        cpu_millis: alloc.cpu_millis,
        memory_bytes: alloc.memory_bytes,
        sandboxes: max_sandboxes as u32,
    };
    let member = Membership::join(store, &cluster, id, offered, &manager)
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
            auth(),
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
    Runner { server, membership }
}

async fn gateway(pg: &pg::Pg) -> (String, tokio::task::JoinHandle<()>) {
    let cluster = settings(pg, Role::Gateway, None);
    let store = connect(&cluster).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        sandpit_server::gateway::serve(
            listener,
            store,
            auth(),
            GatewayOptions {
                max_message_bytes: 16 << 20,
                tls: None,
                default_resources: DEFAULT_RESOURCES,
                lease: LEASE,
            },
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (url, task)
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
