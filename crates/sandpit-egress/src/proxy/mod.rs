//! The transparent egress proxy for name rules: the firewall DNATs a
//! sandbox's TCP 443 to a TLS listener here and its TCP 80 to an HTTP
//! listener. For each connection:
//!
//! 1. the source address picks the sandbox ([`PolicySource`]); unknown
//!    sources, and sandboxes over `max_connections_per_sandbox` (or the
//!    proxy over `max_connections`), are closed at once;
//! 2. at most `max_client_hello_bytes` / `max_request_head_bytes` are
//!    read, all within `first_bytes_timeout` (a slowloris gets the same
//!    deadline as anyone), and the ClientHello's SNI or the first request's
//!    `Host` is taken as the destination;
//! 3. the name is checked against the sandbox's policy
//!    ([`SandboxPolicy::may_connect`]: carve-outs, grants, port 80 opt-in);
//! 4. the proxy resolves the name itself through the upstreams, never
//!    using the address the sandbox connected to (`SO_ORIGINAL_DST` is read
//!    for the log only), and refuses when *any* resolved address is in the
//!    deny set: the addresses checked are the ones dialed (DNS rebinding);
//! 5. dials them in order within `connect_timeout`, writes the bytes read
//!    so far, then copies both ways until both sides close or nothing
//!    moves for `idle_timeout`.
//!
//! Refusals close the connection: TLS after a fatal alert (access_denied
//! for policy, unrecognized_name without a usable SNI, decode_error for
//! what is not a ClientHello within the bounds, internal_error when
//! resolving or dialing failed or at the connection bound), HTTP
//! after a short 4xx/5xx naming the reason. No TLS is terminated. Every
//! outcome is counted per sandbox ([`crate::SandboxUsage`]).
//!
//! Known limits of routing by SNI and the first `Host` (as with any such
//! proxy): a TLS client may ask the granted server for another name inside
//! the encrypted stream (domain fronting, ECH), and later requests on a
//! kept-alive HTTP connection are not re-checked; both only reach servers
//! at the granted name's addresses.

mod http;
mod sni;
mod splice;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::access::{PolicySource, SandboxPolicy, HTTPS_PORT, HTTP_PORT};
use crate::denyset::DenySet;
use crate::upstream::Upstream;
use crate::usage::{ProxyRefusal, ServerCounters};
use crate::{canonical_ip, tcp_listener, BindError};
use sni::Parsed;

/// The proxy's configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Listeners for TLS (the DNAT target of sandboxes' TCP 443).
    pub tls_listen: Vec<SocketAddr>,
    /// Listeners for HTTP (the DNAT target of sandboxes' TCP 80).
    pub http_listen: Vec<SocketAddr>,
    /// The port TLS connections are dialed on (443; tests change it).
    pub tls_upstream_port: u16,
    /// The port HTTP connections are dialed on (80; tests change it).
    pub http_upstream_port: u16,
    /// The largest ClientHello read (handshake message, all records).
    pub max_client_hello_bytes: usize,
    /// The largest HTTP request head read.
    pub max_request_head_bytes: usize,
    /// The whole ClientHello or request head must arrive within this.
    pub first_bytes_timeout: Duration,
    /// Resolving the name must take no longer.
    pub resolve_timeout: Duration,
    /// Dialing (all addresses together) must take no longer.
    pub connect_timeout: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections of one sandbox at once.
    pub max_connections_per_sandbox: usize,
    /// Connections at once, all sandboxes.
    pub max_connections: usize,
    /// Addresses dialed per connection, at most.
    pub max_dial_attempts: usize,
    /// Copy buffer per direction and connection, in bytes.
    pub buffer_bytes: usize,
    /// Where the proxy never dials (unless a CIDR rule of the sandbox
    /// names the address and it is not in the hard part).
    pub deny: DenySet,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            tls_listen: Vec::new(),
            http_listen: Vec::new(),
            tls_upstream_port: HTTPS_PORT,
            http_upstream_port: HTTP_PORT,
            max_client_hello_bytes: 16 * 1024,
            max_request_head_bytes: 16 * 1024,
            first_bytes_timeout: Duration::from_secs(5),
            resolve_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_connections_per_sandbox: 256,
            max_connections: 16384,
            max_dial_attempts: 4,
            buffer_bytes: 16 * 1024,
            deny: DenySet::standard(),
        }
    }
}

/// What a listener carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tls,
    Http,
}

impl Kind {
    /// The port the policy is asked about.
    fn policy_port(self) -> u16 {
        match self {
            Kind::Tls => HTTPS_PORT,
            Kind::Http => HTTP_PORT,
        }
    }
}

struct Shared {
    upstream: Upstream,
    source: Arc<dyn PolicySource>,
    counters: Arc<ServerCounters>,
    connections: Arc<Semaphore>,
    config: ProxyConfig,
}

