//! Publishing sandboxes' PUBLIC services from the daemon.
//!
//! A sandbox lives in its own network namespace (an address such as
//! 10.209.0.5, routed from the host). The daemon publishes the services a
//! sandbox declares PUBLIC through three frontends, all sharing one
//! [`RouteTable`] the daemon fills as sandboxes start and stop:
//!
//! - [`HttpFrontend`]: a plain HTTP/1.1 reverse proxy (hyper) routing by
//!   the Host header `<port>-<sandbox-id>.<domain>` ([`service_host`]) to
//!   [`RouteKind::Http`] routes, checking share tokens ([`Auth`]), adding
//!   `X-Forwarded-*`, streaming bodies both ways, passing upgrades
//!   (WebSocket) through. TLS in front of it, if any, is someone else's.
//! - [`TlsPassthrough`]: reads the ClientHello, routes by its server name
//!   (same pattern) to [`RouteKind::TlsPassthrough`] routes and splices
//!   the bytes, hello included, without terminating TLS.
//! - [`TcpPorts`]: raw TCP, one host port from a configured range per
//!   published (sandbox, port), each with its own listener task.
//!
//! Everything runs as tasks in the caller's Tokio runtime; no process is
//! spawned per connection.
//!
//! # Threat model
//!
//! Both sides are hostile: clients are the internet, backends are
//! sandboxes running arbitrary code.
//!
//! - No open proxy: a frontend connects only to the `backend` of a route in
//!   the table, found by an exact (sandbox id, port) key parsed from a
//!   strictly shaped name under the configured domain; Host or SNI values
//!   never become addresses, and a route of one kind is never served by
//!   the other frontend.
//! - Share tokens are compared in constant time (through SHA-256 digests,
//!   which hides their length too), the `X-Sandbox-Share-Token` header is
//!   removed before the request is forwarded, and [`Auth`]'s `Debug`
//!   never prints the token, so a backend never learns it. Unknown hosts
//!   get 404 and only known token routes answer 401. A TLS passthrough
//!   cannot check a token, so the table refuses such a route
//!   ([`RouteError::TokenOnPassthrough`]) rather than leave it open.
//! - Everything read is bounded, from clients and backends alike: the
//!   number of connections per frontend (upgraded ones too) and per TCP
//!   port, request and response header sizes and counts, the time to send
//!   request headers (which also ends idle keep-alive connections), the
//!   time to connect to a backend and for it to answer, the size of and
//!   time to send a ClientHello. Bodies and spliced bytes stream with
//!   fixed buffers and backpressure; nothing is buffered whole.
//! - Client-supplied `X-Forwarded-*` and `Forwarded` headers are replaced,
//!   not appended to, so a backend can trust them as far as it trusts this
//!   frontend.

mod host;
mod http;
mod routes;
mod sni;
mod tcp;
mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

pub use host::{http_url, https_url, parse_service_host, service_host, valid_sandbox_id};
pub use http::{HttpConfig, HttpFrontend};
pub use routes::{Auth, Route, RouteError, RouteKind, RouteTable};
pub use tcp::{TcpPorts, TcpPortsConfig, TcpPortsError};
pub use tls::{TlsConfig, TlsPassthrough};

/// The request header carrying a share token; never forwarded.
pub const SHARE_TOKEN_HEADER: &str = "x-sandbox-share-token";

/// A frontend could not listen.
#[derive(Debug, thiserror::Error)]
#[error("bind {addr}")]
pub struct BindError {
    /// The address it was to listen on.
    pub addr: SocketAddr,
    /// Why not.
    #[source]
    pub source: std::io::Error,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// How long an accept loop waits after a failed accept (out of file
/// descriptors, say) before trying again, so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Splices `a` and `b` until both directions are done or one fails.
async fn splice<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(error = %e, "splice ended");
    }
}
