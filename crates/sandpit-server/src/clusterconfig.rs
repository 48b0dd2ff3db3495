//! `[cluster]`: the role of this `sandpitd` in a scaled-out deployment
//! (docs/scale-out.md), validated once at start-up into
//! [`ClusterSettings`]. Without the section the daemon is today's single
//! host: embedded SQLite, no PostgreSQL, no gateway.
//!
//! ```toml
//! [cluster]
//! role = "runner"                       # or "gateway"
//! database_url = "postgresql://sandpit@db:5432/sandpit"
//! # database_url_file = "/etc/sandpit/secret/database-url"   # instead
//! advertise = "http://10.0.0.5:50051"   # runner: where gateways reach it
//! labels = { zone = "a" }               # runner: what placement selects on
//! lease = "10s"                         # every process of a cluster alike
//! # The direct data plane (ConnectSandbox), all three or none:
//! direct_listen = "0.0.0.0:50052"       # runner: mTLS endpoint for clients
//! direct_advertise = "https://10.0.0.5:50052"
//! client_ca_file = "/etc/sandpit/cluster-ca.pem"   # runner: the CA it trusts
//! # ca_cert_file, ca_key_file             # gateway: the CA that signs
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// The lease when `[cluster]` names none: a runner silent this long loses
/// its sandboxes (they become FAILED).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// What this process is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds sandboxes (the engine), registers and heartbeats.
    Runner,
    /// Stateless: serves the API, places creates and routes calls.
    Gateway,
}

/// `[cluster]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    role: Option<Role>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    advertise: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    lease: Option<String>,
    direct_listen: Option<String>,
    direct_advertise: Option<String>,
    client_ca_file: Option<PathBuf>,
    ca_cert_file: Option<PathBuf>,
    ca_key_file: Option<PathBuf>,
}

/// A runner's direct data-plane endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectEndpoint {
    /// Where it listens.
    pub listen: std::net::SocketAddr,
    /// The `https://host:port` clients are sent to.
    pub advertise: String,
    /// The host part of `advertise` (its certificate is made for it).
    pub host: String,
    /// The cluster CA's certificate, PEM: clients must chain to it.
    pub client_ca_pem: String,
}

/// `[cluster]`, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This process's role.
    pub role: Role,
    /// The PostgreSQL URL (may hold a password: never printed).
    pub database_url: String,
    /// A runner's endpoint as gateways dial it (`http://host:port`).
    pub advertise: Option<String>,
    /// A runner's labels.
    pub labels: BTreeMap<String, String>,
    /// A heartbeat older than this ends a runner's lease.
    pub lease: Duration,
    /// A runner's direct endpoint; `None`: ConnectSandbox refers clients
    /// back to the gateway.
    pub direct: Option<DirectEndpoint>,
    /// A gateway's signing CA (certificate, key files); `None`: it answers
    /// ConnectSandbox with UNIMPLEMENTED.
    pub ca: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("role", &self.role)
            .field("advertise", &self.advertise)
            .field("labels", &self.labels)
            .field("lease", &self.lease)
            .field("direct", &self.direct.as_ref().map(|d| &d.advertise))
            .field("ca", &self.ca.as_ref().map(|c| &c.0))
            .finish_non_exhaustive()
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// `"10s"`, `"500ms"`, `"2m"`.
fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = digits.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

