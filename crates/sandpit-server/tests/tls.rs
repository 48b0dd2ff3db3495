//! TLS on both endpoints a client reaches, in-process on 127.0.0.1:0: the
//! main endpoint with `tls_cert`/`tls_key`, and a runner's direct
//! data-plane endpoint (mTLS with ConnectSandbox's certificates). Both
//! build rustls server configs in a process that links two crypto
//! providers; these tests are what notices a panic there.

use std::sync::Arc;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_data_plane_service_client::SandboxDataPlaneServiceClient;
use sandpit_server::clock::SystemClock;
use sandpit_server::db::Db;
use sandpit_server::direct::ca::server_identity;
use sandpit_server::direct::server::{serve as serve_direct, DirectTls};
use sandpit_server::direct::{ClusterCa, Grant, CREDENTIAL_TTL};
use sandpit_server::fake::FakeEngine;
use sandpit_server::logs::NullSink;
use sandpit_server::manager::{Manager, ManagerConfig};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

mod common;
use common::*;

async fn tls_channel(url: &str, server_cert: &str, client: Option<Identity>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_cert))
        .domain_name("127.0.0.1");
    if let Some(identity) = client {
        tls = tls.identity(identity);
    }
    Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

/// A call that failed in the transport (no handler answered), with
/// `detail` in its source chain.
fn assert_transport_error(e: &tonic::Status, detail: &str) {
    assert!(
        matches!(e.code(), Code::Unavailable | Code::Unknown),
        "{e:?}"
    );
    let text = format!("{e:?}");
    assert!(
        text.contains("transport error") && text.contains(detail),
        "{text}"
    );
}

#[tokio::test]
async fn the_main_endpoint_serves_tls() {
    let (cert, key) = server_identity("127.0.0.1").unwrap();
    let server = start_full(false, Some((cert.clone().into(), key.into()))).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let channel = tls_channel(&server.url, &cert, None).await;
    let mut client =
        sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient::new(channel);
    let listed = client
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
        .await
        .expect("a call over TLS");
    assert!(listed.into_inner().sandboxes.is_empty());
    // Plain HTTP/2 to the TLS port is not served.
    let plain = Channel::from_shared(server.url.replace("https://", "http://"))
        .unwrap()
        .connect_lazy();
    let refused =
        sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient::new(plain)
            .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
            .await
            .expect_err("h2c to a TLS endpoint");
    assert_transport_error(&refused, "");
}

/// A client key and the CA's certificate for it carrying `grant`.
fn credential(ca: &ClusterCa, grant: &Grant) -> Identity {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca.issue(csr.der(), grant, CREDENTIAL_TTL).unwrap();
    Identity::from_pem(issued.chain_pem, key.serialize_pem())
}

#[tokio::test]
async fn the_direct_endpoint_requires_a_grant_for_the_sandbox_and_the_operation() {
    let manager = Manager::start(
        ManagerConfig::default(),
        FakeEngine::new(),
        Db::in_memory().unwrap(),
        Arc::new(SystemClock),
        Arc::new(NullSink),
    )
    .await
    .unwrap();
    let ca = ClusterCa::generate("test cluster CA").unwrap();
    let (cert, key) = server_identity("127.0.0.1").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let tls = DirectTls {
        cert_pem: cert.clone(),
        key_pem: key,
        client_ca_pem: ca.cert_pem().to_owned(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_direct(
        listener,
        manager,
        tls,
        4 << 20,
        Default::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let exec = |id: &str| pb::ExecRequest {
        sandbox_id: id.into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let grant = Grant {
        sandbox_id: "sb-mine".into(),
        principal: "alice".into(),
        permissions: vec![pb::SandboxDataPermission::Exec as i32],
    };
    let mut client = SandboxDataPlaneServiceClient::new(
        tls_channel(&url, &cert, Some(credential(&ca, &grant))).await,
    );

    // Its sandbox (which this runner does not hold): past the credential
    // check, the handler's own answer.
    let e = client.exec(exec("sb-mine")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Another sandbox, or an operation it was not granted: refused.
    let e = client.exec(exec("sb-other")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let read = pb::ReadFileRequest {
        sandbox_id: "sb-mine".into(),
        path: "/etc/hostname".into(),
        ..Default::default()
    };
    let e = client.read_file(read).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // No client certificate, or one from another CA: no handshake.
    let mut anonymous = SandboxDataPlaneServiceClient::new(tls_channel(&url, &cert, None).await);
    let e = anonymous.exec(exec("sb-mine")).await.unwrap_err();
    assert_transport_error(&e, "CertificateRequired");
    let stranger = ClusterCa::generate("another CA").unwrap();
    let mut forged = SandboxDataPlaneServiceClient::new(
        tls_channel(&url, &cert, Some(credential(&stranger, &grant))).await,
    );
    let e = forged.exec(exec("sb-mine")).await.unwrap_err();
    assert_transport_error(&e, "alert");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
