//! nftables over netlink: a small description of tables, chains, sets and
//! rules ([`Op`], [`Expr`]), its encoding into one transaction (a batch the
//! kernel applies whole or not at all), and dumps of what exists.
//!
//! Written against the kernel's `nf_tables` netlink interface directly:
//! the `nftnl` crate (libnftnl bindings) has no verdict maps, interval or
//! concatenated sets, set lookups into a register nor dumps, so using it
//! would have meant raw FFI for most of this anyway, plus a C library to
//! build against. [`Op`] is also the boundary the unit tests fake: the
//! ruleset is tested as ops (rendered in `nft`'s syntax), the encoding
//! against the kernel in the privileged tests.

use std::fmt;

use crate::nl::{self, NlError, Socket, Writer};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

mod msg {
    pub(super) const NEWTABLE: u16 = 0;
    pub(super) const NEWCHAIN: u16 = 3;
    pub(super) const GETCHAIN: u16 = 4;
    pub(super) const DELCHAIN: u16 = 5;
    pub(super) const NEWRULE: u16 = 6;
    pub(super) const DELRULE: u16 = 8;
    pub(super) const NEWSET: u16 = 9;
    pub(super) const GETSET: u16 = 10;
    pub(super) const DELSET: u16 = 11;
    pub(super) const NEWSETELEM: u16 = 12;
    pub(super) const DELSETELEM: u16 = 14;
}

/// Registers, in 32-bit units (`NFT_REG32_00` is the first byte of
/// `NFT_REG_1`). `V` is the verdict register.
pub(crate) mod reg {
    pub(crate) const V: u32 = 0;
    pub(crate) const R0: u32 = 8;
    pub(crate) const R1: u32 = 9;
    pub(crate) const R4: u32 = 12;
}

/// Netfilter hooks (`NF_INET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Postrouting = 4,
}

/// Where a base chain hangs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) hook: Hook,
    pub(crate) priority: i32,
    /// `nat` rather than `filter`.
    pub(crate) nat: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Eq = 0,
    Neq = 1,
    Lte = 3,
    Gte = 5,
}

/// The meta keys used (`NFT_META_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKey {
    IifName = 6,
    OifName = 7,
    NfProto = 15,
    L4Proto = 16,
}

/// One nftables expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Meta(MetaKey, u32),
    Cmp(u32, CmpOp, Vec<u8>),
    /// base (1 network, 2 transport), offset, length, destination.
    Payload(u32, u32, u32, u32),
    /// Set name, source register, destination register (a map).
    Lookup(String, u32, Option<u32>),
    /// `ct state` into a register.
    CtState(u32),
    /// Register, mask (`reg = reg & mask`).
    And(u32, Vec<u8>),
    Imm(u32, Vec<u8>),
    Verdict(Verdict),
    /// family, address register, port register.
    Dnat(u8, u32, u32),
    Masquerade,
    /// `fib saddr . iif oif` into a register (0: no route back that way).
    FibSaddrIifOif(u32),
    Counter,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetDef {
    pub(crate) name: String,
    /// `NFT_DATATYPE`-style key type (only `nft list` reads it).
    pub(crate) key_type: u32,
    pub(crate) key_len: u32,
    pub(crate) interval: bool,
    /// Field lengths of a concatenated key.
    pub(crate) concat: Vec<u32>,
    /// A verdict map.
    pub(crate) vmap: bool,
}

/// A set element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Elem {
    Key(Vec<u8>),
    /// The end of an interval, exclusive (rbtree sets).
    End(Vec<u8>),
    /// From, to inclusive (concatenated interval sets).
    Range(Vec<u8>, Vec<u8>),
    Map(Vec<u8>, Verdict),
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    AddTable,
    AddChain(String, Option<Base>),
    FlushChain(String),
    /// Deletes a chain and its rules.
    DelChain(String),
    AddRule(String, Vec<Expr>),
    AddSet(SetDef),
    FlushSet(String),
    DelSet(String),
    AddElems(String, Vec<Elem>),
    DelElems(String, Vec<Elem>),
}

/// Elements per message: a message's attributes nest under a u16 length.
const ELEMS_PER_MSG: usize = 256;

