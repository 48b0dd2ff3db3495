use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::StatusCode;
use sandpit_ingress::{Auth, HttpConfig, HttpFrontend, RouteKind, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

#[tokio::test]
async fn routes_by_host_and_sets_forwarded_headers() {
    let table = Arc::new(RouteTable::new());
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    table
        .insert("sb-a", 80, route(a, Auth::Open, RouteKind::Http))
        .unwrap();
    table
        .insert("sb-b", 8080, route(b, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;

    // One keep-alive connection, two hosts.
    let mut c = Client::connect(front).await;
    let (status, _, body) = c
        .get(
            "80-sb-a.sb.test:1234",
            "/x?y=1",
            &[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("backend=a\n"), "{body}");
    assert!(body.contains("path=/x\n"), "{body}");
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(!body.contains("6.6.6.6"), "{body}");
    assert!(body.contains("x-forwarded-proto: http\n"), "{body}");
    assert!(
        body.contains("x-forwarded-host: 80-sb-a.sb.test:1234\n"),
        "{body}"
    );
    assert!(body.contains("host: 80-sb-a.sb.test:1234\n"), "{body}");

    let (status, _, body) = c.get("8080-SB-B.Sb.Test", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.starts_with("backend=b\n"), "{body}");

    // A request body streams through.
    let big = Bytes::from(vec![7u8; 3 << 20]);
    let resp = c.send("80-sb-a.sb.test", "/up", &[], Some(big)).await;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.contains("method=POST\n"), "{body}");
    assert!(body.contains("body=3145728\n"), "{body}");
}

#[tokio::test]
async fn unknown_hosts_and_routes_are_404() {
    let table = Arc::new(RouteTable::new());
    let a = echo_backend("a").await;
    table
        .insert("sb-a", 80, route(a, Auth::Open, RouteKind::Http))
        .unwrap();
    table
        .insert("sb-a", 443, route(a, Auth::Open, RouteKind::TlsPassthrough))
        .unwrap();
    let front = http_frontend(&table).await;
    let mut c = Client::connect(front).await;
    for host in [
        "evil.example",
        "127.0.0.1",
        "81-sb-a.sb.test",
        "80-sb-c.sb.test",
        "443-sb-a.sb.test",
        "80-sb-a.sb.test.evil.example",
        "sb.test",
    ] {
        let (status, _, body) = c.get(host, "/", &[]).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{host}");
        assert_eq!(body, "no such service\n", "{host}");
    }
    // Still served on the same connection afterwards.
    let (status, _, _) = c.get("80-sb-a.sb.test", "/", &[]).await;
    assert_eq!(status, StatusCode::OK);
    // A removed route is gone.
    table.remove("sb-a", 80);
    let (status, _, _) = c.get("80-sb-a.sb.test", "/", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn share_token_is_required_and_never_forwarded() {
    let table = Arc::new(RouteTable::new());
    let a = echo_backend("a").await;
    let token = Auth::ShareToken("t0ken".into());
    table
        .insert("sb-a", 80, route(a, token, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;
    let mut c = Client::connect(front).await;
    let host = "80-sb-a.sb.test";

    let (status, _, body) = c.get(host, "/", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "share token required\n");
    let (status, _, _) = c.get(host, "/", &[("x-sandbox-share-token", "t0ke")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, body) = c
        .get(
            host,
            "/",
            &[("X-Sandbox-Share-Token", "t0ken"), ("x-other", "1")],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("x-other: 1\n"), "{body}");
    assert!(!body.contains("share-token"), "{body}");
    assert!(!body.contains("t0ken"), "{body}");
}

#[tokio::test]
async fn backend_down_is_502() {
    let table = Arc::new(RouteTable::new());
    let dead = dead_addr().await;
    table
        .insert("sb-a", 80, route(dead, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;
    let (status, _, body) = Client::connect(front)
        .await
        .get("80-sb-a.sb.test", "/", &[])
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body, "backend unreachable\n");
}

#[tokio::test]
async fn slow_backend_is_504() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(listener.accept().await.unwrap().0);
        }
    });
    let table = Arc::new(RouteTable::new());
    let mut r = route(backend, Auth::Open, RouteKind::Http);
    r.request_timeout = Some(Duration::from_millis(300));
    table.insert("sb-a", 80, r).unwrap();
    let front = http_frontend(&table).await;
    let started = std::time::Instant::now();
    let (status, _, body) = Client::connect(front)
        .await
        .get("80-sb-a.sb.test", "/", &[])
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "backend timed out\n");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn large_responses_stream() {
    const FIRST: usize = 1 << 20;
    const TOTAL: usize = 8 << 20;
    let pattern = |i: usize| (i % 251) as u8;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {TOTAL}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let data: Vec<u8> = (0..TOTAL).map(pattern).collect();
        s.write_all(&data[..FIRST]).await.unwrap();
        // The rest only once the client has seen the first MiB: the
        // frontend cannot be buffering the whole body.
        wait.await.unwrap();
        s.write_all(&data[FIRST..]).await.unwrap();
    });
    let table = Arc::new(RouteTable::new());
    table
        .insert("sb-a", 80, route(backend, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;
    let mut c = Client::connect(front).await;
    let resp = c.send("80-sb-a.sb.test", "/big", &[], None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(TOTAL);
    let mut go = Some(go);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            got.extend_from_slice(data);
        }
        if got.len() >= FIRST {
            if let Some(go) = go.take() {
                assert_eq!(got.len(), FIRST, "more than the backend sent");
                go.send(()).unwrap();
            }
        }
    }
    assert_eq!(got.len(), TOTAL);
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
}

#[tokio::test]
async fn upgrades_pass_through() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.contains("upgrade: echo\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });
    let table = Arc::new(RouteTable::new());
    table
        .insert("sb-a", 80, route(backend, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: 80-sb-a.sb.test\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let table = Arc::new(RouteTable::new());
    let a = echo_backend("a").await;
    table
        .insert("sb-a", 80, route(a, Auth::Open, RouteKind::Http))
        .unwrap();
    let front = http_frontend(&table).await;
    let mut s = tokio::net::TcpStream::connect(front).await.unwrap();
    let big = "a".repeat(32 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: 80-sb-a.sb.test\r\nx-big: {big}\r\n\r\n");
    // The frontend may close before reading all of it.
    let _ = s.write_all(req.as_bytes()).await;
    let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

/// Reads a message head (through the blank line) one byte at a time.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test]
async fn upgrades_are_bounded() {
    let table = Arc::new(RouteTable::new());
    let a = echo_backend("a").await;
    table
        .insert("sb-a", 80, route(a, Auth::Open, RouteKind::Http))
        .unwrap();
    let config = HttpConfig {
        max_upgraded: 0,
        ..HttpConfig::default()
    };
    let f = HttpFrontend::bind_with("127.0.0.1:0".parse().unwrap(), DOMAIN, table, config)
        .await
        .unwrap();
    let front = f.local_addr().unwrap();
    tokio::spawn(f.run());
    let mut c = Client::connect(front).await;
    let upgrade = [("connection", "upgrade"), ("upgrade", "echo")];
    let (status, _, body) = c.get("80-sb-a.sb.test", "/", &upgrade).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, "too many upgrades\n");
}
