//! The firewall's layout: the base chains (written once at start-up, in
//! one transaction that replaces their rules without a gap), and each
//! sandbox's own chains and sets, reached through verdict maps keyed by
//! the sandbox's host link, so a create or a delete is one small batch.
//!
//! ```text
//! forward (filter):  ct established,related accept
//!                    iifname sp-* jump from_sb -> never sets drop,
//!                                 iifname vmap @egress (goto eg_N:
//!                                 allowed -> return, else drop), drop
//!                    oifname sp-* jump to_sb   -> oifname vmap @ingress
//!                                 (goto in_N: allowed -> accept, else
//!                                 drop), drop
//! input (filter):    iifname sp-* jump sb_input -> established, IPv6
//!                    neighbour discovery, the resolver and the proxy on
//!                    the gateway; nothing else of the host
//! prerouting (nat):  iifname vmap @nat (jump nat_N: DNS named by a CIDR
//!                    rule stays, web traffic of sandboxes with name rules
//!                    not otherwise allowed -> proxy); DNS -> resolver
//! postrouting (nat): from the subnets, not to a sandbox -> masquerade
//! ```
//!
//! The host reaches every sandbox (its output is not filtered): services
//! a sandbox publishes privately must be reachable from the daemon.

use std::net::IpAddr;

use crate::alloc::Slot;
use crate::config::NetConfig;
use crate::nft::{
    reg, Base, CmpOp, Elem, Expr, Hook, MetaKey, Op, SetDef, Verdict, NFPROTO_IPV4, NFPROTO_IPV6,
};
use crate::policy::PortRange;
use crate::rules::{Compiled, Family, Grants, Span};

const TYPE_IPV4: u32 = 7;
const TYPE_IPV6: u32 = 8;
const TYPE_INET_PROTO: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_IFNAME: u32 = 41;
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;

/// Builds one rule's expressions.
#[derive(Debug, Default)]
struct R(Vec<Expr>);

impl R {
    fn new() -> Self {
        Self::default()
    }

    fn e(mut self, e: Expr) -> Self {
        self.0.push(e);
        self
    }

    fn meta(self, key: MetaKey, op: CmpOp, value: &[u8]) -> Self {
        self.e(Expr::Meta(key, reg::R0))
            .e(Expr::Cmp(reg::R0, op, value.to_vec()))
    }

    /// IPv4 or IPv6 only (what every address match needs in an inet table).
    fn fam(self, f: Family) -> Self {
        let p = match f {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        };
        self.meta(MetaKey::NfProto, CmpOp::Eq, &[p])
    }

    fn tcp_udp(self) -> Self {
        self.e(Expr::Meta(MetaKey::L4Proto, reg::R0))
            .e(Expr::Lookup("tcpudp".into(), reg::R0, None))
    }

    fn tcp(self) -> Self {
        self.meta(MetaKey::L4Proto, CmpOp::Eq, &[6])
    }

    fn dport(self, port: u16) -> Self {
        self.e(Expr::Payload(2, 2, 2, reg::R0)).e(Expr::Cmp(
            reg::R0,
            CmpOp::Eq,
            port.to_be_bytes().to_vec(),
        ))
    }

    fn dport_in(self, set: &str) -> Self {
        self.e(Expr::Payload(2, 2, 2, reg::R0))
            .e(Expr::Lookup(set.into(), reg::R0, None))
    }

    /// The source (`src`) or destination address, into R0.
    fn addr(self, f: Family, src: bool) -> Self {
        let (off, len) = match (f, src) {
            (Family::V4, true) => (12, 4),
            (Family::V4, false) => (16, 4),
            (Family::V6, true) => (8, 16),
            (Family::V6, false) => (24, 16),
        };
        self.e(Expr::Payload(1, off, len, reg::R0))
    }

    fn addr_in(self, f: Family, src: bool, set: &str) -> Self {
        self.addr(f, src).e(Expr::Lookup(set.into(), reg::R0, None))
    }

