//! Secrets as environment variables over gRPC and the in-memory engine:
//! resolved from a managed and a directory store at create, seen by every
//! exec, never in a response, a record or the engine's plain environment.

use prost::Message;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

mod common;
use common::*;

fn mapping(path: &str, field: &str, env_var: &str) -> pb::SecretMapping {
    pb::SecretMapping {
        path: path.into(),
        field: field.into(),
        env_var: env_var.into(),
    }
}

fn request(
    env: &[(&str, &str)],
    stores: Vec<(&str, Vec<pb::SecretMapping>)>,
    tag: &str,
) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(pb::SandboxSpec {
                tags: vec![tag.into()],
                containers: vec![pb::Container {
                    name: "main".into(),
                    image: "python:3.11".into(),
                    environment_variables: env
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    secret_stores: stores
                        .into_iter()
                        .map(|(name, secrets)| pb::SecretStoreReference {
                            store_name: name.into(),
                            secrets,
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn printenv(c: &mut SandboxServiceClient<Channel>, id: &str, name: &str) -> String {
    let r = c
        .exec(with_key(
            pb::ExecRequest {
                sandbox_id: id.into(),
                command: vec!["printenv".into(), name.into()],
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 0, "{name} unset");
    String::from_utf8(r.stdout).unwrap()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn secrets_become_the_sandboxs_environment_and_nothing_else() {
    let server = start().await;
    let mut c = server.client().await;
    let req = request(
        // A plain variable of a secret's name: the secret wins.
        &[("HF_TOKEN", "placeholder"), ("PLAIN", "1")],
        vec![
            ("managed", vec![mapping("HF_TOKEN", "", "HF_TOKEN")]),
            ("local", vec![mapping("db", "password", "DB_PASS")]),
        ],
        "env",
    );
    let sb = c
        .create_sandbox(with_key(req.clone(), ALICE))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sb.status.as_ref().unwrap().state(), pb::State::Running);
    let id = sb.sandbox_id.clone();
    assert_eq!(
        printenv(&mut c, &id, "HF_TOKEN").await,
        format!("{HF_TOKEN}\n")
    );
    assert_eq!(
        printenv(&mut c, &id, "DB_PASS").await,
        format!("{DB_PASSWORD}\n")
    );
    assert_eq!(printenv(&mut c, &id, "PLAIN").await, "1\n");

    // The engine gets them apart from the plain environment, redacted in
    // Debug; joined only for the sandbox's init.
    let spec = server.engine.spec(&id).unwrap();
    assert!(spec
        .env
        .iter()
        .any(|(k, v)| (k.as_str(), v.as_str()) == ("HF_TOKEN", "placeholder")));
    let debug = format!("{spec:?}");
    assert!(
        !debug.contains(HF_TOKEN) && !debug.contains(DB_PASSWORD),
        "{debug}"
    );
    let env = spec.environment();
    assert_eq!(env.iter().filter(|(k, _)| k == "HF_TOKEN").count(), 1);

    // Responses echo the references only.
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
    let list = c
        .list_sandboxes(with_key(
            pb::ListSandboxesRequest {
                tags: vec!["env".into()],
                ..Default::default()
            },
            ALICE,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sandboxes.len(), 1);
    for bytes in [
        sb.encode_to_vec(),
        got.encode_to_vec(),
        list.encode_to_vec(),
    ] {
        assert!(!contains(&bytes, HF_TOKEN) && !contains(&bytes, DB_PASSWORD));
    }
    let echoed = &got.spec.as_ref().unwrap().containers[0].secret_stores;
    assert_eq!(
        echoed,
        &req.sandbox.unwrap().spec.unwrap().containers[0].secret_stores
    );
}

#[tokio::test]
async fn missing_secrets_are_refused_and_leave_nothing() {
    let server = start().await;
    let mut c = server.client().await;
    let f = "sandbox.spec.containers[0].secret_stores[0].secrets[0]";
    let cases = [
        (
            "nope",
            mapping("HF_TOKEN", "", ""),
            Code::FailedPrecondition,
            "CWSANDBOX_SECRET_STORE_NOT_FOUND",
            "no secret store named \"nope\" is configured",
        ),
        (
            "managed",
            mapping("OTHER", "", ""),
            Code::NotFound,
            "CWSANDBOX_SECRET_NOT_FOUND",
            "secret \"OTHER\" not found in store \"managed\"",
        ),
        (
            "local",
            mapping("db", "token", "T"),
            Code::NotFound,
            "CWSANDBOX_SECRET_NOT_FOUND",
            "secret \"db\" in store \"local\": has no field \"token\"",
        ),
        (
            "managed",
            mapping("HF_TOKEN", "password", "T"),
            Code::FailedPrecondition,
            "CWSANDBOX_SECRET_UNUSABLE",
            "secret \"HF_TOKEN\" in store \"managed\": not a JSON object (needed for a field)",
        ),
    ];
    for (store, m, code, why, message) in cases {
        let e = c
            .create_sandbox(with_key(request(&[], vec![(store, vec![m])], "bad"), ALICE))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{message}: {e:?}");
        assert_eq!(e.message(), format!("{f}: {message}"));
        let d = e.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, why);
        assert_eq!(d.error_info().unwrap().metadata["secret_store"], store);
        let fields: Vec<_> = d
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, [f]);
        let text = format!("{e:?}");
        assert!(!text.contains(HF_TOKEN) && !text.contains(DB_PASSWORD));
    }
    let e = c
        .create_sandbox(with_key(
            request(
                &[],
                vec![("managed", vec![mapping("HF_TOKEN", "", "1BAD")])],
                "bad",
            ),
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let list = c
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
    assert!(list.sandboxes.is_empty(), "{:?}", list.sandboxes);
}
