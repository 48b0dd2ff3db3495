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
const CTA_FILTER: u16 = 25;
const CTA_FILTER_ORIG_FLAGS: u16 = 1;
const FLAG_IP_SRC: u32 = 1 << 0;
const FLAG_IP_DST: u32 = 1 << 1;

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

    /// Entries whose original direction starts (`src`) or ends at `addr`:
    /// each one's original tuple and zone attributes, as the kernel wrote
    /// them (what a delete names it by).
    fn find(&self, sock: &Socket, addr: IpAddr, src: bool) -> Result<Vec<Vec<u8>>, NlError> {
        let (family, ip_attr, octets) = match addr {
            IpAddr::V4(a) => (
                libc::AF_INET as u8,
                if src { 1 } else { 2 },
                a.octets().to_vec(),
            ),
            IpAddr::V6(a) => (
                libc::AF_INET6 as u8,
                if src { 3 } else { 4 },
                a.octets().to_vec(),
            ),
        };
        let mut w = Writer::default();
        w.begin(
            (SUBSYS_CTNETLINK << 8) | MSG_GET,
            NLM_F_DUMP,
            sock.seq(),
            &[family, 0, 0, 0],
        );
        w.nest(CTA_TUPLE_ORIG);
        w.nest(CTA_TUPLE_IP);
        w.attr(ip_attr, &octets);
        w.end_nest();
        w.end_nest();
        w.nest(CTA_FILTER);
        w.u32(
            CTA_FILTER_ORIG_FLAGS,
            if src { FLAG_IP_SRC } else { FLAG_IP_DST },
        );
        w.end_nest();
        w.end();
        let mut found = Vec::new();
        sock.dump(&w.buf, |_, payload| {
            let attrs = payload.get(4..).unwrap_or_default();
            let Some(tuple) = nl::attr(attrs, CTA_TUPLE_ORIG) else {
                return;
            };
            let mut key = attr_bytes(CTA_TUPLE_ORIG | 0x8000, tuple);
            if let Some(zone) = nl::attr(attrs, CTA_ZONE) {
                key.extend(attr_bytes(CTA_ZONE, zone));
            }
            key.insert(0, family);
            found.push(key);
        })?;
        Ok(found)
    }

    /// Every entry from or to any of `addrs`, once each.
    fn involving(&self, sock: &Socket, addrs: &[IpAddr]) -> Result<Vec<Vec<u8>>, NlError> {
        let mut entries = Vec::new();
        for a in addrs {
            for src in [true, false] {
                entries.extend(self.find(sock, *a, src)?);
            }
        }
        entries.sort();
        entries.dedup();
        Ok(entries)
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
