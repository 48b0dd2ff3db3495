//! Backends, clients and frontends for the tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sandpit_ingress::{Auth, HttpFrontend, Route, RouteKind, RouteTable};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) const DOMAIN: &str = "sb.test";

pub(crate) fn route(backend: SocketAddr, auth: Auth, kind: RouteKind) -> Route {
    Route {
        backend,
        auth,
        request_timeout: None,
        kind,
    }
}

/// An HTTP backend answering `backend=<name>`, `method`, `path`, the
/// length of the request body it read, then every request header as
/// `name: value` lines.
pub(crate) async fn echo_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let (parts, body) = req.into_parts();
                    let len = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    let mut text = format!(
                        "backend={name}\nmethod={}\npath={}\nbody={len}\n",
                        parts.method,
                        parts.uri.path()
                    );
                    for (k, v) in &parts.headers {
                        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap()));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                }),
            ));
        }
    });
    addr
}

/// An address nothing listens on.
pub(crate) async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A port free a moment ago.
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A started HTTP frontend's address.
pub(crate) async fn http_frontend(table: &Arc<RouteTable>) -> SocketAddr {
    let f = HttpFrontend::bind("127.0.0.1:0".parse().unwrap(), DOMAIN, table.clone())
        .await
        .unwrap();
    let addr = f.local_addr().unwrap();
    tokio::spawn(f.run());
    addr
}

/// One HTTP/1.1 client connection.
pub(crate) struct Client {
    sender: hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, Infallible>,
    >,
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        Self { sender }
    }

    /// Sends a request for `path` on `host` and returns the response head.
    pub(crate) async fn send(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Response<Incoming> {
        let mut req = Request::builder().uri(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => Full::new(b).boxed(),
            None => Empty::new().boxed(),
        };
        let req = req
            .method(if body_is_some(&body) { "POST" } else { "GET" })
            .body(body)
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.sender.send_request(req))
            .await
            .expect("response in time")
            .unwrap()
    }

    /// Like [`send`](Self::send), with the whole body as text.
    pub(crate) async fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let resp = self.send(host, path, headers, None).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }
}

fn body_is_some(body: &http_body_util::combinators::BoxBody<Bytes, Infallible>) -> bool {
    use hyper::body::Body;
    body.size_hint().exact() != Some(0)
}

/// Reads until `stream` ends (or fails: a reset also closes), within 10 s.
pub(crate) async fn read_to_close(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("closed in time");
    out
}
