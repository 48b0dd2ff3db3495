//! `[limits]`: what one tenant may take of this host, validated once at
//! start-up into [`LimitsSettings`]. Every key is optional and the defaults
//! are safe without a config: writable layers of 10 GiB, creates refused
//! below a reserve of free space in the data dir, admission against the
//! host's CPUs and memory less a system share, LXCFS views when installed.
//!
//! ```toml
//! [limits]
//! ephemeral_storage = "10Gi"      # writable layer of a sandbox that asks for none; "0": unbounded
//! max_ephemeral_storage = "1Ti"   # the most `sandpit.dev/ephemeral-storage` may ask for
//! disk_pool = 8                   # writable layers of the default size kept formatted (0: none)
//! data_dir_reserve = "auto"       # free bytes creates never eat into ("auto": 5% of the disk, 1-20 GiB)
//! allocatable_cpu = "auto"        # CPU admitted by requests ("auto": the CPUs sandpitd may use)
//! allocatable_memory = "auto"     # memory admitted by requests ("auto": MemTotal less a tenth, 0.5-4 GiB)
//! lxcfs = "auto"                  # "auto": LXCFS views of /proc when lxcfs is installed; "off"; or a mounted LXCFS
//! ```
//!
//! The per-sandbox CPU, memory and pids defaults are `[resources]` and
//! `pids_max` (see `config.rs`).

use std::path::PathBuf;

use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory, QuantityError};
use serde::Deserialize;

use crate::api::validate::DiskPolicy;
use crate::config::ConfigError;

/// `[limits]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    ephemeral_storage: Option<String>,
    max_ephemeral_storage: Option<String>,
    disk_pool: Option<usize>,
    data_dir_reserve: Option<String>,
    allocatable_cpu: Option<String>,
    allocatable_memory: Option<String>,
    lxcfs: Option<String>,
}

/// Where sandboxes' `/proc` views come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LxcfsMode {
    /// Start (or reuse) LXCFS when it is installed; the host's views
    /// otherwise, with a warning.
    Auto,
    /// The host's views.
    Off,
    /// An LXCFS already mounted there.
    At(PathBuf),
}

/// `[limits]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsSettings {
    /// Sizes of writable layers.
    pub disk: DiskPolicy,
    /// Writable layers of the default size kept formatted.
    pub disk_pool: usize,
    /// Free bytes of the data dir creates never take; `None`: computed
    /// from the disk's size at start-up.
    pub data_dir_reserve: Option<u64>,
    /// CPU admitted (millicores); `None`: the host's.
    pub allocatable_cpu: Option<u64>,
    /// Memory admitted (bytes); `None`: the host's less a system share.
    pub allocatable_memory: Option<u64>,
    /// LXCFS.
    pub lxcfs: LxcfsMode,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        FileLimits::default()
            .resolve()
            .expect("the defaults are valid")
    }
}

/// The default writable layer.
pub const DEFAULT_EPHEMERAL_STORAGE: u64 = 10 << 30;

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// `None` for "auto" (or absent), else the parsed quantity.
fn auto_or(
    key: &'static str,
    value: Option<&str>,
    parse: fn(&str) -> Result<u64, QuantityError>,
) -> Result<Option<u64>, ConfigError> {
    match value {
        None | Some("auto") => Ok(None),
        Some(v) => parse(v).map(Some).map_err(|e| invalid(key, e.to_string())),
    }
}

