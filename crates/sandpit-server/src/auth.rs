//! API keys and principals.
//!
//! A request carries its key as `authorization: Bearer KEY` (the cwsandbox
//! client) or `x-wandb-api-key: KEY` (`wandb.sandbox`). Each key maps to a
//! principal: its configured name, or `key-` and the first 16 hex digits of
//! the key's SHA-256 (stable across restarts, reveals nothing of the key).
//! Keys are looked up by digest, so comparing never depends on how much of a
//! guessed key is right.
//!
//! In a cluster the table has a second part: the principals of the shared
//! store (PostgreSQL), replaced as a whole by [`Auth::set_shared`] on every
//! sync (`crate::principals`). The configured keys always stay, and win
//! over a stored principal of the same name or key.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::model::Principal;

/// One configured key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The secret.
    pub key: String,
    /// The principal's name; derived from the key when `None`.
    pub name: Option<String>,
    /// The organization the principal belongs to (discovery reports it);
    /// the daemon's `organization_id` when `None`.
    pub organization: Option<String>,
}

/// The caller's organization, when its key names one (an extension of the
/// request next to its [`Principal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither header is present.
    #[error("missing API key: send `authorization: Bearer KEY` or `x-wandb-api-key: KEY`")]
    Missing,
    /// The header is not `Bearer KEY` or not ASCII.
    #[error("malformed authorization header: expected `Bearer KEY`")]
    Malformed,
    /// No such key.
    #[error("unknown API key")]
    Unknown,
}

/// Who a key belongs to.
type Caller = (Principal, Option<Organization>);

/// Keys by digest.
type Table = HashMap<[u8; 32], Caller>;

/// The key table: the configured keys, and the shared store's principals.
/// Clones share the store's part: a set installed through one is seen by
/// all (every interceptor made from it).
#[derive(Clone)]
pub struct Auth {
    keys: Arc<Table>,
    /// The configured principals' names: a stored principal by one of
    /// these is left out (the configured key wins).
    names: Arc<HashSet<String>>,
    /// The store's principals, swapped whole by [`Auth::set_shared`].
    shared: Arc<RwLock<Arc<Table>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("shared", &self.shared_table().len())
            .finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Auth {
    /// A table of these keys.
    pub fn new(keys: &[ApiKey]) -> Self {
        let map = keys
            .iter()
            .map(|k| {
                let principal = match &k.name {
                    Some(n) => Principal(n.clone()),
                    None => anonymous_principal(&k.key),
                };
                let org = k.organization.clone().map(Organization);
                (digest(&k.key), (principal, org))
            })
            .collect::<Table>();
        let names = map.values().map(|(p, _)| p.0.clone()).collect();
        Self {
            keys: Arc::new(map),
            names: Arc::new(names),
            shared: Arc::default(),
        }
    }

    /// Replaces the store's principals with `rows` (key digest, name,
    /// organization), at once for every clone. Pass live principals only:
    /// a key left out is refused from now on (revocation). A row whose name
    /// or key is configured is left out: the configured key wins. Returns
    /// the names left out so.
    pub fn set_shared(
        &self,
        rows: impl IntoIterator<Item = ([u8; 32], String, Option<String>)>,
    ) -> Vec<String> {
        let mut shadowed = Vec::new();
        let mut table = Table::new();
        for (key, name, org) in rows {
            if self.keys.contains_key(&key) || self.names.contains(&name) {
                shadowed.push(name);
                continue;
            }
            table.insert(key, (Principal(name), org.map(Organization)));
        }
        *self.shared.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        shadowed
    }

    /// How many of the store's principals are installed.
    pub fn shared_len(&self) -> usize {
        self.shared_table().len()
    }

    fn shared_table(&self) -> Arc<Table> {
        self.shared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The principal of the key the request's metadata carries.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, AuthError> {
        self.authenticate_caller(metadata).map(|(p, _)| p)
    }

    /// The principal and organization of the request's key.
    fn authenticate_caller(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let key = digest(&key_of(metadata)?);
        if let Some(caller) = self.keys.get(&key) {
            return Ok(caller.clone());
        }
        // One read lock, held for the lookup only.
        self.shared
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned()
            .ok_or(AuthError::Unknown)
    }

    /// A tonic interceptor: puts the caller's [`Principal`] into the
    /// request's extensions, or answers UNAUTHENTICATED.
    pub fn interceptor(&self) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
        let auth = self.clone();
        move |mut req: Request<()>| {
            // First, before the key check: tonic starts the call's
            // grpc-timeout clock just before this runs.
            req.extensions_mut()
                .insert(Arrived(std::time::Instant::now()));
            auth.admit(req)
        }
    }

    fn admit(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        match self.authenticate_caller(req.metadata()) {
            Ok((p, org)) => {
                req.extensions_mut().insert(p);
                if let Some(org) = org {
                    req.extensions_mut().insert(org);
                }
                Ok(req)
            }
            Err(e) => Err(crate::api::errors::unauthenticated(&e)),
        }
    }
}

/// When a call reached the server (set by [`Auth::interceptor`]): a
/// handler's own deadline counts from here, as tonic's does.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub std::time::Instant);

