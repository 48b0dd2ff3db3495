//! Conntrack entries of a sandbox, found and deleted over ctnetlink: a
//! released address must not inherit its previous owner's flows.

use std::net::IpAddr;
use std::sync::Mutex;

use crate::nl::{self, NlError, Socket, Writer, NLM_F_ACK, NLM_F_DUMP};

const SUBSYS_CTNETLINK: u16 = 1;
const MSG_GET: u16 = 1;
const MSG_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_ZONE: u16 = 18;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_DST: u16 = 4;

/// The host's conntrack table.
#[derive(Debug)]
pub(crate) struct Conntrack {
    sock: Mutex<Socket>,
}

fn attr_bytes(ty: u16, value: &[u8]) -> Vec<u8> {
    let mut w = Writer::default();
    w.attr(ty, value);
    w.buf
}

impl Conntrack {
    /// A socket in the calling thread's network namespace.
    pub(crate) fn open() -> std::io::Result<Self> {
        Ok(Self {
            sock: Mutex::new(Socket::open(nl::NETFILTER)?),
        })
    }

    /// Every entry whose original direction starts or ends at one of
    /// `addrs`: each one's family, original tuple and zone attributes, as
    /// the kernel wrote them (what a delete names it by), once each.
    ///
    /// One unfiltered dump, matched here: a dump filtered in the kernel
    /// (`CTA_FILTER`) still walks every bucket of the table (262144 on a
    /// host with 16 GiB or more, ~4 ms), so one per address and direction
    /// cost four walks (16 ms) of a sandbox's release. The entries
    /// themselves are few: only flows that crossed the host.
    fn involving(&self, sock: &Socket, addrs: &[IpAddr]) -> Result<Vec<Vec<u8>>, NlError> {
        let wanted: Vec<Vec<u8>> = addrs
            .iter()
            .map(|a| match a {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            })
            .collect();
        let mut w = Writer::default();
        // AF_UNSPEC: both families in one walk.
        w.begin(
            (SUBSYS_CTNETLINK << 8) | MSG_GET,
            NLM_F_DUMP,
            sock.seq(),
            &[libc::AF_UNSPEC as u8, 0, 0, 0],
        );
        w.end();
        let mut found = Vec::new();
        sock.dump(&w.buf, |_, payload| {
            let Some(&family) = payload.first() else {
                return;
            };
            let attrs = payload.get(4..).unwrap_or_default();
            let Some(tuple) = nl::attr(attrs, CTA_TUPLE_ORIG) else {
                return;
            };
            let Some(ip) = nl::attr(tuple, CTA_TUPLE_IP) else {
                return;
            };
            // CTA_IP_V4_SRC, _DST, CTA_IP_V6_SRC, _DST.
            let involved = nl::attrs(ip).any(|(t, v)| {
                (CTA_IP_V4_SRC..=CTA_IP_V6_DST).contains(&t) && wanted.iter().any(|a| a == v)
            });
            if !involved {
                return;
            }
            let mut key = attr_bytes(CTA_TUPLE_ORIG | 0x8000, tuple);
            if let Some(zone) = nl::attr(attrs, CTA_ZONE) {
                key.extend(attr_bytes(CTA_ZONE, zone));
            }
            key.insert(0, family);
            found.push(key);
        })?;
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Deletes every entry from or to `addrs`; returns how many.
    pub(crate) fn flush(&self, addrs: &[IpAddr]) -> Result<usize, NlError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let entries = self.involving(&sock, addrs)?;
        let mut deleted = 0;
        for chunk in entries.chunks(64) {
            let mut w = Writer::default();
            let mut acks = Vec::new();
            for e in chunk {
                let seq = sock.seq();
                acks.push(seq);
                w.begin(
                    (SUBSYS_CTNETLINK << 8) | MSG_DELETE,
                    NLM_F_ACK,
                    seq,
                    &[e[0], 0, 0, 0],
                );
                w.raw(&e[1..]);
                w.end();
            }
            // One that expired meanwhile answers ENOENT; the rest still go.
            match sock.transact(&w.buf, &acks) {
                Ok(()) => deleted += chunk.len(),
                Err(e) if e.errno == libc::ENOENT => deleted += chunk.len(),
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// How many entries are from or to `addrs` (tests, diagnostics).
    pub(crate) fn count(&self, addrs: &[IpAddr]) -> Result<usize, NlError> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let entries = self.involving(&sock, addrs)?;
        Ok(entries.len())
    }
}
