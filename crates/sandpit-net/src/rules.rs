//! A sandbox's policy compiled into the contents of its nftables sets:
//! address ranges (all protocols) and address x port boxes (TCP and UDP),
//! for egress, ingress and the DNS servers it may reach directly. Pure:
//! every always-deny decision is made here, so the kernel's rules stay
//! fixed and small, and this is where they are tested.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::alloc::Allocation;
use crate::policy::{
    DefaultEgress, Egress, EgressTarget, Ingress, IngressSource, NetworkPolicy, PortRange, Tenant,
};

/// An inclusive range of addresses of one family, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Span {
    pub(crate) lo: u128,
    pub(crate) hi: u128,
}

/// Address family of a [`Span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn max(self) -> u128 {
        match self {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        }
    }
}

fn span_of(net: &IpNet) -> (Family, Span) {
    match net {
        IpNet::V4(n) => (
            Family::V4,
            Span {
                lo: u32::from(n.network()).into(),
                hi: u32::from(n.broadcast()).into(),
            },
        ),
        IpNet::V6(n) => (
            Family::V6,
            Span {
                lo: u128::from(n.network()),
                hi: u128::from(n.broadcast()),
            },
        ),
    }
}

fn addr_span(a: IpAddr) -> (Family, Span) {
    span_of(&IpNet::from(a))
}

/// Sorted, merged, non-overlapping (adjacent ranges are joined).
pub(crate) fn normalize(mut v: Vec<Span>) -> Vec<Span> {
    v.sort();
    let mut out: Vec<Span> = Vec::with_capacity(v.len());
    for s in v {
        match out.last_mut() {
            Some(last) if s.lo <= last.hi.saturating_add(1) => last.hi = last.hi.max(s.hi),
            _ => out.push(s),
        }
    }
    out
}

/// `a` without anything in `b` (both normalized).
pub(crate) fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for s in a {
        let mut lo = s.lo;
        let mut open = true;
        for d in b.iter().filter(|d| d.hi >= s.lo && d.lo <= s.hi) {
            if d.lo > lo {
                out.push(Span { lo, hi: d.lo - 1 });
            }
            if d.hi >= s.hi {
                open = false;
                break;
            }
            lo = d.hi + 1;
        }
        if open && lo <= s.hi {
            out.push(Span { lo, hi: s.hi });
        }
    }
    out
}

/// What no rule opens, and what only a CIDR rule naming a range inside it
/// opens.
#[derive(Debug, Clone, Default)]
pub(crate) struct DenySets {
    /// Link-local (cloud metadata), the host's own addresses, the
    /// operator's `extra_deny`: never reachable.
    pub(crate) never: Vec<IpNet>,
    /// The sandbox subnets, RFC 1918, CGNAT, ULA.
    pub(crate) private: Vec<IpNet>,
}

/// The addresses of other sandboxes that `Tenant` rules name; the daemon
/// computes them (it knows who owns what) and calls
/// [`Network::apply`](crate::Network::apply) again when they change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantSets {
    /// Sandboxes of the same principal.
    pub same_user: Vec<Allocation>,
    /// Sandboxes of the same organization.
    pub same_org: Vec<Allocation>,
}

impl TenantSets {
    fn of(&self, t: Tenant) -> &[Allocation] {
        match t {
            Tenant::SameUser => &self.same_user,
            Tenant::SameOrg => &self.same_org,
        }
    }
}

/// The contents of one direction's sets, per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Grants {
    /// Addresses, any protocol.
    pub(crate) all4: Vec<Span>,
    pub(crate) all6: Vec<Span>,
    /// Address x port boxes, TCP and UDP; never overlapping.
    pub(crate) ports4: Vec<(Span, PortRange)>,
    pub(crate) ports6: Vec<(Span, PortRange)>,
}

/// Everything a sandbox's sets hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Compiled {
    pub(crate) egress: Grants,
    pub(crate) ingress: Grants,
    /// DNS servers reached directly (named by a CIDR rule covering port
    /// 53); all other DNS goes to the daemon's resolver.
    pub(crate) dns4: Vec<Span>,
    pub(crate) dns6: Vec<Span>,
    /// Has host-name rules: web traffic not otherwise allowed goes to the
    /// egress proxy.
    pub(crate) proxy: bool,
}

