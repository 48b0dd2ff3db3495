//! The daemon in-process on 127.0.0.1:0 over the in-memory engine, for the
//! gRPC tests: a remote caller's view through the generated tonic clients.

#![allow(dead_code)] // Each test binary uses part of it.

use std::sync::Arc;
use std::time::SystemTime;

use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_server::auth::{ApiKey, Auth};
use sandpit_server::clock::SystemClock;
use sandpit_server::db::Db;
use sandpit_server::fake::FakeEngine;
use sandpit_server::logs::{FileSink, LogSink, NullSink};
use sandpit_server::manager::{Manager, ManagerConfig};
use sandpit_server::secrets::{SecretStoreConfig, SecretStores, SecretValue, StoreKind};
use sandpit_server::server::{serve, ServerOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

pub(crate) const ALICE: &str = "alice-key";
pub(crate) const BOB: &str = "bob-key";
/// In the managed store `managed` of every test server.
pub(crate) const HF_TOKEN: &str = "hf_token-value-4b1d";
/// Member `password` of `db` in the directory store `local`.
pub(crate) const DB_PASSWORD: &str = "db-password-9c2e";

pub(crate) struct Server {
    pub(crate) url: String,
    _secrets: tempfile::TempDir,
    _logs: Option<tempfile::TempDir>,
    pub(crate) engine: FakeEngine,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// A server without kept logs.
pub(crate) async fn start() -> Server {
    start_with(false).await
}

/// A server; with `logs`, main-process output is kept (in a temporary
/// directory) and StreamLogs serves it.
pub(crate) async fn start_with(logs: bool) -> Server {
    start_full(logs, None).await
}

/// A server; with `tls` (certificate and key, PEM) it serves TLS only and
/// its url is `https://`.
pub(crate) async fn start_full(logs: bool, tls: Option<(Vec<u8>, Vec<u8>)>) -> Server {
    let logs_dir = logs.then(|| tempfile::tempdir().unwrap());
    let (sink, reader): (Arc<dyn LogSink>, _) = match &logs_dir {
        Some(d) => {
            let sink = FileSink::new(d.path()).unwrap();
            let reader = sink.reader();
            (Arc::new(sink), Some(reader))
        }
        None => (Arc::new(NullSink), None),
    };
    let engine = FakeEngine::new();
    engine.add_image("docker.io/library/python:3.11", &[], &["python3"]);
    let manager = Manager::start(
        ManagerConfig::default(),
        engine.clone(),
        Db::in_memory().unwrap(),
        Arc::new(SystemClock),
        sink,
    )
    .await
    .unwrap();
    let auth = Auth::new(&[
        ApiKey {
            key: ALICE.into(),
            name: Some("alice".into()),
            organization: None,
        },
        ApiKey {
            key: BOB.into(),
            name: None,
            organization: Some("acme".into()),
        },
    ]);
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("ghcr"), "bot:s3cret\n").unwrap();
    std::fs::write(
        secrets.path().join("db"),
        format!(r#"{{"password": "{DB_PASSWORD}", "user": "app"}}"#),
    )
    .unwrap();
    let vault = SecretStoreConfig {
        kind: StoreKind::Managed,
        // Dot names: out of the directory store's reach.
        dir: secrets.path().join(".managed"),
        key_file: Some(secrets.path().join(".managed.key")),
    };
    let m = vault.managed("managed").unwrap();
    m.set("HF_TOKEN", &SecretValue::new(HF_TOKEN.into()))
        .unwrap();
    let secret_stores = SecretStores::new(
        [
            (
                "local".to_owned(),
                SecretStoreConfig {
                    dir: secrets.path().to_owned(),
                    ..Default::default()
                },
            ),
            ("managed".to_owned(), vault),
        ]
        .into(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(
            listener,
            manager,
            auth,
            ServerOptions {
                max_message_bytes: 100 << 20,
                tls,
                runner_id: "runner-1".into(),
                organization_id: "org".into(),
                started: SystemTime::now(),
                max_file_bytes: 32 << 20,
                logs: reader,
                secret_stores,
            },
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
    });
    Server {
        url,
        _secrets: secrets,
        _logs: logs_dir,
        engine,
        stop: Some(tx),
        task,
    }
}

impl Server {
    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub(crate) async fn client(&self) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::new(self.channel().await)
    }
}

pub(crate) fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
    );
    r
}
