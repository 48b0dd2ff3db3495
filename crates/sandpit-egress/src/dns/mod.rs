//! The resolver sandboxes' `resolv.conf` points at: UDP and TCP on each
//! listen address (the bridge address; the firewall DNATs a sandbox's port
//! 53 here), answering only what the sandbox's policy permits
//! ([`crate::access`]), forwarding the rest to the upstreams.
//!
//! Denied names answer NXDOMAIN; every denial is counted per sandbox and
//! reason ([`crate::SandboxUsage`]). Answers pin nothing: the proxy
//! resolves the names it dials itself.
//!
//! Bounds: a query is at most `max_query_bytes` (larger datagrams are
//! dropped, a larger TCP length closes the connection); each sandbox has a
//! token bucket (`rate_per_sec`, `burst`; queries over it are dropped, not
//! answered, so a flood costs one policy lookup each), at most
//! `max_in_flight_per_sandbox` queries upstream at once (and the server
//! `max_in_flight`), at most `max_tcp_per_sandbox` TCP connections (and the
//! server `max_tcp`), each closed after `tcp_idle_timeout` without a
//! complete query. Unknown sources are dropped silently.
//!
//! Written on hickory-proto (messages) and hickory-resolver (upstreams)
//! rather than hickory-server's `Server`, whose UDP and TCP loops spawn a
//! task per datagram and per connection without a bound and cannot refuse
//! a source before it costs a task.

mod answer;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::access::PolicySource;
use crate::denyset::DenySet;
use crate::upstream::Upstream;
use crate::usage::{DnsDenial, ServerCounters};
use crate::{canonical_ip, tcp_listener, BindError};
use answer::{encode, Answerer, UDP_PAYLOAD};

/// The resolver's configuration.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Where to serve, UDP and TCP on each (port 0: any free port, the
    /// same for both).
    pub listen: Vec<SocketAddr>,
    /// The largest query accepted, in bytes.
    pub max_query_bytes: usize,
    /// Queries per second each sandbox may send (sustained).
    pub rate_per_sec: u32,
    /// Queries each sandbox may send in a burst.
    pub burst: u32,
    /// Queries of one sandbox upstream at once.
    pub max_in_flight_per_sandbox: usize,
    /// Queries upstream at once, all sandboxes.
    pub max_in_flight: usize,
    /// TCP connections of one sandbox.
    pub max_tcp_per_sandbox: usize,
    /// TCP connections, all sandboxes.
    pub max_tcp: usize,
    /// A TCP connection without a complete query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// The longest a query may take upstream (then SERVFAIL).
    pub query_timeout: Duration,
    /// Whether a sandbox with CIDR rules (and no open egress) may resolve
    /// names it has no grant for (see [`crate::access`]).
    pub resolve_all_with_cidr_rules: bool,
    /// Addresses stripped from answers (unless the sandbox's CIDR rules
    /// name them).
    pub deny: DenySet,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            max_query_bytes: 1232,
            rate_per_sec: 100,
            burst: 200,
            max_in_flight_per_sandbox: 32,
            max_in_flight: 2048,
            max_tcp_per_sandbox: 8,
            max_tcp: 512,
            tcp_idle_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(5),
            resolve_all_with_cidr_rules: false,
            deny: DenySet::standard(),
        }
    }
}

struct Shared {
    answerer: Answerer,
    source: Arc<dyn PolicySource>,
    counters: Arc<ServerCounters>,
    in_flight: Arc<Semaphore>,
    tcp: Arc<Semaphore>,
    config: DnsConfig,
}

/// The resolver, bound and ready to [`run`](DnsServer::run).
pub struct DnsServer {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("listen", &self.local_addrs())
            .finish_non_exhaustive()
    }
}

/// UDP and TCP on `addr`, the same port for both (a free one for port 0).
async fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        match tcp_listener(udp.local_addr()?, 1024, false) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::ErrorKind::AddrInUse.into()))
}

impl DnsServer {
    /// Binds every listen address of `config`.
    pub async fn bind(
        config: DnsConfig,
        upstream: Upstream,
        source: Arc<dyn PolicySource>,
    ) -> Result<Self, BindError> {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &addr in &config.listen {
            let (u, t) = bind_pair(addr)
                .await
                .map_err(|source| BindError { addr, source })?;
            udp.push(u);
            tcp.push(t);
        }
        let shared = Arc::new(Shared {
            answerer: Answerer {
                upstream,
                deny: config.deny.clone(),
                resolve_all_with_cidr_rules: config.resolve_all_with_cidr_rules,
                query_timeout: config.query_timeout,
            },
            source,
            counters: Arc::default(),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            tcp: Arc::new(Semaphore::new(config.max_tcp)),
            config,
        });
        Ok(Self { udp, tcp, shared })
    }

