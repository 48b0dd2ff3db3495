//! The test harness (feature `testing`), for this crate's tests and the
//! daemon's: an upstream DNS server ([`TestDns`]), HTTP and HTTPS origins
//! with a private CA ([`TestWeb`], [`TestCa`]), clients bound to a chosen
//! source address, policy shorthands, and [`Lab`], all of it wired up on
//! loopback addresses.
//!
//! Nothing here sends a packet beyond loopback: [`loopback_only_dials`]
//! makes the proxy refuse (and record) any dial to another address, so a
//! broken deny set fails a test instead of reaching a real network.

mod dns;
mod web;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandpit_net::policy::{
    Cidr, DefaultEgress, Egress, EgressRule, EgressTarget, NamePattern, NetworkPolicy, PortRange,
};
use tokio::task::JoinHandle;

pub use dns::{answer_ips, query_tcp, query_udp, TestDns, Zone};
pub use hickory_proto::op::{Message, ResponseCode};
pub use hickory_proto::rr::RecordType;
pub use web::{connect_from, exchange, http_get, https_get, parse_reply, Reply, TestCa, TestWeb};

use crate::{
    DenySet, DnsConfig, DnsServer, PolicyTable, Proxy, ProxyConfig, SandboxPolicy, ServerCounters,
    Upstream, UpstreamConfig,
};

static GUARD: AtomicBool = AtomicBool::new(false);
static FORBIDDEN: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

/// From now on (in this process), the proxy dials loopback addresses only;
/// any other dial is skipped and recorded ([`forbidden_dials`]).
pub fn loopback_only_dials() {
    GUARD.store(true, Relaxed);
}

/// Dials the guard skipped: a test asserts this is empty.
pub fn forbidden_dials() -> Vec<SocketAddr> {
    FORBIDDEN.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

pub(crate) fn dial_permitted(addr: SocketAddr) -> bool {
    if !GUARD.load(Relaxed) || addr.ip().is_loopback() {
        return true;
    }
    FORBIDDEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(addr);
    false
}

/// An egress rule granting `pattern` on `ports` (none: the default, 443).
pub fn name_rule(pattern: &str, ports: &[u16]) -> EgressRule {
    EgressRule {
        target: EgressTarget::Name(NamePattern::parse(pattern).expect("a name pattern")),
        ports: ports.iter().map(|p| PortRange::single(*p)).collect(),
    }
}

/// An egress rule granting `net` on `ports` (none: all).
pub fn cidr_rule(net: &str, ports: &[u16]) -> EgressRule {
    EgressRule {
        target: EgressTarget::Cidr(Cidr {
            net: net.parse().expect("a cidr"),
            except: Vec::new(),
        }),
        ports: ports.iter().map(|p| PortRange::single(*p)).collect(),
    }
}

/// Sandbox `id` allowed only `rules`, under the runner's `carve_outs`.
pub fn rules_policy(id: &str, rules: Vec<EgressRule>, carve_outs: &[&str]) -> SandboxPolicy {
    let policy = NetworkPolicy {
        egress: Egress::Allow(rules),
        ..Default::default()
    };
    SandboxPolicy::new(id, &policy, DefaultEgress::Deny, patterns(carve_outs))
}

/// Sandbox `id` under a runner whose default is the internet.
pub fn open_policy(id: &str, carve_outs: &[&str]) -> SandboxPolicy {
    SandboxPolicy::new(
        id,
        &NetworkPolicy::default(),
        DefaultEgress::Internet,
        patterns(carve_outs),
    )
}

fn patterns(p: &[&str]) -> Vec<NamePattern> {
    p.iter()
        .map(|n| NamePattern::parse(n).expect("a name pattern"))
        .collect()
}

/// The loopback range the lab's origins and upstream DNS serve on: carved
/// out of the deny set, the rest of 127/8 stays denied.
pub const ORIGIN_NET: &str = "127.77.0.0/16";
/// The lab's origin servers' address.
pub const ORIGIN_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1));
/// The lab's upstream DNS server's address.
pub const UPSTREAM_DNS_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 53));
/// Where the lab's resolver and proxy listen (the bridge's stand-in).
pub const LISTEN_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

/// Sandbox `n`'s stand-in source address, `127.0.9.<n>`.
pub fn sandbox_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 9, n))
}

