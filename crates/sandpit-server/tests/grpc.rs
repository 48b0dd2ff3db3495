//! The gRPC server in-process on 127.0.0.1:0 with the fake engine, driven by
//! the generated tonic clients as a remote caller would.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::discovery_service_client::DiscoveryServiceClient;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use sandpit_server::engine::{MainExit, PullFailure, PullFailureKind};
use sandpit_wire::ExitStatus;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

mod common;
use common::*;

fn create_request(tags: &[&str], request_id: &str) -> pb::CreateSandboxRequest {
    let mut spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: "python:3.11".into(),
            command: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "trap \"exit 0\" TERM INT; sleep infinity & wait".into(),
            ],
            ..Default::default()
        }],
        tags: tags.iter().map(|t| t.to_string()).collect(),
        max_lifetime_seconds: 12 * 3600,
        ..Default::default()
    };
    spec.annotations.insert("purpose".into(), "test".into());
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: request_id.into(),
    }
}

fn reason(s: &Status) -> (String, std::collections::HashMap<String, String>) {
    let d = s.get_error_details();
    let info = d.error_info().expect("ErrorInfo in the status details");
    assert_eq!(info.domain, "cwsandbox.com");
    (info.reason.clone(), info.metadata.clone())
}

/// Polls GetSandbox until the sandbox left PENDING/CREATING.
async fn settle(c: &mut SandboxServiceClient<Channel>, id: &str) -> pb::Sandbox {
    for _ in 0..500 {
        let sb = c
            .get_sandbox(with_key(
                pb::GetSandboxRequest {
                    sandbox_id: id.into(),
                },
                ALICE,
            ))
            .await
            .unwrap()
            .into_inner();
        if !matches!(state(&sb), pb::State::Pending | pb::State::Creating) {
            return sb;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("sandbox {id} did not settle");
}

fn with_image_and_credentials(
    image: &str,
    credentials: Option<pb::ImagePullCredentials>,
) -> pb::CreateSandboxRequest {
    let mut req = create_request(&[], "");
    let c = &mut req
        .sandbox
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[0];
    c.image = image.into();
    c.image_pull_credentials = credentials;
    req
}

fn pull_credentials(registry: &str, store: &str, path: &str) -> pb::ImagePullCredentials {
    pb::ImagePullCredentials {
        registry: registry.into(),
        credentials: Some(pb::SecretSource {
            store_name: store.into(),
            path: path.into(),
            field: String::new(),
        }),
    }
}

#[tokio::test]
async fn missing_images_are_pulled_with_resolved_credentials() {
    let server = start().await;
    let mut c = server.client().await;
    server.engine.hold_pulls();
    server
        .engine
        .add_remote_image("ghcr.io/team/tool:2", &["/tool"], &[]);

    // PENDING while the pull runs, RUNNING after; the credentials came from
    // the secret store.
    let req = with_image_and_credentials(
        "ghcr.io/team/tool:2",
        Some(pull_credentials("GHCR.io", "local", "ghcr")),
    );
    let sb = c
        .create_sandbox(with_key(req, ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&sb), pb::State::Pending);
    let pulls = server.engine.pulls();
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls[0].0, "ghcr.io/team/tool:2");
    let creds = pulls[0].1.clone().expect("credentials passed to the pull");
    assert_eq!(
        (
            creds.registry.as_str(),
            creds.credentials.username.as_str(),
            creds.credentials.password.as_str()
        ),
        ("ghcr.io", "bot", "s3cret")
    );
    server.engine.open_pulls();
    let sb = settle(&mut c, &sb.sandbox_id).await;
    assert_eq!(state(&sb), pb::State::Running);
    assert_eq!(
        server.engine.spec(&sb.sandbox_id).unwrap().lower_dirs,
        [std::path::PathBuf::from("/fake/pulled")]
    );

    // A second sandbox of that image starts from the store: no new pull.
    let sb = c
        .create_sandbox(with_key(
            with_image_and_credentials("ghcr.io/team/tool:2", None),
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&sb), pb::State::Running);
    assert_eq!(server.engine.pulls().len(), 1);

    // Failures say why.
    server.engine.fail_pull(
        "ghcr.io/team/private:1",
        PullFailure {
            kind: PullFailureKind::Unauthorized,
            message: "pull ghcr.io/team/private:1: unauthorized".into(),
        },
    );
    let sb = c
        .create_sandbox(with_key(
            with_image_and_credentials("ghcr.io/team/private:1", None),
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    let sb = settle(&mut c, &sb.sandbox_id).await;
    assert_eq!(state(&sb), pb::State::Failed);
    assert_eq!(
        sb.status.unwrap().state_reason,
        "pull ghcr.io/team/private:1: unauthorized"
    );

    // A sandbox stopped while its image is pulled ends at once and is never
    // created.
    server.engine.hold_pulls();
    server
        .engine
        .add_remote_image("ghcr.io/team/slow:1", &[], &[]);
    let sb = c
        .create_sandbox(with_key(
            with_image_and_credentials("ghcr.io/team/slow:1", None),
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&sb), pb::State::Pending);
    let stopped = c
        .delete_sandbox(with_key(
            pb::DeleteSandboxRequest {
                sandbox_id: sb.sandbox_id.clone(),
                ..Default::default()
            },
            ALICE,
        ))
        .await;
    assert!(stopped.is_ok(), "{stopped:?}");
    let got = settle(&mut c, &sb.sandbox_id).await;
    assert_eq!(state(&got), pb::State::Terminated);
    server.engine.open_pulls();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(server.engine.spec(&sb.sandbox_id).is_none());
    let got = settle(&mut c, &sb.sandbox_id).await;
    assert_eq!(state(&got), pb::State::Terminated);
}

#[tokio::test]
async fn bad_pull_credentials_are_refused_with_the_field() {
    let server = start().await;
    let mut c = server.client().await;
    let p = "sandbox.spec.containers[0].image_pull_credentials";
    let cases = [
        (
            pull_credentials("ghcr.io", "vault", "ghcr"),
            format!("{p}.credentials.store_name"),
            "no secret store named \"vault\" is configured",
        ),
        (
            pull_credentials("ghcr.io", "local", "missing"),
            format!("{p}.credentials.path"),
            "secret \"missing\" not found in store \"local\"",
        ),
        (
            pull_credentials("ghcr.io", "local", "../etc/shadow"),
            format!("{p}.credentials.path"),
            "\"../etc/shadow\" is not a relative path of plain names",
        ),
        (
            pull_credentials("", "local", "ghcr"),
            format!("{p}.registry"),
            "required",
        ),
        (
            pb::ImagePullCredentials {
                registry: "ghcr.io".into(),
                credentials: None,
            },
            format!("{p}.credentials"),
            "required",
        ),
    ];
    for (creds, field, description) in cases {
        let err = c
            .create_sandbox(with_key(
                with_image_and_credentials("ghcr.io/team/tool:2", Some(creds)),
                ALICE,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        let details = err.get_error_details();
        let violations = &details
            .bad_request()
            .expect("BadRequest details")
            .field_violations;
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].field, field);
        assert_eq!(violations[0].description, description);
    }
    assert!(server.engine.pulls().is_empty());
    assert!(server.engine.alive().is_empty());
}

fn state(sb: &pb::Sandbox) -> pb::State {
    sb.status.as_ref().unwrap().state()
}

#[tokio::test]
async fn lifecycle_over_grpc() {
    let server = start().await;
    let mut c = server.client().await;

    let created = c
        .create_sandbox(with_key(create_request(&["t1", "t2"], "req-1"), ALICE))
        .await
        .unwrap()
        .into_inner();
    let id = created.sandbox_id.clone();
    assert_eq!(id.len(), 12);
    let status = created.status.clone().unwrap();
    assert_eq!(status.state(), pb::State::Running);
    assert!(status.create_time.is_some() && status.start_time.is_some());
    assert_eq!(status.effective_max_lifetime_seconds, 43_200);
    // Longer than the runner's maximum: refused, naming the field, never
    // silently shortened.
    let mut long = create_request(&[], "");
    long.sandbox
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .max_lifetime_seconds = 86_401;
    let e = c.create_sandbox(with_key(long, ALICE)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let fields: Vec<String> = e
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["sandbox.spec.max_lifetime_seconds"]);
    assert_eq!(status.runner_id, "runner-1");
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.tags, ["t1", "t2"]);
    assert_eq!(spec.annotations["purpose"], "test");

    // The same request id gives the same sandbox.
    let again = c
        .create_sandbox(with_key(create_request(&["t1", "t2"], "req-1"), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.sandbox_id, id);

    let got = c
        .get_sandbox(with_key(
            pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&got), pb::State::Running);

    let second = c
        .create_sandbox(with_key(create_request(&["t1"], "req-2"), ALICE))
        .await
        .unwrap()
        .into_inner();
    let list = |tags: &[&str], show_terminated: bool| pb::ListSandboxesRequest {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        show_terminated,
        ..Default::default()
    };
    let ids = |r: pb::ListSandboxesResponse| -> Vec<String> {
        r.sandboxes.into_iter().map(|s| s.sandbox_id).collect()
    };
    let all = c
        .list_sandboxes(with_key(list(&["t1"], false), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(all), [id.clone(), second.sandbox_id.clone()]);
    let both = c
        .list_sandboxes(with_key(list(&["t1", "t2"], false), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(both), std::slice::from_ref(&id));

    // The main process exits with 7: FAILED with exit code.
    server.engine.exit(
        &second.sandbox_id,
        MainExit::Exited {
            status: ExitStatus::Code(7),
            oom_kills: 0,
        },
    );
    let failed = loop {
        let s = c
            .get_sandbox(with_key(
                pb::GetSandboxRequest {
                    sandbox_id: second.sandbox_id.clone(),
                },
                ALICE,
            ))
            .await
            .unwrap()
            .into_inner();
        if state(&s) != pb::State::Running {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let st = failed.status.unwrap();
    assert_eq!(st.state(), pb::State::Failed);
    assert_eq!(st.exit_code, Some(7));
    assert_eq!(st.state_reason, "main process exited with code 7");
    assert!(st.end_time.is_some());

    // Stopped with SIGTERM (which this fake main process obeys).
    server.engine.set_sigterm_exits(true);
    let deleted = c
        .delete_sandbox(with_key(
            pb::DeleteSandboxRequest {
                sandbox_id: id.clone(),
                grace_period_seconds: 10,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    let st = deleted.status.unwrap();
    assert_eq!(st.state(), pb::State::Terminated);
    assert_eq!(st.state_reason, "stopped by request");
    assert_eq!(st.exit_code, Some(0));

    // Terminal ones are listed only on request.
    let live = c
        .list_sandboxes(with_key(list(&[], false), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(live.sandboxes.is_empty());
    let terminated = c
        .list_sandboxes(with_key(
            pb::ListSandboxesRequest {
                state: pb::State::Terminated as i32,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(terminated), std::slice::from_ref(&id));

    // allow_missing
    let missing = c
        .delete_sandbox(with_key(
            pb::DeleteSandboxRequest {
                sandbox_id: "doesnotexist".into(),
                allow_missing: true,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(missing.sandbox.is_none());

    // Purge by tag.
    for rid in ["p1", "p2"] {
        c.create_sandbox(with_key(create_request(&["batch"], rid), ALICE))
            .await
            .unwrap();
    }
    let purge = |dry_run| pb::PurgeSandboxesRequest {
        tags: vec!["batch".into()],
        dry_run,
        ..Default::default()
    };
    let n = c
        .purge_sandboxes(with_key(purge(true), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.purge_count, 2);
    let n = c
        .purge_sandboxes(with_key(purge(false), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.purge_count, 2);
    assert!(n.failed_sandbox_ids.is_empty());
    let err = c
        .purge_sandboxes(with_key(pb::PurgeSandboxesRequest::default(), ALICE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn auth_and_isolation() {
    let server = start().await;
    let mut c = server.client().await;
    // No key, a wrong key.
    let err = c
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .get_sandbox(with_key(
            pb::GetSandboxRequest {
                sandbox_id: "x".into(),
            },
            "mallory",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err).0, "CWSANDBOX_UNAUTHENTICATED");

    // wandb's header works too.
    let mut r = Request::new(create_request(&[], ""));
    r.metadata_mut()
        .insert("x-wandb-api-key", MetadataValue::from_static(BOB));
    let bobs = c.create_sandbox(r).await.unwrap().into_inner();

    // Alice cannot see Bob's sandbox: the same answer as a missing one.
    for id in [bobs.sandbox_id.as_str(), "doesnotexist"] {
        let err = c
            .get_sandbox(with_key(
                pb::GetSandboxRequest {
                    sandbox_id: id.into(),
                },
                ALICE,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        let (reason, metadata) = reason(&err);
        assert_eq!(reason, "CWSANDBOX_SANDBOX_NOT_FOUND");
        assert_eq!(metadata["sandbox_id"], id);
        let err = c
            .delete_sandbox(with_key(
                pb::DeleteSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                },
                ALICE,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let listed = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sandboxes.is_empty());
    let listed = c
        .list_sandboxes(with_key(pb::ListSandboxesRequest::default(), BOB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes.len(), 1);
}

#[tokio::test]
async fn errors_carry_structured_details() {
    let server = start().await;
    let mut c = server.client().await;

    let mut bad = create_request(&[], "");
    let spec = bad.sandbox.as_mut().unwrap().spec.as_mut().unwrap();
    spec.max_lifetime_seconds = -1;
    spec.containers[0].resource_requirements = Some(pb::ResourceRequirements {
        limits: Some(pb::Resources {
            cpu: "fast".into(),
            ..Default::default()
        }),
        requests: None,
    });
    let err = c.create_sandbox(with_key(bad, ALICE)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err).0, "CWSANDBOX_INVALID_REQUEST");
    let fields: Vec<String> = err
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "sandbox.spec.max_lifetime_seconds",
            "sandbox.spec.containers[0].resource_requirements.limits.cpu"
        ]
    );

    let mut services = create_request(&[], "");
    services
        .sandbox
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .services = vec![pb::Service {
        port: 80,
        ..Default::default()
    }];
    let err = c
        .create_sandbox(with_key(services, ALICE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let (r, md) = reason(&err);
    assert_eq!(r, "CWSANDBOX_NOT_IMPLEMENTED");
    assert_eq!(md["field"], "sandbox.spec.services");

    // A missing image is pulled in the background: PENDING at first, then
    // FAILED with the pull's reason.
    let mut missing = create_request(&[], "");
    missing
        .sandbox
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = "nope:1".into();
    let sb = c
        .create_sandbox(with_key(missing, ALICE))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(state(&sb), pb::State::Pending | pb::State::Failed),
        "{:?}",
        state(&sb)
    );
    let sb = settle(&mut c, &sb.sandbox_id).await;
    let st = sb.status.unwrap();
    assert_eq!(st.state(), pb::State::Failed);
    assert_eq!(
        st.state_reason,
        "pull docker.io/library/nope:1: manifest unknown (not found)"
    );

    // Unsupported RPCs: UNIMPLEMENTED with a reason, so the client falls back.
    let err = c
        .connect_sandbox(with_key(pb::ConnectSandboxRequest::default(), ALICE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(
        reason(&err),
        (
            "CWSANDBOX_NOT_IMPLEMENTED".into(),
            [("rpc".to_string(), "ConnectSandbox".to_string())].into()
        )
    );
    let err = c
        .list_file_system_snapshots(with_key(
            pb::ListFileSystemSnapshotsRequest::default(),
            ALICE,
        ))
        .await
        .unwrap_err();
    // Services this server does not offer: UNIMPLEMENTED with ErrorInfo,
    // never a bare status.
    use sandpit_proto::sandbox::v1::sandbox_data_plane_service_client::SandboxDataPlaneServiceClient;
    use sandpit_proto::sandbox::v1::sandbox_template_service_client::SandboxTemplateServiceClient;
    use sandpit_proto::sandbox::v1::settings_service_client::SettingsServiceClient;
    use sandpit_proto::sandbox::v1::volume_service_client::VolumeServiceClient;
    let channel = server.channel().await;
    let errs = [
        VolumeServiceClient::new(channel.clone())
            .list_volumes(with_key(pb::ListVolumesRequest::default(), ALICE))
            .await
            .unwrap_err(),
        SandboxTemplateServiceClient::new(channel.clone())
            .get_sandbox_template(with_key(pb::GetSandboxTemplateRequest::default(), ALICE))
            .await
            .unwrap_err(),
        SettingsServiceClient::new(channel.clone())
            .list_secret_stores(with_key(pb::ListSecretStoresRequest::default(), ALICE))
            .await
            .unwrap_err(),
        SandboxDataPlaneServiceClient::new(channel.clone())
            .exec(with_key(pb::ExecRequest::default(), ALICE))
            .await
            .unwrap_err(),
    ];
    let rpcs = [
        "coreweave.sandbox.v1.VolumeService/ListVolumes",
        "coreweave.sandbox.v1.SandboxTemplateService/GetSandboxTemplate",
        "coreweave.sandbox.v1.SettingsService/ListSecretStores",
        "coreweave.sandbox.v1.SandboxDataPlaneService/Exec",
    ];
    for (err, rpc) in errs.iter().zip(rpcs) {
        assert_eq!(err.code(), Code::Unimplemented, "{rpc}");
        let (why, meta) = reason(err);
        assert_eq!(why, "CWSANDBOX_NOT_IMPLEMENTED", "{rpc}");
        assert_eq!(meta["rpc"], rpc);
    }

    // Snapshots answer with the reason the client turns into
    // SnapshotNotSupportedError.
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err).0, "CWSANDBOX_FSS_NOT_SUPPORTED");

    // Messages far above tonic's 4 MiB default are accepted (the client
    // writes files of up to 32 MiB in one call).
    let big = pb::WriteFileRequest {
        sandbox_id: "x".into(),
        path: "/big".into(),
        content: vec![7; 40 << 20],
        container: String::new(),
    };
    // Decoded, then refused for the file limit (before the sandbox lookup),
    // with what the client needs to switch to streaming.
    let err = c.write_file(with_key(big, ALICE)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    let (why, meta) = reason(&err);
    assert_eq!(why, "CWSANDBOX_FILE_TOO_LARGE");
    assert_eq!(meta["size_bytes"], (40u64 << 20).to_string());
    assert_eq!(meta["max_size_bytes"], (32u64 << 20).to_string());
}

#[tokio::test]
async fn discovery_health_reflection_and_shutdown() {
    let mut server = start().await;
    let channel = server.channel().await;

    let mut d = DiscoveryServiceClient::new(channel.clone());
    let runners = d
        .list_available_runners(with_key(
            pb::ListAvailableRunnersRequest {
                view: pb::RunnerView::Full as i32,
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner()
        .runners;
    assert_eq!(runners.len(), 1);
    let r = &runners[0];
    assert_eq!(r.runner_id, "runner-1");
    assert!(r.healthy);
    assert_eq!(r.capabilities.as_ref().unwrap().max_cpu_millicores, 4000);
    assert_eq!(r.resources.as_ref().unwrap().running_sandboxes, 0);
    let got = d
        .get_available_runner(with_key(
            pb::GetAvailableRunnerRequest {
                runner_id: "runner-1".into(),
                organization_id: "org".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.runner_id, "runner-1");
    // The organization is the caller's: the configured one, or its key's.
    assert_eq!(r.organization_id, "org");
    assert_eq!(got.organization_id, "org");
    let bobs = d
        .list_available_runners(with_key(pb::ListAvailableRunnersRequest::default(), BOB))
        .await
        .unwrap()
        .into_inner()
        .runners;
    assert_eq!(bobs[0].organization_id, "acme");
    let err = d
        .get_available_runner(with_key(
            pb::GetAvailableRunnerRequest {
                runner_id: "runner-1".into(),
                organization_id: "org".into(),
                ..Default::default()
            },
            BOB,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Capabilities in the basic view too; what is free only in the full one.
    let basic = d
        .get_available_runner(with_key(
            pb::GetAvailableRunnerRequest {
                runner_id: "runner-1".into(),
                organization_id: "org".into(),
                view: pb::RunnerView::Basic as i32,
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    let caps = basic.capabilities.unwrap();
    assert_eq!(caps.supported_architectures, ["amd64"]);
    assert!(!caps.supports_privileged);
    assert!(basic.resources.is_none());
    let err = d
        .get_available_runner(with_key(
            pb::GetAvailableRunnerRequest {
                runner_id: "other".into(),
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err).0, "CWSANDBOX_RUNNER_NOT_FOUND");
    assert_eq!(
        d.list_available_runners(pb::ListAvailableRunnersRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // Health and reflection need no key.
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "coreweave.sandbox.v1.SandboxService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for svc in [
        "coreweave.sandbox.v1.SandboxService",
        "coreweave.sandbox.v1.DiscoveryService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&svc), "{svc} not in {names:?}");
    }

    // Graceful shutdown: serve returns; the sandbox is left alone.
    let mut c = server.client().await;
    let sb = c
        .create_sandbox(with_key(create_request(&[], ""), ALICE))
        .await
        .unwrap()
        .into_inner();
    drop((c, d, h, refl, stream, channel));
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("server stops")
        .unwrap();
    assert_eq!(server.engine.alive(), [sb.sandbox_id]);
}
