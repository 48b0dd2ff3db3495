//! What one sandbox may resolve and reach by name, and how the daemon tells
//! the resolver and the proxy which sandbox a packet comes from.
//!
//! Decisions, in order (the same for the resolver and the proxy):
//!
//! 1. A name matching one of the runner's `dns_name_except` carve-outs is
//!    refused, whatever the grants or the runner default say.
//! 2. A sandbox whose egress is open (the runner default `internet`, or an
//!    `any` rule) may resolve and reach every other name.
//! 3. Otherwise only names matching a `dns_name` grant. A grant opens TCP
//!    443 (HTTPS, routed by SNI). It opens TCP 80 (HTTP, routed by `Host`)
//!    only when the rule lists port 80 among its ports: the platform's
//!    model is HTTPS only, and plain HTTP to a granted name is an explicit
//!    opt-in. Other ports of a name rule open nothing (they are CIDR-only).
//! 4. A sandbox with CIDR rules but no grant for the name resolves it only
//!    when [`crate::DnsConfig::resolve_all_with_cidr_rules`] is set (off by
//!    default: a name lookup forwarded upstream is itself a way out, DNS
//!    tunnelling, and a CIDR rule speaks of addresses, not names).
//!
//! Sandboxes are identified by their source address only
//! ([`PolicySource::lookup`]); the firewall makes sure a sandbox cannot
//! send from another's address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use sandpit_net::policy::{
    is_dns_name, Cidr, DefaultEgress, EgressTarget, NamePattern, NetworkPolicy, PortRange,
};

use crate::canonical_ip;
use crate::usage::{DnsDenial, ProxyRefusal, SandboxUsage};

/// The HTTPS port a name grant opens.
pub const HTTPS_PORT: u16 = 443;
/// The HTTP port a name grant opens when its rule lists it.
pub const HTTP_PORT: u16 = 80;

/// What the resolver and the proxy know about one sandbox: its id (for
/// logs), its name grants, CIDR rules and carve-outs, and its counters.
#[derive(Debug)]
pub struct SandboxPolicy {
    id: String,
    /// Egress open to everything but the deny set.
    open: bool,
    names: Vec<(NamePattern, Vec<PortRange>)>,
    cidrs: Vec<(Cidr, Vec<PortRange>)>,
    carve_outs: Vec<NamePattern>,
    usage: Arc<SandboxUsage>,
}

/// What the resolver may answer for one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Forward the query, whatever its type (open egress, or CIDR rules
    /// with `resolve_all_with_cidr_rules`).
    AnyType,
    /// Forward address queries (A, AAAA, CNAME) only: a granted name. Other
    /// types get an empty answer (no HTTPS/SVCB records, so no ECH configs
    /// that would hide the real destination behind the granted name).
    Addresses,
    /// Answer NXDOMAIN.
    Denied(DnsDenial),
}

impl SandboxPolicy {
    /// The policy of sandbox `id` as the enforcers read it: `policy`'s
    /// egress with the runner's default resolved, and the runner's
    /// `dns_name_except` carve-outs.
    pub fn new(
        id: impl Into<String>,
        policy: &NetworkPolicy,
        default: DefaultEgress,
        carve_outs: Vec<NamePattern>,
    ) -> Self {
        let (open, names, cidrs) = match policy.effective_egress(default) {
            None => (true, Vec::new(), Vec::new()),
            Some(rules) => {
                let mut names = Vec::new();
                let mut cidrs = Vec::new();
                for rule in rules {
                    match &rule.target {
                        EgressTarget::Name(n) => names.push((n.clone(), rule.ports.clone())),
                        EgressTarget::Cidr(c) => cidrs.push((c.clone(), rule.ports.clone())),
                        EgressTarget::Any | EgressTarget::Tenant(_) => {}
                    }
                }
                (false, names, cidrs)
            }
        };
        Self {
            id: id.into(),
            open,
            names,
            cidrs,
            carve_outs,
            usage: Arc::default(),
        }
    }

