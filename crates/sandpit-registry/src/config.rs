//! Registry configuration: hosts, mirrors, credentials, caps.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;

use sandpit_image::Reference;
use serde::{Deserialize, Serialize};

/// Default unpacked cap per layer.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 16 << 30;
/// Default unpacked cap per image.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;
/// Default number of layers downloaded at once.
pub const DEFAULT_CONCURRENT_LAYERS: usize = 3;
/// Most layers downloaded at once, whatever the config says.
const MAX_CONCURRENT_LAYERS: usize = 32;

/// How images are pulled: per-registry settings and global caps.
///
/// Deserialised from the daemon's `[registry]` TOML table (see
/// `docs/registries.md`); check it with [`RegistryConfig::validate`]
/// ([`crate::Puller::new`] does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Settings per registry host as spelled in references (`docker.io`,
    /// `127.0.0.1:5000`, `ghcr.io`). Registries not listed are reached over
    /// HTTPS, anonymously, with the system roots.
    pub registries: BTreeMap<String, RegistryHost>,
    /// Unpacked size cap per layer: decompression bombs fail at this size.
    pub max_layer_bytes: u64,
    /// Unpacked size cap per image (all its layers).
    pub max_image_bytes: u64,
    /// Layers downloaded at once per pull.
    pub concurrent_layers: usize,
    /// Seconds to wait for a response, and for each read of a body: a
    /// stalled transfer fails after this long without data.
    pub timeout_secs: u64,
    /// Seconds to wait for a TCP connection (and TLS handshake).
    pub connect_timeout_secs: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            registries: BTreeMap::new(),
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            concurrent_layers: DEFAULT_CONCURRENT_LAYERS,
            timeout_secs: 60,
            connect_timeout_secs: 10,
        }
    }
}

/// Settings of one registry.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryHost {
    /// Endpoint URLs tried in order before the registry itself
    /// (`https://mirror.example.com`, `http://127.0.0.1:5000`). An `http://`
    /// URL is the explicit opt-in to plain HTTP for that mirror.
    pub mirrors: Vec<String>,
    /// The registry itself speaks plain HTTP. Never implied: without it an
    /// `https://` attempt that fails is an error, not a downgrade.
    pub insecure: bool,
    /// URL of the registry itself when it is not `https://<host>`
    /// (`http://<host>` with `insecure`; `https://registry-1.docker.io` for
    /// `docker.io`), e.g. a registry behind a path-less proxy on another
    /// port. An `http://` URL needs `insecure`.
    pub endpoint: Option<String>,
    /// Extra CA certificates (PEM) trusted for this registry and its
    /// mirrors, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Credentials for this registry (Basic auth, or for its token
    /// endpoint). Used for mirrors too.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryHost")
            .field("mirrors", &self.mirrors)
            .field("insecure", &self.insecure)
            .field("endpoint", &self.endpoint)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Credentials for one pull; they win over the registry's configured ones.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Errors of setting up a [`crate::Puller`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    #[error("invalid registry config: {0}")]
    InvalidConfig(String),
    #[error("read ca file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ca file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
}

/// Checks an endpoint URL: `http(s)://host[:port]`, nothing after.
fn validate_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() {
        return Err("has no host");
    }
    if host.contains(['/', '?', '#', '@']) || host.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err("must be scheme://host[:port] only");
    }
    Ok(())
}

