use super::*;
use tonic_types::StatusExt;

type Mutation = Box<dyn Fn(&mut pb::SandboxSpec)>;

fn policy() -> CreatePolicy {
    CreatePolicy {
        runner_id: "r1".into(),
    }
}

fn container() -> pb::Container {
    pb::Container {
        name: "main".into(),
        image: "python:3.11".into(),
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "sleep infinity".into()],
        ..Default::default()
    }
}

fn request(spec: pb::SandboxSpec) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: "11111111-2222".into(),
    }
}

fn spec_with(c: pb::Container) -> pb::SandboxSpec {
    pb::SandboxSpec {
        containers: vec![c],
        ..Default::default()
    }
}

/// The refused fields, and the status code and reason.
fn refused(req: &pb::CreateSandboxRequest) -> (tonic::Code, String, Vec<String>) {
    let status = create_request(req, &policy()).unwrap_err();
    let details = status.get_error_details();
    let info = details.error_info().expect("error info");
    assert_eq!(info.domain, "cwsandbox.com");
    let fields = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    (status.code(), info.reason.clone(), fields)
}

fn invalid_fields(req: &pb::CreateSandboxRequest) -> Vec<String> {
    let (code, reason, fields) = refused(req);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(reason, "CWSANDBOX_INVALID_REQUEST");
    fields
}

#[test]
fn the_clients_default_request_is_accepted() {
    let mut spec = spec_with(container());
    spec.tags = vec!["t1".into(), "t1".into(), "t2".into()];
    spec.annotations.insert("owner".into(), "me".into());
    spec.max_lifetime_seconds = 43_200;
    let mut c = container();
    c.environment_variables.insert("B".into(), "2".into());
    c.environment_variables.insert("A".into(), "1".into());
    c.working_dir = "/tmp".into();
    c.files.push(pb::FileMount {
        path: "/tmp/payload.json".into(),
        content: b"{}".to_vec(),
    });
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: Some(pb::Resources {
            cpu: "250m".into(),
            memory: "128Mi".into(),
            gpu: None,
        }),
        limits: Some(pb::Resources {
            cpu: "500m".into(),
            memory: "256Mi".into(),
            gpu: None,
        }),
    });
    // Defaults spelled out explicitly are fine.
    c.security_context = Some(pb::SecurityContext {
        run_as_user: Some(0),
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        ..Default::default()
    });
    spec.containers = vec![c];
    spec.network = Some(pb::NetworkOptions {
        deny_egress: Some(true),
        ..Default::default()
    });
    spec.runner_ids = vec!["r1".into()];
    spec.mode = pb::SandboxMode::Cks as i32;
    let n = create_request(&request(spec), &policy()).unwrap();
    assert_eq!(n.request_id.as_deref(), Some("11111111-2222"));
    assert_eq!(n.image, "docker.io/library/python:3.11");
    assert_eq!(n.command.as_deref(), Some("/bin/sh"));
    assert_eq!(n.args, ["-c", "sleep infinity"]);
    assert_eq!(
        n.env,
        [("A".to_string(), "1".to_string()), ("B".into(), "2".into())]
    );
    assert_eq!(n.working_dir.as_deref(), Some("/tmp"));
    assert_eq!(n.files[0].content, b"{}");
    assert_eq!(n.limits.cpu_millis, Some(500));
    assert_eq!(n.limits.memory_bytes, Some(256 << 20));
    assert_eq!(n.max_lifetime_seconds, Some(43_200));
    assert_eq!(n.tags, ["t1", "t2"]);
    assert_eq!(n.annotations["owner"], "me");
    // The echoed spec keeps everything but file contents.
    let echo = pb::SandboxSpec::decode(n.spec_echo.as_slice()).unwrap();
    assert_eq!(echo.containers[0].files[0].path, "/tmp/payload.json");
    assert!(echo.containers[0].files[0].content.is_empty());
    assert_eq!(echo.tags, ["t1", "t1", "t2"]);
}

#[test]
fn requests_stand_in_for_missing_limits() {
    let mut c = container();
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: Some(pb::Resources {
            cpu: "2".into(),
            memory: "1Gi".into(),
            gpu: None,
        }),
        limits: None,
    });
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(n.limits.cpu_millis, Some(2000));
    assert_eq!(n.limits.memory_bytes, Some(1 << 30));
    let mut c = container();
    c.resources = Some(pb::Resources {
        cpu: "0.5".into(),
        ..Default::default()
    });
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(n.limits.cpu_millis, Some(500));
    assert_eq!(n.max_lifetime_seconds, None);
    assert!(n.command.is_some());
}

#[test]
fn missing_parts_are_named() {
    let none = pb::CreateSandboxRequest::default();
    assert_eq!(invalid_fields(&none), ["sandbox"]);
    let no_spec = pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox::default()),
        ..Default::default()
    };
    assert_eq!(invalid_fields(&no_spec), ["sandbox.spec"]);
    assert_eq!(
        invalid_fields(&request(pb::SandboxSpec::default())),
        ["sandbox.spec.containers"]
    );
    let mut c = container();
    c.image.clear();
    assert_eq!(
        invalid_fields(&request(spec_with(c))),
        ["sandbox.spec.containers[0].image"]
    );
}

