//! The upstream resolvers: a hickory resolver over the configured servers
//! only (no system configuration, no hosts file, no search domains), with
//! its cache, shared by the resolver (forwarding what sandboxes may ask)
//! and the proxy (resolving the names it dials, itself).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::rr::{Name, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;

/// Where and how to ask upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The upstream servers (UDP, with TCP on truncation), tried in order.
    pub servers: Vec<SocketAddr>,
    /// One attempt's timeout.
    pub timeout: Duration,
    /// Attempts per server.
    pub attempts: usize,
    /// Answers kept in the cache.
    pub cache_size: u64,
    /// Cap on how long an answer is cached (and the TTL handed on).
    pub max_ttl: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            timeout: Duration::from_secs(2),
            attempts: 2,
            cache_size: 8192,
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// The upstream configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No server configured.
    #[error("no upstream dns server configured")]
    NoServers,
    /// The resolver could not be built.
    #[error("build the upstream resolver")]
    Build(#[source] NetError),
}

/// A name the proxy could not resolve.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not a valid DNS name.
    #[error("{0:?} is not a dns name")]
    BadName(String),
    /// The name does not exist or has no address.
    #[error("{0} has no address")]
    NoAddress(String),
    /// The upstreams failed.
    #[error("resolve {0}")]
    Upstream(String, #[source] NetError),
}

/// The upstream resolvers.
#[derive(Debug, Clone)]
pub struct Upstream {
    resolver: TokioResolver,
}

impl Upstream {
    /// A resolver over `config.servers` only.
    pub fn new(config: &UpstreamConfig) -> Result<Self, UpstreamError> {
        if config.servers.is_empty() {
            return Err(UpstreamError::NoServers);
        }
        let servers = config
            .servers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.ndots = 0;
        opts.timeout = config.timeout;
        opts.attempts = config.attempts;
        opts.cache_size = config.cache_size;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.positive_max_ttl = Some(config.max_ttl);
        opts.negative_max_ttl = Some(config.max_ttl.min(Duration::from_secs(60)));
        opts.preserve_intermediates = true;
        opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        opts.num_concurrent_reqs = 1;
        let resolver = TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .build()
        .map_err(UpstreamError::Build)?;
        Ok(Self { resolver })
    }

    /// One lookup of `name` (fully qualified) for `rtype`, answers with
    /// their CNAME chain.
    pub(crate) async fn lookup(&self, name: Name, rtype: RecordType) -> Result<Lookup, NetError> {
        self.resolver.lookup(name, rtype).await
    }

    /// The addresses of `host` (a host name, never an IP literal: see
    /// [`crate::access::host_name`]), A and AAAA, IPv4 first.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let name = fqdn(host).ok_or_else(|| ResolveError::BadName(host.to_owned()))?;
        match self.resolver.lookup_ip(name).await {
            Ok(lookup) => {
                let addrs: Vec<IpAddr> = lookup.iter().collect();
                if addrs.is_empty() {
                    Err(ResolveError::NoAddress(host.to_owned()))
                } else {
                    Ok(addrs)
                }
            }
            Err(e) if e.is_no_records_found() => Err(ResolveError::NoAddress(host.to_owned())),
            Err(e) => Err(ResolveError::Upstream(host.to_owned(), e)),
        }
    }
}

/// `host` as a fully qualified name (so no search list ever applies).
pub(crate) fn fqdn(host: &str) -> Option<Name> {
    let mut name = Name::from_ascii(host).ok()?;
    name.set_fqdn(true);
    Some(name)
}