impl RegistryConfig {
    /// Checks the config: caps and timeouts positive, registry keys as
    /// references spell them, URLs well formed, `http://` endpoints only
    /// with `insecure`, credentials complete.
    pub fn validate(&self) -> Result<(), RegistryError> {
        let invalid = |msg: String| Err(RegistryError::InvalidConfig(msg));
        if self.max_layer_bytes == 0 || self.max_image_bytes == 0 {
            return invalid("max_layer_bytes and max_image_bytes must be positive".into());
        }
        if !(1..=MAX_CONCURRENT_LAYERS).contains(&self.concurrent_layers) {
            return invalid(format!(
                "concurrent_layers must be 1 to {MAX_CONCURRENT_LAYERS}"
            ));
        }
        if self.timeout_secs == 0 || self.connect_timeout_secs == 0 {
            return invalid("timeouts must be positive".into());
        }
        for (key, host) in &self.registries {
            // A key is what references carry: `docker.io`, not a URL, and
            // not `index.docker.io` (references normalise it away).
            match Reference::parse(&format!("{key}/x")) {
                Ok(r) if r.registry == *key => {}
                _ => {
                    return invalid(format!(
                        "registry {key:?}: not a registry host as references spell it"
                    ))
                }
            }
            for mirror in &host.mirrors {
                if let Err(reason) = validate_url(mirror) {
                    return invalid(format!("registry {key:?}: mirror {mirror:?} {reason}"));
                }
            }
            if let Some(endpoint) = &host.endpoint {
                if let Err(reason) = validate_url(endpoint) {
                    return invalid(format!("registry {key:?}: endpoint {endpoint:?} {reason}"));
                }
                if endpoint.starts_with("http://") && !host.insecure {
                    return invalid(format!(
                        "registry {key:?}: endpoint {endpoint:?} is plain http but insecure is not set"
                    ));
                }
            }
            if host.username.is_some() != host.password.is_some() {
                return invalid(format!(
                    "registry {key:?}: username and password go together"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> RegistryConfig {
        #[derive(Deserialize)]
        struct Daemon {
            registry: RegistryConfig,
        }
        toml::from_str::<Daemon>(toml_text).unwrap().registry
    }

    #[test]
    fn parses_the_documented_format() {
        let config = parse(
            r#"
            [registry]
            max_layer_bytes = 1000
            concurrent_layers = 4

            [registry.registries."docker.io"]
            mirrors = ["https://mirror.example.com", "http://127.0.0.1:5000"]

            [registry.registries."127.0.0.1:5001"]
            insecure = true
            username = "ci"
            password = "secret"

            [registry.registries."registry.corp"]
            ca_file = "/etc/sandpit/corp-ca.pem"
            "#,
        );
        config.validate().unwrap();
        assert_eq!(config.max_layer_bytes, 1000);
        assert_eq!(config.max_image_bytes, DEFAULT_MAX_IMAGE_BYTES);
        assert_eq!(config.concurrent_layers, 4);
        let hub = &config.registries["docker.io"];
        assert_eq!(hub.mirrors.len(), 2);
        assert!(!hub.insecure);
        let local = &config.registries["127.0.0.1:5001"];
        assert!(local.insecure);
        assert_eq!(local.password.as_deref(), Some("secret"));
        assert_eq!(
            config.registries["registry.corp"].ca_file,
            Some(PathBuf::from("/etc/sandpit/corp-ca.pem"))
        );
        let empty = parse("[registry]\n");
        assert_eq!(empty, RegistryConfig::default());
        empty.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Daemon {
            registry: RegistryConfig,
        }
        let err =
            toml::from_str::<Daemon>("[registry.registries.\"a.io\"]\nmirror = []\n").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    fn invalid(config: &RegistryConfig) -> String {
        match config.validate() {
            Err(RegistryError::InvalidConfig(msg)) => msg,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn validation() {
        let with_host = |key: &str, host: RegistryHost| RegistryConfig {
            registries: BTreeMap::from([(key.to_owned(), host)]),
            ..RegistryConfig::default()
        };
        assert!(invalid(&RegistryConfig {
            concurrent_layers: 0,
            ..RegistryConfig::default()
        })
        .contains("concurrent_layers"));
        assert!(invalid(&RegistryConfig {
            max_layer_bytes: 0,
            ..RegistryConfig::default()
        })
        .contains("positive"));
        assert!(invalid(&RegistryConfig {
            timeout_secs: 0,
            ..RegistryConfig::default()
        })
        .contains("timeouts"));
        for key in ["https://ghcr.io", "ghcr.io/x", "index.docker.io", "", "a b"] {
            assert!(
                invalid(&with_host(key, RegistryHost::default())).contains("registry host"),
                "{key}"
            );
        }
        with_host("localhost:5000", RegistryHost::default())
            .validate()
            .unwrap();
        for mirror in [
            "ftp://m",
            "https://",
            "https://m/v2",
            "m.example.com",
            "http://a?b",
        ] {
            let host = RegistryHost {
                mirrors: vec![mirror.into()],
                ..RegistryHost::default()
            };
            assert!(
                invalid(&with_host("docker.io", host)).contains("mirror"),
                "{mirror}"
            );
        }
        let plain = RegistryHost {
            endpoint: Some("http://127.0.0.1:1".into()),
            ..RegistryHost::default()
        };
        assert!(invalid(&with_host("a.io", plain.clone())).contains("insecure is not set"));
        with_host(
            "a.io",
            RegistryHost {
                insecure: true,
                ..plain
            },
        )
        .validate()
        .unwrap();
        let half = RegistryHost {
            username: Some("u".into()),
            ..RegistryHost::default()
        };
        assert!(invalid(&with_host("a.io", half)).contains("go together"));
    }

    #[test]
    fn debug_hides_passwords() {
        let creds = Credentials {
            username: "alice".into(),
            password: "hunter2".into(),
        };
        let text = format!("{creds:?}");
        assert!(
            text.contains("alice") && !text.contains("hunter2"),
            "{text}"
        );
        let host = RegistryHost {
            username: Some("alice".into()),
            password: Some("hunter2".into()),
            ..RegistryHost::default()
        };
        let text = format!("{host:?}");
        assert!(
            text.contains("alice") && !text.contains("hunter2"),
            "{text}"
        );
    }
}
