//! Sandpit's OCI registry client: pulls images over the distribution API
//! into the [`sandpit_image::ImageStore`].
//!
//! [`Puller::pull`] resolves a reference (tag or digest; a multi-arch index
//! to the host's platform), fetches and verifies the manifest and config,
//! then streams each missing layer from HTTP straight into the store's
//! hostile-tar-safe import, verifying the blob digest and the config's diff
//! id before the layer becomes visible. Concurrent pulls of one reference
//! share one download.
//!
//! Behaviour follows Docker and containerd: `docker.io` is served by
//! `registry-1.docker.io`; mirrors are tried first, in order; anonymous or
//! credentialed Bearer token flow and Basic auth; redirects followed, with
//! `Authorization` dropped when they leave the host. Plain HTTP only where
//! configured ([`RegistryHost::insecure`], an `http://` mirror), never as a
//! fallback. See `docs/registries.md`.
//!
//! The API is blocking: call it from a thread that may block (the daemon
//! uses `spawn_blocking`).
//!
//! # Errors
//!
//! [`RegistryError`] keeps its causes as `source()` and never prints them
//! (the caller joins the chain once, at the edge). [`PullError`] is the
//! exception, on purpose: see its docs, and the crate-internal `chain()`
//! that builds its message.

#![forbid(unsafe_code)]

use std::fmt;

use sandpit_image::Digest;

mod auth;
mod client;
mod config;
mod manifest;
mod pull;

pub use config::{
    Credentials, RegistryConfig, RegistryError, RegistryHost, DEFAULT_CONCURRENT_LAYERS,
    DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_LAYER_BYTES,
};
pub use pull::Puller;

/// Progress of a pull, reported as it happens (from the pull's threads).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// Another caller is already pulling this reference: this call waits
    /// for its outcome and reports nothing else.
    Waiting,
    /// The manifest and config are fetched and verified.
    Resolved {
        /// The endpoint that served them (a mirror or the registry).
        endpoint: String,
        /// Digest of the manifest the reference names (the index for a
        /// multi-arch image).
        manifest_digest: Digest,
        /// Layers, bottom first; `index` in later events refers to this.
        layers: Vec<LayerProgressInfo>,
    },
    /// Layer `index` is already in the store.
    LayerCached { index: usize },
    /// Bytes of layer `index`'s blob received so far.
    LayerBytes { index: usize, done: u64, total: u64 },
    /// Layer `index` is verified and stored.
    LayerDone { index: usize },
}

/// A layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgressInfo {
    /// Digest of the blob.
    pub digest: Digest,
    /// Blob size in bytes (compressed).
    pub size: u64,
}

/// What kind of failure a [`PullError`] is, for callers that map it (to a
/// gRPC status, an exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PullErrorKind {
    /// No such repository, tag, manifest or blob.
    NotFound,
    /// Authentication failed or access was denied.
    Unauthorized,
    /// The registry could not be reached, answered 5xx or went away
    /// mid-transfer.
    Unreachable,
    /// A layer or the image exceeds the configured caps.
    TooLarge,
    /// A multi-arch image without the host's platform.
    NoMatchingPlatform,
    /// Bad manifest or config, digest mismatch, refused tar entry,
    /// unsupported media type.
    Invalid,
    /// Local failure of the image store.
    Store,
}

impl PullErrorKind {
    /// Short lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotFound => "not found",
            Self::Unauthorized => "unauthorized",
            Self::Unreachable => "unreachable",
            Self::TooLarge => "too large",
            Self::NoMatchingPlatform => "no matching platform",
            Self::Invalid => "invalid",
            Self::Store => "store",
        }
    }
}

impl fmt::Display for PullErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a pull failed. `Clone`: callers of a coalesced pull all get it.
///
/// A kind and a message built once, where the failure happened, rather
/// than an error with a `source()`: every waiter of a coalesced pull gets a
/// clone, and the foreign errors behind it (ureq, rustls, io, the store's)
/// are not `Clone`. The message is the cause chain flattened by `chain()`
/// (`registry unreachable: connection refused`); `source()` is `None`, so
/// an edge that joins the chain prints it once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pull {reference}: {message}")]
pub struct PullError {
    reference: String,
    kind: PullErrorKind,
    message: String,
}

impl PullError {
    /// What kind of failure this is.
    pub fn kind(&self) -> PullErrorKind {
        self.kind
    }

    /// The reference that was pulled.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The failure without the reference.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// A failure before the reference is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub kind: PullErrorKind,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: PullErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(PullErrorKind::Invalid, message)
    }

    pub(crate) fn into_pull_error(self, reference: &str) -> PullError {
        PullError {
            reference: reference.to_owned(),
            kind: self.kind,
            message: self.message,
        }
    }
}

/// `err` and its sources, `: `-separated: the one place this crate turns
/// an error into text. [`PullError`] must be a plain value (see there), so
/// the errors behind a failure (ureq, rustls, io, serde, the store's
/// `ImageError`) are flattened into its message here, once; the reason
/// helpers of `client.rs` only pick short words for the common transport
/// failures and fall back on this. Every other error of the crate keeps its
/// source instead.
///
/// A source whose text already ends the message is skipped: our own errors
/// never print their source (tested), but foreign ones may both print it
/// and return it from `source()` (an `io::Error` wrapping another error
/// displays the inner one and returns the inner one's source), and the
/// message must not say it twice. Nothing else in this crate
/// de-duplicates.
pub(crate) use sandpit_errors::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_types_are_send_sync() {
        fn check<T: Send + Sync + fmt::Debug>() {}
        check::<Puller>();
        check::<PullError>();
        check::<RegistryError>();
        check::<Progress>();
    }

    #[test]
    fn errors_display_their_reference_and_kind() {
        let e = Failure::new(PullErrorKind::NotFound, "manifest unknown (not found)")
            .into_pull_error("127.0.0.1:5000/x:1");
        assert_eq!(
            e.to_string(),
            "pull 127.0.0.1:5000/x:1: manifest unknown (not found)"
        );
        assert_eq!(e.kind(), PullErrorKind::NotFound);
        assert_eq!(e.reference(), "127.0.0.1:5000/x:1");
        assert_eq!(e.clone(), e);
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(PullErrorKind::TooLarge.to_string(), "too large");
    }

    #[test]
    fn chain_flattens_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
        // A foreign error that prints its source and returns it too.
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper: {0}")]
        struct Loud(#[source] Outer);
        let e = Loud(Outer(std::io::Error::other("inner")));
        assert_eq!(chain(&e), "wrapper: outer: inner");
    }

    /// Our errors with a source never print it: the edge joins the chain.
    #[test]
    fn errors_with_a_source_do_not_repeat_it() {
        let e = RegistryError::CaFile {
            path: "/etc/ca.pem".into(),
            source: std::io::Error::other("permission denied"),
        };
        let source = std::error::Error::source(&e).expect("has a source");
        assert!(!e.to_string().contains(&source.to_string()), "{e}");
        assert_eq!(e.to_string(), "read ca file /etc/ca.pem");
        assert_eq!(chain(&e), "read ca file /etc/ca.pem: permission denied");
        // The store's errors, flattened into a pull's message, appear once.
        let store = sandpit_image::ImageError::Archive(std::io::Error::other("bad gzip header"));
        assert_eq!(chain(&store), "read layer: bad gzip header");
    }
}
