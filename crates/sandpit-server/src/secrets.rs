//! Secrets in the daemon: the configured stores (`sandpit-secrets`: the
//! operator's directories and the encrypted managed store) and their two
//! uses, both through the one [`sandpit_secrets::Stores::resolve`]:
//!
//! - `image_pull_credentials`: a secret that is `username:password`, a JSON
//!   `{"username": ..., "password": ...}`, or, with `field`, a JSON object
//!   whose member `field` is either. Used only to authenticate a pull.
//! - `secret_stores`: values injected as environment variables of the
//!   sandbox (its main process and every exec), over the spawner's stdin
//!   and a memfd (never an argv).
//!
//! Values are [`SecretValue`]s (redacted `Debug`) from the moment they are
//! read until the engine hands them to the sandbox. They are never stored:
//! records and the spec returned by Get/List hold only the references.

use std::collections::BTreeMap;

use sandpit_registry::Credentials;

use crate::engine::RegistryCredentials;

pub use sandpit_secrets::{
    ManagedError, SecretError, SecretValue, StoreConfig as SecretStoreConfig, StoreKind,
};

/// What `image_pull_credentials` point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// Registry the credentials are for.
    pub registry: String,
    /// Store name.
    pub store: String,
    /// Path in the store.
    pub path: String,
    /// Member of a JSON secret; empty for the whole secret.
    pub field: String,
}

/// One secret a sandbox wants as an environment variable, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEnvRef {
    /// Where it was asked for
    /// (`sandbox.spec.containers[0].secret_stores[i].secrets[j]`).
    pub field_path: String,
    /// Store name.
    pub store: String,
    /// The secret's name (the mapping's `path`).
    pub name: String,
    /// Member of a JSON secret; empty for the whole secret.
    pub field: String,
    /// The variable it becomes.
    pub env_var: String,
}

/// The field of `SecretSource` a pull-credentials error is about.
pub fn pull_field(e: &SecretError) -> &'static str {
    match e {
        SecretError::UnknownStore(_) => "store_name",
        SecretError::BadName { .. } | SecretError::NotFound { .. } => "path",
        SecretError::NoField { .. } | SecretError::Unusable { .. } => "field",
    }
}

/// The configured stores.
#[derive(Debug, Clone, Default)]
pub struct SecretStores {
    stores: sandpit_secrets::Stores,
}

impl SecretStores {
    /// Stores by name.
    pub fn new(stores: BTreeMap<String, SecretStoreConfig>) -> Self {
        Self {
            stores: sandpit_secrets::Stores::new(stores),
        }
    }

    /// Creates what the managed stores lack (directory, key) and checks
    /// their keys: at start-up, so that a bad key file stops the daemon
    /// instead of every sandbox that needs it.
    pub fn init_managed(&self) -> Result<(), (String, ManagedError)> {
        for (name, config) in self.stores.iter() {
            if let Some(m) = config.managed(name) {
                m.init().map_err(|e| (name.clone(), e))?;
            }
        }
        Ok(())
    }

    /// The value a sandbox's secret mapping points at.
    pub fn resolve_env(&self, r: &SecretEnvRef) -> Result<SecretValue, SecretError> {
        self.stores.resolve(&r.store, &r.name, &r.field)
    }

    /// Reads the credentials `r` points at.
    pub fn resolve(&self, r: &SecretRef) -> Result<RegistryCredentials, SecretError> {
        let value = self.stores.resolve(&r.store, &r.path, &r.field)?;
        let credentials =
            parse_credentials(value.expose()).ok_or_else(|| SecretError::Unusable {
                store: r.store.clone(),
                name: r.path.clone(),
                why: "not username:password nor {\"username\", \"password\"}".into(),
            })?;
        Ok(RegistryCredentials {
            registry: r.registry.clone(),
            credentials,
        })
    }
}

/// `username:password`, or a JSON object of both.
fn parse_credentials(text: &str) -> Option<Credentials> {
    let text = text.trim();
    if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let username = v.get("username")?.as_str()?;
        let password = v.get("password")?.as_str()?;
        return (!username.is_empty()).then(|| Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        });
    }
    let (user, password) = text.split_once(':')?;
    (!user.is_empty()).then(|| Credentials {
        username: user.to_owned(),
        password: password.to_owned(),
    })
}

/// A directory store's path: relative, of plain names. The error reads
/// `"x" is not a relative path of plain names`.
pub fn check_path(path: &str) -> Result<(), String> {
    sandpit_secrets::dir::check_path(path).map_err(|why| format!("{path:?} is {why}"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn stores(dir: &Path) -> SecretStores {
        SecretStores::new(BTreeMap::from([(
            "local".to_owned(),
            SecretStoreConfig {
                dir: dir.to_owned(),
                ..Default::default()
            },
        )]))
    }

    fn sref(path: &str, field: &str) -> SecretRef {
        SecretRef {
            registry: "ghcr.io".into(),
            store: "local".into(),
            path: path.into(),
            field: field.into(),
        }
    }

    fn user_password(c: &RegistryCredentials) -> (&str, &str) {
        (
            c.credentials.username.as_str(),
            c.credentials.password.as_str(),
        )
    }

    #[test]
    fn credential_formats_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("team")).unwrap();
        std::fs::write(dir.path().join("team/plain"), "bot:s3cr:et\n").unwrap();
        std::fs::write(
            dir.path().join("team/json"),
            r#"{"username": "u", "password": "p"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("bundle"),
            r#"{"ghcr": {"username": "g", "password": "x"}, "quay": "q:y", "n": 3}"#,
        )
        .unwrap();
        let s = stores(dir.path());
        let c = s.resolve(&sref("team/plain", "")).unwrap();
        assert_eq!(c.registry, "ghcr.io");
        assert_eq!(user_password(&c), ("bot", "s3cr:et"));
        let c = s.resolve(&sref("team/json", "")).unwrap();
        assert_eq!(user_password(&c), ("u", "p"));
        let c = s.resolve(&sref("bundle", "ghcr")).unwrap();
        assert_eq!(user_password(&c), ("g", "x"));
        let c = s.resolve(&sref("bundle", "quay")).unwrap();
        assert_eq!(user_password(&c), ("q", "y"));

        let e = s.resolve(&sref("bundle", "n")).unwrap_err();
        assert_eq!(pull_field(&e), "field");
        let e = s.resolve(&sref("bundle", "nope")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret \"bundle\" in store \"local\": has no field \"nope\""
        );
        assert_eq!(pull_field(&e), "field");
        let e = s.resolve(&sref("team/missing", "")).unwrap_err();
        assert_eq!(pull_field(&e), "path");
        let e = s
            .resolve(&SecretRef {
                store: "vault".into(),
                ..sref("x", "")
            })
            .unwrap_err();
        assert_eq!(e, SecretError::UnknownStore("vault".into()));
        assert_eq!(pull_field(&e), "store_name");
        assert_eq!(
            check_path("../x").unwrap_err(),
            "\"../x\" is not a relative path of plain names"
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = RegistryCredentials {
            registry: "r".into(),
            credentials: Credentials {
                username: "u".into(),
                password: "hunter2".into(),
            },
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