/// The proxy, bound and ready to [`run`](Proxy::run).
pub struct Proxy {
    listeners: Vec<(Kind, TcpListener)>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("tls", &self.tls_addrs())
            .field("http", &self.http_addrs())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds every listener of `config`.
    pub async fn bind(
        config: ProxyConfig,
        upstream: Upstream,
        source: Arc<dyn PolicySource>,
    ) -> Result<Self, BindError> {
        let mut listeners = Vec::new();
        let all = (config.tls_listen.iter().map(|a| (Kind::Tls, *a)))
            .chain(config.http_listen.iter().map(|a| (Kind::Http, *a)));
        for (kind, addr) in all {
            let l = tcp_listener(addr, 4096, true).map_err(|source| BindError { addr, source })?;
            listeners.push((kind, l));
        }
        let shared = Arc::new(Shared {
            upstream,
            source,
            counters: Arc::default(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            config,
        });
        Ok(Self { listeners, shared })
    }

    fn addrs(&self, want: Kind) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|(k, _)| *k == want)
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }

    /// The bound TLS listeners.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Tls)
    }

    /// The bound HTTP listeners.
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Http)
    }

    /// The proxy's own counters (unknown sources, the proxy-wide bound).
    pub fn counters(&self) -> Arc<ServerCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// Serves until the future is dropped (which closes every connection
    /// it carries) or a listener fails for good.
    pub async fn run(self) -> io::Result<()> {
        let mut tasks = JoinSet::new();
        for (kind, listener) in self.listeners {
            tasks.spawn(accept_loop(kind, listener, Arc::clone(&self.shared)));
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
        Ok(())
    }
}

async fn accept_loop(kind: Kind, listener: TcpListener, shared: Arc<Shared>) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(got) => got,
            Err(e) if !matches!(e.kind(), io::ErrorKind::InvalidInput) => {
                tracing::debug!(error = %e, "proxy accept");
                // A full fd table stays full for a while: do not spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        while tasks.try_join_next().is_some() {}
        let Some(policy) = shared.source.lookup(canonical_ip(peer.ip())) else {
            shared.counters.unknown();
            continue;
        };
        let usage = Arc::clone(policy.usage());
        let Some(slot) = usage.connection(shared.config.max_connections_per_sandbox) else {
            usage.refuse(ProxyRefusal::TooManyConnections);
            let _ = stream.try_write(refusal(kind, ProxyRefusal::TooManyConnections, "").as_ref());
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
            shared.counters.overloaded();
            usage.refuse(ProxyRefusal::TooManyConnections);
            continue;
        };
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            connection(kind, stream, peer, &policy, &shared).await;
            drop((slot, permit));
        });
    }
}

/// One connection, from its first byte to its close.
async fn connection(
    kind: Kind,
    mut client: TcpStream,
    peer: SocketAddr,
    policy: &SandboxPolicy,
    shared: &Shared,
) {
    let _ = client.set_nodelay(true);
    let mut buf = Vec::with_capacity(2048);
    let mut name = String::new();
    match open(kind, &mut client, &mut buf, &mut name, policy, shared).await {
        Ok(mut upstream) => {
            // The hello or head is upstream now: do not hold it for the
            // connection's life.
            drop(std::mem::take(&mut buf));
            policy.usage().allow();
            tracing::debug!(sandbox = policy.id(), %name, %peer, "egress allowed");
            let config = &shared.config;
            let usage = policy.usage();
            splice::splice(
                &mut client,
                &mut upstream,
                usage,
                config.idle_timeout,
                config.buffer_bytes,
            )
            .await;
        }
        Err(reason) => {
            policy.usage().refuse(reason);
            let original = original_dst(&client);
            tracing::info!(
                sandbox = policy.id(), %name, %reason, %peer, original = ?original,
                "egress refused"
            );
            let reply = refusal(kind, reason, &name);
            let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&reply)).await;
            let _ = client.shutdown().await;
        }
    }
}

/// Reads the name, checks it, resolves it and dials it; the upstream
/// stream with the bytes read so far already written to it.
async fn open(
    kind: Kind,
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    name: &mut String,
    policy: &SandboxPolicy,
    shared: &Shared,
) -> Result<TcpStream, ProxyRefusal> {
    let config = &shared.config;
    let deadline = Instant::now() + config.first_bytes_timeout;
    *name = tokio::time::timeout_at(deadline, read_name(kind, client, buf, config))
        .await
        .map_err(|_| ProxyRefusal::Timeout)??;
    let port = kind.policy_port();
    policy.may_connect(name, port)?;
    let addrs = tokio::time::timeout(config.resolve_timeout, shared.upstream.resolve(name))
        .await
        .map_err(|_| ProxyRefusal::ResolveFailed)?
        .map_err(|e| {
            tracing::debug!(sandbox = policy.id(), error = %sandpit_errors::Chain(&e), "resolve");
            ProxyRefusal::ResolveFailed
        })?;
    // Every address is checked, not just the one dialed first: a name
    // that mixes public and private answers is not one we trust.
    for &ip in &addrs {
        if config
            .deny
            .check(ip, |a| policy.cidr_allows(a, Some(port)))
            .is_err()
        {
            tracing::info!(sandbox = policy.id(), %name, %ip, "name resolves into the deny set");
            return Err(ProxyRefusal::PrivateAddress);
        }
    }
    let dial_port = match kind {
        Kind::Tls => config.tls_upstream_port,
        Kind::Http => config.http_upstream_port,
    };
    let mut upstream = dial(&addrs, dial_port, config).await?;
    tokio::time::timeout(config.connect_timeout, upstream.write_all(buf))
        .await
        .map_err(|_| ProxyRefusal::ConnectFailed)?
        .map_err(|_| ProxyRefusal::ConnectFailed)?;
    policy.usage().add_out(buf.len() as u64);
    Ok(upstream)
}

