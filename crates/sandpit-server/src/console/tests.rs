//! The console's routes, auth and headers through a real listener, over the
//! in-memory engine; raw HTTP/1.1 and websocket frames, so that what is
//! checked is what a browser gets.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::auth::ApiKey;
use crate::clock::SystemClock;
use crate::db::Db;
use crate::fake::FakeEngine;
use crate::logs::NullSink;
use crate::manager::ManagerConfig;
use crate::model::NewSandbox;

const IMAGE: &str = "docker.io/library/python:3.11";
const ALICE: &str = "k-alice";
const BOB: &str = "k-bob";

struct Fixture {
    console: ConsoleServer,
    manager: Manager<FakeEngine>,
}

async fn fixture() -> Fixture {
    let engine = FakeEngine::new();
    engine.add_image(IMAGE, &[], &["python3"]);
    let manager = Manager::start(
        ManagerConfig::default(),
        engine,
        Db::in_memory().unwrap(),
        Arc::new(SystemClock),
        Arc::new(NullSink),
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
            name: Some("bob".into()),
            organization: None,
        },
    ]);
    let settings = ConsoleSettings {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        origins: vec![],
    };
    let console = ConsoleServer::start(&settings, manager.clone(), auth, None)
        .await
        .unwrap();
    Fixture { console, manager }
}

async fn create(m: &Manager<FakeEngine>, who: &str, tags: &[&str]) -> String {
    let r = m
        .create(
            &Principal(who.into()),
            NewSandbox {
                image: IMAGE.into(),
                command: Some("sleep".into()),
                args: vec!["infinity".into()],
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    r.id.to_string()
}

/// A response: status, headers (names lowercased), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = vec![];
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let (status, headers) = parse_head(std::str::from_utf8(&raw[..split]).unwrap());
    Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A websocket upgrade with this `Origin` (none: `None`): the status, and
/// the stream when it was upgraded.
async fn upgrade(addr: SocketAddr, path: &str, origin: Option<&str>) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    if let Some(o) = origin {
        req.push_str(&format!("Origin: {o}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The head only, byte by byte: frames may follow it.
    let mut head = vec![];
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let (status, _) = parse_head(std::str::from_utf8(&head).unwrap());
    (status, s)
}

/// A client frame (masked, as clients must).
async fn send_frame(s: &mut TcpStream, opcode: u8, payload: &[u8]) {
    let mut f = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend((n as u16).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&f).await.unwrap();
}

/// The next server frame: opcode and payload.
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let b0 = s.read_u8().await.unwrap();
    let b1 = s.read_u8().await.unwrap();
    let len = match b1 & 0x7f {
        126 => u64::from(s.read_u16().await.unwrap()),
        127 => s.read_u64().await.unwrap(),
        n => u64::from(n),
    };
    let mut payload = vec![0; len as usize];
    s.read_exact(&mut payload).await.unwrap();
    (b0 & 0x0f, payload)
}

async fn read_json(s: &mut TcpStream) -> serde_json::Value {
    let (op, payload) = read_frame(s).await;
    assert_eq!(op, 1, "not a text frame: {payload:?}");
    serde_json::from_slice(&payload).unwrap()
}

#[tokio::test]
async fn the_api_answers_401_without_a_valid_key() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    for path in ["/api/whoami", "/api/sandboxes"] {
        for headers in [
            vec![],
            vec![("Authorization", bearer("k-mallory"))],
            vec![("Authorization", format!("Basic {ALICE}"))],
            // The wandb header is the gRPC API's, not the page's.
            vec![("x-wandb-api-key", ALICE.to_owned())],
        ] {
            let h: Vec<_> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let r = http(addr, "GET", path, &h).await;
            assert_eq!(r.status, 401, "{path} {headers:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert!(r.json()["error"].is_string());
        }
    }
    let stop = http(addr, "POST", "/api/sandboxes/abc/stop", &[]).await;
    assert_eq!(stop.status, 401);
    let me = http(
        addr,
        "GET",
        "/api/whoami",
        &[("Authorization", &bearer(ALICE))],
    )
    .await;
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["principal"], "alice");
    f.console.shutdown().await;
}

#[tokio::test]
async fn every_response_carries_the_security_headers_and_no_cors() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    let evil = [("Origin", "http://evil.example")];
    for (method, path, status) in [
        ("GET", "/", 200),
        ("GET", "/app.js", 200),
        ("GET", "/xterm.js", 200),
        ("GET", "/api/sandboxes", 401),
        ("GET", "/nowhere", 404),
        ("OPTIONS", "/api/sandboxes", 405),
    ] {
        let r = http(addr, method, path, &evil).await;
        assert_eq!(r.status, status, "{method} {path}");
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert!(
            !r.headers
                .iter()
                .any(|(n, _)| n.starts_with("access-control-")),
            "{path}: {:?}",
            r.headers
        );
    }
    // The page loads its script from a file: nothing inline to allow.
    let page = http(addr, "GET", "/", &[]).await;
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<script src=\"/app.js\" defer></script>"));
    assert!(!html.contains("<script>") && !html.contains("javascript:"));
    for handler in ["onclick=", "onload=", "onsubmit=", "onerror=", "oninput="] {
        assert!(!html.contains(handler), "{handler}");
    }
    assert!(CSP.contains("script-src 'self';") && !CSP.contains("unsafe-eval"));
    let js = http(addr, "GET", "/app.js", &[]).await;
    assert_eq!(
        js.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    f.console.shutdown().await;
}