fn nfgen(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

fn ty(m: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | m
}

fn data_value(w: &mut Writer, attr: u16, value: &[u8]) {
    w.nest(attr);
    w.attr(1, value); // NFTA_DATA_VALUE
    w.end_nest();
}

fn verdict(w: &mut Writer, attr: u16, v: &Verdict) {
    let (code, chain): (i32, Option<&str>) = match v {
        Verdict::Accept => (1, None),
        Verdict::Drop => (0, None),
        Verdict::Return => (-5, None),
        Verdict::Jump(c) => (-3, Some(c)),
        Verdict::Goto(c) => (-4, Some(c)),
    };
    w.nest(attr);
    w.nest(2); // NFTA_DATA_VERDICT
    w.be32(1, code as u32); // NFTA_VERDICT_CODE
    if let Some(c) = chain {
        w.str(2, c); // NFTA_VERDICT_CHAIN
    }
    w.end_nest();
    w.end_nest();
}

fn expr(w: &mut Writer, e: &Expr) {
    let name = match e {
        Expr::Meta(..) => "meta",
        Expr::Cmp(..) => "cmp",
        Expr::Payload(..) => "payload",
        Expr::Lookup(..) => "lookup",
        Expr::CtState(..) => "ct",
        Expr::And(..) => "bitwise",
        Expr::Imm(..) | Expr::Verdict(..) => "immediate",
        Expr::Dnat(..) => "nat",
        Expr::Masquerade => "masq",
        Expr::FibSaddrIifOif(..) => "fib",
        Expr::Counter => "counter",
    };
    w.nest(1); // NFTA_LIST_ELEM
    w.str(1, name); // NFTA_EXPR_NAME
    w.nest(2); // NFTA_EXPR_DATA
    match e {
        Expr::Meta(key, dreg) => {
            w.be32(1, *dreg);
            w.be32(2, *key as u32);
        }
        Expr::Cmp(sreg, op, data) => {
            w.be32(1, *sreg);
            w.be32(2, *op as u32);
            data_value(w, 3, data);
        }
        Expr::Payload(base, offset, len, dreg) => {
            w.be32(1, *dreg);
            w.be32(2, *base);
            w.be32(3, *offset);
            w.be32(4, *len);
        }
        Expr::Lookup(set, sreg, dreg) => {
            w.str(1, set);
            w.be32(2, *sreg);
            if let Some(d) = dreg {
                w.be32(3, *d);
            }
        }
        Expr::CtState(dreg) => {
            w.be32(1, *dreg);
            w.be32(2, 0); // NFT_CT_STATE
        }
        Expr::And(r, mask) => {
            w.be32(1, *r);
            w.be32(2, *r);
            w.be32(3, mask.len() as u32);
            data_value(w, 4, mask);
            data_value(w, 5, &vec![0; mask.len()]);
        }
        Expr::Imm(dreg, data) => {
            w.be32(1, *dreg);
            data_value(w, 2, data);
        }
        Expr::Verdict(v) => {
            w.be32(1, reg::V);
            verdict(w, 2, v);
        }
        Expr::Dnat(family, addr, port) => {
            w.be32(1, 1); // NFT_NAT_DNAT
            w.be32(2, u32::from(*family));
            w.be32(3, *addr);
            w.be32(5, *port);
        }
        Expr::FibSaddrIifOif(dreg) => {
            w.be32(1, *dreg);
            w.be32(2, 1); // NFT_FIB_RESULT_OIF
            w.be32(3, 1 | 8); // NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF
        }
        Expr::Masquerade | Expr::Counter => {}
    }
    w.end_nest();
    w.end_nest();
}

fn elems(w: &mut Writer, list: &[Elem]) {
    w.nest(3); // NFTA_SET_ELEM_LIST_ELEMENTS
    for e in list {
        w.nest(1);
        match e {
            Elem::Key(k) => data_value(w, 1, k),
            Elem::End(k) => {
                data_value(w, 1, k);
                w.be32(3, 1); // NFT_SET_ELEM_INTERVAL_END
            }
            Elem::Range(from, to) => {
                data_value(w, 1, from);
                data_value(w, 10, to); // NFTA_SET_ELEM_KEY_END
            }
            Elem::Map(k, v) => {
                data_value(w, 1, k);
                verdict(w, 2, v); // NFTA_SET_ELEM_DATA
            }
        }
        w.end_nest();
    }
    w.end_nest();
}

/// Encodes `ops` on `table` as one transaction; returns the bytes and the
/// sequence numbers whose answers to wait for.
pub(crate) fn encode(table: &str, ops: &[Op], mut seq: impl FnMut() -> u32) -> (Vec<u8>, Vec<u32>) {
    use nl::{NLM_F_ACK as ACK, NLM_F_APPEND, NLM_F_CREATE as CREATE};
    let mut w = Writer::default();
    let mut acks = Vec::new();
    let mut set_id = 0u32;
    let fam = nfgen(NFPROTO_INET, 0);
    w.begin(
        NFNL_MSG_BATCH_BEGIN,
        0,
        seq(),
        &nfgen(0, NFNL_SUBSYS_NFTABLES),
    );
    w.end();
    let mut start = |w: &mut Writer, m: u16, flags: u16| {
        let s = seq();
        acks.push(s);
        w.begin(ty(m), flags | ACK, s, &fam);
    };
    for op in ops {
        match op {
            Op::AddTable => {
                start(&mut w, msg::NEWTABLE, CREATE);
                w.str(1, table);
                w.end();
            }
            Op::AddChain(name, base) => {
                start(&mut w, msg::NEWCHAIN, CREATE);
                w.str(1, table);
                w.str(3, name);
                if let Some(b) = base {
                    w.nest(4); // NFTA_CHAIN_HOOK
                    w.be32(1, b.hook as u32);
                    w.be32(2, b.priority as u32);
                    w.end_nest();
                    w.str(7, if b.nat { "nat" } else { "filter" });
                }
                w.end();
            }
            Op::FlushChain(name) => {
                start(&mut w, msg::DELRULE, 0);
                w.str(1, table);
                w.str(2, name);
                w.end();
            }
            Op::DelChain(name) => {
                start(&mut w, msg::DELCHAIN, 0);
                w.str(1, table);
                w.str(3, name);
                w.end();
            }
            Op::AddRule(chain, exprs) => {
                start(&mut w, msg::NEWRULE, CREATE | NLM_F_APPEND);
                w.str(1, table);
                w.str(2, chain);
                w.nest(4); // NFTA_RULE_EXPRESSIONS
                for e in exprs {
                    expr(&mut w, e);
                }
                w.end_nest();
                w.end();
            }
            Op::AddSet(s) => {
                start(&mut w, msg::NEWSET, CREATE);
                w.str(1, table);
                w.str(2, &s.name);
                let mut flags = 0;
                if s.interval {
                    flags |= 0x4;
                }
                if s.vmap {
                    flags |= 0x8;
                }
                if s.concat.len() > 1 {
                    flags |= 0x80;
                }
                w.be32(3, flags);
                w.be32(4, s.key_type);
                w.be32(5, s.key_len);
                // NFTA_SET_ID: required, unique within the transaction.
                set_id += 1;
                w.be32(10, set_id);
                if s.vmap {
                    w.be32(6, 0xffff_ff00); // NFT_DATA_VERDICT
                }
                if s.concat.len() > 1 {
                    w.nest(9); // NFTA_SET_DESC
                    w.nest(2); // NFTA_SET_DESC_CONCAT
                    for len in &s.concat {
                        w.nest(1);
                        w.be32(1, *len); // NFTA_SET_FIELD_LEN
                        w.end_nest();
                    }
                    w.end_nest();
                    w.end_nest();
                }
                w.end();
            }
            Op::FlushSet(name) => {
                start(&mut w, msg::DELSETELEM, 0);
                w.str(1, table);
                w.str(2, name);
                w.end();
            }
            Op::DelSet(name) => {
                start(&mut w, msg::DELSET, 0);
                w.str(1, table);
                w.str(2, name);
                w.end();
            }
            Op::AddElems(set, list) | Op::DelElems(set, list) => {
                let add = matches!(op, Op::AddElems(..));
                for chunk in list.chunks(ELEMS_PER_MSG) {
                    if add {
                        start(&mut w, msg::NEWSETELEM, CREATE);
                    } else {
                        start(&mut w, msg::DELSETELEM, 0);
                    }
                    w.str(1, table);
                    w.str(2, set);
                    elems(&mut w, chunk);
                    w.end();
                }
            }
        }
    }
    w.begin(
        NFNL_MSG_BATCH_END,
        0,
        seq(),
        &nfgen(0, NFNL_SUBSYS_NFTABLES),
    );
    w.end();
    (w.buf, acks)
}

/// Where transactions go: the kernel, or a recorder in unit tests.
pub(crate) trait Nft: Send + Sync {
    /// Applies `ops` to `table` as one transaction, whole or not at all.
    fn commit(&self, table: &str, ops: &[Op]) -> Result<(), NlError>;
}

/// The kernel's nftables, through one netlink socket.
#[derive(Debug)]
pub(crate) struct Kernel {
    sock: std::sync::Mutex<Socket>,
}

impl Kernel {
    /// A socket in the calling thread's network namespace.
    pub(crate) fn open() -> std::io::Result<Self> {
        Ok(Self {
            sock: std::sync::Mutex::new(Socket::open(nl::NETFILTER)?),
        })
    }

    fn dump(&self, m: u16, table: &str, name_attr: u16) -> Result<Option<Vec<String>>, NlError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = Writer::default();
        w.begin(ty(m), nl::NLM_F_DUMP, sock.seq(), &nfgen(NFPROTO_INET, 0));
        w.end();
        let mut names = Vec::new();
        let mut table_seen = false;
        sock.dump(&w.buf, |_, payload| {
            let attrs = payload.get(4..).unwrap_or_default();
            let of_table = nl::attr(attrs, 1)
                .is_some_and(|t| t.split(|&b| b == 0).next() == Some(table.as_bytes()));
            if of_table {
                table_seen = true;
                if let Some(n) = nl::attr(attrs, name_attr) {
                    let n = n.split(|&b| b == 0).next().unwrap_or_default();
                    names.push(String::from_utf8_lossy(n).into_owned());
                }
            }
        })?;
        Ok(table_seen.then_some(names))
    }

    /// The chains of `table` (none when it does not exist).
    pub(crate) fn chains(&self, table: &str) -> Result<Vec<String>, NlError> {
        Ok(self.dump(msg::GETCHAIN, table, 3)?.unwrap_or_default())
    }

    /// The sets of `table`.
    pub(crate) fn sets(&self, table: &str) -> Result<Vec<String>, NlError> {
        Ok(self.dump(msg::GETSET, table, 2)?.unwrap_or_default())
    }
}

