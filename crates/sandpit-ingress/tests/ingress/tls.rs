use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sandpit_ingress::{Auth, RouteKind, RouteTable, TlsPassthrough};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::support::*;

const NAME: &str = "8443-sb-t.sb.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS backend with a self-signed certificate for [`NAME`], answering
/// each line with `tls:<line>`; counts the connections it accepted.
async fn tls_backend() -> (SocketAddr, Arc<AtomicUsize>, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec![NAME.to_owned()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut tls = BufReader::new(tls);
                let mut line = String::new();
                while tls.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let reply = format!("tls:{line}");
                    tls.get_mut().write_all(reply.as_bytes()).await.unwrap();
                    line.clear();
                }
            });
        }
    });
    (addr, accepted, cert)
}

async fn passthrough(table: &Arc<RouteTable>) -> SocketAddr {
    let p = TlsPassthrough::bind("127.0.0.1:0".parse().unwrap(), DOMAIN, table.clone())
        .await
        .unwrap();
    let addr = p.local_addr().unwrap();
    tokio::spawn(p.run());
    addr
}

fn connector(cert: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn splices_tls_to_the_backend_named_by_sni() {
    let (backend, accepted, cert) = tls_backend().await;
    let table = Arc::new(RouteTable::new());
    table
        .insert(
            "sb-t",
            8443,
            route(backend, Auth::Open, RouteKind::TlsPassthrough),
        )
        .unwrap();
    let front = passthrough(&table).await;

    // The client verifies the backend's own certificate: TLS ends there.
    let tcp = TcpStream::connect(front).await.unwrap();
    let name = ServerName::try_from("8443-SB-T.sb.test").unwrap();
    let mut tls = connector(&cert).connect(name, tcp).await.unwrap();
    tls.write_all(b"hello\n").await.unwrap();
    let mut buf = [0u8; 10];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"tls:hello\n");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn refuses_unknown_names_and_other_kinds() {
    let (backend, accepted, cert) = tls_backend().await;
    let table = Arc::new(RouteTable::new());
    table
        .insert(
            "sb-t",
            8443,
            route(backend, Auth::Open, RouteKind::TlsPassthrough),
        )
        .unwrap();
    table
        .insert("sb-t", 80, route(backend, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = passthrough(&table).await;

    for sni in [
        "9999-sb-t.sb.test",
        "80-sb-t.sb.test",
        "8443-sb-t.other.test",
        "evil.example",
    ] {
        let tcp = TcpStream::connect(front).await.unwrap();
        let name = ServerName::try_from(sni).unwrap();
        assert!(connector(&cert).connect(name, tcp).await.is_err(), "{sni}");
    }
    // Not TLS at all: closed without an answer.
    let mut tcp = TcpStream::connect(front).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: 8443-sb-t.sb.test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(&mut tcp).await.is_empty());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
}