    /// The same policy counting into `usage` (e.g. counters kept across a
    /// policy update).
    pub fn with_usage(mut self, usage: Arc<SandboxUsage>) -> Self {
        self.usage = usage;
        self
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox's counters.
    pub fn usage(&self) -> &Arc<SandboxUsage> {
        &self.usage
    }

    /// Whether egress is open to everything but the deny set.
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn carved_out(&self, name: &str) -> bool {
        self.carve_outs.iter().any(|c| c.matches(name))
    }

    /// What the resolver may answer for `name` (normalised by
    /// [`host_name`]).
    pub fn resolution(&self, name: &str, resolve_all_with_cidr_rules: bool) -> Resolution {
        if self.carved_out(name) {
            Resolution::Denied(DnsDenial::CarvedOut)
        } else if self.open {
            Resolution::AnyType
        } else if self.names.iter().any(|(n, _)| n.matches(name)) {
            Resolution::Addresses
        } else if resolve_all_with_cidr_rules && !self.cidrs.is_empty() {
            Resolution::AnyType
        } else {
            Resolution::Denied(DnsDenial::NotGranted)
        }
    }

    /// Whether the proxy may carry a connection to `name` (normalised by
    /// [`host_name`]) on `port` (443 or 80).
    pub fn may_connect(&self, name: &str, port: u16) -> Result<(), ProxyRefusal> {
        if self.carved_out(name) {
            return Err(ProxyRefusal::CarvedOut);
        }
        if self.open {
            return Ok(());
        }
        let granted = self
            .names
            .iter()
            .any(|(n, ports)| n.matches(name) && name_rule_opens(ports, port));
        if granted {
            Ok(())
        } else {
            Err(ProxyRefusal::NotGranted)
        }
    }

    /// Whether one of the sandbox's CIDR rules names `addr` (on `port`,
    /// or on any port when `None`): such an address is reachable even if
    /// it is in the overridable part of the deny set.
    pub fn cidr_allows(&self, addr: IpAddr, port: Option<u16>) -> bool {
        let addr = canonical_ip(addr);
        self.cidrs.iter().any(|(c, ports)| {
            c.contains(addr)
                && match port {
                    None => true,
                    Some(p) => ports.is_empty() || ports.iter().any(|r| r.contains(p)),
                }
        })
    }
}

/// Whether a name rule with `ports` opens `port` (see the module doc).
fn name_rule_opens(ports: &[PortRange], port: u16) -> bool {
    match port {
        HTTPS_PORT => ports.is_empty() || ports.iter().any(|r| r.contains(HTTPS_PORT)),
        HTTP_PORT => ports.iter().any(|r| r.contains(HTTP_PORT)),
        _ => false,
    }
}

/// `raw` (an SNI, a `Host` without its port, a query name) as a host name
/// the policy can match: ASCII, lowercase, without a trailing dot, a
/// DNS-1123 name whose last label is not all digits (so never an IPv4
/// literal). `None` otherwise.
pub fn host_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let last = name.rsplit('.').next()?;
    if !is_dns_name(&name) || last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(name)
}

/// Where the resolver and the proxy find the policy of the sandbox a
/// packet comes from. The daemon implements it (or fills a
/// [`PolicyTable`]); `None` refuses the source.
pub trait PolicySource: Send + Sync + 'static {
    /// The policy of the sandbox whose address is `source` (canonical: an
    /// IPv4-mapped address is passed as IPv4).
    fn lookup(&self, source: IpAddr) -> Option<Arc<SandboxPolicy>>;
}

/// A [`PolicySource`] over a map from sandbox address to policy, updated as
/// sandboxes come and go.
#[derive(Debug, Default)]
pub struct PolicyTable {
    by_addr: RwLock<HashMap<IpAddr, Arc<SandboxPolicy>>>,
}

impl PolicyTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `policy` to packets from `addr` (replacing any previous one).
    pub fn insert(&self, addr: IpAddr, policy: Arc<SandboxPolicy>) {
        let mut map = self.by_addr.write().unwrap_or_else(|e| e.into_inner());
        map.insert(canonical_ip(addr), policy);
    }

    /// Stops serving `addr`; returns its policy (and so its counters).
    pub fn remove(&self, addr: IpAddr) -> Option<Arc<SandboxPolicy>> {
        let mut map = self.by_addr.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&canonical_ip(addr))
    }
}

impl PolicySource for PolicyTable {
    fn lookup(&self, source: IpAddr) -> Option<Arc<SandboxPolicy>> {
        let map = self.by_addr.read().unwrap_or_else(|e| e.into_inner());
        map.get(&source).cloned()
    }
}

#[cfg(test)]
mod tests {
    use sandpit_net::policy::{Egress, EgressRule};

    use super::*;

    fn pattern(p: &str) -> NamePattern {
        NamePattern::parse(p).unwrap()
    }

    fn names(rules: &[(&str, &[u16])]) -> NetworkPolicy {
        let rules = rules
            .iter()
            .map(|(n, ports)| EgressRule {
                target: EgressTarget::Name(pattern(n)),
                ports: ports.iter().map(|p| PortRange::single(*p)).collect(),
            })
            .collect();
        NetworkPolicy {
            egress: Egress::Allow(rules),
            ..Default::default()
        }
    }

