//! The gRPC server: SandboxService and DiscoveryService behind the auth
//! interceptor, plus health and reflection (no key needed, so `grpcurl`
//! and load balancers work), over h2c or TLS.

use std::future::Future;
use std::time::SystemTime;

use sandpit_proto::sandbox::v1::discovery_service_server::DiscoveryServiceServer;
use sandpit_proto::sandbox::v1::sandbox_service_server::SandboxServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::api::{DiscoveryApi, SandboxApi};
use crate::auth::Auth;
use crate::engine::Engine;
use crate::manager::Manager;

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
    /// When the daemon started (discovery's `connected_at`).
    pub started: SystemTime,
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
    let max = options.max_message_bytes;
    let sandbox =
        SandboxServiceServer::new(SandboxApi::new(manager.clone(), options.runner_id.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
    let discovery = DiscoveryServiceServer::new(DiscoveryApi::new(
        manager,
        options.runner_id.clone(),
        options.started,
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

    let mut builder = Server::builder();
    if let Some((cert, key)) = &options.tls {
        builder =
            builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(sandbox, auth.interceptor()))
        .add_service(InterceptedService::new(discovery, auth.interceptor()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
