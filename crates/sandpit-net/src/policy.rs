//! A sandbox's network policy, as the engine enforces it: the domain types
//! the API layer builds from `NetworkOptions` and every enforcer (the
//! firewall, the DNS resolver, the egress proxy) reads. No gRPC types.
//!
//! The model (the platform's): egress and ingress are allow-only rule sets
//! over a default-deny baseline. No rules (and no deny flag) leaves the
//! runner's default in force; `deny` refuses everything. Whatever the rules
//! say, destinations in the always-deny set (the host's own addresses,
//! link-local including cloud metadata, the sandbox subnet, private and
//! CGNAT ranges) stay unreachable unless a CIDR rule names them explicitly;
//! link-local and the host itself stay unreachable even then.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An inclusive range of ports, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// Not a valid port range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Port 0, or above 65535.
    #[error("port {0} is outside 1-65535")]
    OutOfRange(i64),
    /// The end comes before the start.
    #[error("end port {end} is below port {start}")]
    Reversed {
        /// The start.
        start: i64,
        /// The end.
        end: i64,
    },
}

impl PortRange {
    /// All ports.
    pub const ALL: PortRange = PortRange {
        first: 1,
        last: 65535,
    };

    /// `start..=end` (`end` = `start` when `None`), both within 1..=65535.
    pub fn new(start: i64, end: Option<i64>) -> Result<Self, PortRangeError> {
        let end = end.unwrap_or(start);
        for p in [start, end] {
            if !(1..=65535).contains(&p) {
                return Err(PortRangeError::OutOfRange(p));
            }
        }
        if end < start {
            return Err(PortRangeError::Reversed { start, end });
        }
        Ok(Self {
            first: start as u16,
            last: end as u16,
        })
    }

    /// One port.
    pub fn single(port: u16) -> Self {
        let port = port.max(1);
        Self {
            first: port,
            last: port,
        }
    }

    /// The first port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last port.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;

    /// `443` or `8000-8100`, what `Display` writes.
    fn try_from(text: String) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<i64>()
                .map_err(|_| format!("{text:?} is not a port range"))
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (num(a)?, Some(num(b)?)),
            None => (num(&text)?, None),
        };
        PortRange::new(first, last).map_err(|e| e.to_string())
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// A host name grant: an exact name, or one leftmost wildcard (`*.pypi.org`
/// matches `files.pypi.org` and `a.b.pypi.org`, not `pypi.org`). Lowercase,
/// without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct NamePattern {
    /// The name, or the suffix after `*.`.
    name: String,
    wildcard: bool,
}

/// Not a valid name pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a DNS name or a single leftmost wildcard (*.example.com)")]
pub struct NamePatternError(pub String);

fn is_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// Whether `name` is a DNS-1123 subdomain (lowercase labels of letters,
/// digits and inner hyphens, at most 253 characters).
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_label)
}

impl NamePattern {
    /// Parses `pypi.org` or `*.pypi.org` (case-insensitive; a trailing dot
    /// is dropped). `*` alone is refused: that is a policy ceiling, not a
    /// grant.
    pub fn parse(text: &str) -> Result<Self, NamePatternError> {
        let lower = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest.to_owned(), true),
            None => (lower.clone(), false),
        };
        if !is_dns_name(&name) {
            return Err(NamePatternError(text.to_owned()));
        }
        Ok(Self { name, wildcard })
    }

    /// Whether `host` (any case, trailing dot or not) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            host.len() > self.name.len() + 1
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl From<NamePattern> for String {
    fn from(n: NamePattern) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for NamePattern {
    type Error = NamePatternError;

    fn try_from(text: String) -> Result<Self, NamePatternError> {
        NamePattern::parse(&text)
    }
}

/// An address range with carved-out sub-ranges.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cidr {
    /// The range.
    pub net: IpNet,
    /// Sub-ranges excluded from it.
    pub except: Vec<IpNet>,
}

impl Cidr {
    /// Whether `addr` is in the range and in none of its exceptions.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.net.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

/// Other sandboxes, selected by who owns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tenant {
    /// The same principal's sandboxes.
    SameUser,
    /// Sandboxes of the same organization.
    SameOrg,
}

/// Where an egress rule lets a sandbox go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EgressTarget {
    /// Addresses (any protocol the ports allow).
    Cidr(Cidr),
    /// A host name, over HTTPS (TCP 443) only, through the egress proxy.
    Name(NamePattern),
    /// Everything but the always-deny set.
    Any,
    /// Other sandboxes.
    Tenant(Tenant),
}

/// One egress grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressRule {
    /// Where.
    pub target: EgressTarget,
    /// Which destination ports; empty means all (names: 443 only).
    pub ports: Vec<PortRange>,
}

/// Where an ingress rule lets connections come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IngressSource {
    /// These addresses.
    Cidr(Cidr),
    /// Anyone (the host, other sandboxes, published services).
    Any,
    /// Other sandboxes.
    Tenant(Tenant),
}

/// One ingress grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IngressRule {
    /// From where.
    pub source: IngressSource,
    /// To which of the sandbox's ports; empty means all.
    pub ports: Vec<PortRange>,
}

/// What a runner does with a sandbox that states no egress policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultEgress {
    /// Nothing leaves (the safe default).
    #[default]
    Deny,
    /// The internet: everything but the always-deny set.
    Internet,
}

/// A sandbox's egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Egress {
    /// The runner's default (no rules and no deny flag were given).
    #[default]
    RunnerDefault,
    /// Nothing leaves (`deny_egress`).
    Deny,
    /// Only what these rules allow.
    Allow(Vec<EgressRule>),
}

