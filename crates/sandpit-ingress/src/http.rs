//! The HTTP/1.1 reverse proxy: routes by Host, checks share tokens,
//! streams bodies, passes upgrades through.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::host::{normalize_domain, parse_service_host};
use crate::routes::{Route, RouteKind, RouteTable};
use crate::{bind, splice, BindError, ACCEPT_BACKOFF, SHARE_TOKEN_HEADER};

type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP frontend's bounds.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The most client connections served at once; further ones wait in
    /// the listen queue.
    pub max_connections: usize,
    /// The most upgraded (WebSocket and the like) connections spliced at
    /// once; they no longer count as HTTP connections. Further upgrade
    /// requests are answered 503.
    pub max_upgraded: usize,
    /// The most bytes of a request head (from clients) or response head
    /// (from backends). At least 8 KiB.
    pub max_header_bytes: usize,
    /// The most header fields of a request or response.
    pub max_headers: usize,
    /// How long a client has to send a request head; also how long an
    /// idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// How long connecting to a backend may take.
    pub connect_timeout: Duration,
    /// How long a backend may take to send its response head when its
    /// route sets no `request_timeout`.
    pub default_request_timeout: Duration,
    /// The `X-Forwarded-Proto` sent to backends: "http", or "https" when
    /// TLS is terminated in front of this frontend.
    pub forwarded_proto: HeaderValue,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_upgraded: 1024,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            default_request_timeout: Duration::from_secs(60),
            forwarded_proto: HeaderValue::from_static("http"),
        }
    }
}

/// The HTTP frontend.
#[derive(Debug)]
pub struct HttpFrontend {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

#[derive(Debug)]
struct Ctx {
    domain: String,
    table: Arc<RouteTable>,
    config: HttpConfig,
    upgraded: Arc<Semaphore>,
}

impl HttpFrontend {
    /// Listens on `addr` for hosts `<port>-<sandbox-id>.<domain>`.
    pub async fn bind(
        addr: SocketAddr,
        domain: &str,
        table: Arc<RouteTable>,
    ) -> Result<Self, BindError> {
        Self::bind_with(addr, domain, table, HttpConfig::default()).await
    }

    /// [`bind`](Self::bind) with other bounds.
    pub async fn bind_with(
        addr: SocketAddr,
        domain: &str,
        table: Arc<RouteTable>,
        mut config: HttpConfig,
    ) -> Result<Self, BindError> {
        // hyper's smallest read buffer.
        config.max_header_bytes = config.max_header_bytes.max(8192);
        let listener = bind(addr).await?;
        Ok(Self {
            listener,
            ctx: Arc::new(Ctx {
                domain: normalize_domain(domain),
                table,
                upgraded: Arc::new(Semaphore::new(config.max_upgraded)),
                config,
            }),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until the future is dropped (connections already
    /// accepted keep going).
    pub async fn run(self) {
        let limit = Arc::new(Semaphore::new(self.ctx.config.max_connections));
        let mut server = hyper::server::conn::http1::Builder::new();
        server
            .timer(TokioTimer::new())
            .header_read_timeout(self.ctx.config.header_read_timeout)
            .max_buf_size(self.ctx.config.max_header_bytes)
            .max_header_size(self.ctx.config.max_header_bytes)
            .max_headers(self.ctx.config.max_headers);
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return; // never closed
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "http frontend accept");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let ctx = self.ctx.clone();
            let conn = server
                .serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(proxy(req, &ctx, peer).await) }
                    }),
                )
                .with_upgrades();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "http connection");
                }
            });
        }
    }
}

/// A short plain-text answer of the frontend itself.
fn answer(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The host a request is for: the authority of an absolute-form target,
/// else the Host header (RFC 9112 3.2.2).
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next()?;
    if hosts.next().is_some() {
        return None; // ambiguous
    }
    host.to_str().ok().map(str::to_owned)
}

