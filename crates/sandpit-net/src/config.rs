//! How the sandbox network is laid out on this host.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::DefaultEgress;
use crate::NetError;

/// The host side of the sandbox network. [`Default`] is what `sandpitd`
/// runs with unless configured otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// An interface (a bridge without ports) holding the gateway addresses (`.1` of each
    /// subnet): what every sandbox routes through, and where the daemon's
    /// resolver and egress proxy listen. `sandpit0`.
    pub gateway_link: String,
    /// Name prefix of the host ends of the sandboxes' veths, followed by
    /// the address's offset in the subnet in hex (`sp-2a`). Everything on
    /// the host with this prefix is Sandpit's: the firewall matches it and
    /// `sweep` removes what nobody owns. At most 6 characters.
    pub link_prefix: String,
    /// Sandbox addresses (IPv4, required). The gateway is its first
    /// address. `10.209.0.0/16`.
    pub subnet_v4: Ipv4Net,
    /// Sandbox addresses (IPv6, a ULA /64 by default), the same offsets as
    /// IPv4; `None` gives sandboxes IPv4 only.
    pub subnet_v6: Option<Ipv6Net>,
    /// The nftables table (family `inet`) everything lives in. `sandpit`.
    pub table: String,
    /// What a sandbox without an egress policy may reach.
    pub default_egress: DefaultEgress,
    /// Masquerade sandbox traffic leaving through any other interface
    /// (the host's uplink). Off only where the subnet is routed to the
    /// host.
    pub nat: bool,
    /// More ranges no sandbox may ever reach, whatever its rules say.
    pub extra_deny: Vec<IpNet>,
    /// Where the daemon's DNS resolver listens on the gateway addresses
    /// (UDP and TCP); every sandbox's DNS is redirected there.
    pub dns_port: u16,
    /// Where the daemon's egress proxy takes TLS on the gateway
    /// addresses: TCP 443 of sandboxes with host-name rules is redirected
    /// there.
    pub proxy_port: u16,
    /// Where the proxy takes plain HTTP (TCP 80 of those sandboxes).
    pub http_proxy_port: u16,
    /// Namespaces prepared ahead of demand (0: none, each `prepare` makes
    /// its own).
    pub pool_size: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            gateway_link: "sandpit0".into(),
            link_prefix: "sp-".into(),
            subnet_v4: "10.209.0.0/16".parse().expect("valid"),
            // fd + 40 random bits + a zero subnet id (RFC 4193).
            subnet_v6: Some("fd5a:9d17:4e3c::/64".parse().expect("valid")),
            table: "sandpit".into(),
            default_egress: DefaultEgress::Deny,
            nat: true,
            extra_deny: Vec::new(),
            dns_port: 5353,
            proxy_port: 3128,
            http_proxy_port: 3129,
            pool_size: 4,
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> NetError {
    NetError::Config {
        field,
        reason: reason.into(),
    }
}

impl NetConfig {
    /// The gateway's IPv4 address (the subnet's first).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet_v4.network()) + 1)
    }

    /// The gateway's IPv6 address, when sandboxes have IPv6.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.subnet_v6
            .map(|n| Ipv6Addr::from(u128::from(n.network()) + 1))
    }

    /// Checks what the kernel would refuse later, or in a confusing way.
    pub fn validate(&self) -> Result<(), NetError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.gateway_link) || self.gateway_link.len() > 15 {
            return Err(invalid("gateway_link", "1 to 15 letters, digits, - or _"));
        }
        if !name_ok(&self.link_prefix) || self.link_prefix.len() > 6 {
            return Err(invalid("link_prefix", "1 to 6 letters, digits, - or _"));
        }
        if self.gateway_link.starts_with(&self.link_prefix) {
            return Err(invalid("gateway_link", "must not start with link_prefix"));
        }
        if !name_ok(&self.table) || self.table.len() > 64 {
            return Err(invalid("table", "1 to 64 letters, digits, - or _"));
        }
        let p4 = self.subnet_v4.prefix_len();
        if !(8..=28).contains(&p4) {
            return Err(invalid("subnet_v4", "prefix must be /8 to /28"));
        }
        if let Some(v6) = self.subnet_v6 {
            let room = 128 - u32::from(v6.prefix_len());
            if room < 32 - u32::from(p4) {
                return Err(invalid(
                    "subnet_v6",
                    "must hold as many addresses as subnet_v4",
                ));
            }
        }
        let ports = [self.dns_port, self.proxy_port, self.http_proxy_port];
        if ports.contains(&0)
            || ports[0] == ports[1]
            || ports[0] == ports[2]
            || ports[1] == ports[2]
        {
            return Err(invalid("dns_port", "ports must be distinct and nonzero"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_gateways_are_first() {
        let c = NetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.gateway_v4(), Ipv4Addr::new(10, 209, 0, 1));
        assert_eq!(
            c.gateway_v6().unwrap(),
            "fd5a:9d17:4e3c::1".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn bad_configs_name_their_field() {
        let bad = |f: fn(&mut NetConfig)| {
            let mut c = NetConfig::default();
            f(&mut c);
            match c.validate() {
                Err(NetError::Config { field, .. }) => field,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(bad(|c| c.link_prefix = "toolong-".into()), "link_prefix");
        assert_eq!(bad(|c| c.gateway_link = "sp-gw".into()), "gateway_link");
        assert_eq!(
            bad(|c| c.subnet_v4 = "10.0.0.0/30".parse().unwrap()),
            "subnet_v4"
        );
        assert_eq!(
            bad(|c| c.subnet_v6 = Some("fd00::/120".parse().unwrap())),
            "subnet_v6"
        );
        assert_eq!(bad(|c| c.proxy_port = c.dns_port), "dns_port");
        assert_eq!(bad(|c| c.http_proxy_port = c.proxy_port), "dns_port");
    }
}
