//! What the tests of the security context and the startup probe share.

use sandpit_proto::sandbox::v1 as pb;
use tonic_types::StatusExt;

use super::{create_request, CreatePolicy};
use crate::model::{NewSandbox, ResourceSpec};

/// A container as the client sends it by default.
pub(super) fn container() -> pb::Container {
    pb::Container {
        name: "main".into(),
        image: "python:3.11".into(),
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "sleep infinity".into()],
        ..Default::default()
    }
}

/// A spec with that container, changed by `f`.
pub(super) fn spec(f: impl FnOnce(&mut pb::SandboxSpec)) -> pb::SandboxSpec {
    let mut s = pb::SandboxSpec {
        containers: vec![container()],
        ..Default::default()
    };
    f(&mut s);
    s
}

/// Validates a request of that spec.
pub(super) fn validate(spec: pb::SandboxSpec) -> Result<NewSandbox, tonic::Status> {
    let req = pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    create_request(
        &req,
        &CreatePolicy {
            runner_id: "r1".into(),
            default_resources: ResourceSpec::default(),
            disk: Default::default(),
            max_lifetime_seconds: 86_400,
            network: None,
            storage: None,
        },
    )
}

/// The refusal of a spec: INVALID_ARGUMENT with CWSANDBOX_INVALID_REQUEST,
/// and its violations as (field, description).
pub(super) fn violations(spec: pb::SandboxSpec) -> Vec<(String, String)> {
    let status = validate(spec).expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("error info");
    assert_eq!(info.reason, "CWSANDBOX_INVALID_REQUEST");
    details
        .bad_request()
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| (v.field.clone(), v.description.clone()))
                .collect()
        })
        .unwrap_or_default()
}
