//! Secret stores: where per-sandbox registry credentials
//! (`image_pull_credentials`) come from.
//!
//! A store is a directory the operator fills (mode 0700, owned by root); a
//! request names a store, a path in it and optionally a field. The secret is
//! one of:
//!
//! - `username:password` (the text of the file, trimmed);
//! - a JSON object `{"username": ..., "password": ...}`;
//! - with `field`, a JSON object whose member `field` is either of the above.
//!
//! Secrets never leave the daemon: they only authenticate pulls. Paths come
//! from API callers, so they are checked component by component and opened
//! without following symlinks: a request cannot read a file outside its
//! store.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use sandpit_registry::Credentials;

use crate::engine::RegistryCredentials;

/// Largest secret file read.
const MAX_SECRET_BYTES: u64 = 64 << 10;

/// A configured store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretStoreConfig {
    /// Directory holding the secrets.
    pub dir: PathBuf,
}

/// Errors resolving a secret; each names the request field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No store of that name is configured.
    #[error("no secret store named {0:?} is configured")]
    UnknownStore(String),
    /// The path is not a plain relative path.
    #[error("{0:?} is not a relative path of plain names")]
    BadPath(String),
    /// No such secret in the store.
    #[error("secret {path:?} not found in store {store:?}")]
    NotFound {
        /// The store.
        store: String,
        /// The path.
        path: String,
    },
    /// The secret exists but cannot be used as credentials.
    #[error("secret {path:?} in store {store:?}: {reason}")]
    Unusable {
        /// The store.
        store: String,
        /// The path.
        path: String,
        /// What is wrong with it (never its content).
        reason: String,
    },
}

impl SecretError {
    /// The field of `SecretSource` the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::UnknownStore(_) => "store_name",
            Self::BadPath(_) | Self::NotFound { .. } => "path",
            Self::Unusable { .. } => "field",
        }
    }
}

/// What a request points at.
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

/// The configured stores.
#[derive(Debug, Clone, Default)]
pub struct SecretStores {
    stores: BTreeMap<String, SecretStoreConfig>,
}

impl SecretStores {
    /// Stores by name.
    pub fn new(stores: BTreeMap<String, SecretStoreConfig>) -> Self {
        Self { stores }
    }

    /// Reads the credentials `r` points at.
    pub fn resolve(&self, r: &SecretRef) -> Result<RegistryCredentials, SecretError> {
        let store = self
            .stores
            .get(&r.store)
            .ok_or_else(|| SecretError::UnknownStore(r.store.clone()))?;
        check_path(&r.path)?;
        let unusable = |reason: &str| SecretError::Unusable {
            store: r.store.clone(),
            path: r.path.clone(),
            reason: reason.to_owned(),
        };
        let text = read_secret(&store.dir, &r.path).map_err(|e| match e {
            ReadError::Missing => SecretError::NotFound {
                store: r.store.clone(),
                path: r.path.clone(),
            },
            ReadError::Other(reason) => unusable(&reason),
        })?;
        let value = if r.field.is_empty() {
            parse_credentials(&text)
        } else {
            let object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).map_err(|_| unusable("not a JSON object"))?;
            match object.get(&r.field) {
                Some(serde_json::Value::String(s)) => parse_credentials(s),
                Some(v @ serde_json::Value::Object(_)) => credentials_from_json(v),
                Some(_) => None,
                None => return Err(unusable(&format!("has no field {:?}", r.field))),
            }
        };
        let credentials = value
            .ok_or_else(|| unusable("not username:password nor {\"username\", \"password\"}"))?;
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
        return credentials_from_json(&v);
    }
    let (user, password) = text.split_once(':')?;
    (!user.is_empty()).then(|| Credentials {
        username: user.to_owned(),
        password: password.to_owned(),
    })
}

