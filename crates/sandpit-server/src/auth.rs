//! API keys and principals.
//!
//! A request carries its key as `authorization: Bearer KEY` (the cwsandbox
//! client) or `x-wandb-api-key: KEY` (`wandb.sandbox`). Each key maps to a
//! principal: its configured name, or `key-` and the first 16 hex digits of
//! the key's SHA-256 (stable across restarts, reveals nothing of the key).
//! Keys are looked up by digest, so comparing never depends on how much of a
//! guessed key is right.

use std::collections::HashMap;
use std::sync::Arc;

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

/// The key table.
#[derive(Clone)]
pub struct Auth {
    keys: Arc<HashMap<[u8; 32], Caller>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
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
            .collect();
        Self {
            keys: Arc::new(map),
        }
    }

    /// The principal of the key the request's metadata carries.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, AuthError> {
        self.authenticate_caller(metadata).map(|(p, _)| p)
    }

    /// The principal and organization of the request's key.
    fn authenticate_caller(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let key = key_of(metadata)?;
        self.keys
            .get(&digest(&key))
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
