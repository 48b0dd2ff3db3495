//! `[metrics]`: where Prometheus scrapes `sandpitd`, validated once at
//! start-up into [`MetricsSettings`].
//!
//! ```toml
//! [metrics]
//! listen = "127.0.0.1:9464"   # the default; "off" serves no metrics
//! ```
//!
//! On by default, on loopback, like node_exporter's and containerd's
//! metrics: scraping needs no set-up on the host and nothing is exposed
//! beyond it. The endpoint has no authentication (the exporter norm): put
//! it on a non-loopback address only on a network trusted to read sandbox
//! ids and figures. An explicit address that cannot be bound fails the
//! start; the default one already taken (a second daemon on the host) only
//! turns metrics off, with a warning.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::ConfigError;

/// The default metrics address (the port OpenTelemetry's Prometheus
/// exporter uses).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// `[metrics]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetrics {
    listen: Option<String>,
}

/// `[metrics]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Where `/metrics` is served; `None`: nowhere.
    pub listen: Option<SocketAddr>,
    /// Whether the address was asked for (a flag or the file) rather than
    /// the default: only then does failing to bind it fail the start.
    pub explicit: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        FileMetrics::default()
            .resolve(None)
            .expect("the default is valid")
    }
}

impl FileMetrics {
    /// Validates the file's values, `flag` (`--metrics-listen`) first.
    pub fn resolve(self, flag: Option<String>) -> Result<MetricsSettings, ConfigError> {
        let explicit = flag.is_some() || self.listen.is_some();
        let text = flag
            .or(self.listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        if text.trim() == "off" {
            return Ok(MetricsSettings {
                listen: None,
                explicit,
            });
        }
        let addr: SocketAddr = text.trim().parse().map_err(|_| ConfigError::Invalid {
            key: "metrics.listen",
            reason: format!("{text:?} is not an address like 127.0.0.1:9464, [::1]:9464 or off"),
        })?;
        Ok(MetricsSettings {
            listen: Some(addr),
            explicit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, flag: Option<&str>) -> Result<MetricsSettings, ConfigError> {
        let file: FileMetrics = toml::from_str(text).unwrap();
        file.resolve(flag.map(str::to_owned))
    }

    #[test]
    fn the_default_is_loopback_and_not_explicit() {
        let s = MetricsSettings::default();
        assert_eq!(s.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(!s.explicit);
    }

    #[test]
    fn the_flag_wins_over_the_file_and_off_turns_it_off() {
        let s = parse("listen = \"0.0.0.0:9100\"", None).unwrap();
        assert_eq!(s.listen, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(s.explicit);
        let s = parse("listen = \"0.0.0.0:9100\"", Some("[::1]:9200")).unwrap();
        assert_eq!(s.listen, Some("[::1]:9200".parse().unwrap()));
        assert_eq!(parse("listen = \"off\"", None).unwrap().listen, None);
    }

    #[test]
    fn a_bad_address_names_the_key_and_the_value() {
        let e = parse("listen = \"localhost\"", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics.listen") && e.contains("\"localhost\""),
            "{e}"
        );
        let e = parse("", Some("9464")).unwrap_err().to_string();
        assert!(e.contains("metrics.listen"), "{e}");
        assert!(toml::from_str::<FileMetrics>("port = 1").is_err());
    }
}