fn direct_endpoint(
    listen: &str,
    advertise: &str,
    ca: &std::path::Path,
) -> Result<DirectEndpoint, ConfigError> {
    let listen = listen.trim().parse().map_err(|_| {
        invalid(
            "cluster.direct_listen",
            format!("{listen:?} is not an address like 0.0.0.0:50052"),
        )
    })?;
    let uri: axum::http::Uri = advertise.parse().map_err(|_| {
        invalid(
            "cluster.direct_advertise",
            format!("{advertise:?} is not a URL like https://10.0.0.5:50052"),
        )
    })?;
    let host = match (uri.scheme_str(), uri.host(), uri.port_u16()) {
        (Some("https"), Some(host), Some(_)) => host.to_owned(),
        _ => {
            return Err(invalid(
                "cluster.direct_advertise",
                format!("{advertise:?}: the client needs https://HOST:PORT"),
            ))
        }
    };
    let client_ca_pem = std::fs::read_to_string(ca).map_err(|e| {
        invalid(
            "cluster.client_ca_file",
            format!("read {}: {e}", ca.display()),
        )
    })?;
    if !client_ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid(
            "cluster.client_ca_file",
            format!("{} holds no PEM certificate", ca.display()),
        ));
    }
    Ok(DirectEndpoint {
        listen,
        advertise: advertise.to_owned(),
        host,
        client_ca_pem,
    })
}