/// A sandbox's ingress policy (connections other sandboxes and the host
/// open to it; the services it publishes get their own path).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Ingress {
    /// Nothing comes in but the daemon's own (published services,
    /// health probes). The default.
    #[default]
    Deny,
    /// Only what these rules allow.
    Allow(Vec<IngressRule>),
}

/// Everything the enforcers need about one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// Outbound.
    pub egress: Egress,
    /// Inbound.
    pub ingress: Ingress,
}

impl NetworkPolicy {
    /// The egress rules in force once the runner's default is resolved:
    /// `None` means everything but the always-deny set, `Some(rules)` only
    /// what the rules allow (an empty list allows nothing).
    pub fn effective_egress(&self, default: DefaultEgress) -> Option<&[EgressRule]> {
        match (&self.egress, default) {
            (Egress::RunnerDefault, DefaultEgress::Internet) => None,
            (Egress::RunnerDefault, DefaultEgress::Deny) | (Egress::Deny, _) => Some(&[]),
            (Egress::Allow(rules), _) if rules.iter().any(|r| r.target == EgressTarget::Any) => {
                None
            }
            (Egress::Allow(rules), _) => Some(rules),
        }
    }

    /// The host-name grants (served by the proxy and the resolver).
    pub fn name_grants(&self) -> impl Iterator<Item = &NamePattern> {
        let rules: &[EgressRule] = match &self.egress {
            Egress::Allow(r) => r,
            _ => &[],
        };
        rules.iter().filter_map(|r| match &r.target {
            EgressTarget::Name(n) => Some(n),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_json() {
        let policy = NetworkPolicy {
            egress: Egress::Allow(vec![
                EgressRule {
                    target: EgressTarget::Name(NamePattern::parse("*.pypi.org").unwrap()),
                    ports: vec![],
                },
                EgressRule {
                    target: EgressTarget::Cidr(Cidr {
                        net: "198.51.100.0/24".parse().unwrap(),
                        except: vec!["198.51.100.128/25".parse().unwrap()],
                    }),
                    ports: vec![PortRange::new(8000, Some(8100)).unwrap()],
                },
            ]),
            ingress: Ingress::Allow(vec![IngressRule {
                source: IngressSource::Tenant(Tenant::SameUser),
                ports: vec![PortRange::single(22)],
            }]),
        };
        let text = serde_json::to_string(&policy).unwrap();
        assert!(
            text.contains("\"*.pypi.org\"") && text.contains("\"8000-8100\""),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<NetworkPolicy>(&text).unwrap(),
            policy
        );
        // What a hand-edited file may hold is checked as the API checks it.
        let bad = text.replace("8000-8100", "0-8100");
        assert!(serde_json::from_str::<NetworkPolicy>(&bad).is_err());
        let bad = text.replace("*.pypi.org", "a.*.org");
        assert!(serde_json::from_str::<NetworkPolicy>(&bad).is_err());
        assert_eq!(
            serde_json::from_str::<DefaultEgress>("\"internet\"").unwrap(),
            DefaultEgress::Internet
        );
    }

    #[test]
    fn ports_are_bounded() {
        assert_eq!(PortRange::new(443, None).unwrap().to_string(), "443");
        assert_eq!(
            PortRange::new(8000, Some(8100)).unwrap().to_string(),
            "8000-8100"
        );
        assert_eq!(PortRange::new(0, None), Err(PortRangeError::OutOfRange(0)));
        assert_eq!(
            PortRange::new(1, Some(65536)),
            Err(PortRangeError::OutOfRange(65536))
        );
        assert_eq!(
            PortRange::new(10, Some(9)),
            Err(PortRangeError::Reversed { start: 10, end: 9 })
        );
        assert!(PortRange::ALL.contains(1) && PortRange::ALL.contains(65535));
    }

    #[test]
    fn names_and_wildcards() {
        let exact = NamePattern::parse("API.Test.").unwrap();
        assert_eq!(exact.to_string(), "api.test");
        assert!(exact.matches("api.test") && exact.matches("API.TEST."));
        assert!(!exact.matches("x.api.test"));
        let wild = NamePattern::parse("*.pypi.org").unwrap();
        assert!(wild.matches("files.pypi.org") && wild.matches("a.b.pypi.org"));
        assert!(!wild.matches("pypi.org") && !wild.matches("evilpypi.org"));
        for bad in ["*", "a.*.b", "foo.*", "*.", "-a.b", "a_b.c", "", "*.*.x"] {
            assert!(NamePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_runner_default_applies_only_without_rules() {
        let p = NetworkPolicy::default();
        assert_eq!(p.effective_egress(DefaultEgress::Deny), Some(&[][..]));
        assert_eq!(p.effective_egress(DefaultEgress::Internet), None);
        let deny = NetworkPolicy {
            egress: Egress::Deny,
            ..Default::default()
        };
        assert_eq!(
            deny.effective_egress(DefaultEgress::Internet),
            Some(&[][..])
        );
        let any = NetworkPolicy {
            egress: Egress::Allow(vec![EgressRule {
                target: EgressTarget::Any,
                ports: vec![],
            }]),
            ..Default::default()
        };
        assert_eq!(any.effective_egress(DefaultEgress::Deny), None);
    }

    #[test]
    fn exceptions_carve_out_of_a_cidr() {
        let c = Cidr {
            net: "10.1.0.0/16".parse().unwrap(),
            except: vec!["10.1.2.0/24".parse().unwrap()],
        };
        assert!(c.contains("10.1.1.1".parse().unwrap()));
        assert!(!c.contains("10.1.2.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
    }
}
