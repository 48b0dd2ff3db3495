//! ConnectSandbox (docs/scale-out.md, "The direct data plane"): a
//! certificate for one sandbox, signed by the cluster CA from the client's
//! CSR, and the endpoint of the runner that holds the sandbox.

use std::future::Future;

use sandpit_proto::sandbox::v1 as pb;
use tonic::{Code, Response, Status};

use super::directory::Runner;
use crate::api::errors::{self, invalid_request, reason, Violation};
use crate::direct::ClusterCa;

/// The connection for `req` by `caller`, whose sandbox `runner` resolves
/// to its runner (after the request is checked, so a bad request costs no
/// lookup).
pub(super) async fn connect(
    ca: &ClusterCa,
    caller: &str,
    req: &pb::ConnectSandboxRequest,
    runner: impl Future<Output = Result<Runner, Status>>,
) -> Result<Response<pb::SandboxConnection>, Status> {
    let mut bad = Vec::new();
    if req.csr_der.is_empty() {
        bad.push(Violation::new("csr_der", "required"));
    }
    if req.requested_permissions.is_empty() {
        bad.push(Violation::new("requested_permissions", "required"));
    }
    for (i, p) in req.requested_permissions.iter().enumerate() {
        if !crate::direct::grant::is_data_permission(*p) {
            bad.push(Violation::new(
                format!("requested_permissions[{i}]"),
                format!("{p} is not a data-plane permission"),
            ));
        }
    }
    if !bad.is_empty() {
        return Err(invalid_request(&bad));
    }
    let runner = runner.await?;
    let Some(direct) = runner.status.direct.clone() else {
        return Err(errors::status(
            Code::Unimplemented,
            format!(
                "runner {} offers no direct endpoint; send data calls to this gateway",
                runner.status.id
            ),
            reason::NOT_IMPLEMENTED,
            &[("runner_id", runner.status.id.as_str().to_owned())],
        ));
    };
    let mut permissions = req.requested_permissions.clone();
    permissions.sort_unstable();
    permissions.dedup();
    let grant = crate::direct::Grant {
        sandbox_id: req.sandbox_id.clone(),
        principal: caller.to_owned(),
        permissions,
    };
    let issued = ca
        .issue(&req.csr_der, &grant, crate::direct::CREDENTIAL_TTL)
        .map_err(|e| match e {
            crate::direct::ca::CaError::Csr(why) => {
                invalid_request(&[Violation::new("csr_der", why)])
            }
            other => Status::internal(format!(
                "cannot sign the credential: {}",
                sandpit_errors::chain(&other)
            )),
        })?;
    tracing::debug!(sandbox_id = %grant.sandbox_id, runner = %runner.status.id, "direct credential issued");
    Ok(Response::new(pb::SandboxConnection {
        endpoint_uri: direct.uri,
        client_certificate_chain_pem: issued.chain_pem.into_bytes(),
        server_ca_bundle_pem: direct.cert_pem.into_bytes(),
        expires_at: Some(crate::api::convert::timestamp(issued.not_after)),
        endpoint_id: runner.status.id.as_str().to_owned(),
        transport: pb::SandboxDataTransport::DirectMtls as i32,
        protocol: pb::SandboxDataProtocol::ConnectH2V1 as i32,
        granted_permissions: grant.permissions,
    }))
}
