//! `[network]`: how sandboxes are networked on this runner, validated once
//! at start-up into [`NetworkSettings`].
//!
//! ```toml
//! [network]
//! enabled = true                     # false: loopback only, as before issue 12
//! default_egress = "deny"            # or "internet"
//! subnet_v4 = "10.209.0.0/16"
//! subnet_v6 = "fd5a:9d17:4e3c::/64"  # "" for IPv4 only
//! upstream_dns = ["192.0.2.53:53"]   # default: the host's /etc/resolv.conf
//! dns_name_except = ["*.internal.example.com"]
//! extra_deny = ["203.0.113.0/24"]
//! pool_size = 4
//! public_domain = "sandpit.localhost"    # PUBLIC services: <port>-<id>.<domain>
//! public_http_listen = "127.0.0.1:8780"  # "" turns a frontend off
//! public_tls_listen = "127.0.0.1:8743"
//! public_tcp_ports = "30000-30999"
//! public_tcp_bind = "127.0.0.1"
//! ca_certificates = ["/etc/sandpit/proxy-ca.pem"]  # trusted in every sandbox
//! [network.env]                      # into every sandbox (proxies, mirrors)
//! PIP_INDEX_URL = "https://pypi.mirror.example/simple"
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use sandpit_net::policy::NamePattern;
use sandpit_net::{DefaultEgress, NetConfig};
use serde::Deserialize;

use crate::config::ConfigError;

/// `[network]` as the file spells it, every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNetwork {
    enabled: Option<bool>,
    default_egress: Option<DefaultEgress>,
    subnet_v4: Option<String>,
    subnet_v6: Option<String>,
    gateway_link: Option<String>,
    link_prefix: Option<String>,
    table: Option<String>,
    nat: Option<bool>,
    extra_deny: Option<Vec<String>>,
    dns_port: Option<u16>,
    proxy_port: Option<u16>,
    http_proxy_port: Option<u16>,
    pool_size: Option<usize>,
    upstream_dns: Option<Vec<String>>,
    dns_name_except: Option<Vec<String>>,
    resolve_all_with_cidr_rules: Option<bool>,
    env: Option<BTreeMap<String, String>>,
    public_domain: Option<String>,
    public_http_listen: Option<String>,
    public_tls_listen: Option<String>,
    public_tcp_ports: Option<String>,
    public_tcp_bind: Option<String>,
    ca_certificates: Option<Vec<std::path::PathBuf>>,
}

/// Where PUBLIC services are published. Loopback by default: putting them
/// on a routable address is the operator's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicSettings {
    /// Service host names are `<port>-<sandbox-id>.<domain>`
    /// (`sandpit.localhost`: `*.localhost` resolves to loopback).
    pub domain: String,
    /// The HTTP frontend (`None`: no HTTPS-kind endpoints).
    pub http: Option<SocketAddr>,
    /// The TLS passthrough frontend (`None`: no TLS passthrough endpoints).
    pub tls: Option<SocketAddr>,
    /// Host ports for raw TCP services (`None`: none).
    pub tcp_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Where those ports listen.
    pub tcp_bind: IpAddr,
}

impl Default for PublicSettings {
    fn default() -> Self {
        Self {
            domain: "sandpit.localhost".into(),
            http: Some("127.0.0.1:8780".parse().expect("valid")),
            tls: Some("127.0.0.1:8743".parse().expect("valid")),
            tcp_ports: Some(30000..=30999),
            tcp_bind: IpAddr::from([127, 0, 0, 1]),
        }
    }
}

/// The sandbox network of this runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSettings {
    /// Whether sandboxes get a network at all (`false`: loopback only, and
    /// every network option but "none" is refused).
    pub enabled: bool,
    /// The data path and firewall layout.
    pub net: NetConfig,
    /// Where the resolver forwards (none: no name resolves).
    pub upstream_dns: Vec<SocketAddr>,
    /// The runner's carve-outs: names no sandbox resolves or reaches,
    /// whatever its grants say.
    pub dns_name_except: Vec<NamePattern>,
    /// Sandboxes with CIDR rules resolve every name (off: only granted
    /// names; a lookup upstream is itself a way out).
    pub resolve_all_with_cidr_rules: bool,
    /// Environment given to every sandbox (a sandbox's own wins).
    pub env: Vec<(String, String)>,
    /// Where PUBLIC services are published.
    pub public: PublicSettings,
    /// CA certificates (PEM, read at start-up) every sandbox trusts besides
    /// its image's: a TLS-inspecting proxy's, a private mirror's.
    pub ca_certificates: Vec<u8>,
}