#[derive(Default)]
struct Builder {
    all: [Vec<Span>; 2],
    boxes: [Vec<(Span, PortRange)>; 2],
}

impl Builder {
    fn add(&mut self, fam: Family, spans: &[Span], ports: &[PortRange]) {
        let i = fam as usize;
        if ports.is_empty() {
            self.all[i].extend_from_slice(spans);
        } else {
            for s in spans {
                for p in ports {
                    self.boxes[i].push((*s, *p));
                }
            }
        }
    }

    fn finish(self, v6: bool) -> Grants {
        let [a4, a6] = self.all;
        let [b4, b6] = self.boxes;
        let a4 = normalize(a4);
        let a6 = if v6 { normalize(a6) } else { Vec::new() };
        Grants {
            ports4: disjoint_boxes(b4, &a4),
            ports6: if v6 {
                disjoint_boxes(b6, &a6)
            } else {
                Vec::new()
            },
            all4: a4,
            all6: a6,
        }
    }
}

/// Boxes that cover exactly what `boxes` cover, minus what `all` already
/// grants, without overlaps (an interval set of concatenations refuses
/// them): the port axis is cut at every boundary, the address ranges of
/// each piece merged, and neighbouring pieces with the same ranges joined.
fn disjoint_boxes(boxes: Vec<(Span, PortRange)>, all: &[Span]) -> Vec<(Span, PortRange)> {
    let mut cuts: Vec<u32> = boxes
        .iter()
        .flat_map(|(_, p)| [u32::from(p.first()), u32::from(p.last()) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces: Vec<(u32, u32, Vec<Span>)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let spans: Vec<Span> = boxes
            .iter()
            .filter(|(_, p)| u32::from(p.first()) <= lo && hi <= u32::from(p.last()))
            .map(|(s, _)| *s)
            .collect();
        let spans = subtract(&normalize(spans), all);
        if spans.is_empty() {
            continue;
        }
        match pieces.last_mut() {
            Some(last) if last.1 + 1 == lo && last.2 == spans => last.1 = hi,
            _ => pieces.push((lo, hi, spans)),
        }
    }
    let mut out = Vec::new();
    for (lo, hi, spans) in pieces {
        let ports = PortRange::new(i64::from(lo), Some(i64::from(hi))).expect("within 1-65535");
        out.extend(spans.into_iter().map(|s| (s, ports)));
    }
    out
}

/// The ranges of `nets` of family `fam`, normalized.
pub(crate) fn spans_of(fam: Family, nets: &[IpNet]) -> Vec<Span> {
    spans(fam, nets)
}

fn spans(fam: Family, nets: &[IpNet]) -> Vec<Span> {
    normalize(
        nets.iter()
            .map(span_of)
            .filter(|(f, _)| *f == fam)
            .map(|(_, s)| s)
            .collect(),
    )
}

fn universe(fam: Family) -> Vec<Span> {
    vec![Span {
        lo: 0,
        hi: fam.max(),
    }]
}

/// What an egress CIDR may open: its range less its exceptions, less
/// whatever is never reachable, less every private range it does not lie
/// inside (naming 10.1.0.0/16 opens it; naming 0.0.0.0/0 opens no private
/// range; naming 10.0.0.0/8 still leaves the sandbox subnet inside it
/// shut).
fn egress_cidr(c: &crate::policy::Cidr, deny: &DenySets) -> (Family, Vec<Span>) {
    let (fam, s) = span_of(&c.net);
    let mut shut = spans(fam, &deny.never);
    for p in deny.private.iter().filter(|p| !p.contains(&c.net)) {
        let (f, ps) = span_of(p);
        if f == fam {
            shut.push(ps);
        }
    }
    let mut except = spans(fam, &c.except);
    except.extend(shut);
    (fam, subtract(&[s], &normalize(except)))
}

fn tenant_spans(tenants: &[Allocation], never: &[IpNet]) -> [Vec<Span>; 2] {
    let mut out: [Vec<Span>; 2] = Default::default();
    for a in tenants {
        let addrs = std::iter::once(IpAddr::V4(a.ipv4)).chain(a.ipv6.map(IpAddr::V6));
        for addr in addrs {
            let (f, s) = addr_span(addr);
            out[f as usize].push(s);
        }
    }
    for (i, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
        let v = std::mem::take(&mut out[i]);
        out[i] = subtract(&normalize(v), &spans(fam, never));
    }
    out
}

/// Compiles `policy` (the runner's default applied) for a sandbox.
/// `v6`: whether the network has IPv6 (otherwise IPv6 sets stay empty).
pub(crate) fn compile(
    policy: &NetworkPolicy,
    default: DefaultEgress,
    tenants: &TenantSets,
    deny: &DenySets,
    v6: bool,
) -> Compiled {
    let mut out = Compiled::default();
    let mut eg = Builder::default();
    let mut dns: [Vec<Span>; 2] = Default::default();
    let any = |eg: &mut Builder, ports: &[PortRange]| {
        for fam in [Family::V4, Family::V6] {
            let mut shut = spans(fam, &deny.never);
            shut.extend(spans(fam, &deny.private));
            eg.add(fam, &subtract(&universe(fam), &normalize(shut)), ports);
        }
    };
    match (&policy.egress, default) {
        (Egress::RunnerDefault, DefaultEgress::Internet) => any(&mut eg, &[]),
        (Egress::RunnerDefault, DefaultEgress::Deny) | (Egress::Deny, _) => {}
        (Egress::Allow(rules), _) => {
            for r in rules {
                match &r.target {
                    EgressTarget::Any => any(&mut eg, &r.ports),
                    EgressTarget::Cidr(c) => {
                        let (fam, s) = egress_cidr(c, deny);
                        eg.add(fam, &s, &r.ports);
                        if r.ports.is_empty() || r.ports.iter().any(|p| p.contains(53)) {
                            dns[fam as usize].extend(s);
                        }
                    }
                    EgressTarget::Tenant(t) => {
                        let [s4, s6] = tenant_spans(tenants.of(*t), &deny.never);
                        eg.add(Family::V4, &s4, &r.ports);
                        eg.add(Family::V6, &s6, &r.ports);
                    }
                    EgressTarget::Name(_) => out.proxy = true,
                }
            }
        }
    }
    out.egress = eg.finish(v6);
    let [d4, d6] = dns;
    out.dns4 = normalize(d4);
    out.dns6 = if v6 { normalize(d6) } else { Vec::new() };

    let mut ing = Builder::default();
    if let Ingress::Allow(rules) = &policy.ingress {
        for r in rules {
            match &r.source {
                IngressSource::Any => {
                    ing.add(Family::V4, &universe(Family::V4), &r.ports);
                    ing.add(Family::V6, &universe(Family::V6), &r.ports);
                }
                IngressSource::Cidr(c) => {
                    let (fam, s) = span_of(&c.net);
                    let s = subtract(&[s], &spans(fam, &c.except));
                    ing.add(fam, &s, &r.ports);
                }
                IngressSource::Tenant(t) => {
                    let [s4, s6] = tenant_spans(tenants.of(*t), &[]);
                    ing.add(Family::V4, &s4, &r.ports);
                    ing.add(Family::V6, &s6, &r.ports);
                }
            }
        }
    }
    out.ingress = ing.finish(v6);
    out
}

/// The always-deny sets for a network: `subnets` are the sandboxes' own,
/// `host` the host's addresses.
pub(crate) fn deny_sets(subnets: &[IpNet], host: &[IpAddr], extra: &[IpNet]) -> DenySets {
    let mut never: Vec<IpNet> = ["169.254.0.0/16", "fe80::/10"]
        .iter()
        .map(|s| s.parse().expect("valid"))
        .collect();
    never.extend(host.iter().map(|a| IpNet::from(*a)));
    never.extend_from_slice(extra);
    let mut private: Vec<IpNet> = subnets.to_vec();
    private.extend(
        [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ]
        .iter()
        .map(|s| s.parse::<IpNet>().expect("valid")),
    );
    DenySets { never, private }
}

/// Whether `addr` is inside one of `spans` (tests and diagnostics).
#[cfg(test)]
pub(crate) fn covers(spans: &[Span], addr: IpAddr) -> bool {
    let (_, a) = addr_span(addr);
    spans.iter().any(|s| s.lo <= a.lo && a.lo <= s.hi)
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
