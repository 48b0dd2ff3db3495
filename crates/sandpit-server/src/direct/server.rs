//! A runner's direct data-plane endpoint: SandboxDataPlaneService over
//! TLS that requires a client certificate from the cluster CA. The
//! certificate is the whole credential (the client sends no key here): its
//! grant names the one sandbox, the principal and the operations allowed,
//! and every call is checked against it before the same handlers as
//! SandboxService's data RPCs run.

use std::future::Future;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_data_plane_service_server::{
    SandboxDataPlaneService, SandboxDataPlaneServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Code, Request, Response, Status, Streaming};

use super::ca::grant_of;
use crate::api::errors::{self, invalid_request, reason, Violation};
use crate::api::{exec, files, logs, DataPlaneOptions};
use crate::engine::Engine;
use crate::manager::Manager;
use crate::model::Principal;
use crate::server::ServerError;

use pb::SandboxDataPermission as Perm;

/// What the direct endpoint serves with.
#[derive(Debug, Clone)]
pub struct DirectTls {
    /// The endpoint's certificate and key, PEM.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
    /// The cluster CA's certificate: clients must chain to it.
    pub client_ca_pem: String,
}

struct DirectApi<E: Engine> {
    manager: Manager<E>,
    data: DataPlaneOptions,
}

/// Checks the caller's certificate against `sandbox_id` and `permission`
/// and records its principal for the handlers.
fn authorize<T>(
    request: &mut Request<T>,
    sandbox_id: &str,
    permission: Perm,
) -> Result<(), Status> {
    let grant = request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| grant_of(c.as_ref())))
        .ok_or_else(|| {
            errors::status(
                Code::Unauthenticated,
                "no sandbox credential: ask ConnectSandbox for a certificate",
                reason::UNAUTHENTICATED,
                &[],
            )
        })?;
    if !grant.allows(sandbox_id, permission) {
        return Err(errors::status(
            Code::PermissionDenied,
            format!(
                "the credential does not allow {} on sandbox {sandbox_id}",
                permission.as_str_name()
            ),
            reason::UNAUTHENTICATED,
            &[("sandbox_id", sandbox_id.to_owned())],
        ));
    }
    request.extensions_mut().insert(Principal(grant.principal));
    Ok(())
}

#[tonic::async_trait]
impl<E: Engine> SandboxDataPlaneService for DirectApi<E> {
    async fn exec(
        &self,
        mut request: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        authorize(&mut request, &id, Perm::Exec)?;
        exec::exec(&self.manager, self.data.shutdown.clone(), request).await
    }

    async fn stream_exec(
        &self,
        mut request: Request<Streaming<pb::ExecStreamRequest>>,
    ) -> Result<Response<BoxStream<pb::ExecStreamResponse>>, Status> {
        // The init names the sandbox: read it, check it, then go on.
        let init = match request.get_mut().message().await? {
            Some(pb::ExecStreamRequest {
                message: Some(pb::exec_stream_request::Message::Init(init)),
            }) => init,
            _ => {
                return Err(invalid_request(&[Violation::new(
                    "init",
                    "the first message of StreamExec must be init",
                )]))
            }
        };
        authorize(&mut request, &init.sandbox_id, Perm::StreamExec)?;
        let principal = crate::api::principal(&request)?;
        let deadline =
            exec::grpc_timeout(request.metadata()).map(|d| tokio::time::Instant::now() + d);
        exec::stream_exec_from(
            &self.manager,
            self.data.shutdown.clone(),
            &principal,
            deadline,
            init,
            request.into_inner(),
        )
        .await
    }

    async fn stream_logs(
        &self,
        mut request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<BoxStream<pb::LogEntry>>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        authorize(&mut request, &id, Perm::StreamLogs)?;
        logs::stream_logs(
            &self.manager,
            self.data.logs.clone(),
            self.data.shutdown.clone(),
            request,
        )
        .await
    }

    async fn write_file(
        &self,
        mut request: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        authorize(&mut request, &id, Perm::WriteFile)?;
        files::write_file(&self.manager, self.data.max_file_bytes, request).await
    }

    async fn read_file(
        &self,
        mut request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let id = request.get_ref().sandbox_id.clone();
        authorize(&mut request, &id, Perm::ReadFile)?;
        files::read_file(&self.manager, self.data.max_file_bytes, request).await
    }
}

/// Serves the direct endpoint on `listener` until `shutdown` resolves.
pub async fn serve<E: Engine>(
    listener: TcpListener,
    manager: Manager<E>,
    tls: DirectTls,
    max_message_bytes: usize,
    data: DataPlaneOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    // Long streams end when the shutdown starts, as on the main endpoint.
    let (stopping, stop_rx) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    let data = DataPlaneOptions {
        shutdown: stop_rx,
        ..data
    };
    let service = SandboxDataPlaneServiceServer::new(DirectApi { manager, data })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            // Exec's small frames must not wait for Nagle.
            let _ = c.set_nodelay(true);
        }
        conn
    });
    crate::install_tls_provider();
    Server::builder()
        .tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                .client_ca_root(Certificate::from_pem(&tls.client_ca_pem)),
        )?
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