impl Nft for Kernel {
    fn commit(&self, table: &str, ops: &[Op]) -> Result<(), NlError> {
        if ops.is_empty() {
            return Ok(());
        }
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, acks) = encode(table, ops, || sock.seq());
        sock.transact_seq(&bytes, &acks).map_err(|(mut e, seq)| {
            // Name the step that failed: the kernel's errno alone (EINVAL,
            // EEXIST) does not say which of a hundred it was.
            let i = seq.and_then(|s| acks.iter().position(|&a| a == s));
            if let Some(op) = i.and_then(|i| op_of_ack(ops, i)) {
                let what = describe(op);
                e.message = Some(match e.message.take() {
                    Some(m) => format!("{m}, in {what}"),
                    None => format!("in {what}"),
                });
            }
            e
        })
    }
}

/// The op whose `i`-th acknowledged message this is (element lists may
/// take several messages).
fn op_of_ack(ops: &[Op], mut i: usize) -> Option<&Op> {
    for op in ops {
        let n = match op {
            Op::AddElems(_, l) | Op::DelElems(_, l) => l.len().div_ceil(ELEMS_PER_MSG),
            _ => 1,
        };
        if i < n {
            return Some(op);
        }
        i -= n;
    }
    None
}

/// An op in a few words, for errors.
fn describe(op: &Op) -> String {
    match op {
        Op::AddTable => "add table".into(),
        Op::AddChain(c, _) => format!("add chain {c}"),
        Op::FlushChain(c) => format!("flush chain {c}"),
        Op::DelChain(c) => format!("delete chain {c}"),
        Op::AddRule(c, e) => format!(
            "add rule to {c}: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Op::AddSet(s) => format!("add set {}", s.name),
        Op::FlushSet(s) => format!("flush set {s}"),
        Op::DelSet(s) => format!("delete set {s}"),
        Op::AddElems(s, l) => format!("add {} elements to {s}", l.len()),
        Op::DelElems(s, l) => format!("delete {} elements from {s}", l.len()),
    }
}

// ------------------------------------------------------------- rendering

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// Each expression as the kernel sees it, one per word: what the unit
/// tests compare (nft's own syntax needs its type inference; this is the
/// `nft --debug=netlink` view, condensed).
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Meta(k, r) => write!(f, "meta:{k:?}>{r}"),
            Expr::Cmp(r, op, d) => {
                let op = match op {
                    CmpOp::Eq => "==",
                    CmpOp::Neq => "!=",
                    CmpOp::Lte => "<=",
                    CmpOp::Gte => ">=",
                };
                match std::str::from_utf8(d) {
                    Ok(s) if d.iter().all(|b| b.is_ascii_graphic()) => write!(f, "{r}{op}\"{s}\""),
                    _ => write!(f, "{r}{op}{}", hex(d)),
                }
            }
            Expr::Payload(b, o, l, r) => {
                let base = if *b == 1 { "nh" } else { "th" };
                write!(f, "{base}[{o}:{l}]>{r}")
            }
            Expr::Lookup(s, r, None) => write!(f, "{r}@{s}"),
            Expr::Lookup(s, r, Some(_)) => write!(f, "vmap:{r}@{s}"),
            Expr::CtState(r) => write!(f, "ct:state>{r}"),
            Expr::And(r, m) => write!(f, "{r}&={}", hex(m)),
            Expr::Imm(r, d) => write!(f, "{r}:={}", hex(d)),
            Expr::Verdict(v) => write!(f, "{v}"),
            Expr::Dnat(fam, a, p) => write!(f, "dnat:{fam}({a},{p})"),
            Expr::Masquerade => f.write_str("masquerade"),
            Expr::FibSaddrIifOif(r) => write!(f, "fib:saddr.iif.oif>{r}"),
            Expr::Counter => f.write_str("counter"),
        }
    }
}

