//! The web console: a page served on a listener of its own (off by default,
//! `[console]`), over the same [`Manager`] and API keys as the gRPC API.
//!
//! Handlers only delegate: the table is [`Manager::list`] (ListSandboxes'
//! filters), the logs pane is [`crate::api::logs::stream_logs`] (StreamLogs,
//! followed), the terminal is [`crate::api::exec::start`] (StreamExec's way
//! to the agent) with a PTY, stop is [`Manager::delete`].
//!
//! Auth: the page keeps the key the user pasted in the tab's session storage
//! and sends it as `Authorization: Bearer KEY` on fetches and as the first
//! message of each websocket, never in a URL. A key sees only its
//! principal's sandboxes. No cookie is set, so another site can make the
//! browser send nothing on the user's behalf; websockets (which browsers
//! open cross-origin) are refused unless their `Origin` is the console's
//! own. Every response carries a CSP without inline scripts, `X-Frame-Options:
//! DENY` and no CORS header.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

use crate::auth::{Auth, AuthError};
use crate::consoleconfig::ConsoleSettings;
use crate::engine::Engine;
use crate::logs::LogReader;
use crate::manager::Manager;
use crate::model::Principal;

mod routes;
mod ws;

#[cfg(test)]
mod tests;

/// The Content-Security-Policy of every response. Scripts only from files
/// of this origin (no inline script, no eval); styles also inline, since
/// xterm.js's renderer writes `<style>` elements.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// What the handlers share.
#[derive(Debug)]
struct Console<E: Engine> {
    manager: Manager<E>,
    auth: Auth,
    logs: Option<LogReader>,
    shutdown: watch::Receiver<bool>,
    origins: Origins,
}

type Shared<E> = Arc<Console<E>>;

/// The browser origins a websocket may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origins {
    /// `http://ADDR` (and `http://localhost:PORT` on loopback).
    own: Vec<String>,
    /// Listening on every address: the origin must name the host the
    /// request was sent to.
    any_host: bool,
    /// Configured (`[console] origins`).
    extra: Vec<String>,
}

impl Origins {
    /// The origins of a console bound to `addr`, plus `extra`.
    pub(crate) fn new(addr: SocketAddr, extra: &[String]) -> Self {
        let mut own = vec![];
        let any_host = addr.ip().is_unspecified();
        if !any_host {
            let mut hosts = vec![match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            }];
            if addr.ip().is_loopback() {
                hosts.push("localhost".into());
            }
            for host in hosts {
                own.push(format!("http://{host}:{}", addr.port()));
                // Browsers leave the default port out.
                if addr.port() == 80 {
                    own.push(format!("http://{host}"));
                }
            }
        }
        Self {
            own,
            any_host,
            extra: extra.to_vec(),
        }
    }

    /// Whether a websocket with these `Origin` and `Host` headers is the
    /// console's own page.
    pub(crate) fn allow(&self, origin: Option<&HeaderValue>, host: Option<&HeaderValue>) -> bool {
        let Some(origin) = origin.and_then(|o| o.to_str().ok()) else {
            return false;
        };
        let origin = origin.trim_end_matches('/');
        if self.own.iter().chain(&self.extra).any(|o| o == origin) {
            return true;
        }
        self.any_host
            && host
                .and_then(|h| h.to_str().ok())
                .is_some_and(|h| origin.strip_prefix("http://") == Some(h))
    }
}

/// A refusal as the page reads it: `{"error": ...}` with a status.
pub(crate) fn refusal(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The principal of a request's `Authorization: Bearer KEY`, by the gRPC
/// API's own key table.
fn caller(auth: &Auth, headers: &HeaderMap) -> Result<Principal, AuthError> {
    // Only the bearer header: the page sends nothing else.
    let mut only = HeaderMap::new();
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        only.insert(header::AUTHORIZATION, v.clone());
    }
    auth.authenticate(&MetadataMap::from_headers(only))
}

/// The 401 for a refused key.
fn unauthorized(e: &AuthError) -> Response {
    refusal(StatusCode::UNAUTHORIZED, e.to_string())
}

/// The principal of a key sent in a websocket's first message.
fn key_caller(auth: &Auth, key: &str) -> Option<Principal> {
    let value = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value);
    caller(auth, &headers).ok()
}

/// Security headers on every response.
async fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn router<E: Engine>(console: Shared<E>) -> Router {
    routes::routes(console).layer(axum::middleware::map_response(harden))
}

/// A running console.
#[derive(Debug)]
pub struct ConsoleServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ConsoleServer {
    /// Binds `settings.listen` and serves the console there.
    pub async fn start<E: Engine>(
        settings: &ConsoleSettings,
        manager: Manager<E>,
        auth: Auth,
        logs: Option<LogReader>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(settings.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let console = Arc::new(Console {
            manager,
            auth,
            logs,
            shutdown: shutdown.clone(),
            origins: Origins::new(addr, &settings.origins),
        });
        let app = router(console);
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(crate::api::exec::shutdown_signal(shutdown))
                .await
        });
        Ok(Self { addr, stop, task })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends open log and terminal sockets, and waits for
    /// the server to finish.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "console server failed"),
            Err(e) => tracing::warn!(error = %e, "console task failed"),
        }
    }
}
