//! Secret stores: where the values behind a sandbox's `secret_stores` (and
//! its `image_pull_credentials`) come from. Shared by `sandpitd`, which
//! resolves them, and `sandpit secret`, which fills the managed kind.
//!
//! Two kinds, configured as `[secret_stores.NAME]`:
//!
//! - `dir` (the default): a directory the operator fills, one file per
//!   secret, named by a relative path of plain names. Read component by
//!   component without following symlinks ([`dir`]).
//! - `managed`: one encrypted file per secret under `dir`, sealed with
//!   XChaCha20-Poly1305 under the 32-byte key in `key_file`; written only
//!   by `sandpit secret` ([`managed`]).
//!
//! A value is the secret's content; with a `field`, the secret is a JSON
//! object and the value is that member (a string as is, anything else as
//! its JSON text). Values are [`SecretValue`]s: their `Debug` is redacted
//! and their memory is wiped when dropped. No error of this crate ever
//! carries a value: errors name the store, the secret and the field.

pub mod dir;
pub mod managed;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use zeroize::Zeroizing;

pub use managed::{ManagedError, ManagedStore};

/// Largest secret read or stored.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// A secret's value. `Debug` never shows it; it is wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value itself: for the one place that hands it on (a sandbox's
    /// environment, a registry's `Authorization`).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// The kind of a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A directory of plain files the operator fills.
    #[default]
    Dir,
    /// Encrypted files written by `sandpit secret`.
    Managed,
}

/// One `[secret_stores.NAME]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `dir` (default) or `managed`.
    #[serde(default)]
    pub kind: StoreKind,
    /// Where the secrets are.
    pub dir: PathBuf,
    /// The managed store's key (32 bytes, mode 0600); only for `managed`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl StoreConfig {
    /// Checks a store as configured under `name`; the error names what is
    /// wrong (the caller names the setting).
    pub fn validate(&self, name: &str) -> Result<(), String> {
        check_store_name(name).map_err(|why| format!("store name {name:?} {why}"))?;
        if !self.dir.is_absolute() {
            return Err(format!("dir of store {name:?} must be an absolute path"));
        }
        match (self.kind, &self.key_file) {
            (StoreKind::Dir, Some(_)) => Err(format!(
                "store {name:?} is a directory store: key_file is only for kind = \"managed\""
            )),
            (StoreKind::Managed, None) => Err(format!("managed store {name:?} needs a key_file")),
            (StoreKind::Managed, Some(k)) if !k.is_absolute() => Err(format!(
                "key_file of store {name:?} must be an absolute path"
            )),
            (StoreKind::Managed, Some(k)) if k.starts_with(&self.dir) => Err(format!(
                "key_file of store {name:?} must not be inside its dir"
            )),
            _ => Ok(()),
        }
    }

    /// The managed store this configures, if it is one.
    pub fn managed(&self, name: &str) -> Option<ManagedStore> {
        match (self.kind, &self.key_file) {
            (StoreKind::Managed, Some(key)) => Some(ManagedStore::new(name, &self.dir, key)),
            _ => None,
        }
    }
}

/// Store names: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 63 bytes (they are
/// part of file names and of the managed store's associated data).
pub fn check_store_name(name: &str) -> Result<(), &'static str> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric());
    if name.is_empty() {
        Err("is empty")
    } else if name.len() > 63 {
        Err("is longer than 63 bytes")
    } else if !ok_first
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Err("must be letters, digits, '.', '_' or '-', starting with a letter or digit")
    } else {
        Ok(())
    }
}

/// Why a secret cannot be had. Never carries its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No store of that name is configured.
    #[error("no secret store named {0:?} is configured")]
    UnknownStore(String),
    /// The name cannot name a secret in this store.
    #[error("{name:?} is not a valid secret name in store {store:?}: {why}")]
    BadName {
        /// The store.
        store: String,
        /// The name.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// No such secret.
    #[error("secret {name:?} not found in store {store:?}")]
    NotFound {
        /// The store.
        store: String,
        /// The name.
        name: String,
    },
    /// The secret has no such member.
    #[error("secret {name:?} in store {store:?}: has no field {field:?}")]
    NoField {
        /// The store.
        store: String,
        /// The name.
        name: String,
        /// The member asked for.
        field: String,
    },
    /// The secret exists but cannot be used.
    #[error("secret {name:?} in store {store:?}: {why}")]
    Unusable {
        /// The store.
        store: String,
        /// The name.
        name: String,
        /// What is wrong with it (never its content).
        why: String,
    },
}

/// The configured stores, by name.
#[derive(Debug, Clone, Default)]
pub struct Stores {
    stores: BTreeMap<String, StoreConfig>,
}

impl Stores {
    /// Stores by name (validated with [`StoreConfig::validate`]).
    pub fn new(stores: BTreeMap<String, StoreConfig>) -> Self {
        Self { stores }
    }

    /// The store named `name`.
    pub fn get(&self, name: &str) -> Option<&StoreConfig> {
        self.stores.get(name)
    }

    /// Every store, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &StoreConfig)> {
        self.stores.iter()
    }

    /// The value of secret `name` of `store`, or its member `field` when
    /// `field` is not empty. The one resolution path of every use.
    pub fn resolve(
        &self,
        store: &str,
        name: &str,
        field: &str,
    ) -> Result<SecretValue, SecretError> {
        let config = self
            .stores
            .get(store)
            .ok_or_else(|| SecretError::UnknownStore(store.to_owned()))?;
        let content = match config.managed(store) {
            Some(m) => m.get(name).map_err(|e| e.into_secret_error(store, name))?,
            None => dir::read(&config.dir, store, name)?,
        };
        let unusable = |why: &str| SecretError::Unusable {
            store: store.to_owned(),
            name: name.to_owned(),
            why: why.to_owned(),
        };
        let value = if field.is_empty() {
            content
        } else {
            pick_field(&content, field).map_err(|e| match e {
                FieldError::NotAnObject => unusable("not a JSON object (needed for a field)"),
                FieldError::Missing => SecretError::NoField {
                    store: store.to_owned(),
                    name: name.to_owned(),
                    field: field.to_owned(),
                },
            })?
        };
        if value.expose().contains('\0') {
            return Err(unusable("contains a NUL byte"));
        }
        Ok(value)
    }
}

enum FieldError {
    NotAnObject,
    Missing,
}

/// Member `field` of a JSON object: a string as is, any other value (an
/// object, a number) as its compact JSON text. `null` counts as missing.
fn pick_field(content: &SecretValue, field: &str) -> Result<SecretValue, FieldError> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(content.expose()).map_err(|_| FieldError::NotAnObject)?;
    let picked = match object.remove(field) {
        None | Some(serde_json::Value::Null) => Err(FieldError::Missing),
        Some(serde_json::Value::String(s)) => Ok(SecretValue::new(s)),
        Some(other) => Ok(SecretValue::new(other.to_string())),
    };
    // The rest of the object holds other secrets: wipe what can be wiped.
    for (_, v) in object {
        if let serde_json::Value::String(s) = v {
            drop(Zeroizing::new(s));
        }
    }
    picked
}

/// A value as read from a file or stdin: without one trailing newline
/// (`echo token >file`), which is never meant to be part of a token.
pub fn strip_newline(mut text: String) -> SecretValue {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    SecretValue::new(text)
}

#[cfg(test)]
mod tests;