impl FileCluster {
    /// Validates the section.
    pub fn resolve(self) -> Result<ClusterSettings, ConfigError> {
        let role = self.role.ok_or_else(|| {
            invalid(
                "cluster.role",
                "required in [cluster]: \"runner\" or \"gateway\"",
            )
        })?;
        let database_url = match (self.database_url, self.database_url_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "cluster.database_url",
                    "give database_url or database_url_file, not both",
                ))
            }
            (Some(url), None) => url,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    invalid(
                        "cluster.database_url_file",
                        format!("read {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(invalid(
                    "cluster.database_url",
                    "required in [cluster] (or database_url_file)",
                ))
            }
        };
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(invalid(
                "cluster.database_url",
                "expected a URL like postgresql://user@host:5432/db",
            ));
        }
        let lease = match self.lease {
            None => DEFAULT_LEASE,
            Some(text) => parse_duration(&text)
                .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(600))
                .ok_or_else(|| {
                    invalid(
                        "cluster.lease",
                        format!("{text:?} is not a duration from 1s to 10m like \"10s\""),
                    )
                })?,
        };
        let labels = self.labels.unwrap_or_default();
        let advertise = match role {
            Role::Runner => {
                let a = self.advertise.ok_or_else(|| {
                    invalid(
                        "cluster.advertise",
                        "a runner needs the endpoint gateways reach it at, like http://10.0.0.5:50051",
                    )
                })?;
                if !(a.starts_with("http://") || a.starts_with("https://"))
                    || a.parse::<axum::http::Uri>().is_err()
                {
                    return Err(invalid(
                        "cluster.advertise",
                        format!("{a:?} is not a URL like http://10.0.0.5:50051"),
                    ));
                }
                for (k, v) in &labels {
                    if k.is_empty() || k.len() > 63 || v.len() > 63 {
                        return Err(invalid(
                            "cluster.labels",
                            format!("{k:?}: keys are 1-63 bytes, values at most 63"),
                        ));
                    }
                }
                Some(a)
            }
            Role::Gateway => {
                if self.advertise.is_some() || !labels.is_empty() {
                    return Err(invalid(
                        "cluster.advertise",
                        "advertise and labels are a runner's; this is a gateway",
                    ));
                }
                None
            }
        };
        let direct = match (
            role,
            self.direct_listen,
            self.direct_advertise,
            self.client_ca_file,
        ) {
            (_, None, None, None) => None,
            (Role::Runner, Some(listen), Some(advertise), Some(ca)) => {
                Some(direct_endpoint(&listen, &advertise, &ca)?)
            }
            (Role::Runner, ..) => {
                return Err(invalid(
                    "cluster.direct_listen",
                    "give direct_listen, direct_advertise and client_ca_file together",
                ))
            }
            (Role::Gateway, ..) => {
                return Err(invalid(
                    "cluster.direct_listen",
                    "the direct endpoint is a runner's; this is a gateway",
                ))
            }
        };
        let ca = match (role, self.ca_cert_file, self.ca_key_file) {
            (_, None, None) => None,
            (Role::Gateway, Some(cert), Some(key)) => Some((cert, key)),
            (Role::Gateway, ..) => {
                return Err(invalid(
                    "cluster.ca_cert_file",
                    "give ca_cert_file and ca_key_file together",
                ))
            }
            (Role::Runner, ..) => {
                return Err(invalid(
                    "cluster.ca_cert_file",
                    "the signing CA is a gateway's; a runner needs only client_ca_file",
                ))
            }
        };
        Ok(ClusterSettings {
            role,
            database_url,
            advertise,
            labels,
            lease,
            direct,
            ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterSettings, ConfigError> {
        toml::from_str::<FileCluster>(text).unwrap().resolve()
    }

    #[test]
    fn a_runner_needs_its_endpoint_and_the_lease_defaults() {
        let c = parse(
            "role = \"runner\"\ndatabase_url = \"postgresql://u@db/x\"\nadvertise = \"http://10.0.0.5:50051\"\nlabels = { zone = \"a\" }",
        )
        .unwrap();
        assert_eq!(c.role, Role::Runner);
        assert_eq!(c.lease, DEFAULT_LEASE);
        assert_eq!(c.labels["zone"], "a");
        let e = parse("role = \"runner\"\ndatabase_url = \"postgresql://u@db/x\"").unwrap_err();
        assert!(e.to_string().contains("cluster.advertise"), "{e}");
        let e = parse("role = \"runner\"\ndatabase_url = \"postgresql://u@db/x\"\nadvertise = \"10.0.0.5:50051\"")
            .unwrap_err();
        assert!(e.to_string().contains("not a URL"), "{e}");
    }

    #[test]
    fn a_gateway_has_no_endpoint_and_bad_values_name_their_key() {
        let c =
            parse("role = \"gateway\"\ndatabase_url = \"postgres://u:pw@db/x\"\nlease = \"2s\"")
                .unwrap();
        assert_eq!((c.role, c.lease), (Role::Gateway, Duration::from_secs(2)));
        assert!(
            !format!("{c:?}").contains("pw"),
            "the URL's password is never printed"
        );
        for (text, key) in [
            ("database_url = \"postgres://db\"", "cluster.role"),
            ("role = \"gateway\"", "cluster.database_url"),
            (
                "role = \"gateway\"\ndatabase_url = \"mysql://db\"",
                "cluster.database_url",
            ),
            (
                "role = \"gateway\"\ndatabase_url = \"postgres://db\"\nlease = \"0s\"",
                "cluster.lease",
            ),
            (
                "role = \"gateway\"\ndatabase_url = \"postgres://db\"\nlease = \"ten\"",
                "cluster.lease",
            ),
            (
                "role = \"gateway\"\ndatabase_url = \"postgres://db\"\nadvertise = \"http://a:1\"",
                "cluster.advertise",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        assert!(toml::from_str::<FileCluster>("role = \"leader\"").is_err());
    }

    #[test]
    fn a_direct_endpoint_needs_all_three_keys_and_https() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let base = "role = \"runner\"\ndatabase_url = \"postgres://db\"\nadvertise = \"http://10.0.0.5:50051\"\n";
        let ok = format!(
            "{base}direct_listen = \"0.0.0.0:50052\"\ndirect_advertise = \"https://10.0.0.5:50052\"\nclient_ca_file = {:?}",
            ca.display().to_string()
        );
        let d = parse(&ok).unwrap().direct.unwrap();
        assert_eq!((d.host.as_str(), d.listen.port()), ("10.0.0.5", 50052));
        let e = parse(&format!("{base}direct_listen = \"0.0.0.0:50052\"")).unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        let plain = ok.replace("https://", "http://");
        assert!(parse(&plain)
            .unwrap_err()
            .to_string()
            .contains("https://HOST:PORT"));
        let gw = "role = \"gateway\"\ndatabase_url = \"postgres://db\"\nca_cert_file = \"/c\"";
        assert!(parse(gw).unwrap_err().to_string().contains("together"));
    }

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }
}
