//! The metrics listener: `GET /metrics` in the text exposition format
//! (0.0.4), 404 for any other path, 405 for another method. Its own
//! address (`[metrics] listen`), plain HTTP without authentication, as
//! Prometheus exporters are: keep it on loopback or a private network.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

use crate::engine::Engine;
use crate::manager::Manager;

/// What a listener exposes beside the default registry.
pub trait Exposition: Send + Sync + 'static {
    /// The families read at this scrape.
    fn families(&self) -> impl std::future::Future<Output = Vec<MetricFamily>> + Send;
}

impl<E: Engine> Exposition for Manager<E> {
    async fn families(&self) -> Vec<MetricFamily> {
        super::sandboxes::families(self).await
    }
}

/// The default registry alone: a gateway has no sandboxes of its own
/// (its API counters and histograms are in the registry).
#[derive(Debug, Clone, Copy)]
pub struct RegistryOnly;

impl Exposition for RegistryOnly {
    async fn families(&self) -> Vec<MetricFamily> {
        Vec::new()
    }
}

/// The whole exposition: the default registry (every module's counters,
/// the process collector) plus the families read now.
pub async fn render<S: Exposition>(source: &S) -> String {
    let mut families = prometheus::gather();
    families.extend(source.families().await);
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle<S: Exposition>(
    manager: Arc<S>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "not found; try /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let body = render(manager.as_ref()).await;
    let mut r = reply(StatusCode::OK, body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(r)
}

/// Serves `listener` until the task is dropped (aborted).
pub async fn serve<S: Exposition>(listener: TcpListener, manager: S) {
    let manager = Arc::new(manager);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(error = %e, "metrics accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let manager = Arc::clone(&manager);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&manager), req));
            // A client that never finishes its headers is dropped.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