async fn proxy(mut req: Request<Incoming>, ctx: &Ctx, peer: SocketAddr) -> Response<Body> {
    let Some(host) = request_host(&req) else {
        return answer(StatusCode::BAD_REQUEST, "no host\n");
    };
    let route = parse_service_host(&host, &ctx.domain)
        .and_then(|(id, port)| ctx.table.get(&id, port))
        .filter(|r| r.kind == RouteKind::Http);
    let Some(route) = route else {
        return answer(StatusCode::NOT_FOUND, "no such service\n");
    };
    let token = req
        .headers()
        .get(SHARE_TOKEN_HEADER)
        .map(HeaderValue::as_bytes);
    if !route.auth.allows(token) {
        return answer(StatusCode::UNAUTHORIZED, "share token required\n");
    }
    let upgrade = wants_upgrade(req.headers());
    let upgrade_permit = if upgrade {
        match ctx.upgraded.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => return answer(StatusCode::SERVICE_UNAVAILABLE, "too many upgrades\n"),
        }
    } else {
        None
    };
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let backend_req = match backend_request(req, &host, peer, upgrade, ctx) {
        Some(r) => r,
        None => return answer(StatusCode::BAD_REQUEST, "bad request\n"),
    };
    let mut resp = match forward(backend_req, &route, ctx).await {
        Ok(resp) => resp,
        Err(e) => return e,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return answer(StatusCode::BAD_GATEWAY, "unexpected upgrade\n");
        };
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _permit = upgrade_permit;
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((c, b)) => splice(TokioIo::new(c), TokioIo::new(b)).await,
                Err(e) => tracing::debug!(error = %e, "upgrade"),
            }
        });
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(BodyExt::boxed)
}

/// Connects to the route's backend and sends `req`; the error is the
/// frontend's answer.
async fn forward(
    req: Request<Incoming>,
    route: &Route,
    ctx: &Ctx,
) -> Result<Response<Incoming>, Response<Body>> {
    let bad_gateway = || answer(StatusCode::BAD_GATEWAY, "backend unreachable\n");
    let stream = match tokio::time::timeout(
        ctx.config.connect_timeout,
        TcpStream::connect(route.backend),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(backend = %route.backend, error = %e, "backend connect");
            return Err(bad_gateway());
        }
        Err(_) => return Err(answer(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n")),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(ctx.config.max_header_bytes)
        .max_header_size(ctx.config.max_header_bytes)
        .max_headers(ctx.config.max_headers)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| bad_gateway())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "backend connection");
        }
    });
    let timeout = route
        .request_timeout
        .unwrap_or(ctx.config.default_request_timeout);
    match tokio::time::timeout(timeout, sender.send_request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            tracing::debug!(backend = %route.backend, error = %e, "backend request");
            Err(bad_gateway())
        }
        Err(_) => Err(answer(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n")),
    }
}

/// The request as sent to the backend: origin-form target, hop-by-hop
/// headers and the share token removed, `X-Forwarded-*` replaced.
fn backend_request(
    req: Request<Incoming>,
    host: &str,
    peer: SocketAddr,
    upgrade: bool,
    ctx: &Ctx,
) -> Option<Request<Incoming>> {
    let (mut parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = Uri::try_from(target).ok()?;
    parts.version = hyper::Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrade);
    h.remove(SHARE_TOKEN_HEADER);
    h.remove(header::FORWARDED);
    let host = HeaderValue::from_str(host).ok()?;
    h.insert(header::HOST, host.clone());
    h.insert(X_FORWARDED_HOST, host);
    h.insert(X_FORWARDED_PROTO, ctx.config.forwarded_proto.clone());
    h.insert(
        X_FORWARDED_FOR,
        HeaderValue::from_str(&peer.ip().to_canonical().to_string()).ok()?,
    );
    Some(Request::from_parts(parts, body))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the request asks to switch protocols (`Connection: upgrade`
/// and an `Upgrade` header).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t == "upgrade")
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Removes the headers meant for one hop only (RFC 9110 7.6.1), those
/// `Connection` names included; with `keep_upgrade`, `Connection: upgrade`
/// and `Upgrade` stay.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in named {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            if !(keep_upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }
}