/// Everything wired up on loopback: upstream DNS authoritative for
/// `zone`, an HTTPS and an HTTP origin (for every name of the zone that
/// points at [`ORIGIN_IP`]), and the resolver and proxy under test serving
/// the sandboxes of [`Lab::policies`].
#[derive(Debug)]
pub struct Lab {
    /// The private CA the HTTPS origin's certificate comes from.
    pub ca: TestCa,
    /// The upstream DNS server.
    pub upstream_dns: TestDns,
    /// The HTTPS origin.
    pub https: TestWeb,
    /// The HTTP origin.
    pub http: TestWeb,
    /// Sandboxes by source address.
    pub policies: Arc<PolicyTable>,
    /// The resolver under test: where sandboxes send queries.
    pub dns_addr: SocketAddr,
    /// The proxy's TLS listener.
    pub tls_addr: SocketAddr,
    /// The proxy's HTTP listener.
    pub http_addr: SocketAddr,
    /// The resolver's own counters.
    pub dns_counters: Arc<ServerCounters>,
    /// The proxy's own counters.
    pub proxy_counters: Arc<ServerCounters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Lab {
    /// The deny set the lab runs with: the standard one with
    /// [`ORIGIN_NET`] carved out.
    pub fn deny() -> DenySet {
        DenySet::standard().allowing(ORIGIN_NET.parse().expect("origin net"))
    }

    /// A lab serving `zone` with default configurations, certificates for
    /// `cert_names` (wildcards allowed).
    pub async fn start(zone: &Zone, cert_names: &[&str]) -> Self {
        Self::start_with(zone, cert_names, |_, _| {}).await
    }

    /// A lab whose configurations `tune` adjusts first.
    pub async fn start_with(
        zone: &Zone,
        cert_names: &[&str],
        tune: impl FnOnce(&mut DnsConfig, &mut ProxyConfig),
    ) -> Self {
        loopback_only_dials();
        let ca = TestCa::new();
        let https = TestWeb::https(SocketAddr::new(ORIGIN_IP, 0), ca.server_config(cert_names))
            .await
            .expect("https origin");
        let http = TestWeb::http(SocketAddr::new(ORIGIN_IP, 0))
            .await
            .expect("http origin");
        let upstream_dns = TestDns::start(UPSTREAM_DNS_IP, zone)
            .await
            .expect("upstream dns");
        let upstream = Upstream::new(&UpstreamConfig {
            servers: vec![upstream_dns.addr()],
            timeout: Duration::from_secs(1),
            attempts: 1,
            ..Default::default()
        })
        .expect("upstream");
        let mut dns_config = DnsConfig {
            listen: vec![SocketAddr::new(LISTEN_IP, 0)],
            deny: Self::deny(),
            ..Default::default()
        };
        let mut proxy_config = ProxyConfig {
            tls_listen: vec![SocketAddr::new(LISTEN_IP, 0)],
            http_listen: vec![SocketAddr::new(LISTEN_IP, 0)],
            tls_upstream_port: https.addr().port(),
            http_upstream_port: http.addr().port(),
            deny: Self::deny(),
            ..Default::default()
        };
        tune(&mut dns_config, &mut proxy_config);
        let policies = Arc::new(PolicyTable::new());
        let dns = DnsServer::bind(dns_config, upstream.clone(), policies.clone())
            .await
            .expect("bind resolver");
        let proxy = Proxy::bind(proxy_config, upstream, policies.clone())
            .await
            .expect("bind proxy");
        let dns_addr = dns.local_addrs()[0];
        let (tls_addr, http_addr) = (proxy.tls_addrs()[0], proxy.http_addrs()[0]);
        let (dns_counters, proxy_counters) = (dns.counters(), proxy.counters());
        let tasks = vec![
            tokio::spawn(async move {
                let _ = dns.run().await;
            }),
            tokio::spawn(async move {
                let _ = proxy.run().await;
            }),
        ];
        Self {
            ca,
            upstream_dns,
            https,
            http,
            policies,
            dns_addr,
            tls_addr,
            http_addr,
            dns_counters,
            proxy_counters,
            tasks,
        }
    }

    /// Serves `policy` to the sandbox at `source`; its policy back (for
    /// its counters).
    pub fn sandbox(&self, source: IpAddr, policy: SandboxPolicy) -> Arc<SandboxPolicy> {
        let policy = Arc::new(policy);
        self.policies.insert(source, Arc::clone(&policy));
        policy
    }

    /// `GET https://sni/path` from `source` through the proxy.
    pub async fn https_get(&self, source: IpAddr, sni: &str, path: &str) -> std::io::Result<Reply> {
        https_get(source, self.tls_addr, self.ca.client_config(), sni, path).await
    }

    /// `GET http://host/path` from `source` through the proxy.
    pub async fn http_get(&self, source: IpAddr, host: &str, path: &str) -> std::io::Result<Reply> {
        http_get(source, self.http_addr, host, path).await
    }
}