impl NetworkSettings {
    /// What every sandbox's environment starts from: `[network.env]`, and
    /// with extra CAs the variables that make common tools read the
    /// bundle they were added to (a sandbox's own variables win over both).
    pub fn sandbox_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if !self.ca_certificates.is_empty() {
            let bundle = sandpit_runtime::CA_BUNDLE;
            for k in [
                "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE",
                "PIP_CERT",
                "GIT_SSL_CAINFO",
            ] {
                env.push((k.to_owned(), bundle.to_owned()));
            }
            env.push((
                "NODE_EXTRA_CA_CERTS".into(),
                sandpit_runtime::EXTRA_CAS.into(),
            ));
        }
        for (k, v) in &self.env {
            match env.iter_mut().find(|(n, _)| n == k) {
                Some(slot) => slot.1 = v.clone(),
                None => env.push((k.clone(), v.clone())),
            }
        }
        env
    }
}

impl Default for NetworkSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            net: NetConfig::default(),
            upstream_dns: Vec::new(),
            dns_name_except: Vec::new(),
            resolve_all_with_cidr_rules: false,
            env: Vec::new(),
            public: PublicSettings::default(),
            ca_certificates: Vec::new(),
        }
    }
}

fn invalid(reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: "network",
        reason: reason.into(),
    }
}

/// The nameservers of a `resolv.conf`, port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        // A zone index (`fe80::1%eth0`) is not an address we can parse.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn server(text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse::<SocketAddr>()
        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| invalid(format!("upstream_dns: {text:?} is not an address[:port]")))
}

