//! The gRPC server: SandboxService and DiscoveryService behind the auth
//! interceptor, plus health and reflection (no key needed, so `grpcurl`
//! and load balancers work), over h2c or TLS.

use std::future::Future;
use std::time::SystemTime;

use sandpit_proto::sandbox::v1::discovery_service_server::DiscoveryServiceServer;
use sandpit_proto::sandbox::v1::sandbox_service_server::SandboxServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::api::{
    AccountingApi, CheckpointApi, DataPlaneOptions, DiscoveryApi, OperationsApi, SandboxApi,
    SettingsApi, VolumeApi,
};
use crate::auth::Auth;
use crate::engine::Engine;
use crate::logs::LogReader;
use crate::manager::Manager;
use crate::secrets::SecretStores;
use crate::storage::Storage;
use sandpit_proto::sandbox::v1::settings_service_server::SettingsServiceServer;
use sandpit_proto::sandbox::v1::volume_service_server::VolumeServiceServer;
use sandpit_proto::sandpit::v1::accounting_server::AccountingServer;
use sandpit_proto::sandpit::v1::checkpoint_service_server::CheckpointServiceServer;
use sandpit_proto::sandpit::v1::operations_server::OperationsServer;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not be built from the descriptors.
    #[error("build reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// TLS set-up or serving failed.
    #[error("transport")]
    Transport(#[from] tonic::transport::Error),
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// PEM certificate chain and key; plaintext (h2c) when `None`.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// This runner's id.
    pub runner_id: String,
    /// The organization of callers whose key names none.
    pub organization_id: String,
    /// When the daemon started (discovery's `connected_at`).
    pub started: SystemTime,
    /// Largest file moved by one ReadFile or WriteFile.
    pub max_file_bytes: u64,
    /// Where the log sink keeps main-process output (StreamLogs).
    pub logs: Option<LogReader>,
    /// Where `image_pull_credentials` are looked up.
    pub secret_stores: SecretStores,
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting and
/// lets in-flight calls finish. Sandboxes are not touched.
pub async fn serve<E: Engine>(
    listener: TcpListener,
    manager: Manager<E>,
    auth: Auth,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    serve_with_storage(listener, manager, auth, options, None, shutdown).await
}

/// [`serve`], with volumes and snapshots (VolumeService, the snapshot RPCs
/// and SettingsService's bucket configuration) when `storage` is given.
pub async fn serve_with_storage<E: Engine>(
    listener: TcpListener,
    manager: Manager<E>,
    auth: Auth,
    options: ServerOptions,
    storage: Option<Storage<E>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let max = options.max_message_bytes;
    // Long data-plane streams (exec, followed logs) end when shutdown starts,
    // or the graceful shutdown would wait for them.
    let (stopping, stop_rx) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    let data = DataPlaneOptions {
        max_file_bytes: options.max_file_bytes,
        logs: options.logs.clone(),
        shutdown: stop_rx,
    };
    let mut sandbox_api = SandboxApi::new(manager.clone(), options.runner_id.clone(), data)
        .with_secret_stores(options.secret_stores.clone());
    if let Some(storage) = &storage {
        sandbox_api = sandbox_api.with_storage(storage.clone());
    }
    let sandbox = SandboxServiceServer::new(sandbox_api)
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let checkpoint = CheckpointServiceServer::new(CheckpointApi::new(manager.clone()));
    let operations = OperationsServer::new(OperationsApi::new(manager.clone()));
    let accounting = AccountingServer::new(AccountingApi::new(manager.clone()));
    let discovery = DiscoveryServiceServer::new(DiscoveryApi::new(
        manager,
        options.runner_id.clone(),
        options.started,
        options.organization_id.clone(),
    ));

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

    // Small frames (an exec's ready, output and exit) must not wait for
    // Nagle and delayed ACKs: that alone costs an exec round trip ~40 ms.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
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
        .add_service(InterceptedService::new(discovery, auth.interceptor()))
        .add_service(InterceptedService::new(checkpoint, auth.interceptor()))
        .add_service(InterceptedService::new(operations, auth.interceptor()))
        .add_service(InterceptedService::new(accounting, auth.interceptor()));
    if let Some(storage) = storage.filter(|s| s.offered()) {
        routes = routes
            .add_service(InterceptedService::new(
                VolumeServiceServer::new(VolumeApi::new(storage.clone())),
                auth.interceptor(),
            ))
            .add_service(InterceptedService::new(
                SettingsServiceServer::new(SettingsApi::new(storage)),
                auth.interceptor(),
            ));
    }
    // The services of the protocol this server does not offer (templates,
    // settings, volumes, the direct data plane), and any other path, answer
    // UNIMPLEMENTED with the client's ErrorInfo instead of a bare status.
    let router = std::mem::take(routes.axum_router_mut());
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
    crate::api::errors::rpc_not_implemented(rpc).into_http()
}
