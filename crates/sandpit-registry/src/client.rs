//! HTTP to one registry endpoint: agents (TLS roots, timeouts, redirect
//! policy), the auth round trips, and the mapping of statuses and transport
//! errors to [`PullErrorKind`]s.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_image::Digest;
use serde::Deserialize;
use ureq::config::RedirectAuthHeaders;
use ureq::http::Response;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::{Agent, Body};

use crate::auth::{self, Accepted, AuthCache, Challenge, TokenResponse};
use crate::config::{RegistryConfig, RegistryError};
use crate::{chain, Credentials, Failure, PullErrorKind};

/// Largest error body read for its message.
const ERROR_BODY_MAX: u64 = 64 << 10;
/// Largest token response.
const TOKEN_BODY_MAX: u64 = 1 << 20;

/// The agents of one registry: one that only speaks HTTPS (also across
/// redirects), and one for endpoints configured as plain HTTP.
#[derive(Debug, Clone)]
pub(crate) struct Agents {
    secure: Agent,
    plain: Agent,
}

impl Agents {
    pub(crate) fn new(config: &RegistryConfig, roots: RootCerts) -> Self {
        let build = |https_only: bool| {
            let tls = TlsConfig::builder().root_certs(roots.clone()).build();
            let timeout = Some(Duration::from_secs(config.timeout_secs));
            Agent::new_with_config(
                Agent::config_builder()
                    .http_status_as_error(false)
                    .https_only(https_only)
                    .tls_config(tls)
                    // Pulls go where the config says, whatever the
                    // environment of the daemon.
                    .proxy(None)
                    .max_redirects(10)
                    // Blob redirects go to S3/CDN hosts: they must not see
                    // the registry's credentials.
                    .redirect_auth_headers(RedirectAuthHeaders::SameHost)
                    .user_agent(concat!("sandpit/", env!("CARGO_PKG_VERSION")))
                    .timeout_connect(Some(Duration::from_secs(config.connect_timeout_secs)))
                    .timeout_recv_response(timeout)
                    .timeout_per_read(timeout)
                    .build(),
            )
        };
        Self {
            secure: build(true),
            plain: build(false),
        }
    }

    fn for_url(&self, url: &str) -> &Agent {
        if url.starts_with("http://") {
            &self.plain
        } else {
            &self.secure
        }
    }
}

/// Trusted roots: the system's plus `ca_file`'s certificates.
pub(crate) fn roots(
    system: &Arc<Vec<Certificate<'static>>>,
    ca_file: Option<&Path>,
) -> Result<RootCerts, RegistryError> {
    let Some(path) = ca_file else {
        if system.is_empty() {
            return Ok(RootCerts::WebPki);
        }
        return Ok(RootCerts::Specific(system.clone()));
    };
    let pem = std::fs::read(path).map_err(|source| RegistryError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    let mut certs: Vec<Certificate<'static>> = system.as_ref().clone();
    let before = certs.len();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => certs.push(cert),
            Ok(_) => {}
            Err(e) => {
                return Err(RegistryError::CaFile {
                    path: path.to_owned(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })
            }
        }
    }
    if certs.len() == before {
        return Err(RegistryError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(RootCerts::Specific(Arc::new(certs)))
}

/// The system's trusted roots (`/etc/ssl/certs`); empty when none load.
pub(crate) fn system_roots() -> Vec<Certificate<'static>> {
    let result = rustls_native_certs::load_native_certs();
    for e in &result.errors {
        tracing::warn!(error = %e, "cannot load a system root certificate");
    }
    result
        .certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect()
}

/// One place a registry's content is served from.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port]`, no trailing slash.
    pub url: String,
    pub mirror: bool,
    pub agents: Agents,
}

/// Requests to one endpoint for one repository with one set of
/// credentials.
#[derive(Debug)]
pub(crate) struct Session<'a> {
    pub endpoint: &'a Endpoint,
    pub repository: &'a str,
    pub credentials: Option<&'a Credentials>,
    pub cache: &'a AuthCache,
    pub cache_key: (String, String, String),
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Debug, Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `(code, message)` of a distribution error body, if it is one.
fn parse_error_body(body: &[u8]) -> Option<(String, String)> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let first = parsed.errors.into_iter().next()?;
    Some((first.code, first.message))
}