impl FileLimits {
    /// Validates every key.
    pub fn resolve(self) -> Result<LimitsSettings, ConfigError> {
        let bytes =
            |key: &'static str, v: &str| parse_memory(v).map_err(|e| invalid(key, e.to_string()));
        let max = match &self.max_ephemeral_storage {
            Some(v) => bytes("limits.max_ephemeral_storage", v)?,
            None => 1 << 40,
        };
        let default = match &self.ephemeral_storage {
            Some(v) if v.trim() == "0" => 0,
            Some(v) => bytes("limits.ephemeral_storage", v)?,
            None => DEFAULT_EPHEMERAL_STORAGE,
        };
        let min = crate::api::validate::MIN_DISK_BYTES;
        if default != 0 && default < min {
            return Err(invalid(
                "limits.ephemeral_storage",
                format!("{default} bytes is less than the {} MiB minimum", min >> 20),
            ));
        }
        if default > max {
            return Err(invalid(
                "limits.ephemeral_storage",
                "is more than limits.max_ephemeral_storage",
            ));
        }
        // The parsers refuse 0 and negative quantities themselves.
        let allocatable_cpu = auto_or(
            "limits.allocatable_cpu",
            self.allocatable_cpu.as_deref(),
            parse_cpu_millis,
        )?;
        let allocatable_memory = auto_or(
            "limits.allocatable_memory",
            self.allocatable_memory.as_deref(),
            parse_memory,
        )?;
        let data_dir_reserve = auto_or(
            "limits.data_dir_reserve",
            self.data_dir_reserve.as_deref(),
            parse_memory,
        )?;
        let lxcfs = match self.lxcfs.as_deref() {
            None | Some("auto") => LxcfsMode::Auto,
            Some("off") => LxcfsMode::Off,
            Some(p) if p.starts_with('/') => LxcfsMode::At(PathBuf::from(p)),
            Some(other) => {
                return Err(invalid(
                    "limits.lxcfs",
                    format!("{other:?} is not \"auto\", \"off\" or an absolute path"),
                ))
            }
        };
        Ok(LimitsSettings {
            disk: DiskPolicy {
                default_bytes: (default != 0).then_some(default),
                max_bytes: max,
            },
            disk_pool: self.disk_pool.unwrap_or(8),
            data_dir_reserve,
            allocatable_cpu,
            allocatable_memory,
            lxcfs,
        })
    }
}

/// The reserve of a data dir on a disk of `total` bytes when none is
/// configured: 5%, at least 1 GiB and at most 20 GiB (and never more than
/// half the disk: a small test disk still takes sandboxes).
pub fn auto_reserve(total: u64) -> u64 {
    (total / 20).clamp(1 << 30, 20 << 30).min(total / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<LimitsSettings, ConfigError> {
        let f: FileLimits = toml::from_str(toml_text).unwrap();
        f.resolve()
    }

    #[test]
    fn defaults_are_bounded() {
        let d = LimitsSettings::default();
        assert_eq!(d.disk.default_bytes, Some(10 << 30));
        assert_eq!(d.disk.max_bytes, 1 << 40);
        assert_eq!(d.disk_pool, 8);
        assert_eq!(d.lxcfs, LxcfsMode::Auto);
        assert_eq!(
            (d.allocatable_cpu, d.allocatable_memory, d.data_dir_reserve),
            (None, None, None)
        );
    }

    #[test]
    fn keys_are_parsed_and_checked() {
        let s = parse(
            "ephemeral_storage = \"0\"\nallocatable_cpu = \"1500m\"\nallocatable_memory = \"2Gi\"\n\
             data_dir_reserve = \"512Mi\"\nlxcfs = \"/run/x\"\ndisk_pool = 0",
        )
        .unwrap();
        assert_eq!(s.disk.default_bytes, None);
        assert_eq!(s.allocatable_cpu, Some(1500));
        assert_eq!(s.allocatable_memory, Some(2 << 30));
        assert_eq!(s.data_dir_reserve, Some(512 << 20));
        assert_eq!(s.lxcfs, LxcfsMode::At("/run/x".into()));
        for (text, key) in [
            ("ephemeral_storage = \"1Mi\"", "limits.ephemeral_storage"),
            ("ephemeral_storage = \"2Ti\"", "limits.ephemeral_storage"),
            ("allocatable_cpu = \"0\"", "limits.allocatable_cpu"),
            ("allocatable_memory = \"lots\"", "limits.allocatable_memory"),
            ("lxcfs = \"maybe\"", "limits.lxcfs"),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_automatic_reserve_scales_with_the_disk() {
        assert_eq!(auto_reserve(100 << 30), 5 << 30);
        assert_eq!(auto_reserve(1 << 40), 20 << 30);
        assert_eq!(auto_reserve(10 << 30), 1 << 30);
        assert_eq!(auto_reserve(1 << 30), 512 << 20);
    }
}