#[test]
fn each_bad_field_gets_its_path() {
    let p = "sandbox.spec.containers[0]";
    let cases: Vec<(Mutation, String)> = vec![
        (
            Box::new(|s| s.containers[0].image = "Python:3.11".into()),
            format!("{p}.image"),
        ),
        (
            Box::new(|s| s.containers[0].image = "python:bad tag".into()),
            format!("{p}.image"),
        ),
        (
            Box::new(|s| s.max_lifetime_seconds = -1),
            "sandbox.spec.max_lifetime_seconds".into(),
        ),
        (
            Box::new(|s| {
                s.containers[0].resource_requirements = Some(pb::ResourceRequirements {
                    limits: Some(pb::Resources {
                        cpu: "lots".into(),
                        ..Default::default()
                    }),
                    requests: None,
                })
            }),
            format!("{p}.resource_requirements.limits.cpu"),
        ),
        (
            Box::new(|s| {
                s.containers[0].resource_requirements = Some(pb::ResourceRequirements {
                    requests: Some(pb::Resources {
                        memory: "256MB".into(),
                        ..Default::default()
                    }),
                    limits: None,
                })
            }),
            format!("{p}.resource_requirements.requests.memory"),
        ),
        (
            Box::new(|s| {
                s.containers[0].resource_requirements = Some(pb::ResourceRequirements {
                    requests: Some(pb::Resources {
                        memory: "2Gi".into(),
                        ..Default::default()
                    }),
                    limits: Some(pb::Resources {
                        memory: "1Gi".into(),
                        ..Default::default()
                    }),
                })
            }),
            format!("{p}.resource_requirements.requests.memory"),
        ),
        (
            Box::new(|s| {
                s.containers[0].files.push(pb::FileMount {
                    path: "relative/x".into(),
                    content: vec![],
                })
            }),
            format!("{p}.files[0].path"),
        ),
        (
            Box::new(|s| {
                s.containers[0].files.push(pb::FileMount {
                    path: "/tmp/../etc/passwd".into(),
                    content: vec![],
                })
            }),
            format!("{p}.files[0].path"),
        ),
        (
            Box::new(|s| {
                s.containers[0].files.push(pb::FileMount {
                    path: "/x".into(),
                    content: vec![0; MAX_FILES_BYTES + 1],
                })
            }),
            format!("{p}.files"),
        ),
        (
            Box::new(|s| s.containers[0].working_dir = "tmp".into()),
            format!("{p}.working_dir"),
        ),
        (
            Box::new(|s| {
                s.containers[0]
                    .environment_variables
                    .insert("A=B".into(), "x".into());
            }),
            format!("{p}.environment_variables[\"A=B\"]"),
        ),
        (
            Box::new(|s| s.containers[0].args.push("a\0b".into())),
            format!("{p}.args[2]"),
        ),
        (
            Box::new(|s| s.containers[0].args.push("x".repeat(MAX_ARGV_BYTES))),
            format!("{p}.args"),
        ),
        (
            Box::new(|s| s.tags.push(String::new())),
            "sandbox.spec.tags[0]".into(),
        ),
        (
            Box::new(|s| s.runner_ids.push("elsewhere".into())),
            "sandbox.spec.runner_ids".into(),
        ),
    ];
    for (mutate, field) in cases {
        let mut spec = spec_with(container());
        mutate(&mut spec);
        assert_eq!(
            invalid_fields(&request(spec)),
            std::slice::from_ref(&field),
            "{field}"
        );
    }
}

#[test]
fn gpus_are_refused_clearly() {
    let mut c = container();
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: None,
        limits: Some(pb::Resources {
            gpu: Some(pb::Gpu {
                count: 1,
                selector: Some(pb::gpu::Selector::Type("A100".into())),
            }),
            ..Default::default()
        }),
    });
    let req = request(spec_with(c));
    let (code, reason, fields) = refused(&req);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(reason, "CWSANDBOX_NOT_IMPLEMENTED");
    assert_eq!(
        fields,
        ["sandbox.spec.containers[0].resource_requirements.limits.gpu"]
    );
    let msg = create_request(&req, &policy())
        .unwrap_err()
        .message()
        .to_owned();
    assert!(
        msg.contains("gpus are not supported on this runner"),
        "{msg}"
    );
}

