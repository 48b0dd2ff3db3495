//! The daemon's configuration: an optional TOML file, then command-line
//! flags (and `SANDPIT_API_KEYS`), validated once at start-up into
//! [`Config`]. Keys from every source add up; any other flag replaces the
//! file's value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandpit_registry::RegistryConfig;
use serde::Deserialize;

use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory};

use crate::auth::ApiKey;
use crate::manager::ManagerConfig;
use crate::model::{ResourceSpec, Resources};
use crate::secrets::SecretStoreConfig;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandpit";
/// Smallest accepted message limit: the client writes files of up to
/// 32 MiB in one message, plus framing.
pub const MIN_MESSAGE_BYTES: usize = 33 << 20;

/// Errors of the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parse config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is not acceptable.
    #[error("invalid {key}: {reason}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not text or json")),
        }
    }
}

/// An API key in the file: a bare string, or a table with a name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum FileKey {
    Plain(String),
    Named {
        name: String,
        key: String,
        #[serde(default)]
        organization: Option<String>,
    },
}

/// CPU and memory quantities as the file spells them (`"500m"`, `"1Gi"`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuantities {
    cpu: Option<String>,
    memory: Option<String>,
}

/// `[resources]`: what a sandbox that asks for nothing gets.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileResources {
    default_requests: Option<FileQuantities>,
    default_limits: Option<FileQuantities>,
}

/// The longest `max_max_lifetime_seconds` accepted: 30 days.
pub const MAX_LIFETIME_CEILING: u32 = 30 * 24 * 3600;

/// The TOML file, every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    api_keys: Option<Vec<FileKey>>,
    log_format: Option<LogFormat>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure: Option<bool>,
    runner_id: Option<String>,
    organization_id: Option<String>,
    resources: Option<FileResources>,
    default_max_lifetime_seconds: Option<u32>,
    max_max_lifetime_seconds: Option<u32>,
    retention_seconds: Option<u64>,
    lifetime_grace_seconds: Option<u32>,
    gc_interval_seconds: Option<u64>,
    max_sandboxes: Option<usize>,
    max_message_bytes: Option<usize>,
    max_file_bytes: Option<u64>,
    max_log_bytes: Option<u64>,
    pids_max: Option<u64>,
    agent_binary: Option<PathBuf>,
    spawner_binary: Option<PathBuf>,
    cgroup_parent: Option<String>,
    secret_stores: Option<BTreeMap<String, SecretStoreConfig>>,
    registry: Option<RegistryConfig>,
    network: Option<crate::netconfig::FileNetwork>,
    storage: Option<crate::storageconfig::FileStorage>,
    limits: Option<crate::limitsconfig::FileLimits>,
    console: Option<crate::consoleconfig::FileConsole>,
    metrics: Option<crate::metricsconfig::FileMetrics>,
    pool: Option<Vec<crate::poolconfig::FilePool>>,
    cluster: Option<crate::clusterconfig::FileCluster>,
}

/// What a sandbox that asks for nothing gets when `[resources]` does not
/// say: a small request (so that a host admits many idle sandboxes) and
/// limits that keep one tenant from taking the host: one CPU, 1 GiB.
pub const DEFAULT_RESOURCES: ResourceSpec = ResourceSpec {
    requests: Resources {
        cpu_millis: Some(50),
        memory_bytes: Some(128 << 20),
    },
    limits: Resources {
        cpu_millis: Some(1000),
        memory_bytes: Some(1 << 30),
    },
};

impl FileResources {
    /// Each quantity the file leaves out takes [`DEFAULT_RESOURCES`]'; `"0"`
    /// leaves it unset (no request, no limit).
    fn resolve(self) -> Result<ResourceSpec, ConfigError> {
        let side = |q: Option<FileQuantities>,
                    field: &str,
                    d: Resources|
         -> Result<Resources, ConfigError> {
            let q = q.unwrap_or_default();
            let cpu = match q.cpu {
                None => d.cpu_millis,
                Some(c) if c.trim() == "0" => None,
                Some(c) => Some(
                    parse_cpu_millis(&c)
                        .map_err(|e| invalid("resources", format!("{field}.cpu: {e}")))?,
                ),
            };
            let memory = match q.memory {
                None => d.memory_bytes,
                Some(m) if m.trim() == "0" => None,
                Some(m) => Some(
                    parse_memory(&m)
                        .map_err(|e| invalid("resources", format!("{field}.memory: {e}")))?,
                ),
            };
            Ok(Resources {
                cpu_millis: cpu,
                memory_bytes: memory,
            })
        };
        let requests = side(
            self.default_requests,
            "default_requests",
            DEFAULT_RESOURCES.requests,
        )?;
        let limits = side(
            self.default_limits,
            "default_limits",
            DEFAULT_RESOURCES.limits,
        )?;
        let over = |r: Option<u64>, l: Option<u64>| matches!((r, l), (Some(r), Some(l)) if r > l);
        if over(requests.cpu_millis, limits.cpu_millis)
            || over(requests.memory_bytes, limits.memory_bytes)
        {
            return Err(invalid(
                "resources",
                "a default request exceeds its default limit",
            ));
        }
        Ok(ResourceSpec { requests, limits })
    }
}

