//! Name-based egress for sandboxes (issue 12, items 3 and 4): the DNS
//! resolver every sandbox's `resolv.conf` points at, and the transparent
//! proxy that carries a sandbox's TCP 443 (TLS, routed by the ClientHello's
//! SNI) and 80 (HTTP, routed by the first request's `Host`) to the names
//! its policy grants.
//!
//! Both are tokio servers the daemon starts once for all sandboxes. They
//! know a sandbox only by the source address of its packets, through the
//! daemon's [`PolicySource`]; unknown sources are refused. Everything a
//! sandbox sends is hostile: every read is bounded in bytes and time, every
//! sandbox in connections, queries in flight and query rate.
//!
//! - [`access`]: what one sandbox may resolve and reach by name
//!   ([`SandboxPolicy`]), and how the daemon hands policies in
//!   ([`PolicySource`], [`PolicyTable`]).
//! - [`denyset`]: the always-deny address set the proxy checks every
//!   address it is about to dial against (DNS rebinding), and the resolver
//!   strips from its answers.
//! - [`usage`]: per-sandbox counters (answers, denials by reason,
//!   connections, bytes) and the per-sandbox bounds' state.
//! - [`upstream`]: the upstream resolvers (hickory), shared by both.
//! - [`dns`]: the resolver ([`DnsServer`]).
//! - [`proxy`]: the proxy ([`Proxy`]).
//! - `testing` (feature `testing`): an upstream DNS server, HTTP and HTTPS
//!   servers with a private CA, and clients bound to chosen source
//!   addresses, for this crate's tests and the daemon's.
//!
//! The proxy never dials the address the sandbox connected to: it dials
//! the name it read, resolved by itself through the upstreams, and refuses
//! when any resolved address is in the deny set. No TLS is terminated.

pub mod access;
pub mod denyset;
pub mod dns;
pub mod proxy;
pub mod upstream;
pub mod usage;

#[cfg(feature = "testing")]
pub mod testing;

pub use access::{PolicySource, PolicyTable, SandboxPolicy};
pub use denyset::DenySet;
pub use dns::{DnsConfig, DnsServer};
pub use proxy::{Proxy, ProxyConfig};
pub use upstream::{Upstream, UpstreamConfig};
pub use usage::{DnsDenial, ProxyRefusal, SandboxUsage, ServerCounters};

/// A listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("bind {addr}")]
pub struct BindError {
    /// The address.
    pub addr: std::net::SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// A TCP listener on `addr` (address reuse on: a restarted daemon binds
/// again while its old sockets linger in TIME_WAIT), with `backlog` and,
/// where bytes are relayed, Nagle off.
pub(crate) fn tcp_listener(
    addr: std::net::SocketAddr,
    backlog: u32,
    nodelay: bool,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if nodelay {
        socket.set_nodelay(true)?;
    }
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) turned into
/// the IPv4 address it stands for: every check compares canonical addresses.
pub fn canonical_ip(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use hickory_resolver::net::NetError;
    use sandpit_errors::chain;

    use super::*;
    use crate::upstream::{ResolveError, UpstreamError};

    #[test]
    fn errors_with_a_source_do_not_repeat_it() {
        let errors: Vec<Box<dyn Error>> = vec![
            Box::new(BindError {
                addr: "127.0.0.1:53".parse().unwrap(),
                source: std::io::ErrorKind::AddrInUse.into(),
            }),
            Box::new(UpstreamError::Build(NetError::from(
                "no runtime".to_owned(),
            ))),
            Box::new(ResolveError::Upstream(
                "api.test".into(),
                NetError::from("timed out".to_owned()),
            )),
        ];
        for e in &errors {
            let source = e.source().expect("a source").to_string();
            assert!(!e.to_string().contains(&source), "{e}");
        }
        assert_eq!(chain(&*errors[2]), "resolve api.test: timed out");
        assert_eq!(
            UpstreamError::NoServers.to_string(),
            "no upstream dns server configured"
        );
    }
}