/// Reads until the ClientHello or the request head is complete (or a
/// bound breaks); the name it is for.
async fn read_name(
    kind: Kind,
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    config: &ProxyConfig,
) -> Result<String, ProxyRefusal> {
    let max = match kind {
        Kind::Tls => config.max_client_hello_bytes,
        Kind::Http => config.max_request_head_bytes,
    };
    // TLS: the hello's records plus their 5-byte headers.
    let cap = match kind {
        Kind::Tls => max + 5 * max.div_ceil(1 << 14),
        Kind::Http => max,
    };
    let mut need = 1;
    let mut scanned = 0;
    loop {
        if buf.len() >= need {
            let parsed = match kind {
                Kind::Tls => sni::server_name(buf, max)?,
                Kind::Http => match http::head_end(buf, scanned) {
                    Some(end) => http::request_host(&buf[..end])?,
                    None => Parsed::Incomplete(buf.len() + 1),
                },
            };
            scanned = buf.len();
            match parsed {
                Parsed::Done(name) => return Ok(name),
                Parsed::Incomplete(n) => need = n,
            }
        }
        if need > cap || buf.len() >= cap {
            return Err(ProxyRefusal::TooLarge);
        }
        let have = buf.len();
        let want = (cap - have).min(8192);
        buf.resize(have + want, 0);
        let n = client.read(&mut buf[have..]).await;
        let n = n.unwrap_or(0);
        buf.truncate(have + n);
        if n == 0 {
            return Err(if have == 0 {
                ProxyRefusal::NoName
            } else {
                ProxyRefusal::Malformed
            });
        }
    }
}

/// Dials `addrs` in order on `port`, all within `connect_timeout`.
async fn dial(
    addrs: &[IpAddr],
    port: u16,
    config: &ProxyConfig,
) -> Result<TcpStream, ProxyRefusal> {
    let deadline = Instant::now() + config.connect_timeout;
    for &ip in addrs.iter().take(config.max_dial_attempts) {
        let addr = SocketAddr::new(ip, port);
        #[cfg(feature = "testing")]
        if !crate::testing::dial_permitted(addr) {
            continue;
        }
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "dial"),
            Err(_) => break,
        }
    }
    Err(ProxyRefusal::ConnectFailed)
}

/// What a refused client is told before the close.
fn refusal(kind: Kind, reason: ProxyRefusal, name: &str) -> Vec<u8> {
    match kind {
        Kind::Tls => {
            // A fatal alert record (RFC 8446 6): access_denied for policy,
            // unrecognized_name without a usable SNI, decode_error for what
            // is not a ClientHello within the bounds, internal_error when
            // the destination failed or at the connection bound.
            let code = match reason {
                ProxyRefusal::Malformed | ProxyRefusal::TooLarge | ProxyRefusal::Timeout => 50,
                ProxyRefusal::ResolveFailed
                | ProxyRefusal::ConnectFailed
                | ProxyRefusal::TooManyConnections => 80,
                ProxyRefusal::NoName | ProxyRefusal::BadName => 112,
                _ => 49,
            };
            vec![0x15, 3, 3, 0, 2, 2, code]
        }
        Kind::Http => {
            let status = match reason {
                ProxyRefusal::NotGranted
                | ProxyRefusal::CarvedOut
                | ProxyRefusal::PrivateAddress => "403 Forbidden",
                ProxyRefusal::NoName | ProxyRefusal::BadName | ProxyRefusal::Malformed => {
                    "400 Bad Request"
                }
                ProxyRefusal::TooLarge => "431 Request Header Fields Too Large",
                ProxyRefusal::Timeout => "408 Request Timeout",
                ProxyRefusal::ResolveFailed | ProxyRefusal::ConnectFailed => "502 Bad Gateway",
                ProxyRefusal::TooManyConnections => "503 Service Unavailable",
            };
            let body = if name.is_empty() {
                format!("sandpit egress refused: {reason}\n")
            } else {
                format!("sandpit egress refused: {reason}: {name}\n")
            };
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    }
}

/// Where the sandbox meant to connect before the DNAT (for the log only:
/// the proxy never dials it).
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
    match stream.local_addr().ok()? {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|a| SocketAddr::from(SockaddrIn::from(a))),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|a| SocketAddr::from(SockaddrIn6::from(a))),
    }
}