#[test]
fn unsupported_fields_are_named_never_ignored() {
    let p = "sandbox.spec.containers[0]";
    let cases: Vec<(Mutation, String)> = vec![
        (
            Box::new(|s| s.containers.push(container())),
            "sandbox.spec.containers".into(),
        ),
        (
            Box::new(|s| {
                s.volumes.push(pb::SandboxVolume {
                    name: "v".into(),
                    source: None,
                })
            }),
            "sandbox.spec.volumes".into(),
        ),
        (
            Box::new(|s| {
                s.services.push(pb::Service {
                    port: 8080,
                    ..Default::default()
                })
            }),
            "sandbox.spec.services".into(),
        ),
        (
            Box::new(|s| s.runtime_class = "gvisor".into()),
            "sandbox.spec.runtime_class".into(),
        ),
        (
            Box::new(|s| s.runtime_class_selection = pb::RuntimeClass::GpuDefault as i32),
            "sandbox.spec.runtime_class_selection".into(),
        ),
        (
            Box::new(|s| s.mode = pb::SandboxMode::Serverless as i32),
            "sandbox.spec.mode".into(),
        ),
        (
            Box::new(|s| s.network_ids.push("n".into())),
            "sandbox.spec.network_ids".into(),
        ),
        (
            Box::new(|s| s.object_storage_access = Some(Default::default())),
            "sandbox.spec.object_storage_access".into(),
        ),
        (
            Box::new(|s| {
                s.network = Some(pb::NetworkOptions {
                    egress: vec![pb::EgressRule::default()],
                    ..Default::default()
                })
            }),
            "sandbox.spec.network.egress".into(),
        ),
        (
            Box::new(|s| {
                s.network = Some(pb::NetworkOptions {
                    deny_egress: Some(false),
                    ..Default::default()
                })
            }),
            "sandbox.spec.network.deny_egress".into(),
        ),
        (
            Box::new(|s| {
                s.containers[0].volume_mounts.push(pb::VolumeMount {
                    volume: "v".into(),
                    mount_path: "/v".into(),
                    ..Default::default()
                })
            }),
            format!("{p}.volume_mounts"),
        ),
        (
            Box::new(|s| {
                s.containers[0].security_context = Some(pb::SecurityContext {
                    run_as_user: Some(1000),
                    ..Default::default()
                })
            }),
            format!("{p}.security_context.run_as_user"),
        ),
        (
            Box::new(|s| {
                s.containers[0].security_context = Some(pb::SecurityContext {
                    capabilities_add: vec!["NET_ADMIN".into()],
                    ..Default::default()
                })
            }),
            format!("{p}.security_context.capabilities_add"),
        ),
        (
            Box::new(|s| s.containers[0].startup_probe = Some(Default::default())),
            format!("{p}.startup_probe"),
        ),
    ];
    for (mutate, field) in cases {
        let mut spec = spec_with(container());
        mutate(&mut spec);
        let (code, reason, fields) = refused(&request(spec));
        assert_eq!(code, tonic::Code::Unimplemented, "{field}");
        assert_eq!(reason, "CWSANDBOX_NOT_IMPLEMENTED", "{field}");
        assert_eq!(fields, std::slice::from_ref(&field));
    }
}

#[test]
fn invalid_wins_and_every_violation_is_listed() {
    let mut spec = spec_with(container());
    spec.max_lifetime_seconds = -5;
    spec.services.push(pb::Service::default());
    let (code, reason, fields) = refused(&request(spec));
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(reason, "CWSANDBOX_INVALID_REQUEST");
    assert_eq!(
        fields,
        ["sandbox.spec.max_lifetime_seconds", "sandbox.spec.services"]
    );
}

#[test]
fn pull_credentials_are_checked_and_normalised() {
    let creds = |registry: &str, store: &str, path: &str| pb::ImagePullCredentials {
        registry: registry.into(),
        credentials: Some(pb::SecretSource {
            store_name: store.into(),
            path: path.into(),
            field: "token".into(),
        }),
    };
    let mut c = container();
    c.image_pull_credentials = Some(creds(" Index.Docker.IO ", "local", "team/hub"));
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(
        n.pull_secret,
        Some(SecretRef {
            registry: "docker.io".into(),
            store: "local".into(),
            path: "team/hub".into(),
            field: "token".into(),
        })
    );
    assert!(n.pull_credentials.is_none(), "resolved by the handler");

    let p = "sandbox.spec.containers[0].image_pull_credentials";
    for (ipc, field) in [
        (creds("", "local", "x"), format!("{p}.registry")),
        (creds("not a host", "local", "x"), format!("{p}.registry")),
        (
            creds("ghcr.io", "", "x"),
            format!("{p}.credentials.store_name"),
        ),
        (
            creds("ghcr.io", "local", ""),
            format!("{p}.credentials.path"),
        ),
        (
            creds("ghcr.io", "local", "a/../b"),
            format!("{p}.credentials.path"),
        ),
        (
            pb::ImagePullCredentials {
                registry: "ghcr.io".into(),
                credentials: None,
            },
            format!("{p}.credentials"),
        ),
    ] {
        let mut c = container();
        c.image_pull_credentials = Some(ipc);
        let (code, reason, fields) = refused(&request(spec_with(c)));
        assert_eq!(code, tonic::Code::InvalidArgument, "{field}");
        assert_eq!(reason, "CWSANDBOX_INVALID_REQUEST", "{field}");
        assert_eq!(fields, [field]);
    }
}