    #[test]
    fn grants_open_443_and_80_only_when_listed() {
        let p = SandboxPolicy::new(
            "s",
            &names(&[("api.test", &[]), ("*.files.test", &[80, 443])]),
            DefaultEgress::Deny,
            vec![],
        );
        assert_eq!(p.may_connect("api.test", 443), Ok(()));
        assert_eq!(p.may_connect("api.test", 80), Err(ProxyRefusal::NotGranted));
        assert_eq!(p.may_connect("a.files.test", 80), Ok(()));
        assert_eq!(p.may_connect("a.files.test", 443), Ok(()));
        assert_eq!(
            p.may_connect("files.test", 443),
            Err(ProxyRefusal::NotGranted)
        );
        assert_eq!(
            p.may_connect("other.test", 443),
            Err(ProxyRefusal::NotGranted)
        );
        assert_eq!(p.resolution("api.test", false), Resolution::Addresses);
        assert_eq!(
            p.resolution("other.test", true),
            Resolution::Denied(DnsDenial::NotGranted)
        );
        // A name rule on 8443 opens nothing on 443.
        let odd = SandboxPolicy::new(
            "s",
            &names(&[("x.test", &[8443])]),
            DefaultEgress::Deny,
            vec![],
        );
        assert_eq!(
            odd.may_connect("x.test", 443),
            Err(ProxyRefusal::NotGranted)
        );
    }

    #[test]
    fn carve_outs_win_over_grants_and_open_egress() {
        let carve = vec![pattern("*.internal.test")];
        let granted = SandboxPolicy::new(
            "s",
            &names(&[("*.test", &[])]),
            DefaultEgress::Deny,
            carve.clone(),
        );
        assert_eq!(
            granted.may_connect("db.internal.test", 443),
            Err(ProxyRefusal::CarvedOut)
        );
        assert_eq!(granted.may_connect("api.test", 443), Ok(()));
        let open = SandboxPolicy::new(
            "s",
            &NetworkPolicy::default(),
            DefaultEgress::Internet,
            carve,
        );
        assert!(open.is_open());
        assert_eq!(
            open.resolution("db.internal.test", false),
            Resolution::Denied(DnsDenial::CarvedOut)
        );
        assert_eq!(
            open.resolution("anything.example", false),
            Resolution::AnyType
        );
        assert_eq!(open.may_connect("anything.example", 80), Ok(()));
    }

    #[test]
    fn cidr_only_sandboxes_resolve_only_when_configured() {
        let policy = NetworkPolicy {
            egress: Egress::Allow(vec![EgressRule {
                target: EgressTarget::Cidr(Cidr {
                    net: "10.1.0.0/16".parse().unwrap(),
                    except: vec![],
                }),
                ports: vec![PortRange::single(5432)],
            }]),
            ..Default::default()
        };
        let p = SandboxPolicy::new("s", &policy, DefaultEgress::Internet, vec![]);
        assert_eq!(
            p.resolution("db.test", false),
            Resolution::Denied(DnsDenial::NotGranted)
        );
        assert_eq!(p.resolution("db.test", true), Resolution::AnyType);
        assert!(p.cidr_allows("10.1.2.3".parse().unwrap(), Some(5432)));
        assert!(p.cidr_allows("::ffff:10.1.2.3".parse().unwrap(), None));
        assert!(!p.cidr_allows("10.1.2.3".parse().unwrap(), Some(443)));
        let denied =
            SandboxPolicy::new("s", &NetworkPolicy::default(), DefaultEgress::Deny, vec![]);
        assert_eq!(
            denied.resolution("api.test", true),
            Resolution::Denied(DnsDenial::NotGranted)
        );
    }

    #[test]
    fn host_names_are_normalised_and_literals_refused() {
        assert_eq!(host_name(b"API.Test."), Some("api.test".into()));
        for bad in [
            &b"10.0.0.1"[..],
            b"1.2.3.4.",
            b"[::1]",
            b"a_b.test",
            b"",
            b".",
            b"a..b",
            b"caf\xc3\xa9.test",
            b"x y.test",
        ] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
        assert_eq!(host_name(b"1.2.3.example"), Some("1.2.3.example".into()));
    }

    #[test]
    fn the_table_canonicalises_addresses() {
        let t = PolicyTable::new();
        let p = Arc::new(SandboxPolicy::new(
            "s",
            &NetworkPolicy::default(),
            DefaultEgress::Deny,
            vec![],
        ));
        t.insert("::ffff:10.88.0.2".parse().unwrap(), p);
        assert!(t.lookup("10.88.0.2".parse().unwrap()).is_some());
        assert!(t.lookup("10.88.0.3".parse().unwrap()).is_none());
        assert!(t.remove("10.88.0.2".parse().unwrap()).is_some());
        assert!(t.lookup("10.88.0.2".parse().unwrap()).is_none());
    }
}
