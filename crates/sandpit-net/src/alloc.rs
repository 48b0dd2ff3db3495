//! Sandbox addresses: what the lead persists with a record
//! ([`Allocation`]), and the allocator that hands them out.
//!
//! A sandbox's addresses are the same offset `n` into both subnets
//! (`10.209.0.n`, `fd..::n`), and every name the network gives it derives
//! from that offset: the host link `sp-<n in hex>`, the nftables chains
//! and sets `eg_<n>`, `in_<n>`, ... So a record's allocation alone finds
//! everything of its sandbox again after a restart.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::NetConfig;
use crate::NetError;

/// A sandbox's addresses. Stored with the record (serde, or the string
/// form `10.209.0.5` / `10.209.0.5,fd5a:9d17:4e3c::5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Allocation {
    /// IPv4 address (always).
    pub ipv4: Ipv4Addr,
    /// IPv6 address, when the network has IPv6.
    pub ipv6: Option<Ipv6Addr>,
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv6 {
            Some(v6) => write!(f, "{},{v6}", self.ipv4),
            None => write!(f, "{}", self.ipv4),
        }
    }
}

/// Not an allocation's string form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address allocation (IPV4 or IPV4,IPV6)")]
pub struct BadAllocation(pub String);

impl FromStr for Allocation {
    type Err = BadAllocation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadAllocation(s.to_owned());
        let (v4, v6) = match s.split_once(',') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        Ok(Self {
            ipv4: v4.trim().parse().map_err(|_| bad())?,
            ipv6: v6
                .map(|t| t.trim().parse().map_err(|_| bad()))
                .transpose()?,
        })
    }
}

/// The names of one sandbox's objects, from its offset in the subnet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Slot {
    /// Offset into the subnets.
    pub(crate) n: u32,
    /// Host end of the veth.
    pub(crate) link: String,
}

impl Slot {
    pub(crate) fn new(config: &NetConfig, n: u32) -> Self {
        Self {
            n,
            link: format!("{}{n:x}", config.link_prefix),
        }
    }

    /// `<what>_<n in hex>`: a chain or set of this sandbox.
    pub(crate) fn name(&self, what: &str) -> String {
        format!("{what}_{:x}", self.n)
    }

    /// The offset a per-sandbox chain or set name carries, if it is one.
    pub(crate) fn parse_name(name: &str) -> Option<u32> {
        let (_, hex) = name.rsplit_once('_')?;
        u32::from_str_radix(hex, 16).ok()
    }

    /// The offset in a host link's name, if it is one of ours.
    pub(crate) fn parse_link(config: &NetConfig, link: &str) -> Option<u32> {
        let hex = link.strip_prefix(&config.link_prefix)?;
        if hex.is_empty() || hex.len() > 8 {
            return None;
        }
        u32::from_str_radix(hex, 16).ok()
    }
}

/// Hands out offsets `2..size-1` of the subnet (the network address and
/// the gateway `.1` are not sandboxes', nor is the IPv4 broadcast), the
/// next free one after the last given: an address freed is reused as late
/// as possible, so stale state about it (neighbour caches, a slow peer)
/// rarely meets a new sandbox.
#[derive(Debug)]
pub(crate) struct Allocator {
    base4: u32,
    base6: Option<u128>,
    size: u32,
    next: u32,
    used: HashSet<u32>,
}

impl Allocator {
    pub(crate) fn new(config: &NetConfig) -> Self {
        let size = 1u32 << (32 - u32::from(config.subnet_v4.prefix_len()));
        Self {
            base4: u32::from(config.subnet_v4.network()),
            base6: config.subnet_v6.map(|n| u128::from(n.network())),
            size,
            next: 2,
            used: HashSet::new(),
        }
    }

