//! `WWW-Authenticate` challenges, the token flow's pieces and the cache of
//! what a registry accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::Credentials;

/// Lifetime of a token whose response gives none (the distribution spec's
/// default).
const DEFAULT_TOKEN_SECS: u64 = 60;
/// Tokens are dropped this long before they expire: a request must not
/// start with a token that dies in flight.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// Lowercase scheme: `bearer`, `basic`.
    pub scheme: String,
    /// Parameters, names lowercase.
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value (RFC 7235): one or more challenges,
/// each a scheme and comma-separated `name=value` or `name="quoted"`
/// parameters.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let bytes = header.as_bytes();
    let mut i = 0;
    let skip = |i: &mut usize, set: &[u8]| {
        while *i < bytes.len() && set.contains(&bytes[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && !b" \t,=\"".contains(&bytes[*i]) {
            *i += 1;
        }
        &header[start..*i]
    };
    loop {
        skip(&mut i, b" \t,");
        if i >= bytes.len() {
            break;
        }
        let word = token(&mut i);
        if word.is_empty() {
            // A stray `=` or quote: skip one byte and go on.
            i += 1;
            continue;
        }
        let mut j = i;
        skip(&mut j, b" \t");
        if j < bytes.len() && bytes[j] == b'=' && !out.is_empty() && !word.contains('/') {
            // A parameter of the current challenge.
            i = j + 1;
            skip(&mut i, b" \t");
            let value = if i < bytes.len() && bytes[i] == b'"' {
                i += 1;
                let mut value = String::new();
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' && i + 1 < bytes.len() {
                        i += 1;
                    }
                    // Push whole characters: values may be UTF-8.
                    let ch = header[i..].chars().next().expect("in bounds");
                    value.push(ch);
                    i += ch.len_utf8();
                }
                i += 1;
                value
            } else {
                token(&mut i).to_owned()
            };
            if let Some(current) = out.last_mut() {
                current.params.insert(word.to_ascii_lowercase(), value);
            }
        } else {
            out.push(Challenge {
                scheme: word.to_ascii_lowercase(),
                params: BTreeMap::new(),
            });
        }
    }
    out
}

/// `Basic <base64(user:password)>`.
pub(crate) fn basic_header(credentials: &Credentials) -> String {
    let raw = format!("{}:{}", credentials.username, credentials.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
pub(crate) fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A token endpoint's answer.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenResponse {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token (`token`, or OAuth2's `access_token`) and how long it lives.
    pub(crate) fn into_token(self) -> Option<(String, Duration)> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let secs = self
            .expires_in
            .unwrap_or(DEFAULT_TOKEN_SECS)
            .max(DEFAULT_TOKEN_SECS);
        Some((token, Duration::from_secs(secs)))
    }
}

/// Identifies the credentials of a pull without keeping them: tokens and
/// coalesced pulls must never be shared between different credentials.
pub(crate) fn credentials_tag(credentials: Option<&Credentials>) -> String {
    match credentials {
        None => "anonymous".to_owned(),
        Some(c) => {
            let mut h = Sha256::new();
            h.update(c.username.as_bytes());
            h.update([0]);
            h.update(c.password.as_bytes());
            hex::encode(&h.finalize()[..16])
        }
    }
}

/// What an endpoint accepted for a repository.
#[derive(Debug, Clone)]
pub(crate) enum Accepted {
    Bearer { token: String, until: Instant },
    Basic,
}

/// `Authorization` values that worked, per (endpoint, repository,
/// credentials), so later requests of a pull (and later pulls) skip the
/// 401 round trip.
#[derive(Debug, Default)]
pub(crate) struct AuthCache {
    entries: Mutex<HashMap<(String, String, String), Accepted>>,
}

impl AuthCache {
    pub(crate) fn get(&self, key: &(String, String, String)) -> Option<Accepted> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(Accepted::Bearer { until, .. }) if *until <= Instant::now() => {
                entries.remove(key);
                None
            }
            other => other.cloned(),
        }
    }

    pub(crate) fn put_bearer(
        &self,
        key: (String, String, String),
        token: String,
        lifetime: Duration,
    ) {
        let until = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, Accepted::Bearer { token, until });
    }

    pub(crate) fn put_basic(&self, key: (String, String, String)) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(key, Accepted::Basic);
    }

    pub(crate) fn forget(&self, key: &(String, String, String)) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            [
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/busybox:pull"),
                ("service", "registry.docker.io"),
            ]
        );
        // Unquoted values, odd spacing, escapes, commas inside quotes.
        let c = parse_challenges(
            r#"bearer  realm = https://a/token , scope="repository:a/b:pull,push", error="say \"hi\"""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(
            params(&c[0]),
            [
                ("error", "say \"hi\""),
                ("realm", "https://a/token"),
                ("scope", "repository:a/b:pull,push"),
            ]
        );
    }

    #[test]
    fn parses_basic_and_several_challenges() {
        let c = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(params(&c[0]), [("realm", "Registry Realm")]);
        let c = parse_challenges(r#"Basic realm="x", Bearer realm="https://t/token",service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(
            params(&c[1]),
            [("realm", "https://t/token"), ("service", "s")]
        );
        assert!(parse_challenges("").is_empty());
        // Garbage does not panic.
        let c = parse_challenges(r#"="x" , Bearer realm="unterminated"#);
        assert_eq!(c.last().unwrap().scheme, "bearer");
        assert_eq!(c.last().unwrap().params["realm"], "unterminated");
        assert_eq!(parse_challenges("Negotiate")[0].scheme, "negotiate");
    }

    #[test]
    fn token_responses() {
        let t: TokenResponse = serde_json::from_str(r#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("abc".to_owned(), Duration::from_secs(300)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("xyz".to_owned(), Duration::from_secs(60)))
        );
        let t: TokenResponse =
            serde_json::from_str(r#"{"token":"","access_token":"o","expires_in":5}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("o".to_owned(), Duration::from_secs(60)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }

    #[test]
    fn helpers() {
        let creds = Credentials {
            username: "aladdin".into(),
            password: "opensesame".into(),
        };
        assert_eq!(basic_header(&creds), "Basic YWxhZGRpbjpvcGVuc2VzYW1l");
        assert_eq!(
            query_escape("repository:library/busybox:pull"),
            "repository%3Alibrary%2Fbusybox%3Apull"
        );
        assert_eq!(query_escape("a b&c=d~"), "a%20b%26c%3Dd~");
        let other = Credentials {
            password: "other".into(),
            ..creds.clone()
        };
        assert_ne!(credentials_tag(Some(&creds)), credentials_tag(Some(&other)));
        assert_eq!(credentials_tag(None), "anonymous");
        assert!(!credentials_tag(Some(&creds)).contains("opensesame"));
    }

    #[test]
    fn cache_expires_tokens() {
        let cache = AuthCache::default();
        let key = ("e".to_owned(), "r".to_owned(), "anonymous".to_owned());
        cache.put_bearer(key.clone(), "t".into(), Duration::from_secs(5));
        // Shorter than the margin: expired at once.
        assert!(cache.get(&key).is_none());
        cache.put_bearer(key.clone(), "t".into(), Duration::from_secs(300));
        assert!(matches!(cache.get(&key), Some(Accepted::Bearer { token, .. }) if token == "t"));
        cache.forget(&key);
        assert!(cache.get(&key).is_none());
        cache.put_basic(key.clone());
        assert!(matches!(cache.get(&key), Some(Accepted::Basic)));
    }
}
