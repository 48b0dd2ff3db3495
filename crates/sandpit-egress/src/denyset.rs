//! The always-deny address set: where the proxy never dials and the
//! resolver never answers, whatever name led there (DNS rebinding: a
//! granted name that resolves to the host, cloud metadata or a private
//! network).
//!
//! Two parts, as in the policy model (`sandpit_net::policy`): `hard`
//! (loopback, link-local including 169.254.169.254, unspecified,
//! multicast, the host's own addresses) is refused even when a CIDR rule
//! of the sandbox names it; `private` (RFC 1918, CGNAT, ULA, NAT64, the
//! documentation and benchmark ranges, the sandbox subnet) is refused
//! unless one of the sandbox's CIDR rules names the address.
//!
//! Addresses are compared canonically: `::ffff:10.0.0.1` is `10.0.0.1`.

use std::net::IpAddr;

use ipnet::IpNet;
use sandpit_net::policy::Cidr;

use crate::canonical_ip;

/// Ranges refused even when a CIDR rule names them.
const HARD: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    // Unspecified, loopback and the deprecated IPv4-compatible addresses.
    "::/96",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

/// Ranges refused unless a CIDR rule names them.
const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "fc00::/7",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:db8::/32",
];

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// In the hard part: never reachable.
    Hard,
    /// In the private part, and no CIDR rule of the sandbox names it.
    Private,
}

/// The always-deny set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenySet {
    hard: Vec<Cidr>,
    private: Vec<Cidr>,
}

fn parse_all(nets: &[&str]) -> Vec<Cidr> {
    nets.iter()
        .map(|n| Cidr {
            net: n.parse().expect("a valid built-in range"),
            except: Vec::new(),
        })
        .collect()
}

impl Default for DenySet {
    fn default() -> Self {
        Self::standard()
    }
}

impl DenySet {
    /// The standard set, without the host's addresses and the sandbox
    /// subnet (add them with [`DenySet::with_host`] and
    /// [`DenySet::with_private`]).
    pub fn standard() -> Self {
        Self {
            hard: parse_all(HARD),
            private: parse_all(PRIVATE),
        }
    }

    /// The built-in hard part (loopback, link-local, multicast and other
    /// never-routable ranges) with `never` added to it, and `private` as
    /// the private part: the firewall's own ranges
    /// (`sandpit_net::Network::deny_ranges`), so that what a name resolves
    /// to is judged as a packet to it would be.
    pub fn of_firewall(never: Vec<IpNet>, private: Vec<IpNet>) -> Self {
        Self {
            hard: parse_all(HARD),
            private: Vec::new(),
        }
        .with_host(never)
        .with_private(private)
    }

    /// An explicit set (e.g. from configuration).
    pub fn new(hard: Vec<Cidr>, private: Vec<Cidr>) -> Self {
        Self { hard, private }
    }

    /// Adds the host's own addresses (or networks) to the hard part.
    pub fn with_host(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.hard.extend(nets.into_iter().map(|net| Cidr {
            net,
            except: Vec::new(),
        }));
        self
    }

    /// Adds ranges (the sandbox subnet, site networks) to the private part.
    pub fn with_private(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.private.extend(nets.into_iter().map(|net| Cidr {
            net,
            except: Vec::new(),
        }));
        self
    }

    /// Carves `net` out of every range of the set that contains it: a test
    /// harness serving on loopback addresses uses this; production should
    /// not need it.
    pub fn allowing(mut self, net: IpNet) -> Self {
        for c in self.hard.iter_mut().chain(self.private.iter_mut()) {
            if c.net.contains(&net) || net.contains(&c.net) {
                c.except.push(net);
            }
        }
        self
    }

    /// Whether `addr` may be dialed, given whether one of the sandbox's
    /// CIDR rules names it (`cidr_allows`, asked only when needed).
    pub fn check(
        &self,
        addr: IpAddr,
        cidr_allows: impl FnOnce(IpAddr) -> bool,
    ) -> Result<(), Denied> {
        let addr = canonical_ip(addr);
        if self.hard.iter().any(|c| c.contains(addr)) {
            return Err(Denied::Hard);
        }
        if self.private.iter().any(|c| c.contains(addr)) && !cidr_allows(addr) {
            return Err(Denied::Private);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(set: &DenySet, addr: &str, cidr: bool) -> Result<(), Denied> {
        set.check(addr.parse().unwrap(), |_| cidr)
    }

    #[test]
    fn the_firewalls_ranges_replace_the_built_in_private_part() {
        let set = DenySet::of_firewall(
            vec![
                "169.254.0.0/16".parse().unwrap(),
                "192.0.2.7/32".parse().unwrap(),
            ],
            vec!["10.0.0.0/8".parse().unwrap()],
        );
        assert_eq!(check(&set, "127.0.0.1", true), Err(Denied::Hard));
        assert_eq!(check(&set, "169.254.169.254", true), Err(Denied::Hard));
        assert_eq!(check(&set, "192.0.2.7", true), Err(Denied::Hard));
        assert_eq!(check(&set, "10.1.2.3", false), Err(Denied::Private));
        assert_eq!(check(&set, "10.1.2.3", true), Ok(()));
        // Not private to the firewall, so not to the proxy either.
        assert_eq!(check(&set, "198.51.100.2", false), Ok(()));
    }

    #[test]
    fn the_standard_set_refuses_what_rebinding_aims_at() {
        let set = DenySet::standard();
        for hard in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "::7f00:1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "fe80::1",
            "ff02::1",
        ] {
            assert_eq!(check(&set, hard, true), Err(Denied::Hard), "{hard}");
        }
        for private in [
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "198.18.0.1",
        ] {
            assert_eq!(
                check(&set, private, false),
                Err(Denied::Private),
                "{private}"
            );
            assert_eq!(check(&set, private, true), Ok(()), "{private}");
        }
        for public in ["1.1.1.1", "172.32.0.1", "2606:4700::1111", "100.128.0.1"] {
            assert_eq!(check(&set, public, false), Ok(()), "{public}");
        }
    }

    #[test]
    fn host_subnet_and_carve_outs() {
        let set = DenySet::standard()
            .with_host(["203.0.114.7/32".parse().unwrap()])
            .with_private(["100.100.0.0/16".parse().unwrap()])
            .allowing("127.77.0.0/16".parse().unwrap());
        assert_eq!(check(&set, "203.0.114.7", true), Err(Denied::Hard));
        assert_eq!(check(&set, "203.0.114.8", false), Ok(()));
        assert_eq!(check(&set, "127.77.0.1", false), Ok(()));
        assert_eq!(check(&set, "127.0.0.1", false), Err(Denied::Hard));
        assert_eq!(check(&set, "100.100.1.1", false), Err(Denied::Private));
    }
}
