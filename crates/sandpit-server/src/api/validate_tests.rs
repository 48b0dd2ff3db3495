use super::*;
use tonic_types::StatusExt;

type Mutation = Box<dyn Fn(&mut pb::SandboxSpec)>;

fn policy() -> CreatePolicy {
    CreatePolicy {
        runner_id: "r1".into(),
        default_resources: ResourceSpec::default(),
        disk: Default::default(),
        max_lifetime_seconds: 86_400,
        network: None,
        storage: None,
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
    assert_eq!(n.resources.limits.cpu_millis, Some(500));
    assert_eq!(n.resources.limits.memory_bytes, Some(256 << 20));
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
    assert_eq!(n.resources.limits.cpu_millis, Some(2000));
    assert_eq!(n.resources.limits.memory_bytes, Some(1 << 30));
    let mut c = container();
    c.resources = Some(pb::Resources {
        cpu: "0.5".into(),
        ..Default::default()
    });
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(n.resources.limits.cpu_millis, Some(500));
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
    // A resource ceiling: INVALID_ARGUMENT with the reason the client may
    // spill over on (another placement could have GPUs).
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(reason, "CWSANDBOX_RESOURCE_CEILING_EXCEEDED");
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
fn runtime_classes_and_placement_modes() {
    // The runner's own class by name, and SERVERLESS placement: accepted,
    // kept in the spec (which the status echoes).
    let mut spec = spec_with(container());
    spec.runtime_class = "sandpit".into();
    spec.mode = pb::SandboxMode::Serverless as i32;
    let n = create_request(&request(spec), &policy()).unwrap();
    let echo = pb::SandboxSpec::decode(n.spec_echo.as_slice()).unwrap();
    assert_eq!(echo.mode, pb::SandboxMode::Serverless as i32);
    assert_eq!(echo.runtime_class, "sandpit");
    // Unknown ones are refused, naming what there is.
    let mut spec = spec_with(container());
    spec.runtime_class = "gvisor".into();
    let status = create_request(&request(spec.clone()), &policy()).unwrap_err();
    assert!(
        status.message().contains("it offers sandpit"),
        "{}",
        status.message()
    );
    assert_eq!(
        invalid_fields(&request(spec)),
        ["sandbox.spec.runtime_class"]
    );
    let mut spec = spec_with(container());
    spec.runtime_class_selection = pb::RuntimeClass::GpuDefault as i32;
    assert_eq!(
        invalid_fields(&request(spec)),
        ["sandbox.spec.runtime_class_selection"]
    );
}

#[test]
fn refusals_carry_the_reasons_the_client_maps() {
    let mut spec = spec_with(container());
    spec.services.push(pb::Service {
        port: 8443,
        endpoint: Some(pb::EndpointSpec {
            kind: pb::EndpointKind::TlsPassthrough as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let (code, reason, fields) = refused(&request(spec));
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert_eq!(reason, "CWSANDBOX_TLS_PASSTHROUGH_ENDPOINTS_NOT_SUPPORTED");
    assert_eq!(
        fields,
        [
            "sandbox.spec.services[0].endpoint.kind",
            "sandbox.spec.services"
        ]
    );
    let mut spec = spec_with(container());
    spec.volumes.push(pb::SandboxVolume {
        name: "work".into(),
        source: Some(pb::sandbox_volume::Source::Scratch(pb::ScratchVolume {
            restore_from_snapshot_id: "fss-1".into(),
            ..Default::default()
        })),
    });
    let (code, reason, fields) = refused(&request(spec));
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert_eq!(reason, "CWSANDBOX_FSS_NOT_SUPPORTED");
    assert_eq!(
        fields[0],
        "sandbox.spec.volumes[0].scratch.restore_from_snapshot_id"
    );
}

#[test]
fn lifetimes_above_the_maximum_are_refused_not_clamped() {
    let mut spec = spec_with(container());
    spec.max_lifetime_seconds = 86_400;
    let n = create_request(&request(spec.clone()), &policy()).unwrap();
    assert_eq!(n.max_lifetime_seconds, Some(86_400));
    spec.max_lifetime_seconds = 86_401;
    let status = create_request(&request(spec.clone()), &policy()).unwrap_err();
    assert!(
        status
            .message()
            .contains("86401 s exceeds this runner's maximum of 86400 s"),
        "{}",
        status.message()
    );
    assert_eq!(
        invalid_fields(&request(spec)),
        ["sandbox.spec.max_lifetime_seconds"]
    );
}

#[test]
fn requests_and_limits_are_kept_apart_and_defaulted() {
    let q = |cpu: &str, memory: &str| pb::Resources {
        cpu: cpu.into(),
        memory: memory.into(),
        gpu: None,
    };
    // Burstable: both kept.
    let mut c = container();
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: Some(q("250m", "128Mi")),
        limits: Some(q("2", "1Gi")),
    });
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(n.resources.requests.cpu_millis, Some(250));
    assert_eq!(n.resources.requests.memory_bytes, Some(128 << 20));
    assert_eq!(n.resources.limits.cpu_millis, Some(2000));
    assert_eq!(n.resources.limits.memory_bytes, Some(1 << 30));
    // A limit alone is also the request.
    let mut c = container();
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: None,
        limits: Some(q("1", "")),
    });
    let n = create_request(&request(spec_with(c)), &policy()).unwrap();
    assert_eq!(n.resources.requests.cpu_millis, Some(1000));
    assert_eq!(n.resources.limits.memory_bytes, None);
    // Nothing asked: the runner's defaults.
    let defaults = ResourceSpec {
        requests: Resources {
            cpu_millis: Some(100),
            memory_bytes: None,
        },
        limits: Resources {
            cpu_millis: Some(1000),
            memory_bytes: Some(512 << 20),
        },
    };
    let with_defaults = CreatePolicy {
        default_resources: defaults,
        ..policy()
    };
    let n = create_request(&request(spec_with(container())), &with_defaults).unwrap();
    // A resource without a default request requests its default limit.
    assert_eq!(n.resources.requests.cpu_millis, Some(100));
    assert_eq!(n.resources.requests.memory_bytes, Some(512 << 20));
    assert_eq!(n.resources.limits, defaults.limits);
    // Only the resource left out is defaulted.
    let mut c = container();
    c.resource_requirements = Some(pb::ResourceRequirements {
        requests: Some(q("", "64Mi")),
        limits: Some(q("", "64Mi")),
    });
    let n = create_request(&request(spec_with(c)), &with_defaults).unwrap();
    assert_eq!(n.resources.limits.memory_bytes, Some(64 << 20));
    assert_eq!(n.resources.limits.cpu_millis, Some(1000));
    assert_eq!(n.resources.requests.cpu_millis, Some(100));
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

#[test]
fn with_a_network_the_options_become_the_sandboxs_policy() {
    use sandpit_net::policy::Egress;
    let on = CreatePolicy {
        network: Some(crate::engine::NetworkOffer {
            default_egress: sandpit_net::DefaultEgress::Deny,
            public: crate::engine::PublicOffer {
                domain: "sandpit.localhost".into(),
                http_port: Some(8780),
                tls_port: None,
                tcp_host: None,
            },
        }),
        ..policy()
    };
    // No options: a network with the runner's default.
    let n = create_request(&request(spec_with(container())), &on).unwrap();
    assert_eq!(n.network.unwrap().policy.egress, Egress::RunnerDefault);
    let mut spec = spec_with(container());
    spec.network = Some(pb::NetworkOptions {
        egress: vec![pb::EgressRule {
            destination: Some(pb::egress_rule::Destination::HttpsHostname(
                "api.test".into(),
            )),
            ..Default::default()
        }],
        ..Default::default()
    });
    let n = create_request(&request(spec.clone()), &on).unwrap();
    assert!(matches!(n.network.unwrap().policy.egress, Egress::Allow(r) if r.len() == 1));
    // Bad rules are invalid, with their paths; DNS cannot be turned off.
    spec.network.as_mut().unwrap().egress[0].destination = Some(
        pb::egress_rule::Destination::HttpsHostname("a.*.test".into()),
    );
    spec.network.as_mut().unwrap().dns_egress = pb::DnsEgressMode::Deny as i32;
    let status = create_request(&request(spec), &on).unwrap_err();
    let details = status.get_error_details();
    let fields: Vec<String> = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert!(
        fields.contains(&"sandbox.spec.network.egress[0].https_hostname".to_string()),
        "{status:?}"
    );
    // Without a network nothing of it reaches the engine.
    let n = create_request(&request(spec_with(container())), &policy()).unwrap();
    assert!(n.network.is_none());
}