/// The key a request carries: `authorization: Bearer KEY`, else
/// `x-wandb-api-key: KEY`.
fn key_of(metadata: &MetadataMap) -> Result<String, AuthError> {
    let key = if let Some(v) = metadata.get("authorization") {
        let v = v.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, key) = v.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        key.trim().to_owned()
    } else if let Some(v) = metadata.get("x-wandb-api-key") {
        v.to_str()
            .map_err(|_| AuthError::Malformed)?
            .trim()
            .to_owned()
    } else {
        return Err(AuthError::Missing);
    };
    if key.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(key)
}

/// The principal of a key configured without a name.
pub fn anonymous_principal(key: &str) -> Principal {
    Principal(format!("key-{}", &hex::encode(digest(key))[..16]))
}

/// A fresh random key (256 bits, hex).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, MetadataValue::try_from(*v).unwrap());
        }
        m
    }

    fn auth() -> Auth {
        Auth::new(&[
            ApiKey {
                key: "k-alice".into(),
                name: Some("alice".into()),
                organization: None,
            },
            ApiKey {
                key: "k-anon".into(),
                name: None,
                organization: None,
            },
        ])
    }

    #[test]
    fn bearer_and_wandb_headers_map_to_principals() {
        let a = auth();
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer k-alice")])),
            Ok(Principal("alice".into()))
        );
        assert_eq!(
            a.authenticate(&md(&[("authorization", "bearer  k-alice ")])),
            Ok(Principal("alice".into()))
        );
        assert_eq!(
            a.authenticate(&md(&[("x-wandb-api-key", "k-alice")])),
            Ok(Principal("alice".into()))
        );
        let anon = a
            .authenticate(&md(&[("authorization", "Bearer k-anon")]))
            .unwrap();
        assert_eq!(anon, anonymous_principal("k-anon"));
        assert!(anon.as_str().starts_with("key-") && anon.as_str().len() == 20);
    }

    #[test]
    fn bad_keys_are_refused() {
        let a = auth();
        assert_eq!(a.authenticate(&md(&[])), Err(AuthError::Missing));
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer ")])),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Basic k-alice")])),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer k-mallory")])),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            a.authenticate(&md(&[("x-wandb-api-key", "")])),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn interceptor_sets_the_principal_or_refuses() {
        let mut f = auth().interceptor();
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer k-alice".parse().unwrap());
        let req = f(req).unwrap();
        assert_eq!(
            req.extensions().get::<Principal>(),
            Some(&Principal("alice".into()))
        );
        let err = f(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    fn stored(key: &str, name: &str, org: Option<&str>) -> ([u8; 32], String, Option<String>) {
        (digest(key), name.into(), org.map(Into::into))
    }

    #[test]
    fn store_keys_authenticate_until_a_set_leaves_them_out() {
        let a = auth();
        let clone = a.clone();
        let carol = md(&[("authorization", "Bearer k-carol")]);
        assert_eq!(a.authenticate(&carol), Err(AuthError::Unknown));

        let shadowed = a.set_shared([stored("k-carol", "carol", Some("acme"))]);
        assert!(shadowed.is_empty());
        // Seen through every clone, organization included.
        assert_eq!(clone.authenticate(&carol), Ok(Principal("carol".into())));
        assert_eq!(
            clone.authenticate_caller(&carol).unwrap().1,
            Some(Organization("acme".into()))
        );
        assert_eq!(a.shared_len(), 1);

        // Revoked: the next set has it no more.
        a.set_shared([stored("k-dave", "dave", None)]);
        assert_eq!(clone.authenticate(&carol), Err(AuthError::Unknown));
        assert_eq!(
            a.authenticate(&md(&[("x-wandb-api-key", "k-dave")])),
            Ok(Principal("dave".into()))
        );
        // The configured keys never change.
        a.set_shared([]);
        assert_eq!(
            clone.authenticate(&md(&[("authorization", "Bearer k-alice")])),
            Ok(Principal("alice".into()))
        );
        assert_eq!(
            clone.authenticate(&md(&[("authorization", "Bearer k-anon")])),
            Ok(anonymous_principal("k-anon"))
        );
        assert_eq!(a.shared_len(), 0);
    }

    #[test]
    fn configured_keys_win_over_stored_ones() {
        let a = auth();
        let shadowed = a.set_shared([
            // Another key under a configured name: refused.
            stored("k-fake-alice", "alice", None),
            // A configured key under another name: the configured name holds.
            stored("k-alice", "mallory", None),
            stored("k-carol", "carol", None),
        ]);
        assert_eq!(shadowed, ["alice", "mallory"]);
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer k-fake-alice")])),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer k-alice")])),
            Ok(Principal("alice".into()))
        );
        assert_eq!(
            a.authenticate(&md(&[("authorization", "Bearer k-carol")])),
            Ok(Principal("carol".into()))
        );
    }

    #[test]
    fn an_interceptor_made_before_a_set_sees_it() {
        let a = auth();
        let mut f = a.interceptor();
        let with = |k: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
            r
        };
        assert_eq!(
            f(with("k-carol")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        a.set_shared([stored("k-carol", "carol", None)]);
        let req = f(with("k-carol")).unwrap();
        assert_eq!(
            req.extensions().get::<Principal>(),
            Some(&Principal("carol".into()))
        );
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_them() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let k = ApiKey {
            key: a.clone(),
            name: None,
            organization: None,
        };
        assert!(!format!("{k:?}").contains(&a));
    }
}
