//! `[console]`: the web console (see `console/`), off by default. Validated
//! once at start-up into [`ConsoleSettings`].
//!
//! ```toml
//! [console]
//! enabled = false                 # `--console-listen ADDR` enables it too
//! listen = "127.0.0.1:8080"
//! origins = []                    # extra browser origins for its websockets, e.g. a TLS proxy's
//! ```
//!
//! The console has no TLS of its own: like the gRPC listener, a
//! non-loopback address needs `insecure` (put it behind a TLS proxy).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::ConfigError;

/// The default listen address.
pub const DEFAULT_CONSOLE_LISTEN: &str = "127.0.0.1:8080";

/// `[console]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConsole {
    enabled: Option<bool>,
    listen: Option<String>,
    origins: Option<Vec<String>>,
}

/// `[console]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSettings {
    /// Whether the console listens at all.
    pub enabled: bool,
    /// Where.
    pub listen: SocketAddr,
    /// Origins accepted for websockets besides the listen address's own
    /// (`scheme://host[:port]`, no path).
    pub origins: Vec<String>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        FileConsole::default()
            .resolve(None, false)
            .expect("the defaults are valid")
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl FileConsole {
    /// Validates every key; `flag` (`--console-listen`) replaces the file's
    /// address and enables the console. `insecure` allows a non-loopback
    /// address.
    pub fn resolve(
        self,
        flag: Option<&str>,
        insecure: bool,
    ) -> Result<ConsoleSettings, ConfigError> {
        let enabled = flag.is_some() || self.enabled.unwrap_or(false);
        let text = flag
            .or(self.listen.as_deref())
            .unwrap_or(DEFAULT_CONSOLE_LISTEN);
        let listen: SocketAddr = text.parse().map_err(|_| {
            invalid(
                "console.listen",
                format!("{text:?} is not an address like 127.0.0.1:8080"),
            )
        })?;
        if enabled && !listen.ip().is_loopback() && !insecure {
            return Err(invalid(
                "console.listen",
                format!(
                    "{listen} is not a loopback address: the console has no TLS; serve it \
                     through a TLS proxy and allow plaintext with --insecure"
                ),
            ));
        }
        let origins = self.origins.unwrap_or_default();
        for o in &origins {
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains('/') => {}
                _ => {
                    return Err(invalid(
                        "console.origins",
                        format!("{o:?} is not an origin like https://console.example.com"),
                    ))
                }
            }
        }
        Ok(ConsoleSettings {
            enabled,
            listen,
            origins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        text: &str,
        flag: Option<&str>,
        insecure: bool,
    ) -> Result<ConsoleSettings, ConfigError> {
        let f: FileConsole = toml::from_str(text).unwrap();
        f.resolve(flag, insecure)
    }

    #[test]
    fn off_by_default_and_the_flag_enables_it() {
        let d = ConsoleSettings::default();
        assert!(!d.enabled);
        assert_eq!(d.listen.to_string(), DEFAULT_CONSOLE_LISTEN);
        let s = parse("listen = \"127.0.0.1:9\"", Some("127.0.0.1:7"), false).unwrap();
        assert!(s.enabled);
        assert_eq!(s.listen.port(), 7);
        let s = parse(
            "enabled = true\norigins = [\"https://c.example\"]",
            None,
            false,
        )
        .unwrap();
        assert!(s.enabled);
        assert_eq!(s.origins, ["https://c.example"]);
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, flag, key) in [
            ("listen = \"nowhere\"", None, "console.listen"),
            (
                "enabled = true\nlisten = \"0.0.0.0:8080\"",
                None,
                "console.listen",
            ),
            ("", Some("10.0.0.1:80"), "console.listen"),
            ("origins = [\"c.example\"]", None, "console.origins"),
            (
                "origins = [\"https://c.example/app\"]",
                None,
                "console.origins",
            ),
        ] {
            match parse(text, flag, false) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        // Off, any address is only stored; --insecure allows a remote one.
        assert!(parse("listen = \"0.0.0.0:8080\"", None, false).is_ok());
        assert!(parse("", Some("0.0.0.0:8080"), true).is_ok());
    }
}