    /// The offset of `alloc`, if its IPv4 address is one this subnet hands
    /// out.
    pub(crate) fn offset(&self, alloc: &Allocation) -> Result<u32, NetError> {
        let a = u32::from(alloc.ipv4);
        match a.checked_sub(self.base4) {
            Some(n) if (2..self.size - 1).contains(&n) => Ok(n),
            _ => Err(NetError::Foreign(*alloc)),
        }
    }

    /// The allocation at offset `n`.
    pub(crate) fn at(&self, n: u32) -> Allocation {
        Allocation {
            ipv4: Ipv4Addr::from(self.base4 + n),
            ipv6: self.base6.map(|b| Ipv6Addr::from(b + u128::from(n))),
        }
    }

    /// Marks `alloc` as taken (a sandbox adopted after a restart); false if
    /// it already was.
    pub(crate) fn reserve(&mut self, alloc: &Allocation) -> Result<bool, NetError> {
        let n = self.offset(alloc)?;
        Ok(self.used.insert(n))
    }

    /// A free offset.
    pub(crate) fn take(&mut self) -> Result<u32, NetError> {
        let span = self.size - 3;
        for i in 0..span {
            let n = 2 + (self.next - 2 + i) % span;
            if self.used.insert(n) {
                self.next = 2 + (n - 2 + 1) % span;
                return Ok(n);
            }
        }
        Err(NetError::Exhausted)
    }

    pub(crate) fn is_used(&self, n: u32) -> bool {
        self.used.contains(&n)
    }

    pub(crate) fn free(&mut self, n: u32) {
        self.used.remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_and_serde_forms_round_trip() {
        let a: Allocation = "10.209.0.5,fd5a:9d17:4e3c::5".parse().unwrap();
        assert_eq!(a.to_string(), "10.209.0.5,fd5a:9d17:4e3c::5");
        let b: Allocation = "10.209.0.6".parse().unwrap();
        assert_eq!((b.ipv6, b.to_string().as_str()), (None, "10.209.0.6"));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Allocation>(&json).unwrap(), a);
        assert!("10.209.0".parse::<Allocation>().is_err());
        assert!("10.209.0.1,nope".parse::<Allocation>().is_err());
    }

    #[test]
    fn offsets_skip_network_gateway_and_broadcast_and_reuse_late() {
        let config = NetConfig {
            subnet_v4: "10.9.0.0/28".parse().unwrap(),
            ..Default::default()
        };
        let mut a = Allocator::new(&config);
        let got: Vec<u32> = (0..13).map(|_| a.take().unwrap()).collect();
        assert_eq!(got, (2..15).collect::<Vec<_>>());
        assert!(matches!(a.take(), Err(NetError::Exhausted)));
        a.free(4);
        a.free(9);
        // The next after the last given, wrapping.
        assert_eq!(a.take().unwrap(), 4);
        assert_eq!(a.take().unwrap(), 9);
        let at = a.at(5);
        assert_eq!(at.ipv4, Ipv4Addr::new(10, 9, 0, 5));
        assert_eq!(at.ipv6.unwrap().to_string(), "fd5a:9d17:4e3c::5");
        assert_eq!(a.offset(&at).unwrap(), 5);
        for foreign in ["10.9.0.1", "10.9.0.15", "10.9.1.2"] {
            let f: Allocation = foreign.parse().unwrap();
            assert!(a.offset(&f).is_err(), "{foreign}");
        }
    }

    #[test]
    fn names_derive_from_the_offset() {
        let config = NetConfig::default();
        let s = Slot::new(&config, 0x2a);
        assert_eq!(s.link, "sp-2a");
        assert_eq!(s.name("eg4a"), "eg4a_2a");
        assert_eq!(Slot::parse_name("eg4a_2a"), Some(0x2a));
        assert_eq!(Slot::parse_link(&config, "sp-2a"), Some(0x2a));
        assert_eq!(Slot::parse_link(&config, "sandpit0"), None);
        assert_eq!(Slot::parse_link(&config, "sp-zz"), None);
    }
}
