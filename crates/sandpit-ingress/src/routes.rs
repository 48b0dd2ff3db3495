//! The table of published services the frontends route by.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::host::valid_sandbox_id;

/// Who may reach a route.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// Anyone who knows the host name.
    Open,
    /// Requests carrying this token in `X-Sandbox-Share-Token`.
    ShareToken(String),
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("Open"),
            // Never the token itself: Debug ends up in logs.
            Self::ShareToken(_) => f.write_str("ShareToken(..)"),
        }
    }
}

impl Auth {
    /// Whether `presented` (the header's value, if any) satisfies this.
    /// Tokens are compared through their SHA-256 digests in constant time,
    /// so neither their contents nor their lengths leak through timing.
    pub fn allows(&self, presented: Option<&[u8]>) -> bool {
        match self {
            Self::Open => true,
            Self::ShareToken(token) => {
                let Some(presented) = presented else {
                    return false;
                };
                let a = Sha256::digest(token.as_bytes());
                let b = Sha256::digest(presented);
                a.iter()
                    .zip(b.iter())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
            }
        }
    }
}

/// Which frontend serves a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// The HTTP/1.1 reverse proxy, routing by Host.
    Http,
    /// The TLS passthrough, routing by SNI without terminating TLS.
    TlsPassthrough,
}

/// Where and how one published service is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The service inside the sandbox (its address, its port).
    pub backend: SocketAddr,
    /// Who may reach it.
    pub auth: Auth,
    /// How long the HTTP frontend waits for the backend's response headers
    /// (`None`: the frontend's default). Unused by the TLS passthrough.
    pub request_timeout: Option<Duration>,
    /// Which frontend serves it.
    pub kind: RouteKind,
}

/// Why a route was not inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The id cannot appear in a host name.
    #[error("sandbox id {0:?} cannot appear in a host name")]
    BadSandboxId(String),
    /// The TLS passthrough cannot check a share token without
    /// terminating TLS, so such a route would be open to anyone.
    #[error("a tls passthrough route cannot require a share token")]
    TokenOnPassthrough,
    /// An empty token would be satisfied by an empty header.
    #[error("a share token cannot be empty")]
    EmptyToken,
    /// Port 0 names no service.
    #[error("port 0 names no service")]
    PortZero,
}

/// The published services, keyed by (sandbox id, port in the sandbox).
/// Shared (`Arc`) between the daemon, which inserts and removes routes as
/// sandboxes start and stop, and the frontends, which look them up per
/// request or connection.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<(String, u16), Arc<Route>>>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes `port` of `sandbox_id`, replacing any route it had;
    /// returns the replaced one.
    pub fn insert(
        &self,
        sandbox_id: &str,
        port: u16,
        route: Route,
    ) -> Result<Option<Arc<Route>>, RouteError> {
        if !valid_sandbox_id(sandbox_id) {
            return Err(RouteError::BadSandboxId(sandbox_id.to_owned()));
        }
        if port == 0 {
            return Err(RouteError::PortZero);
        }
        if route.auth == Auth::ShareToken(String::new()) {
            return Err(RouteError::EmptyToken);
        }
        if route.kind == RouteKind::TlsPassthrough && route.auth != Auth::Open {
            return Err(RouteError::TokenOnPassthrough);
        }
        Ok(self
            .write()
            .insert((sandbox_id.to_owned(), port), Arc::new(route)))
    }

    /// Unpublishes `port` of `sandbox_id`; returns its route. Connections
    /// already proxied are not cut.
    pub fn remove(&self, sandbox_id: &str, port: u16) -> Option<Arc<Route>> {
        self.write().remove(&(sandbox_id.to_owned(), port))
    }

    /// Unpublishes every port of `sandbox_id`; returns how many there were.
    pub fn remove_sandbox(&self, sandbox_id: &str) -> usize {
        let mut routes = self.write();
        let before = routes.len();
        routes.retain(|(id, _), _| id != sandbox_id);
        before - routes.len()
    }

    /// The route of `port` of `sandbox_id`.
    pub fn get(&self, sandbox_id: &str, port: u16) -> Option<Arc<Route>> {
        // The key is owned; a lookup allocates once, which is cheap next
        // to the connection it serves.
        self.read().get(&(sandbox_id.to_owned(), port)).cloned()
    }

    /// How many routes there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, u16), Arc<Route>>> {
        // A panic while holding the lock leaves the map itself consistent
        // (every mutation is one HashMap call), so poisoning is ignored.
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<(String, u16), Arc<Route>>> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteKind, auth: Auth) -> Route {
        Route {
            backend: "10.209.0.5:80".parse().unwrap(),
            auth,
            request_timeout: None,
            kind,
        }
    }

    #[test]
    fn insert_get_remove() {
        let t = RouteTable::new();
        assert!(t.is_empty());
        let r = route(RouteKind::Http, Auth::Open);
        assert_eq!(t.insert("sb-1", 80, r.clone()), Ok(None));
        t.insert("sb-1", 81, r.clone()).unwrap();
        t.insert("sb-2", 80, r.clone()).unwrap();
        assert_eq!(t.get("sb-1", 80).as_deref(), Some(&r));
        assert_eq!(t.get("sb-1", 82), None);
        assert!(t.remove("sb-2", 80).is_some());
        assert_eq!(t.remove_sandbox("sb-1"), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn refuses_unroutable_routes() {
        let t = RouteTable::new();
        let open = route(RouteKind::Http, Auth::Open);
        assert_eq!(
            t.insert("Sb", 80, open.clone()),
            Err(RouteError::BadSandboxId("Sb".into()))
        );
        assert_eq!(t.insert("sb", 0, open), Err(RouteError::PortZero));
        let tls = route(RouteKind::TlsPassthrough, Auth::ShareToken("t".into()));
        assert_eq!(
            t.insert("sb", 443, tls),
            Err(RouteError::TokenOnPassthrough)
        );
        let empty = route(RouteKind::Http, Auth::ShareToken(String::new()));
        assert_eq!(t.insert("sb", 80, empty), Err(RouteError::EmptyToken));
    }

    #[test]
    fn share_tokens() {
        let a = Auth::ShareToken("s3cret".into());
        assert!(a.allows(Some(b"s3cret")));
        assert!(!a.allows(Some(b"s3cre")));
        assert!(!a.allows(Some(b"s3cretx")));
        assert!(!a.allows(None));
        assert!(Auth::Open.allows(None));
        assert_eq!(format!("{a:?}"), "ShareToken(..)");
    }
}