    /// The bound addresses (UDP; TCP listens on the same).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// The server's own counters (unknown sources, server-wide bounds).
    pub fn counters(&self) -> Arc<ServerCounters> {
        Arc::clone(&self.shared.counters)
    }

    /// Serves until the future is dropped (which stops every task it
    /// started) or a socket fails for good.
    pub async fn run(self) -> io::Result<()> {
        let mut tasks = JoinSet::new();
        for socket in self.udp {
            tasks.spawn(serve_udp(Arc::new(socket), Arc::clone(&self.shared)));
        }
        for listener in self.tcp {
            tasks.spawn(serve_tcp(listener, Arc::clone(&self.shared)));
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Errors of `recv_from`/`accept` that say nothing about the socket
/// itself (a peer's ICMP, a full fd table): keep serving.
fn transient(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::InvalidInput | io::ErrorKind::NotConnected | io::ErrorKind::Unsupported
    )
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) -> io::Result<()> {
    let max = shared.config.max_query_bytes;
    let mut buf = vec![0u8; max + 1];
    let mut tasks = JoinSet::new();
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, "dns udp receive");
                continue;
            }
            Err(e) => return Err(e),
        };
        while tasks.try_join_next().is_some() {}
        let Some(policy) = shared.source.lookup(canonical_ip(peer.ip())) else {
            shared.counters.unknown();
            continue;
        };
        let usage = policy.usage();
        if n > max {
            usage.deny(DnsDenial::Malformed);
            continue;
        }
        if !usage.take_token(shared.config.rate_per_sec, shared.config.burst) {
            usage.deny(DnsDenial::RateLimited);
            continue;
        }
        let Some(slot) = usage.dns_query(shared.config.max_in_flight_per_sandbox) else {
            usage.deny(DnsDenial::Busy);
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
            shared.counters.overloaded();
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            usage.deny(DnsDenial::Malformed);
            continue;
        };
        let (socket, shared) = (Arc::clone(&socket), Arc::clone(&shared));
        tasks.spawn(async move {
            let reply = shared.answerer.answer(&policy, &query).await;
            let limit = usize::from(query.max_payload().min(UDP_PAYLOAD));
            if let Some(bytes) = encode(&reply, limit) {
                let _ = socket.send_to(&bytes, peer).await;
            }
            drop((slot, permit));
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(got) => got,
            Err(e) if transient(&e) => {
                tracing::debug!(error = %e, "dns tcp accept");
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
        let Some(slot) = policy.usage().dns_tcp(shared.config.max_tcp_per_sandbox) else {
            policy.usage().deny(DnsDenial::Busy);
            continue;
        };
        let Ok(permit) = Arc::clone(&shared.tcp).try_acquire_owned() else {
            shared.counters.overloaded();
            continue;
        };
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let _ = tcp_session(stream, &policy, &shared).await;
            drop((slot, permit));
        });
    }
}

/// Queries on one TCP connection, one at a time, until the peer closes,
/// idles, or breaks a bound.
async fn tcp_session(
    mut stream: TcpStream,
    policy: &crate::access::SandboxPolicy,
    shared: &Shared,
) -> io::Result<()> {
    let config = &shared.config;
    let usage = policy.usage();
    let mut buf = vec![0u8; config.max_query_bytes];
    loop {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            if len > config.max_query_bytes {
                return Ok(None);
            }
            stream.read_exact(&mut buf[..len]).await?;
            io::Result::Ok(Some(len))
        };
        let len = match tokio::time::timeout(config.tcp_idle_timeout, read).await {
            Ok(Ok(Some(len))) => len,
            Ok(Ok(None)) => {
                usage.deny(DnsDenial::Malformed);
                return Ok(());
            }
            Ok(Err(_)) | Err(_) => return Ok(()),
        };
        if !usage.take_token(config.rate_per_sec, config.burst) {
            usage.deny(DnsDenial::RateLimited);
            return Ok(());
        }
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            usage.deny(DnsDenial::Malformed);
            return Ok(());
        };
        let Some(_slot) = usage.dns_query(config.max_in_flight_per_sandbox) else {
            usage.deny(DnsDenial::Busy);
            return Ok(());
        };
        let reply = shared.answerer.answer(policy, &query).await;
        let Some(bytes) = encode(&reply, usize::from(u16::MAX)) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        match tokio::time::timeout(config.tcp_idle_timeout, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        }
    }
}