impl FileNetwork {
    /// Validates the section; `host_resolv_conf` is the host's
    /// `/etc/resolv.conf` (the default upstreams).
    pub fn resolve(self, host_resolv_conf: &str) -> Result<NetworkSettings, ConfigError> {
        let d = NetConfig::default();
        let mut net = NetConfig {
            gateway_link: self.gateway_link.unwrap_or(d.gateway_link),
            link_prefix: self.link_prefix.unwrap_or(d.link_prefix),
            subnet_v4: match self.subnet_v4 {
                Some(s) => s
                    .parse()
                    .map_err(|_| invalid(format!("subnet_v4: {s:?} is not an IPv4 CIDR")))?,
                None => d.subnet_v4,
            },
            subnet_v6: match self.subnet_v6.as_deref() {
                Some("") => None,
                Some(s) => Some(
                    s.parse()
                        .map_err(|_| invalid(format!("subnet_v6: {s:?} is not an IPv6 CIDR")))?,
                ),
                None => d.subnet_v6,
            },
            table: self.table.unwrap_or(d.table),
            default_egress: self.default_egress.unwrap_or(d.default_egress),
            nat: self.nat.unwrap_or(d.nat),
            extra_deny: Vec::new(),
            dns_port: self.dns_port.unwrap_or(d.dns_port),
            proxy_port: self.proxy_port.unwrap_or(d.proxy_port),
            http_proxy_port: self.http_proxy_port.unwrap_or(d.http_proxy_port),
            pool_size: self.pool_size.unwrap_or(d.pool_size),
        };
        for text in self.extra_deny.unwrap_or_default() {
            let n: IpNet = text
                .parse()
                .map_err(|_| invalid(format!("extra_deny: {text:?} is not a CIDR")))?;
            net.extra_deny.push(n.trunc());
        }
        net.validate()
            .map_err(|e| invalid(sandpit_errors::chain(&e)))?;
        let upstream_dns = match self.upstream_dns {
            Some(list) => list.iter().map(|s| server(s)).collect::<Result<_, _>>()?,
            None => nameservers(host_resolv_conf),
        };
        // None (a host without resolv.conf): sandboxes resolve nothing,
        // which the daemon says when it starts.
        let enabled = self.enabled.unwrap_or(true);
        let mut dns_name_except = Vec::new();
        for text in self.dns_name_except.unwrap_or_default() {
            dns_name_except.push(
                NamePattern::parse(&text).map_err(|e| invalid(format!("dns_name_except: {e}")))?,
            );
        }
        let mut env = Vec::new();
        for (k, v) in self.env.unwrap_or_default() {
            let name_ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok || v.contains('\0') {
                return Err(invalid(format!("env: {k:?} is not a variable name")));
            }
            env.push((k, v));
        }
        let d = PublicSettings::default();
        let listen = |v: Option<String>, default: Option<SocketAddr>, key: &str| match v.as_deref()
        {
            None => Ok(default),
            Some("") => Ok(None),
            Some(t) => t
                .parse::<SocketAddr>()
                .map(Some)
                .map_err(|_| invalid(format!("{key}: {t:?} is not an address:port"))),
        };
        let domain = self
            .public_domain
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or(d.domain);
        if !sandpit_net::policy::is_dns_name(&domain) {
            return Err(invalid(format!(
                "public_domain: {domain:?} is not a DNS name"
            )));
        }
        let tcp_ports = match self.public_tcp_ports.as_deref() {
            None => d.tcp_ports,
            Some("") => None,
            Some(t) => {
                let bad = || {
                    invalid(format!(
                        "public_tcp_ports: {t:?} is not a range like 30000-30999"
                    ))
                };
                let (a, b) = t.split_once('-').ok_or_else(bad)?;
                let (a, b): (u16, u16) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a == 0 || b < a {
                    return Err(bad());
                }
                Some(a..=b)
            }
        };
        let tcp_bind = match self.public_tcp_bind {
            None => d.tcp_bind,
            Some(t) => t
                .parse()
                .map_err(|_| invalid(format!("public_tcp_bind: {t:?} is not an address")))?,
        };
        let public = PublicSettings {
            domain,
            http: listen(self.public_http_listen, d.http, "public_http_listen")?,
            tls: listen(self.public_tls_listen, d.tls, "public_tls_listen")?,
            tcp_ports,
            tcp_bind,
        };
        let mut ca_certificates = Vec::new();
        for path in self.ca_certificates.unwrap_or_default() {
            let pem = std::fs::read(&path)
                .map_err(|e| invalid(format!("ca_certificates: read {}: {e}", path.display())))?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(invalid(format!(
                    "ca_certificates: {} holds no PEM certificate",
                    path.display()
                )));
            }
            ca_certificates.extend_from_slice(&pem);
            if !pem.ends_with(b"\n") {
                ca_certificates.push(b'\n');
            }
        }
        Ok(NetworkSettings {
            ca_certificates,
            public,
            enabled,
            net,
            upstream_dns,
            dns_name_except,
            resolve_all_with_cidr_rules: self.resolve_all_with_cidr_rules.unwrap_or(false),
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NetworkSettings, ConfigError> {
        let f: FileNetwork = toml::from_str(text).unwrap();
        f.resolve("# generated\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    }

    #[test]
    fn defaults_take_the_hosts_resolvers() {
        let s = parse("").unwrap();
        assert!(s.enabled);
        assert_eq!(s.net, NetConfig::default());
        assert_eq!(s.upstream_dns, ["192.0.2.53:53".parse().unwrap()]);
        assert_eq!(s.net.default_egress, DefaultEgress::Deny);
    }

    #[test]
    fn every_key_is_read_and_checked() {
        let s = parse(
            r#"
            default_egress = "internet"
            subnet_v4 = "10.77.0.0/20"
            subnet_v6 = ""
            upstream_dns = ["198.51.100.2", "198.51.100.3:5300"]
            dns_name_except = ["*.Internal.test"]
            extra_deny = ["203.0.113.7/24"]
            pool_size = 0
            public_domain = "Apps.Example.TEST."
            public_http_listen = ""
            public_tcp_ports = "40000-40010"
            [env]
            PIP_INDEX_URL = "https://pypi.test/simple"
            "#,
        )
        .unwrap();
        assert_eq!(s.net.default_egress, DefaultEgress::Internet);
        assert_eq!(s.net.subnet_v6, None);
        assert_eq!(
            s.net.extra_deny,
            ["203.0.113.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(s.upstream_dns[1], "198.51.100.3:5300".parse().unwrap());
        assert_eq!(s.dns_name_except[0].to_string(), "*.internal.test");
        assert_eq!(
            s.env,
            [("PIP_INDEX_URL".into(), "https://pypi.test/simple".into())]
        );
        for bad in [
            r#"default_egress = "open""#,
            r#"subnet_v4 = "10.0.0.0/33""#,
            r#"subnet_v4 = "10.0.0.0/30""#,
            r#"upstream_dns = ["nope"]"#,
            r#"dns_name_except = ["a.*.b"]"#,
            "proxy_port = 5353",
            r#"public_domain = "a b""#,
            r#"public_tcp_ports = "9-3""#,
            r#"public_tls_listen = "localhost""#,
            "[env]\n\"1X\" = \"v\"",
        ] {
            let f: Result<FileNetwork, _> = toml::from_str(bad);
            match f {
                Err(_) => {}
                Ok(f) => assert!(f.resolve("nameserver 192.0.2.53").is_err(), "{bad}"),
            }
        }
        assert!(FileNetwork::default()
            .resolve("")
            .unwrap()
            .upstream_dns
            .is_empty());
        let off: FileNetwork = toml::from_str("enabled = false").unwrap();
        assert!(!off.resolve("").unwrap().enabled);
    }

    #[test]
    fn extra_cas_are_read_once_and_pointed_at() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let s = parse(&format!(
            "ca_certificates = [{:?}]\n[env]\nPIP_CERT = \"/mine.pem\"",
            ca
        ))
        .unwrap();
        assert!(s.ca_certificates.ends_with(b"-----END CERTIFICATE-----\n"));
        let env = s.sandbox_env();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("SSL_CERT_FILE"), Some(sandpit_runtime::CA_BUNDLE));
        // The operator's own setting wins over the default.
        assert_eq!(get("PIP_CERT"), Some("/mine.pem"));
        assert!(parse(&format!("ca_certificates = [{junk:?}]")).is_err());
        assert!(parse("ca_certificates = [\"/nonexistent/ca.pem\"]").is_err());
        assert!(parse("").unwrap().sandbox_env().is_empty());
    }

    #[test]
    fn nameservers_are_read_like_the_libc_resolver() {
        assert_eq!(
            nameservers("nameserver 127.0.0.53\noptions edns0\n  nameserver ::1 # x\n"),
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