/// A rule's expressions, space separated.
#[cfg(test)]
pub(crate) fn show_rule(exprs: &[Expr]) -> String {
    exprs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_framed_and_every_message_acked() {
        let ops = vec![
            Op::AddTable,
            Op::AddChain(
                "forward".into(),
                Some(Base {
                    hook: Hook::Forward,
                    priority: 0,
                    nat: false,
                }),
            ),
            Op::AddRule(
                "forward".into(),
                vec![Expr::Counter, Expr::Verdict(Verdict::Jump("x".into()))],
            ),
            Op::AddElems(
                "s".into(),
                (0..600u32)
                    .map(|i| Elem::Key(i.to_be_bytes().to_vec()))
                    .collect(),
            ),
        ];
        let mut n = 0;
        let (bytes, acks) = encode("t", &ops, || {
            n += 1;
            n
        });
        let msgs: Vec<_> = nl::messages(&bytes).collect();
        // begin, 3 ops, 3 element chunks, end.
        assert_eq!(msgs.len(), 8);
        assert_eq!(msgs[0].0.ty, NFNL_MSG_BATCH_BEGIN);
        assert_eq!(msgs[0].1, &[0, 0, 0, 10], "res_id names nftables");
        assert_eq!(msgs[7].0.ty, NFNL_MSG_BATCH_END);
        assert_eq!(acks, (2..=7).collect::<Vec<_>>());
        assert_eq!(msgs[2].0.ty, ty(msg::NEWCHAIN));
        let chain = &msgs[2].1[4..];
        let hook = nl::attr(chain, 4).unwrap();
        assert_eq!(nl::attr(hook, 1), Some(&2u32.to_be_bytes()[..]));
        assert_eq!(nl::attr(chain, 7), Some(&b"filter\0"[..]));
        // The rule: table, chain, two expressions.
        let rule = &msgs[3].1[4..];
        let list: Vec<_> = nl::attrs(nl::attr(rule, 4).unwrap()).collect();
        assert_eq!(list.len(), 2);
        assert_eq!(nl::attr(list[1].1, 1), Some(&b"immediate\0"[..]));
    }

    #[test]
    fn rules_render_as_the_kernel_sees_them() {
        let r = vec![
            Expr::Meta(MetaKey::IifName, reg::R0),
            Expr::Cmp(reg::R0, CmpOp::Eq, b"sp-".to_vec()),
            Expr::Payload(1, 16, 4, reg::R0),
            Expr::Lookup("never4".into(), reg::R0, None),
            Expr::Verdict(Verdict::Drop),
        ];
        assert_eq!(
            show_rule(&r),
            "meta:IifName>8 8==\"sp-\" nh[16:4]>8 8@never4 drop"
        );
    }
}