    fn addr_is(self, f: Family, src: bool, a: IpAddr) -> Self {
        self.addr(f, src)
            .e(Expr::Cmp(reg::R0, CmpOp::Eq, octets(a)))
    }

    /// Address and destination port, concatenated, in `set`.
    fn addr_port_in(self, f: Family, src: bool, set: &str) -> Self {
        let port_reg = match f {
            Family::V4 => reg::R1,
            Family::V6 => reg::R4,
        };
        self.addr(f, src)
            .e(Expr::Payload(2, 2, 2, port_reg))
            .e(Expr::Lookup(set.into(), reg::R0, None))
    }

    fn ct_established(self) -> Self {
        self.e(Expr::CtState(reg::R0))
            .e(Expr::And(
                reg::R0,
                CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
            ))
            .e(Expr::Cmp(reg::R0, CmpOp::Neq, vec![0; 4]))
    }

    fn v(self, v: Verdict) -> Self {
        self.e(Expr::Verdict(v))
    }

    fn rule(self, chain: &str) -> Op {
        Op::AddRule(chain.into(), self.0)
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn addr_set(name: String, f: Family) -> SetDef {
    let (key_type, key_len) = match f {
        Family::V4 => (TYPE_IPV4, 4),
        Family::V6 => (TYPE_IPV6, 16),
    };
    SetDef {
        name,
        key_type,
        key_len,
        interval: true,
        concat: vec![],
        vmap: false,
    }
}

fn addr_port_set(name: String, f: Family) -> SetDef {
    let (t, len) = match f {
        Family::V4 => (TYPE_IPV4, 4),
        Family::V6 => (TYPE_IPV6, 16),
    };
    SetDef {
        name,
        key_type: (t << 6) | TYPE_INET_SERVICE,
        key_len: len + 4,
        interval: true,
        concat: vec![len, 2],
        vmap: false,
    }
}

fn vmap(name: &str) -> SetDef {
    SetDef {
        name: name.into(),
        key_type: TYPE_IFNAME,
        key_len: 16,
        interval: false,
        concat: vec![],
        vmap: true,
    }
}

fn ifname(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.resize(16, 0);
    k
}

fn value(f: Family, v: u128) -> Vec<u8> {
    match f {
        Family::V4 => (v as u32).to_be_bytes().to_vec(),
        Family::V6 => v.to_be_bytes().to_vec(),
    }
}

/// An rbtree interval set's elements: each range's start, and the
/// exclusive end unless the range runs to the top.
fn interval_elems(f: Family, spans: &[Span]) -> Vec<Elem> {
    let max = match f {
        Family::V4 => u128::from(u32::MAX),
        Family::V6 => u128::MAX,
    };
    let mut out = Vec::with_capacity(spans.len() * 2);
    for s in spans {
        out.push(Elem::Key(value(f, s.lo)));
        if s.hi < max {
            out.push(Elem::End(value(f, s.hi + 1)));
        }
    }
    out
}

fn box_elems(f: Family, boxes: &[(Span, PortRange)]) -> Vec<Elem> {
    let key = |a: u128, p: u16| {
        let mut k = value(f, a);
        k.extend_from_slice(&p.to_be_bytes());
        k.extend_from_slice(&[0, 0]);
        k
    };
    boxes
        .iter()
        .map(|(s, p)| Elem::Range(key(s.lo, p.first()), key(s.hi, p.last())))
        .collect()
}

fn prefix(config: &NetConfig) -> &[u8] {
    config.link_prefix.as_bytes()
}

/// The table, global sets and base chains: adds what is missing and
/// replaces the base chains' rules and the global sets' contents, in one
/// transaction (established flows and every sandbox's chains, sets and
/// map elements are left alone: a restarted daemon flushes nothing).
/// `never`: link-local, the host's addresses, `extra_deny`.
pub(crate) fn base(config: &NetConfig, never4: &[Span], never6: &[Span]) -> Vec<Op> {
    let mut ops = vec![Op::AddTable];
    let set = |ops: &mut Vec<Op>, def: SetDef, elems: Vec<Elem>| {
        let name = def.name.clone();
        ops.push(Op::AddSet(def));
        ops.push(Op::FlushSet(name.clone()));
        if !elems.is_empty() {
            ops.push(Op::AddElems(name, elems));
        }
    };
    set(
        &mut ops,
        addr_set("never4".into(), Family::V4),
        interval_elems(Family::V4, never4),
    );
    set(
        &mut ops,
        addr_set("never6".into(), Family::V6),
        interval_elems(Family::V6, never6),
    );
    set(
        &mut ops,
        SetDef {
            name: "tcpudp".into(),
            key_type: TYPE_INET_PROTO,
            key_len: 1,
            interval: false,
            concat: vec![],
            vmap: false,
        },
        vec![Elem::Key(vec![6]), Elem::Key(vec![17])],
    );
    set(
        &mut ops,
        SetDef {
            name: "web".into(),
            key_type: TYPE_INET_SERVICE,
            key_len: 2,
            interval: false,
            concat: vec![],
            vmap: false,
        },
        vec![
            Elem::Key(80u16.to_be_bytes().to_vec()),
            Elem::Key(443u16.to_be_bytes().to_vec()),
        ],
    );
    // The maps hold every sandbox's element: created, never flushed.
    for m in ["egress", "ingress", "nat"] {
        ops.push(Op::AddSet(vmap(m)));
    }
    let chains: [(&str, Option<Base>); 7] = [
        (
            "forward",
            Some(Base {
                hook: Hook::Forward,
                priority: 0,
                nat: false,
            }),
        ),
        ("from_sb", None),
        ("to_sb", None),
        (
            "input",
            Some(Base {
                hook: Hook::Input,
                priority: 0,
                nat: false,
            }),
        ),
        ("sb_input", None),
        (
            "prerouting",
            Some(Base {
                hook: Hook::Prerouting,
                priority: -100,
                nat: true,
            }),
        ),
        (
            "postrouting",
            Some(Base {
                hook: Hook::Postrouting,
                priority: 100,
                nat: true,
            }),
        ),
    ];
    for (name, base) in chains {
        ops.push(Op::AddChain(name.into(), base));
        ops.push(Op::FlushChain(name.into()));
    }
    let p = prefix(config);
    let (v4, v6) = (Family::V4, Family::V6);

    ops.push(R::new().ct_established().v(Verdict::Accept).rule("forward"));
    ops.push(
        R::new()
            .meta(MetaKey::IifName, CmpOp::Eq, p)
            .v(Verdict::Jump("from_sb".into()))
            .rule("forward"),
    );
    ops.push(
        R::new()
            .meta(MetaKey::OifName, CmpOp::Eq, p)
            .v(Verdict::Jump("to_sb".into()))
            .rule("forward"),
    );

    // A sandbox cannot forge its source (its network namespace is not its
    // user namespace's, so it has no raw sockets); this holds even if it
    // could.
    let spoofed = || {
        R::new()
            .e(Expr::FibSaddrIifOif(reg::R0))
            .e(Expr::Cmp(reg::R0, CmpOp::Eq, vec![0; 4]))
            .e(Expr::Counter)
            .v(Verdict::Drop)
    };
    ops.push(spoofed().rule("from_sb"));
    ops.push(
        R::new()
            .fam(v4)
            .addr_in(v4, false, "never4")
            .e(Expr::Counter)
            .v(Verdict::Drop)
            .rule("from_sb"),
    );
    ops.push(
        R::new()
            .fam(v6)
            .addr_in(v6, false, "never6")
            .e(Expr::Counter)
            .v(Verdict::Drop)
            .rule("from_sb"),
    );
    ops.push(
        R::new()
            .e(Expr::Meta(MetaKey::IifName, reg::R0))
            .e(Expr::Lookup("egress".into(), reg::R0, Some(reg::V)))
            .rule("from_sb"),
    );
    ops.push(R::new().e(Expr::Counter).v(Verdict::Drop).rule("from_sb"));
    ops.push(
        R::new()
            .e(Expr::Meta(MetaKey::OifName, reg::R0))
            .e(Expr::Lookup("ingress".into(), reg::R0, Some(reg::V)))
            .rule("to_sb"),
    );
    ops.push(R::new().e(Expr::Counter).v(Verdict::Drop).rule("to_sb"));

    ops.push(
        R::new()
            .meta(MetaKey::IifName, CmpOp::Eq, p)
            .v(Verdict::Jump("sb_input".into()))
            .rule("input"),
    );
    ops.push(
        R::new()
            .ct_established()
            .v(Verdict::Accept)
            .rule("sb_input"),
    );
    // Neighbour discovery (133-136) with the host end of the veth.
    ops.push(
        R::new()
            .fam(v6)
            .meta(MetaKey::L4Proto, CmpOp::Eq, &[58])
            .e(Expr::Payload(2, 0, 1, reg::R0))
            .e(Expr::Cmp(reg::R0, CmpOp::Gte, vec![133]))
            .e(Expr::Cmp(reg::R0, CmpOp::Lte, vec![136]))
            .v(Verdict::Accept)
            .rule("sb_input"),
    );
    ops.push(spoofed().rule("sb_input"));
    let gws: Vec<(Family, IpAddr)> = std::iter::once((v4, IpAddr::V4(config.gateway_v4())))
        .chain(config.gateway_v6().map(|g| (v6, IpAddr::V6(g))))
        .collect();
    for &(f, gw) in &gws {
        ops.push(
            R::new()
                .fam(f)
                .addr_is(f, false, gw)
                .tcp_udp()
                .dport(config.dns_port)
                .v(Verdict::Accept)
                .rule("sb_input"),
        );
        for port in [config.proxy_port, config.http_proxy_port] {
            ops.push(
                R::new()
                    .fam(f)
                    .addr_is(f, false, gw)
                    .tcp()
                    .dport(port)
                    .v(Verdict::Accept)
                    .rule("sb_input"),
            );
        }
    }
    ops.push(R::new().e(Expr::Counter).v(Verdict::Drop).rule("sb_input"));

    ops.push(
        R::new()
            .e(Expr::Meta(MetaKey::IifName, reg::R0))
            .e(Expr::Lookup("nat".into(), reg::R0, Some(reg::V)))
            .rule("prerouting"),
    );
    for &(f, gw) in &gws {
        ops.push(
            R::new()
                .meta(MetaKey::IifName, CmpOp::Eq, p)
                .fam(f)
                .tcp_udp()
                .dport(53)
                .e(Expr::Imm(reg::R0, octets(gw)))
                .e(Expr::Imm(
                    port_reg(f),
                    config.dns_port.to_be_bytes().to_vec(),
                ))
                .e(Expr::Dnat(nfproto(f), reg::R0, port_reg(f)))
                .rule("prerouting"),
        );
    }
    if config.nat {
        let nets: Vec<(Family, Vec<u8>, Vec<u8>)> = std::iter::once((
            v4,
            config.subnet_v4.network().octets().to_vec(),
            config.subnet_v4.netmask().octets().to_vec(),
        ))
        .chain(config.subnet_v6.map(|n| {
            (
                v6,
                n.network().octets().to_vec(),
                n.netmask().octets().to_vec(),
            )
        }))
        .collect();
        for (f, net, mask) in nets {
            ops.push(
                R::new()
                    .fam(f)
                    .addr(f, true)
                    .e(Expr::And(reg::R0, mask))
                    .e(Expr::Cmp(reg::R0, CmpOp::Eq, net))
                    .meta(MetaKey::OifName, CmpOp::Neq, p)
                    .e(Expr::Masquerade)
                    .rule("postrouting"),
            );
        }
    }
    ops
}

/// The never-reachable sets' new contents (host addresses changed).
pub(crate) fn never_sets(never4: &[Span], never6: &[Span]) -> Vec<Op> {
    let mut ops = vec![Op::FlushSet("never4".into()), Op::FlushSet("never6".into())];
    for (name, f, s) in [
        ("never4", Family::V4, never4),
        ("never6", Family::V6, never6),
    ] {
        if !s.is_empty() {
            ops.push(Op::AddElems(name.into(), interval_elems(f, s)));
        }
    }
    ops
}

fn port_reg(f: Family) -> u32 {
    match f {
        Family::V4 => reg::R1,
        Family::V6 => reg::R4,
    }
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

/// The sets of one sandbox: (name, definition).
fn sandbox_sets(slot: &Slot) -> Vec<SetDef> {
    let mut v = Vec::new();
    for dir in ["eg", "in"] {
        v.push(addr_set(slot.name(&format!("{dir}4a")), Family::V4));
        v.push(addr_set(slot.name(&format!("{dir}6a")), Family::V6));
        v.push(addr_port_set(slot.name(&format!("{dir}4p")), Family::V4));
        v.push(addr_port_set(slot.name(&format!("{dir}6p")), Family::V6));
    }
    v.push(addr_set(slot.name("dns4"), Family::V4));
    v.push(addr_set(slot.name("dns6"), Family::V6));
    v
}

fn chains(slot: &Slot) -> [String; 3] {
    [slot.name("eg"), slot.name("in"), slot.name("nat")]
}

fn map_elems(slot: &Slot) -> [(&'static str, Elem); 3] {
    let [eg, ing, nat] = chains(slot);
    let k = ifname(&slot.link);
    [
        ("egress", Elem::Map(k.clone(), Verdict::Goto(eg))),
        ("ingress", Elem::Map(k.clone(), Verdict::Goto(ing))),
        ("nat", Elem::Map(k, Verdict::Jump(nat))),
    ]
}

/// One sandbox's chains, sets and map elements, created if missing and
/// filled with `c`, replacing whatever they held: one transaction.
pub(crate) fn sandbox(config: &NetConfig, slot: &Slot, c: &Compiled) -> Vec<Op> {
    let mut ops = Vec::new();
    let fill = |ops: &mut Vec<Op>, name: String, elems: Vec<Elem>| {
        ops.push(Op::FlushSet(name.clone()));
        if !elems.is_empty() {
            ops.push(Op::AddElems(name, elems));
        }
    };
    for def in sandbox_sets(slot) {
        ops.push(Op::AddSet(def));
    }
    for (dir, g) in [("eg", &c.egress), ("in", &c.ingress)] {
        let Grants {
            all4,
            all6,
            ports4,
            ports6,
        } = g;
        fill(
            &mut ops,
            slot.name(&format!("{dir}4a")),
            interval_elems(Family::V4, all4),
        );
        fill(
            &mut ops,
            slot.name(&format!("{dir}6a")),
            interval_elems(Family::V6, all6),
        );
        fill(
            &mut ops,
            slot.name(&format!("{dir}4p")),
            box_elems(Family::V4, ports4),
        );
        fill(
            &mut ops,
            slot.name(&format!("{dir}6p")),
            box_elems(Family::V6, ports6),
        );
    }
    fill(
        &mut ops,
        slot.name("dns4"),
        interval_elems(Family::V4, &c.dns4),
    );
    fill(
        &mut ops,
        slot.name("dns6"),
        interval_elems(Family::V6, &c.dns6),
    );

    let [eg, ing, nat] = chains(slot);
    for ch in [&eg, &ing, &nat] {
        ops.push(Op::AddChain(ch.clone(), None));
        ops.push(Op::FlushChain(ch.clone()));
    }
    for f in [Family::V4, Family::V6] {
        let n = if f == Family::V4 { "4" } else { "6" };
        let (a, pp) = (slot.name(&format!("eg{n}a")), slot.name(&format!("eg{n}p")));
        ops.push(
            R::new()
                .fam(f)
                .addr_in(f, false, &a)
                .v(Verdict::Return)
                .rule(&eg),
        );
        ops.push(
            R::new()
                .fam(f)
                .tcp_udp()
                .addr_port_in(f, false, &pp)
                .v(Verdict::Return)
                .rule(&eg),
        );
        let (a, pp) = (slot.name(&format!("in{n}a")), slot.name(&format!("in{n}p")));
        ops.push(
            R::new()
                .fam(f)
                .addr_in(f, true, &a)
                .v(Verdict::Accept)
                .rule(&ing),
        );
        ops.push(
            R::new()
                .fam(f)
                .tcp_udp()
                .addr_port_in(f, true, &pp)
                .v(Verdict::Accept)
                .rule(&ing),
        );
    }
    ops.push(R::new().e(Expr::Counter).v(Verdict::Drop).rule(&eg));
    ops.push(R::new().e(Expr::Counter).v(Verdict::Drop).rule(&ing));

    let gws: Vec<(Family, IpAddr)> = std::iter::once((Family::V4, IpAddr::V4(config.gateway_v4())))
        .chain(config.gateway_v6().map(|g| (Family::V6, IpAddr::V6(g))))
        .collect();
    for &(f, _) in &gws {
        let n = if f == Family::V4 { "4" } else { "6" };
        ops.push(
            R::new()
                .fam(f)
                .tcp_udp()
                .dport(53)
                .addr_in(f, false, &slot.name(&format!("dns{n}")))
                .v(Verdict::Accept)
                .rule(&nat),
        );
    }
    if c.proxy {
        for &(f, gw) in &gws {
            let n = if f == Family::V4 { "4" } else { "6" };
            let web = || R::new().fam(f).tcp().dport_in("web");
            ops.push(
                web()
                    .addr_in(f, false, &slot.name(&format!("eg{n}a")))
                    .v(Verdict::Accept)
                    .rule(&nat),
            );
            ops.push(
                web()
                    .addr_port_in(f, false, &slot.name(&format!("eg{n}p")))
                    .v(Verdict::Accept)
                    .rule(&nat),
            );
            // TLS and HTTP go to listeners of their own: the proxy reads
            // a ClientHello on one and a request head on the other.
            for (dport, to) in [(443, config.proxy_port), (80, config.http_proxy_port)] {
                ops.push(
                    R::new()
                        .fam(f)
                        .tcp()
                        .dport(dport)
                        .e(Expr::Imm(reg::R0, octets(gw)))
                        .e(Expr::Imm(port_reg(f), to.to_be_bytes().to_vec()))
                        .e(Expr::Dnat(nfproto(f), reg::R0, port_reg(f)))
                        .rule(&nat),
                );
            }
        }
    }
    for (map, elem) in map_elems(slot) {
        ops.push(Op::AddElems(map.into(), vec![elem]));
    }
    ops
}

/// Removes one sandbox's chains, sets and map elements, whether or not
/// they (all) exist: each is added first (a no-op when it exists), so the
/// deletions cannot fail on a missing one and the batch stays atomic.
pub(crate) fn remove_sandbox(slot: &Slot) -> Vec<Op> {
    let mut ops = Vec::new();
    let sets = sandbox_sets(slot);
    let chains = chains(slot);
    for ch in &chains {
        ops.push(Op::AddChain(ch.clone(), None));
    }
    for (map, elem) in map_elems(slot) {
        ops.push(Op::AddElems(map.into(), vec![elem.clone()]));
        ops.push(Op::DelElems(map.into(), vec![elem]));
    }
    for ch in chains {
        ops.push(Op::DelChain(ch));
    }
    for def in sets {
        let name = def.name.clone();
        ops.push(Op::AddSet(def));
        ops.push(Op::DelSet(name));
    }
    ops
}

/// Whether a chain or set name is a per-sandbox one (and of which slot).
pub(crate) fn sandbox_object(name: &str) -> Option<u32> {
    let (what, _) = name.rsplit_once('_')?;
    let ours = [
        "eg", "in", "nat", "eg4a", "eg6a", "eg4p", "eg6p", "in4a", "in6a", "in4p", "in6p", "dns4",
        "dns6",
    ];
    ours.contains(&what)
        .then(|| Slot::parse_name(name))
        .flatten()
}

#[cfg(test)]
#[path = "ruleset_tests.rs"]
mod tests;