fn credentials_from_json(v: &serde_json::Value) -> Option<Credentials> {
    let username = v.get("username")?.as_str()?;
    let password = v.get("password")?.as_str()?;
    (!username.is_empty()).then(|| Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// Relative, made of plain names (no `..`, `.`, empty or hidden-by-dot
/// components), of sane length.
pub fn check_path(path: &str) -> Result<(), SecretError> {
    let bad = || SecretError::BadPath(path.to_owned());
    if path.is_empty() || path.len() > 512 || path.contains('\0') {
        return Err(bad());
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(name) if !name.as_encoded_bytes().starts_with(b".") => {}
            _ => return Err(bad()),
        }
    }
    if path.ends_with('/') || path.contains("//") {
        return Err(bad());
    }
    Ok(())
}

enum ReadError {
    Missing,
    Other(String),
}

/// Opens `dir/path` one component at a time, never following a symlink.
fn read_secret(dir: &Path, path: &str) -> Result<String, ReadError> {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::Mode;

    let map = |e: nix::errno::Errno| match e {
        nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP => {
            ReadError::Missing
        }
        other => ReadError::Other(format!("cannot be read ({})", other.desc().to_lowercase())),
    };
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| ReadError::Other(format!("store directory cannot be opened ({e})")))?;
    let mut current: std::os::fd::OwnedFd = root.into();
    let parts: Vec<&str> = path.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let flags = OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | if last {
                OFlag::O_RDONLY
            } else {
                OFlag::O_DIRECTORY | OFlag::O_RDONLY
            };
        current = openat(&current, *part, flags, Mode::empty()).map_err(map)?;
    }
    let file = File::from(current);
    let meta = file
        .metadata()
        .map_err(|e| ReadError::Other(format!("cannot be read ({e})")))?;
    if !meta.is_file() {
        return Err(ReadError::Missing);
    }
    let mut text = String::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|_| ReadError::Other("is not UTF-8 text".into()))?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        return Err(ReadError::Other(format!(
            "is larger than {MAX_SECRET_BYTES} bytes"
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stores(dir: &Path) -> SecretStores {
        SecretStores::new(BTreeMap::from([(
            "local".to_owned(),
            SecretStoreConfig {
                dir: dir.to_owned(),
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

    #[test]
    fn formats_are_read() {
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
        assert_eq!(
            (
                c.registry.as_str(),
                c.credentials.username.as_str(),
                c.credentials.password.as_str()
            ),
            ("ghcr.io", "bot", "s3cr:et")
        );
        let c = s.resolve(&sref("team/json", "")).unwrap();
        assert_eq!(
            (
                c.credentials.username.as_str(),
                c.credentials.password.as_str()
            ),
            ("u", "p")
        );
        let c = s.resolve(&sref("bundle", "ghcr")).unwrap();
        assert_eq!(
            (
                c.credentials.username.as_str(),
                c.credentials.password.as_str()
            ),
            ("g", "x")
        );
        let c = s.resolve(&sref("bundle", "quay")).unwrap();
        assert_eq!(
            (
                c.credentials.username.as_str(),
                c.credentials.password.as_str()
            ),
            ("q", "y")
        );

        let e = s.resolve(&sref("bundle", "n")).unwrap_err();
        assert_eq!(e.field(), "field");
        let e = s.resolve(&sref("bundle", "nope")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret \"bundle\" in store \"local\": has no field \"nope\""
        );
        let e = s.resolve(&sref("team/missing", "")).unwrap_err();
        assert_eq!(
            e,
            SecretError::NotFound {
                store: "local".into(),
                path: "team/missing".into()
            }
        );
        let e = s
            .resolve(&SecretRef {
                store: "vault".into(),
                ..sref("x", "")
            })
            .unwrap_err();
        assert_eq!(e, SecretError::UnknownStore("vault".into()));
        assert_eq!(e.field(), "store_name");
    }

    #[test]
    fn paths_cannot_leave_the_store() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-secret"), "root:hunter2").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("host-secret"), dir.path().join("link"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
        let s = stores(dir.path());
        for bad in [
            "../x",
            "/etc/shadow",
            "a/../b",
            "./a",
            ".hidden",
            "a//b",
            "a/",
            "",
        ] {
            assert_eq!(
                s.resolve(&sref(bad, "")).unwrap_err(),
                SecretError::BadPath(bad.into()),
                "{bad}"
            );
        }
        for through_link in ["link", "linkdir/host-secret"] {
            assert!(
                matches!(
                    s.resolve(&sref(through_link, "")),
                    Err(SecretError::NotFound { .. })
                ),
                "{through_link}"
            );
        }
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