impl FileConfig {
    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

/// What the command line (and environment) says.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--api-key` (repeatable) and `SANDPIT_API_KEYS`.
    pub api_keys: Vec<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--insecure`.
    pub insecure: bool,
    /// `--console-listen` (enables the console).
    pub console_listen: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
}

/// Certificate chain and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where everything is kept.
    pub data_dir: PathBuf,
    /// Configured keys; empty means "use or generate `<data-dir>/api-key`".
    pub api_keys: Vec<ApiKey>,
    /// Log format.
    pub log_format: LogFormat,
    /// TLS, when configured.
    pub tls: Option<TlsFiles>,
    /// Plaintext on a non-loopback address was explicitly allowed.
    pub insecure: bool,
    /// This runner's id in discovery and sandbox statuses.
    pub runner_id: String,
    /// The organization discovery reports for callers whose key names none.
    pub organization_id: String,
    /// Lifecycle policy.
    pub manager: ManagerConfig,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Largest file moved by one ReadFile/WriteFile message.
    pub max_file_bytes: u64,
    /// Main-process output kept per sandbox (the oldest is dropped).
    pub max_log_bytes: u64,
    /// Task limit per sandbox (`None`: unlimited).
    pub pids_max: Option<u64>,
    /// The static agent binary.
    pub agent_binary: PathBuf,
    /// The `sandpit-spawn` helper.
    pub spawner_binary: PathBuf,
    /// Parent cgroup of every sandbox.
    pub cgroup_parent: String,
    /// Secret stores for `image_pull_credentials` and `secret_stores`, by
    /// name.
    pub secret_stores: BTreeMap<String, SecretStoreConfig>,
    /// Registries, mirrors and caps for image pulls (`[registry]`).
    pub registry: RegistryConfig,
    /// The sandbox network (`[network]`).
    pub network: crate::netconfig::NetworkSettings,
    /// Volumes and snapshots (`[storage]`).
    pub storage: crate::storageconfig::StorageSettings,
    /// What one tenant may take of the host (`[limits]`).
    pub limits: crate::limitsconfig::LimitsSettings,
    /// The web console (`[console]`).
    pub console: crate::consoleconfig::ConsoleSettings,
    /// Where Prometheus scrapes (`[metrics]`).
    pub metrics: crate::metricsconfig::MetricsSettings,
    /// Warm pools (`[[pool]]`); empty: none.
    pub pools: Vec<crate::poolconfig::PoolSettings>,
    /// This process's role in a cluster (`[cluster]`); `None`: a single host.
    pub cluster: Option<crate::clusterconfig::ClusterSettings>,
}

impl Config {
    /// The image store.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    /// Per-sandbox engine state.
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("sandboxes")
    }

    /// The database.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("sandpitd.db")
    }

    /// Kept output of main processes.
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// The generated key, when none is configured.
    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join("api-key")
    }

    /// Merges the file (if any), flags and `SANDPIT_API_KEYS` (`env_keys`)
    /// and validates the result.
    pub fn load(
        file: Option<&Path>,
        overrides: Overrides,
        env_keys: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let file = match file {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, overrides, env_keys)
    }

    /// [`Config::load`] with the file already parsed.
    pub fn resolve(
        file: FileConfig,
        o: Overrides,
        env_keys: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let listen_text = o
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{listen_text:?} is not an address like 127.0.0.1:50051 or [::1]:50051"),
            )
        })?;
        let data_dir = o
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }

        let mut api_keys = Vec::new();
        for k in file.api_keys.unwrap_or_default() {
            api_keys.push(match k {
                FileKey::Plain(key) => ApiKey {
                    key,
                    name: None,
                    organization: None,
                },
                FileKey::Named {
                    name,
                    key,
                    organization,
                } => {
                    if name.is_empty() {
                        return Err(invalid("api_keys", "a key's name must not be empty"));
                    }
                    if organization.as_deref() == Some("") {
                        return Err(invalid(
                            "api_keys",
                            "a key's organization must not be empty",
                        ));
                    }
                    ApiKey {
                        key,
                        name: Some(name),
                        organization,
                    }
                }
            });
        }
        let env = env_keys
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned);
        for key in o.api_keys.into_iter().chain(env) {
            api_keys.push(ApiKey {
                key,
                name: None,
                organization: None,
            });
        }
        for k in &api_keys {
            if k.key.trim().is_empty() || k.key.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "api_keys",
                    "keys must be non-empty and without whitespace",
                ));
            }
        }

        let tls = match (o.tls_cert.or(file.tls_cert), o.tls_key.or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(invalid("tls", "give both a certificate and a key")),
        };
        let insecure = o.insecure || file.insecure.unwrap_or(false);
        if tls.is_none() && !listen.ip().is_loopback() && !insecure {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is not a loopback address: configure TLS (--tls-cert, --tls-key) \
                     or allow plaintext with --insecure"
                ),
            ));
        }

        let defaults = ManagerConfig::default();
        let default_lifetime = file
            .default_max_lifetime_seconds
            .unwrap_or(defaults.default_max_lifetime_seconds);
        let max_lifetime = file
            .max_max_lifetime_seconds
            .unwrap_or(defaults.max_max_lifetime_seconds);
        if default_lifetime == 0 {
            return Err(invalid(
                "default_max_lifetime_seconds",
                "must be at least 1",
            ));
        }
        if max_lifetime < default_lifetime {
            return Err(invalid(
                "max_max_lifetime_seconds",
                format!(
                    "{max_lifetime} is below default_max_lifetime_seconds ({default_lifetime})"
                ),
            ));
        }
        if max_lifetime > MAX_LIFETIME_CEILING {
            return Err(invalid(
                "max_max_lifetime_seconds",
                format!("{max_lifetime} is above {MAX_LIFETIME_CEILING} (30 days)"),
            ));
        }
        let default_resources = file.resources.unwrap_or_default().resolve()?;
        let limits = file.limits.unwrap_or_default().resolve()?;
        let metrics = file.metrics.unwrap_or_default().resolve(o.metrics_listen)?;
        let pools = crate::poolconfig::resolve(file.pool.unwrap_or_default())?;
        let cluster = file.cluster.map(|c| c.resolve()).transpose()?;
        let organization_id = file.organization_id.unwrap_or_else(|| "default".into());
        if organization_id.is_empty() {
            return Err(invalid("organization_id", "must not be empty"));
        }
        let gc_interval = file
            .gc_interval_seconds
            .map_or(defaults.gc_interval, Duration::from_secs);
        if gc_interval.is_zero() {
            return Err(invalid("gc_interval_seconds", "must be at least 1"));
        }
        let max_sandboxes = file.max_sandboxes.unwrap_or(defaults.max_sandboxes);
        if max_sandboxes == 0 {
            return Err(invalid("max_sandboxes", "must be at least 1"));
        }
        let max_message_bytes = file.max_message_bytes.unwrap_or(100 << 20);
        if max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(invalid(
                "max_message_bytes",
                format!(
                    "{max_message_bytes} is below {MIN_MESSAGE_BYTES} (the client writes files of up to 32 MiB)"
                ),
            ));
        }
        let max_file_bytes = file
            .max_file_bytes
            .unwrap_or(crate::api::files::DEFAULT_MAX_FILE_BYTES);
        if max_file_bytes == 0 {
            return Err(invalid("max_file_bytes", "must be at least 1"));
        }
        // Room for the message's own framing.
        if max_file_bytes > (max_message_bytes as u64).saturating_sub(1 << 20) {
            return Err(invalid(
                "max_file_bytes",
                format!(
                    "{max_file_bytes} does not fit in max_message_bytes ({max_message_bytes}) \
                     with 1 MiB to spare"
                ),
            ));
        }
        let max_log_bytes = file
            .max_log_bytes
            .unwrap_or(crate::logs::DEFAULT_MAX_LOG_BYTES);
        if max_log_bytes < crate::logs::MIN_MAX_LOG_BYTES {
            return Err(invalid(
                "max_log_bytes",
                format!(
                    "{max_log_bytes} is below {}",
                    crate::logs::MIN_MAX_LOG_BYTES
                ),
            ));
        }
        let cgroup_parent = file.cgroup_parent.unwrap_or_else(|| "sandpit".into());
        if cgroup_parent.is_empty() || cgroup_parent.contains('/') || cgroup_parent.starts_with('.')
        {
            return Err(invalid(
                "cgroup_parent",
                format!("{cgroup_parent:?} must be a single directory name"),
            ));
        }
        let secret_stores = file.secret_stores.unwrap_or_default();
        for (name, store) in &secret_stores {
            store
                .validate(name)
                .map_err(|why| invalid("secret_stores", why))?;
        }
        let registry = file.registry.unwrap_or_default();
        registry
            .validate()
            .map_err(|e| invalid("registry", e.to_string()))?;
        // The host's resolvers are the default upstreams of sandboxes' DNS.
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let network = file.network.unwrap_or_default().resolve(&host_resolv)?;
        let storage = file.storage.unwrap_or_default().resolve()?;
        let console = file
            .console
            .unwrap_or_default()
            .resolve(o.console_listen.as_deref(), insecure)?;
        let runner_id = match file.runner_id {
            Some(id) if id.is_empty() => return Err(invalid("runner_id", "must not be empty")),
            Some(id) => id,
            None => default_runner_id(),
        };

        Ok(Self {
            listen,
            data_dir,
            api_keys,
            log_format: o.log_format.or(file.log_format).unwrap_or_default(),
            tls,
            insecure,
            runner_id,
            manager: ManagerConfig {
                default_max_lifetime_seconds: default_lifetime,
                max_max_lifetime_seconds: max_lifetime,
                retention: file
                    .retention_seconds
                    .map_or(defaults.retention, Duration::from_secs),
                lifetime_grace: file
                    .lifetime_grace_seconds
                    .map_or(defaults.lifetime_grace, |s| Duration::from_secs(s.into())),
                gc_interval,
                max_sandboxes,
                default_resources,
                // Filled in from the host at start-up (see `main.rs`).
                allocatable: Default::default(),
                disk: limits.disk,
            },
            organization_id,
            max_message_bytes,
            max_file_bytes,
            max_log_bytes,
            // 0 in the file means unlimited (TOML has no null).
            pids_max: match file.pids_max {
                None => Some(4096),
                Some(0) => None,
                Some(n) => Some(n),
            },
            agent_binary: file
                .agent_binary
                .unwrap_or_else(sandpit_runtime::default_agent_binary),
            spawner_binary: file
                .spawner_binary
                .unwrap_or_else(sandpit_runtime::default_spawner_binary),
            cgroup_parent,
            secret_stores,
            registry,
            network,
            storage,
            limits,
            console,
            metrics,
            pools,
            cluster,
        })
    }
}

fn default_runner_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sandpit".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str, o: Overrides, env: Option<&str>) -> Result<Config, ConfigError> {
        Config::resolve(FileConfig::parse(toml).unwrap(), o, env)
    }

    #[test]
    fn defaults() {
        let c = resolve("", Overrides::default(), None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert!(c.api_keys.is_empty());
        assert_eq!(c.manager.default_max_lifetime_seconds, 3600);
        assert_eq!(c.manager.max_max_lifetime_seconds, 86_400);
        assert_eq!(c.manager.retention, Duration::from_secs(3600));
        assert_eq!(c.manager.lifetime_grace, Duration::from_secs(10));
        assert_eq!(c.max_message_bytes, 100 << 20);
        assert_eq!(c.cgroup_parent, "sandpit");
        assert_eq!(c.pids_max, Some(4096));
        assert_eq!(c.db_path(), Path::new("/var/lib/sandpit/sandpitd.db"));
        assert_eq!(c.store_dir(), Path::new("/var/lib/sandpit/store"));
        assert_eq!(c.organization_id, "default");
        assert_eq!(c.manager.default_resources, DEFAULT_RESOURCES);
        assert_eq!(c.limits, crate::limitsconfig::LimitsSettings::default());
    }

    #[test]
    fn a_resource_set_to_zero_is_left_unset() {
        let c = resolve(
            "[resources]\ndefault_requests = { cpu = \"0\" }\ndefault_limits = { memory = \"0\", cpu = \"2\" }",
            Overrides::default(),
            None,
        )
        .unwrap();
        let r = c.manager.default_resources;
        assert_eq!(r.requests.cpu_millis, None);
        assert_eq!(
            r.requests.memory_bytes,
            DEFAULT_RESOURCES.requests.memory_bytes
        );
        assert_eq!(r.limits.memory_bytes, None);
        assert_eq!(r.limits.cpu_millis, Some(2000));
    }

    #[test]
    fn resources_organizations_and_lifetimes() {
        let toml = r#"
            organization_id = "research"
            max_max_lifetime_seconds = 2592000
            api_keys = [{ name = "alice", key = "k-alice", organization = "acme" }]
            [resources]
            default_requests = { cpu = "250m", memory = "256Mi" }
            default_limits = { cpu = "2", memory = "2Gi" }
        "#;
        let c = resolve(toml, Overrides::default(), None).unwrap();
        assert_eq!(c.organization_id, "research");
        assert_eq!(c.manager.max_max_lifetime_seconds, 30 * 24 * 3600);
        assert_eq!(c.api_keys[0].organization.as_deref(), Some("acme"));
        let r = c.manager.default_resources;
        assert_eq!(r.requests.cpu_millis, Some(250));
        assert_eq!(r.requests.memory_bytes, Some(256 << 20));
        assert_eq!(r.limits.cpu_millis, Some(2000));
        assert_eq!(r.limits.memory_bytes, Some(2 << 30));
    }

    #[test]
    fn flags_override_the_file_and_keys_add_up() {
        let toml = r#"
            listen = "127.0.0.1:1"
            data_dir = "/from/file"
            log_format = "json"
            api_keys = ["plain", { name = "alice", key = "k-alice" }]
            retention_seconds = 60
            pids_max = 0
        "#;
        let o = Overrides {
            listen: Some("127.0.0.1:2".into()),
            api_keys: vec!["flag".into()],
            ..Default::default()
        };
        let c = resolve(toml, o, Some("env1, env2,")).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, Path::new("/from/file"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.manager.retention, Duration::from_secs(60));
        assert_eq!(c.pids_max, None);
        let keys: Vec<_> = c.api_keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["plain", "k-alice", "flag", "env1", "env2"]);
        assert_eq!(c.api_keys[1].name.as_deref(), Some("alice"));
    }

    #[test]
    fn non_loopback_needs_tls_or_insecure() {
        let o = |insecure| Overrides {
            listen: Some("0.0.0.0:50051".into()),
            insecure,
            ..Default::default()
        };
        let e = resolve("", o(false), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid listen: 0.0.0.0:50051 is not a loopback"),
            "{e}"
        );
        assert!(resolve("", o(true), None).is_ok());
        let tls = Overrides {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..o(false)
        };
        assert!(resolve("", tls, None).unwrap().tls.is_some());
        assert!(resolve(
            "",
            Overrides {
                listen: Some("[::1]:5".into()),
                ..Default::default()
            },
            None
        )
        .is_ok());
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "default_max_lifetime_seconds = 0",
                "default_max_lifetime_seconds",
            ),
            (
                "default_max_lifetime_seconds = 100\nmax_max_lifetime_seconds = 10",
                "max_max_lifetime_seconds",
            ),
            ("max_message_bytes = 1000", "max_message_bytes"),
            ("cgroup_parent = \"a/b\"", "cgroup_parent"),
            ("tls_cert = \"c.pem\"", "tls"),
            ("listen = \"localhost\"", "listen"),
            ("api_keys = [\"has space\"]", "api_keys"),
            ("max_sandboxes = 0", "max_sandboxes"),
            // Above 30 days.
            (
                "max_max_lifetime_seconds = 2592001",
                "max_max_lifetime_seconds",
            ),
            ("organization_id = \"\"", "organization_id"),
            (
                "[resources]\ndefault_requests = { cpu = \"2\" }\ndefault_limits = { cpu = \"1\" }",
                "resources",
            ),
            (
                "[resources]\ndefault_limits = { memory = \"lots\" }",
                "resources",
            ),
            (
                "api_keys = [{ name = \"a\", key = \"k\", organization = \"\" }]",
                "api_keys",
            ),
        ];
        for (toml, key) in cases {
            match resolve(toml, Overrides::default(), None) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(FileConfig::parse("lisen = \"x\"").is_err());
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "runner_id = \"r1\"\n").unwrap();
        let c = Config::load(Some(&p), Overrides::default(), None).unwrap();
        assert_eq!(c.runner_id, "r1");
        assert!(matches!(
            Config::load(Some(&dir.path().join("nope")), Overrides::default(), None),
            Err(ConfigError::Read { .. })
        ));
    }
}
