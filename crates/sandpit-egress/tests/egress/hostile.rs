//! Hostile clients: every read is cut at its byte bound or its deadline,
//! every sandbox at its connection bound.

use std::time::{Duration, Instant};

use sandpit_egress::testing::{
    connect_from, name_rule, parse_reply, rules_policy, sandbox_ip, Lab,
};
use sandpit_egress::ProxyRefusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{zone, CERT_NAMES};

async fn short_lab() -> Lab {
    Lab::start_with(&zone(), CERT_NAMES, |_, proxy| {
        proxy.first_bytes_timeout = Duration::from_secs(1);
        proxy.idle_timeout = Duration::from_secs(1);
        proxy.max_connections_per_sandbox = 4;
    })
    .await
}

/// Reads until the proxy closes (or 5 s pass: a failure).
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the proxy did not close the connection"),
        }
    }
}

/// A TLS record header and ClientHello header announcing `len` bytes.
fn hello_header(len: u32) -> Vec<u8> {
    let mut v = vec![0x16, 3, 1, 0x40, 0x00, 1];
    v.extend_from_slice(&len.to_be_bytes()[1..]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_client_hello_is_cut() {
    let lab = short_lab().await;
    let sb = lab.sandbox(
        sandbox_ip(1),
        rules_policy("sb1", vec![name_rule("api.test", &[])], &[]),
    );
    // Announcing more than the bound: cut at the header, alert sent.
    let mut s = connect_from(sandbox_ip(1), lab.tls_addr).await.unwrap();
    s.write_all(&hello_header(0xff_ffff)).await.unwrap();
    let start = Instant::now();
    let got = until_closed(&mut s).await;
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(got, vec![0x15, 3, 3, 0, 2, 2, 50]);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::TooLarge), 1);
    // Within the bound but never finished, fed as fast as it takes: the
    // deadline cuts it.
    let mut s = connect_from(sandbox_ip(1), lab.tls_addr).await.unwrap();
    s.write_all(&hello_header(16000)).await.unwrap();
    let start = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let feeder = tokio::spawn(async move {
        let junk = [0u8; 64];
        while wr.write_all(&junk).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut sink))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    feeder.abort();
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::Timeout), 1);
    // Not TLS at all.
    let mut s = connect_from(sandbox_ip(1), lab.tls_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, vec![0x15, 3, 3, 0, 2, 2, 50]);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::Malformed), 1);
    assert_eq!(lab.https.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_header_is_cut_at_the_bound() {
    let lab = short_lab().await;
    let sb = lab.sandbox(
        sandbox_ip(2),
        rules_policy("sb2", vec![name_rule("api.test", &[80])], &[]),
    );
    let s = connect_from(sandbox_ip(2), lab.http_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut req = b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Big: ".to_vec();
        req.resize(1 << 20, b'a');
        // The proxy stops reading at its bound: this write fails or stalls.
        let _ = tokio::time::timeout(Duration::from_secs(3), wr.write_all(&req)).await;
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut got))
        .await
        .unwrap();
    writer.abort();
    if !got.is_empty() {
        assert_eq!(parse_reply(&got).unwrap().status, 431);
    }
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::TooLarge), 1);
    assert!(sb.usage().bytes_out() == 0, "nothing went upstream");
    assert_eq!(lab.http.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_gets_the_same_deadline() {
    let lab = short_lab().await;
    let sb = lab.sandbox(
        sandbox_ip(3),
        rules_policy("sb3", vec![name_rule("api.test", &[80])], &[]),
    );
    let mut s = connect_from(sandbox_ip(3), lab.http_addr).await.unwrap();
    let start = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: api.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut reply = Vec::new();
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        // Anything back means the proxy gave up on us.
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await
        {
            reply.extend_from_slice(&buf[..n]);
            break;
        }
    }
    reply.extend(until_closed(&mut s).await);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(parse_reply(&reply).unwrap().status, 408);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::Timeout), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_sandbox_are_bounded() {
    let lab = short_lab().await;
    let greedy = lab.sandbox(
        sandbox_ip(4),
        rules_policy("sb4", vec![name_rule("api.test", &[80])], &[]),
    );
    lab.sandbox(
        sandbox_ip(5),
        rules_policy("sb5", vec![name_rule("api.test", &[80])], &[]),
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(sandbox_ip(4), lab.http_addr).await.unwrap());
    }
    // Let the proxy accept them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(greedy.usage().open_connections(), 4);
    let mut fifth = connect_from(sandbox_ip(4), lab.http_addr).await.unwrap();
    let got = until_closed(&mut fifth).await;
    assert_eq!(parse_reply(&got).unwrap().status, 503);
    assert_eq!(
        greedy
            .usage()
            .proxy_refused(ProxyRefusal::TooManyConnections),
        1
    );
    // Another sandbox is served meanwhile.
    assert_eq!(
        lab.http_get(sandbox_ip(5), "api.test", "/")
            .await
            .unwrap()
            .status,
        200
    );
    // The held ones time out (1 s), freeing the slots.
    for mut s in held {
        until_closed(&mut s).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(greedy.usage().open_connections(), 0);
    assert_eq!(
        lab.http_get(sandbox_ip(4), "api.test", "/")
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let lab = short_lab().await;
    let sb = lab.sandbox(
        sandbox_ip(6),
        rules_policy("sb6", vec![name_rule("api.test", &[])], &[]),
    );
    // A completed handshake through the proxy, then silence.
    let tcp = connect_from(sandbox_ip(6), lab.tls_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(lab.ca.client_config())
        .connect(name, tcp)
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(sb.usage().proxy_allowed(), 1);
}
