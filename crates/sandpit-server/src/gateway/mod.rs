//! The gateway role (docs/scale-out.md): `coreweave.sandbox.v1` for
//! clients in front of many runners. It holds no state of its own: every
//! decision is a PostgreSQL transaction of [`sandpit_cluster::Store`], so
//! any number of gateways serve the same clients.
//!
//! - A create is placed ([`Store::place`], under a reservation id), sent
//!   to the chosen runner, and bound to the id the runner gave it.
//! - Every call about one sandbox is sent to the runner its row names,
//!   with the caller's metadata (its key: the runner authenticates it
//!   again and keeps tenancy, the gateway only routes).
//! - Listings and discovery ask every live runner and merge.
//! - A timer fails the sandboxes of runners whose lease expired
//!   ([`Store::expire_leases`]); the answers about those come from their
//!   rows, since their runner no longer answers.
//!
//! It lives in this crate, not one of its own, because it is a role of
//! the one `sandpitd` binary and shares the API's validation (requests'
//! resources), error mapping (the client's ErrorInfo reasons) and keys.

mod connect;
mod directory;
mod discovery;
mod forward;
mod sandbox;

use std::future::Future;
use std::time::Duration;

use sandpit_cluster::Store;
use sandpit_proto::sandbox::v1::discovery_service_server::DiscoveryServiceServer;
use sandpit_proto::sandbox::v1::sandbox_service_server::SandboxServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::auth::Auth;
use crate::model::ResourceSpec;
use crate::server::ServerError;
use directory::Directory;

/// How the gateway serves.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// PEM certificate chain and key; plaintext (h2c) when `None`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// What a sandbox that asks for nothing requests: the same figures
    /// as the runners' `[resources]`, so that placement takes what the
    /// runner will admit.
    pub default_resources: ResourceSpec,
    /// The cluster's lease; leases are checked every quarter of it.
    pub lease: Duration,
    /// The CA that signs ConnectSandbox credentials; `None`: clients use
    /// the gateway for data calls too.
    pub ca: Option<crate::direct::ClusterCa>,
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    auth: Auth,
    options: GatewayOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let max = options.max_message_bytes;
    let directory = Directory::new(store.clone(), max);
    let _leases = AbortOnDrop(tokio::spawn(expire_leases(
        store.clone(),
        directory.clone(),
        options.lease / 4,
    )));
    let sandbox = SandboxServiceServer::new(sandbox::GatewaySandboxApi::new(
        directory.clone(),
        options.default_resources,
        options.ca.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let discovery = DiscoveryServiceServer::new(discovery::GatewayDiscoveryApi::new(directory));

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [
        "",
        sandpit_proto::sandbox::v1::sandbox_service_server::SERVICE_NAME,
        sandpit_proto::sandbox::v1::discovery_service_server::SERVICE_NAME,
    ] {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sandpit_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            // Small frames (exec output) must not wait for Nagle.
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let mut builder = Server::builder();
    if let Some((cert, key)) = &options.tls {
        crate::install_tls_provider();
        builder =
            builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    let mut routes = Routes::new(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(sandbox, auth.interceptor()))
        .add_service(InterceptedService::new(discovery, auth.interceptor()));
    let router = std::mem::take(routes.axum_router_mut());
    // The same API counters and histograms as a runner's (metrics/grpc.rs).
    *routes.axum_router_mut() = router
        .fallback(unknown_rpc)
        .layer(axum::middleware::from_fn(crate::metrics::grpc::track));
    builder
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

async fn unknown_rpc(uri: axum::http::Uri) -> axum::response::Response {
    let rpc = uri.path().trim_start_matches('/');
    crate::api::errors::status(
        tonic::Code::Unimplemented,
        format!("{rpc} is not offered through the gateway"),
        crate::api::errors::reason::NOT_IMPLEMENTED,
        &[],
    )
    .into_http()
}

/// Fails the sandboxes of runners whose lease ran out, every `every`. Any
/// number of gateways run this: the store skips rows another holds.
async fn expire_leases(store: Store, directory: Directory, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.expire_leases().await {
            Ok(failed) => {
                for row in &failed {
                    tracing::warn!(sandbox_id = %row.id, runner = %row.runner, reason = %row.reason, "sandbox failed: its runner's lease expired");
                }
            }
            Err(e) => {
                tracing::warn!(error = %sandpit_errors::chain(&e), "cannot check runners' leases")
            }
        }
        directory.refresh().await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
