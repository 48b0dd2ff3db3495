//! `sandpitd`: the `coreweave.sandbox.v1` gRPC service over the sandpit
//! engine, wire-compatible with the `cwsandbox` Python client.
//!
//! Layers, outside in:
//!
//! - [`server`]: tonic server (h2c or TLS), health, reflection, and the
//!   [`auth`] interceptor that turns API keys into [`model::Principal`]s.
//! - [`api`]: gRPC handlers; validation of requests into domain types,
//!   records into messages, errors into `google.rpc.Status` details.
//! - [`manager`]: the lifecycle state machine over its own types
//!   ([`model`]): creation, watching main processes, stopping with a grace
//!   period, lifetimes, retention, adoption after a restart. Persists every
//!   change in [`db`] (SQLite) before reporting it.
//! - [`engine::Engine`]: what the manager needs from the machinery;
//!   [`local::LocalEngine`] over `sandpit-runtime` and `sandpit-image`,
//!   [`fake::FakeEngine`] in memory for tests.
//! - [`logs::LogSink`]: where main-process output goes while watched.
//!
//! [`config`] merges the TOML file and flags; the binary (`src/main.rs`)
//! wires everything up.

pub mod accounting;
pub mod api;
pub mod auth;
pub mod clock;
pub mod clusterconfig;
pub mod config;
pub mod console;
pub mod consoleconfig;
pub mod db;
pub mod direct;
pub mod engine;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod gateway;
pub mod limitsconfig;
pub mod local;
pub mod local_net;
pub mod local_storage;
pub mod logs;
pub mod lxcfs;
pub mod manager;
pub mod membership;
pub mod metrics;
pub mod metricsconfig;
pub mod model;
pub mod netconfig;
mod offload;
pub mod poolconfig;
pub mod principals;
pub mod sd_notify;
pub mod secrets;
pub mod server;
pub mod storage;
pub mod storageconfig;

/// An error and its sources along `source()`, joined with ": " (the one
/// chain printer at the daemon's edges: gRPC messages, state reasons,
/// logs). Errors of this workspace never repeat their source in their own
/// message; a foreign one that does (some I/O and TLS errors print theirs)
/// is not printed twice.
pub use sandpit_errors::chain;

/// Makes ring the process's rustls provider, once, before any TLS server
/// is built. Two providers are linked (ring here and in tonic, aws-lc-rs
/// through object_store's S3 client), so rustls cannot pick one itself and
/// panics at the first server config it builds. A client that names no
/// provider (the S3 client's) gets ring too.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An embedding program that installed one first keeps its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