#[tokio::test]
async fn the_table_shows_only_the_callers_sandboxes_with_its_filters() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    let web = create(&f.manager, "alice", &["web"]).await;
    let db = create(&f.manager, "alice", &["db"]).await;
    let bobs = create(&f.manager, "bob", &["web"]).await;
    let ids = |r: &Reply| -> Vec<String> {
        let mut v: Vec<String> = r.json()["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let auth = bearer(ALICE);
    let h = [("Authorization", auth.as_str())];
    let all = http(addr, "GET", "/api/sandboxes", &h).await;
    assert_eq!(all.status, 200);
    let mut mine = vec![web.clone(), db.clone()];
    mine.sort();
    assert_eq!(ids(&all), mine);
    let row = &all.json()["sandboxes"][0];
    assert_eq!(row["state"], "running");
    assert_eq!(row["image"], IMAGE);
    assert!(row["created_ms"].as_u64().unwrap() > 0);
    let tagged = http(addr, "GET", "/api/sandboxes?tag=web", &h).await;
    assert_eq!(ids(&tagged), [web.as_str()]);
    let running = http(addr, "GET", "/api/sandboxes?state=running&tag=db", &h).await;
    assert_eq!(ids(&running), [db.as_str()]);
    let none = http(addr, "GET", "/api/sandboxes?state=completed", &h).await;
    assert!(ids(&none).is_empty());
    let bad = http(addr, "GET", "/api/sandboxes?state=paused", &h).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().unwrap().starts_with("state:"));
    // Bob's sandbox is nobody else's: not listed, and not found to stop.
    let theirs = http(addr, "POST", &format!("/api/sandboxes/{bobs}/stop"), &h).await;
    assert_eq!(theirs.status, 404);
    let junk = http(addr, "POST", "/api/sandboxes/..%2F/stop", &h).await;
    assert_eq!(junk.status, 404);
    f.manager.engine().set_sigterm_exits(true);
    let stopped = http(addr, "POST", &format!("/api/sandboxes/{db}/stop"), &h).await;
    assert_eq!(stopped.status, 200, "{:?}", stopped.json());
    assert_eq!(stopped.json()["state"], "terminated");
    f.console.shutdown().await;
}

#[tokio::test]
async fn websockets_need_the_consoles_own_origin() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    let own = format!("http://{addr}");
    for path in ["/api/ws/logs", "/api/ws/terminal"] {
        assert_eq!(upgrade(addr, path, None).await.0, 403, "{path}");
        assert_eq!(
            upgrade(addr, path, Some("http://evil.example")).await.0,
            403
        );
        let other_port = format!("http://127.0.0.1:{}", addr.port() + 1);
        assert_eq!(upgrade(addr, path, Some(&other_port)).await.0, 403);
        assert_eq!(upgrade(addr, path, Some(&own)).await.0, 101, "{path}");
        let localhost = format!("http://localhost:{}", addr.port());
        assert_eq!(upgrade(addr, path, Some(&localhost)).await.0, 101);
    }
    f.console.shutdown().await;
}