/// The failure a non-success status means; `what` names the resource
/// (`manifest`, `blob sha256:...`).
pub(crate) fn status_failure(status: u16, body: &[u8], what: &str) -> Failure {
    let (code, message) = parse_error_body(body).unwrap_or_default();
    let message = message.trim().to_owned();
    let with = |prefix: &str| {
        if message.is_empty() || message == prefix {
            prefix.to_owned()
        } else {
            format!("{prefix}: {message}")
        }
    };
    match (status, code.as_str()) {
        (_, "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN") | (404, _) => {
            let message = if message.is_empty() {
                format!("{what} unknown")
            } else {
                message
            };
            Failure::new(PullErrorKind::NotFound, format!("{message} (not found)"))
        }
        (_, "UNAUTHORIZED" | "DENIED") | (401 | 403, _) => {
            Failure::new(PullErrorKind::Unauthorized, with("unauthorized"))
        }
        (429, _) | (_, "TOOMANYREQUESTS") => Failure::new(
            PullErrorKind::Unreachable,
            with("registry unreachable: too many requests"),
        ),
        (500..=599, _) => Failure::new(
            PullErrorKind::Unreachable,
            with(&format!("registry unreachable: status {status}")),
        ),
        _ => Failure::invalid(with(&format!("unexpected status {status} for {what}"))),
    }
}

/// Why a transfer failed, in a few words.
pub(crate) fn io_reason(e: &io::Error) -> String {
    if let Some(inner) = e.get_ref().and_then(|e| e.downcast_ref::<ureq::Error>()) {
        return transport_reason(inner);
    }
    if let Some(inner) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return tls_reason(inner);
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_owned(),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => "connection reset".to_owned(),
        io::ErrorKind::UnexpectedEof => "connection closed early".to_owned(),
        _ => chain(e),
    }
}

fn transport_reason(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Io(e) => io_reason(e),
        ureq::Error::Timeout(_) => "timed out".to_owned(),
        ureq::Error::HostNotFound => "host not found".to_owned(),
        ureq::Error::ConnectionFailed => "connection failed".to_owned(),
        ureq::Error::Rustls(e) => tls_reason(e),
        other => chain(other),
    }
}

fn tls_reason(e: &rustls::Error) -> String {
    // What an https client reads from a plain http server.
    let plain = matches!(
        e,
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
    );
    if plain {
        format!("tls: {} (is it a plain http server?)", chain(e))
    } else {
        format!("tls: {}", chain(e))
    }
}

/// The failure a transport error means.
pub(crate) fn transport_failure(e: &ureq::Error) -> Failure {
    match e {
        ureq::Error::RequireHttpsOnly(_) => {
            Failure::invalid("refused to follow a redirect to plain http")
        }
        ureq::Error::TooManyRedirects | ureq::Error::RedirectFailed => {
            Failure::invalid(format!("redirect failed: {}", chain(e)))
        }
        other => Failure::new(
            PullErrorKind::Unreachable,
            format!("registry unreachable: {}", transport_reason(other)),
        ),
    }
}

/// Reads a body of at most `limit` bytes.
pub(crate) fn read_limited(
    response: &mut Response<Body>,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    response
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                Failure::invalid(format!("{what} larger than {limit} bytes"))
            }
            other => transport_failure(&other),
        })
}

