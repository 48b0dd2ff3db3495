//! `security_context` and startup probes through the real gRPC handlers
//! over the in-memory engine: what reaches the engine, what is refused and
//! how, and how a probe gates RUNNING.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_runtime::{capability_by_name, capability_mask, DEFAULT_CAPS};
use sandpit_server::api::validate::PROBE_ANNOTATION;
use sandpit_wire::{ProbeCheck, RunAs, StartupState};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

mod common;
use common::*;

fn request(f: impl FnOnce(&mut pb::SandboxSpec)) -> pb::CreateSandboxRequest {
    let mut spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: "python:3.11".into(),
            command: "sleep".into(),
            args: vec!["infinity".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    f(&mut spec);
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn create(
    c: &mut SandboxServiceClient<Channel>,
    req: pb::CreateSandboxRequest,
) -> Result<pb::Sandbox, tonic::Status> {
    c.create_sandbox(with_key(req, ALICE))
        .await
        .map(|r| r.into_inner())
}

async fn get(c: &mut SandboxServiceClient<Channel>, id: &str) -> pb::Sandbox {
    c.get_sandbox(with_key(
        pb::GetSandboxRequest {
            sandbox_id: id.into(),
        },
        ALICE,
    ))
    .await
    .unwrap()
    .into_inner()
}

fn state(sb: &pb::Sandbox) -> pb::State {
    sb.status.as_ref().unwrap().state()
}

async fn wait_state(
    c: &mut SandboxServiceClient<Channel>,
    id: &str,
    want: pb::State,
) -> pb::Sandbox {
    for _ in 0..500 {
        let sb = get(c, id).await;
        if state(&sb) == want {
            return sb;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never reached {want:?}");
}

#[tokio::test]
async fn an_accepted_security_context_reaches_the_engine() {
    let server = start().await;
    let mut c = server.client().await;
    let sb = create(
        &mut c,
        request(|s| {
            s.containers[0].security_context = Some(pb::SecurityContext {
                run_as_user: Some(1000),
                run_as_group: Some(100),
                read_only_root_filesystem: Some(true),
                capabilities_drop: vec!["NET_RAW".into()],
                allow_privilege_escalation: Some(false),
                seccomp_profile: "RuntimeDefault".into(),
                ..Default::default()
            })
        }),
    )
    .await
    .unwrap();
    assert_eq!(state(&sb), pb::State::Running);
    let spec = server.engine.spec(&sb.sandbox_id).unwrap();
    assert_eq!(
        spec.run_as,
        RunAs {
            user: "1000".into(),
            group: "100".into()
        }
    );
    assert!(spec.read_only_root);
    let net_raw = capability_by_name("NET_RAW").unwrap();
    let keep: Vec<u32> = DEFAULT_CAPS
        .iter()
        .copied()
        .filter(|&c| c != net_raw)
        .collect();
    assert_eq!(spec.capabilities, Some(capability_mask(&keep)));
    // Get returns the context as sent.
    let echoed = get(&mut c, &sb.sandbox_id).await.spec.unwrap();
    assert_eq!(
        echoed.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities_drop,
        ["NET_RAW"]
    );
}

#[tokio::test]
async fn refused_settings_name_their_fields_and_create_nothing() {
    let server = start().await;
    let mut c = server.client().await;
    let status = create(
        &mut c,
        request(|s| {
            s.containers[0].security_context = Some(pb::SecurityContext {
                privileged: Some(true),
                capabilities_add: vec!["NET_BIND_SERVICE".into(), "SYS_ADMIN".into()],
                ..Default::default()
            })
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    assert_eq!(
        details.error_info().unwrap().reason,
        "CWSANDBOX_INVALID_REQUEST"
    );
    let v: Vec<(String, String)> = details
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| (v.field.clone(), v.description.clone()))
        .collect();
    let p = "sandbox.spec.containers[0].security_context";
    assert_eq!(v[0].0, format!("{p}.privileged"));
    assert!(v[0].1.starts_with("privileged sandboxes are not offered: "));
    assert_eq!(v[1].0, format!("{p}.capabilities_add[1]"));
    assert!(
        v[1].1.starts_with("SYS_ADMIN is not offered: "),
        "{}",
        v[1].1
    );
    assert_eq!(v.len(), 2);
    // The message says it too, once.
    assert!(
        status.message().contains("SYS_ADMIN"),
        "{}",
        status.message()
    );
    assert!(server.engine.alive().is_empty());
    let listed = c
        .list_sandboxes(with_key(
            pb::ListSandboxesRequest {
                show_terminated: true,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.is_empty());
}

fn probed(json: &str) -> pb::CreateSandboxRequest {
    request(|s| {
        s.annotations
            .insert(PROBE_ANNOTATION.into(), json.to_owned());
    })
}

#[tokio::test]
async fn a_probe_answers_creating_and_gates_running() {
    let server = start().await;
    let mut c = server.client().await;
    let sb = create(
        &mut c,
        probed(r#"{"http": {"port": 8000, "path": "/ready"}, "period_seconds": 1}"#),
    )
    .await
    .unwrap();
    assert_eq!(state(&sb), pb::State::Creating);
    let id = sb.sandbox_id;
    let spec = server.engine.spec(&id).unwrap();
    let probe = spec.startup_probe.unwrap();
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            port: 8000,
            path: "/ready".into()
        }
    );
    assert_eq!((probe.period_ms, probe.failure_threshold), (1000, 3));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state(&get(&mut c, &id).await), pb::State::Creating);
    server.engine.finish_startup(&id, StartupState::Ready);
    let sb = wait_state(&mut c, &id, pb::State::Running).await;
    assert!(sb.status.unwrap().start_time.is_some());
}

#[tokio::test]
async fn a_failed_probe_ends_failed_with_its_output() {
    let server = start().await;
    let mut c = server.client().await;
    let mut req = request(|_| {});
    req.sandbox
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .startup_probe = Some(pb::Probe {
        exec: vec!["cat".into(), "/ready".into()],
        period_seconds: 1,
        failure_threshold: 2,
        ..Default::default()
    });
    let sb = create(&mut c, req).await.unwrap();
    assert_eq!(state(&sb), pb::State::Creating);
    server.engine.finish_startup(
        &sb.sandbox_id,
        StartupState::Failed(
            "2 consecutive checks failed; last: exec exited with code 1: cat: /ready: \
             No such file or directory"
                .into(),
        ),
    );
    let sb = wait_state(&mut c, &sb.sandbox_id, pb::State::Failed).await;
    assert_eq!(
        sb.status.unwrap().state_reason,
        "startup probe failed: 2 consecutive checks failed; last: exec exited with code 1: \
         cat: /ready: No such file or directory"
    );
    assert!(server.engine.destroyed(&sb.sandbox_id));
}