#[test]
fn origins_follow_the_listen_address() {
    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    let loopback = Origins::new("127.0.0.1:8080".parse().unwrap(), &[]);
    assert!(loopback.allow(Some(&v("http://127.0.0.1:8080")), None));
    assert!(loopback.allow(Some(&v("http://localhost:8080")), None));
    assert!(!loopback.allow(Some(&v("https://127.0.0.1:8080")), None));
    assert!(!loopback.allow(Some(&v("null")), None));
    assert!(!loopback.allow(None, Some(&v("127.0.0.1:8080"))));
    let any = Origins::new(
        "0.0.0.0:8080".parse().unwrap(),
        &["https://c.example".into()],
    );
    let host = v("10.1.2.3:8080");
    assert!(any.allow(Some(&v("http://10.1.2.3:8080")), Some(&host)));
    assert!(!any.allow(Some(&v("http://evil.example")), Some(&host)));
    assert!(any.allow(Some(&v("https://c.example")), None));
    let v6 = Origins::new("[::1]:9000".parse().unwrap(), &[]);
    assert!(v6.allow(Some(&v("http://[::1]:9000")), None));
    let port80 = Origins::new("127.0.0.1:80".parse().unwrap(), &[]);
    assert!(port80.allow(Some(&v("http://localhost")), None));
    assert!(port80.allow(Some(&v("http://127.0.0.1:80")), None));
    assert!(!loopback.allow(Some(&v("http://localhost")), None));
}

#[tokio::test]
async fn a_websocket_acts_only_on_a_valid_key_and_the_callers_sandbox() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    let own = format!("http://{addr}");
    let bobs = create(&f.manager, "bob", &[]).await;
    let alices = create(&f.manager, "alice", &[]).await;
    for path in ["/api/ws/logs", "/api/ws/terminal"] {
        for (hello, status) in [
            (
                format!(r#"{{"key":"k-mallory","sandbox_id":"{alices}"}}"#),
                401,
            ),
            (format!(r#"{{"sandbox_id":"{alices}"}}"#), 400),
            (format!(r#"{{"key":"{ALICE}","sandbox_id":"{bobs}"}}"#), 404),
            (format!(r#"{{"key":"{ALICE}","sandbox_id":"../x"}}"#), 404),
        ] {
            let (code, mut s) = upgrade(addr, path, Some(&own)).await;
            assert_eq!(code, 101);
            send_frame(&mut s, 1, hello.as_bytes()).await;
            let reply = read_json(&mut s).await;
            assert_eq!(reply["type"], "error", "{path} {hello}: {reply}");
            assert_eq!(reply["status"], status, "{path} {hello}: {reply}");
            let (op, close) = read_frame(&mut s).await;
            assert_eq!(op, 8);
            assert_eq!(u16::from_be_bytes([close[0], close[1]]), 4000 + status);
        }
    }
    f.console.shutdown().await;
}

#[tokio::test]
async fn the_terminal_carries_keystrokes_and_output_through_a_pty() {
    let f = fixture().await;
    let addr = f.console.local_addr();
    let id = create(&f.manager, "alice", &[]).await;
    let (code, mut s) = upgrade(addr, "/api/ws/terminal", Some(&format!("http://{addr}"))).await;
    assert_eq!(code, 101);
    let hello = format!(
        r#"{{"key":"{ALICE}","sandbox_id":"{id}","command":["cat"],"cols":100,"rows":30}}"#
    );
    send_frame(&mut s, 1, hello.as_bytes()).await;
    assert_eq!(read_json(&mut s).await["type"], "ready");
    send_frame(&mut s, 1, br#"{"resize":[120,40]}"#).await;
    send_frame(&mut s, 2, b"typed\n").await;
    let (op, out) = read_frame(&mut s).await;
    assert_eq!((op, out.as_slice()), (2, b"typed\n".as_slice()));
    let exec = f.manager.engine().execs(&id).last().unwrap().clone();
    assert_eq!(exec.argv, ["cat"]);
    assert_eq!(
        exec.tty,
        Some(sandpit_wire::WinSize {
            cols: 100,
            rows: 30
        })
    );
    assert!(exec
        .env
        .contains(&("TERM".to_owned(), "xterm-256color".to_owned())));
    f.console.shutdown().await;
}