fn header<'r>(response: &'r Response<Body>, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Session<'_> {
    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.endpoint.url, self.repository)
    }

    fn authorization(&self) -> Option<String> {
        match self.cache.get(&self.cache_key)? {
            Accepted::Bearer { token, .. } => Some(format!("Bearer {token}")),
            Accepted::Basic => self.credentials.map(auth::basic_header),
        }
    }

    /// GETs `path` (under `/v2/<repository>/`), authenticating on a 401;
    /// any status but 2xx is a failure.
    pub(crate) fn get(
        &self,
        path: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<Response<Body>, Failure> {
        let url = self.url(path);
        let agent = self.endpoint.agents.for_url(&url);
        let mut authenticated = false;
        loop {
            let mut request = agent.get(&url);
            if let Some(accept) = accept {
                request = request.header("Accept", accept);
            }
            if let Some(value) = self.authorization() {
                request = request.header("Authorization", value);
            }
            let mut response = request.call().map_err(|e| transport_failure(&e))?;
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                return Ok(response);
            }
            let challenges: Vec<Challenge> = response
                .headers()
                .get_all("www-authenticate")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(auth::parse_challenges)
                .collect();
            let body = read_limited(&mut response, ERROR_BODY_MAX, what).unwrap_or_default();
            if status != 401 || authenticated {
                return Err(status_failure(status, &body, what));
            }
            // A cached token may have been revoked: start over.
            self.cache.forget(&self.cache_key);
            self.authenticate(&challenges, status, &body, what)?;
            authenticated = true;
        }
    }

    /// Answers a 401: fetches a token, or settles on Basic when there are
    /// credentials.
    fn authenticate(
        &self,
        challenges: &[Challenge],
        status: u16,
        body: &[u8],
        what: &str,
    ) -> Result<(), Failure> {
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let (token, lifetime) = self.fetch_token(bearer)?;
            self.cache
                .put_bearer(self.cache_key.clone(), token, lifetime);
            return Ok(());
        }
        if challenges.iter().any(|c| c.scheme == "basic") && self.credentials.is_some() {
            self.cache.put_basic(self.cache_key.clone());
            return Ok(());
        }
        if challenges.is_empty() || challenges.iter().any(|c| c.scheme == "basic") {
            return Err(status_failure(status, body, what));
        }
        Err(Failure::new(
            PullErrorKind::Unauthorized,
            format!(
                "unauthorized: unsupported auth scheme {:?}",
                challenges[0].scheme
            ),
        ))
    }

    /// The token flow: `GET realm?service=..&scope=repository:<name>:pull`,
    /// with Basic credentials when there are any.
    fn fetch_token(&self, challenge: &Challenge) -> Result<(String, Duration), Failure> {
        let realm = challenge
            .params
            .get("realm")
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Failure::invalid("bearer challenge without realm"))?;
        let plain_ok = self.endpoint.url.starts_with("http://");
        if realm.starts_with("http://") && !plain_ok {
            // Credentials would travel in clear from an https registry.
            return Err(Failure::invalid(format!(
                "token realm {realm} is plain http"
            )));
        }
        if !realm.starts_with("http://") && !realm.starts_with("https://") {
            return Err(Failure::invalid(format!(
                "token realm {realm:?} is not a url"
            )));
        }
        let mut url = realm.clone();
        url.push(if url.contains('?') { '&' } else { '?' });
        if let Some(service) = challenge.params.get("service") {
            url.push_str("service=");
            url.push_str(&auth::query_escape(service));
            url.push('&');
        }
        url.push_str("scope=");
        url.push_str(&auth::query_escape(&format!(
            "repository:{}:pull",
            self.repository
        )));
        let mut request = self.endpoint.agents.for_url(realm).get(&url);
        if let Some(credentials) = self.credentials {
            request = request.header("Authorization", auth::basic_header(credentials));
        }
        let mut response = request.call().map_err(|e| transport_failure(&e))?;
        let status = response.status().as_u16();
        let body = read_limited(&mut response, TOKEN_BODY_MAX, "token response")?;
        if !(200..300).contains(&status) {
            let failure = status_failure(status, &body, "token");
            if failure.kind == PullErrorKind::NotFound {
                // A token endpoint that does not exist is a broken setup,
                // not a missing image.
                return Err(Failure::invalid(format!(
                    "token endpoint {realm} answered {status}"
                )));
            }
            return Err(failure);
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| Failure::invalid(format!("malformed token response: {}", chain(&e))))?;
        tracing::debug!(
            endpoint = %self.endpoint.url,
            repository = %self.repository,
            "registry token obtained"
        );
        parsed
            .into_token()
            .ok_or_else(|| Failure::invalid("token response without token"))
    }

    /// GETs a manifest: its bytes (at most `limit`) and content type.
    pub(crate) fn manifest(
        &self,
        reference: &str,
        accept: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, Option<String>), Failure> {
        let mut response = self.get(&format!("manifests/{reference}"), Some(accept), "manifest")?;
        let content_type = header(&response, "content-type").map(str::to_owned);
        let bytes = read_limited(&mut response, limit, "manifest")?;
        Ok((bytes, content_type))
    }

    /// GETs a blob; the caller reads (and verifies) the body.
    pub(crate) fn blob(&self, digest: &Digest) -> Result<Response<Body>, Failure> {
        self.get(&format!("blobs/{digest}"), None, &format!("blob {digest}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let f = status_failure(
            404,
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#,
            "manifest",
        );
        assert_eq!(
            f,
            Failure::new(PullErrorKind::NotFound, "manifest unknown (not found)")
        );
        let f = status_failure(404, b"", "blob sha256:ab");
        assert_eq!(f.message, "blob sha256:ab unknown (not found)");
        // The code wins over an odd status.
        let f = status_failure(
            400,
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#,
            "manifest",
        );
        assert_eq!(f.kind, PullErrorKind::NotFound);
        let f = status_failure(
            401,
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            "manifest",
        );
        assert_eq!(
            f,
            Failure::new(
                PullErrorKind::Unauthorized,
                "unauthorized: authentication required"
            )
        );
        assert_eq!(status_failure(403, b"<html>", "x").message, "unauthorized");
        assert_eq!(
            status_failure(503, b"", "x"),
            Failure::new(
                PullErrorKind::Unreachable,
                "registry unreachable: status 503"
            )
        );
        assert_eq!(
            status_failure(429, b"", "x").kind,
            PullErrorKind::Unreachable
        );
        assert_eq!(
            status_failure(418, b"", "manifest"),
            Failure::invalid("unexpected status 418 for manifest")
        );
    }

    #[test]
    fn io_errors_have_short_reasons() {
        for (kind, reason) in [
            (io::ErrorKind::ConnectionRefused, "connection refused"),
            (io::ErrorKind::TimedOut, "timed out"),
            (io::ErrorKind::ConnectionReset, "connection reset"),
            (io::ErrorKind::UnexpectedEof, "connection closed early"),
        ] {
            assert_eq!(io_reason(&io::Error::from(kind)), reason);
        }
        let wrapped = io::Error::other(ureq::Error::HostNotFound);
        assert_eq!(io_reason(&wrapped), "host not found");
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert_eq!(
            io_reason(&tls),
            "tls: received corrupt message of type InvalidContentType (is it a plain http server?)"
        );
        let f = transport_failure(&ureq::Error::Io(io::ErrorKind::ConnectionRefused.into()));
        assert_eq!(
            f,
            Failure::new(
                PullErrorKind::Unreachable,
                "registry unreachable: connection refused"
            )
        );
        assert_eq!(
            transport_failure(&ureq::Error::RequireHttpsOnly("http://x".into())).kind,
            PullErrorKind::Invalid
        );
    }

    #[test]
    fn ca_files() {
        let system = Arc::new(Vec::new());
        assert!(matches!(roots(&system, None), Ok(RootCerts::WebPki)));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        assert!(matches!(
            roots(&system, Some(&empty)),
            Err(RegistryError::NoCertificate { .. })
        ));
        assert!(matches!(
            roots(&system, Some(&dir.path().join("absent.pem"))),
            Err(RegistryError::CaFile { .. })
        ));
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, cert.cert.pem()).unwrap();
        match roots(&system, Some(&pem)).unwrap() {
            RootCerts::Specific(certs) => assert_eq!(certs.len(), 1),
            other => panic!("{other:?}"),
        }
    }
}
