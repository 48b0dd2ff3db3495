use tonic_types::StatusExt;

use super::*;

fn mapping(path: &str, field: &str, env_var: &str) -> pb::SecretMapping {
    pb::SecretMapping {
        path: path.into(),
        field: field.into(),
        env_var: env_var.into(),
    }
}

fn container(stores: Vec<(&str, Vec<pb::SecretMapping>)>) -> pb::Container {
    pb::Container {
        secret_stores: stores
            .into_iter()
            .map(|(name, secrets)| pb::SecretStoreReference {
                store_name: name.into(),
                secrets,
            })
            .collect(),
        ..Default::default()
    }
}

const P: &str = "sandbox.spec.containers[0]";

fn run(c: &pb::Container) -> (Vec<SecretEnvRef>, Vec<(String, String)>) {
    let mut invalid = Vec::new();
    let refs = check(&mut invalid, c, P);
    let invalid = invalid
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect();
    (refs, invalid)
}

#[test]
fn mappings_become_one_variable_each() {
    let c = container(vec![
        (
            "wandb",
            vec![
                mapping("HF_TOKEN", "", ""),
                mapping("db-credentials", "password", "DB_PASS"),
                // The same mapping again: harmless.
                mapping("HF_TOKEN", "", "HF_TOKEN"),
            ],
        ),
        ("files", vec![mapping("team/key", "", "TEAM_KEY")]),
    ]);
    let (refs, invalid) = run(&c);
    assert!(invalid.is_empty(), "{invalid:?}");
    let got: Vec<_> = refs
        .iter()
        .map(|r| {
            (
                r.store.as_str(),
                r.name.as_str(),
                r.field.as_str(),
                r.env_var.as_str(),
                r.field_path.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "wandb",
                "HF_TOKEN",
                "",
                "HF_TOKEN",
                "sandbox.spec.containers[0].secret_stores[0].secrets[0]"
            ),
            (
                "wandb",
                "db-credentials",
                "password",
                "DB_PASS",
                "sandbox.spec.containers[0].secret_stores[0].secrets[1]"
            ),
            (
                "files",
                "team/key",
                "",
                "TEAM_KEY",
                "sandbox.spec.containers[0].secret_stores[1].secrets[0]"
            ),
        ]
    );
}

#[test]
fn bad_names_and_conflicts_name_their_field() {
    let sp = format!("{P}.secret_stores");
    let cases: Vec<(pb::Container, String, &str)> = vec![
        (
            container(vec![("", vec![mapping("A", "", "")])]),
            format!("{sp}[0].store_name"),
            "required",
        ),
        (
            container(vec![("../etc", vec![mapping("A", "", "")])]),
            format!("{sp}[0].store_name"),
            "\"../etc\" must be letters",
        ),
        (
            container(vec![("s", vec![mapping("", "", "A")])]),
            format!("{sp}[0].secrets[0].path"),
            "required",
        ),
        (
            container(vec![("s", vec![mapping("../x", "", "A")])]),
            format!("{sp}[0].secrets[0].path"),
            "\"../x\" is not a relative path of plain names",
        ),
        (
            container(vec![("s", vec![mapping("db-credentials", "", "")])]),
            format!("{sp}[0].secrets[0].env_var"),
            "required: the secret's name \"db-credentials\" is not a variable name",
        ),
        (
            container(vec![("s", vec![mapping("A", "", "1X")])]),
            format!("{sp}[0].secrets[0].env_var"),
            "\"1X\" is not a variable name",
        ),
        (
            container(vec![("s", vec![mapping("A", "", "X=Y")])]),
            format!("{sp}[0].secrets[0].env_var"),
            "\"X=Y\" is not a variable name",
        ),
        (
            container(vec![("s", vec![mapping("A", "a\0b", "X")])]),
            format!("{sp}[0].secrets[0].field"),
            "not a field name",
        ),
        (
            container(vec![
                ("s", vec![mapping("A", "", "X")]),
                ("t", vec![mapping("A", "", "X")]),
            ]),
            format!("{sp}[1].secrets[0].env_var"),
            "\"X\" is already set by sandbox.spec.containers[0].secret_stores[0].secrets[0]",
        ),
        (
            container(vec![(
                "s",
                vec![mapping("A", "", "X"), mapping("A", "f", "X")],
            )]),
            format!("{sp}[0].secrets[1].env_var"),
            "already set by",
        ),
        (
            container(vec![(
                "s",
                (0..=MAX_SECRETS)
                    .map(|i| mapping(&format!("S{i}"), "", ""))
                    .collect(),
            )]),
            sp.clone(),
            "101 secrets; at most 100",
        ),
    ];
    for (c, field, description) in cases {
        let (_, invalid) = run(&c);
        assert_eq!(invalid.len(), 1, "{field}: {invalid:?}");
        assert_eq!(invalid[0].0, field);
        assert!(
            invalid[0].1.contains(description),
            "{field}: {:?} lacks {description:?}",
            invalid[0].1
        );
    }
}

fn stores(root: &std::path::Path) -> SecretStores {
    std::fs::create_dir(root.join("files")).unwrap();
    std::fs::write(root.join("files/plain"), "not json\n").unwrap();
    let managed = crate::secrets::SecretStoreConfig {
        kind: crate::secrets::StoreKind::Managed,
        dir: root.join("vault"),
        key_file: Some(root.join("vault.key")),
    };
    managed
        .managed("vault")
        .unwrap()
        .set(
            "db",
            &SecretValue::new(r#"{"password": "pw-1234567"}"#.into()),
        )
        .unwrap();
    SecretStores::new(
        [
            (
                "files".to_owned(),
                crate::secrets::SecretStoreConfig {
                    dir: root.join("files"),
                    ..Default::default()
                },
            ),
            ("vault".to_owned(), managed),
        ]
        .into(),
    )
}

fn env_ref(j: usize, store: &str, name: &str, field: &str, env_var: &str) -> SecretEnvRef {
    SecretEnvRef {
        field_path: format!("{P}.secret_stores[0].secrets[{j}]"),
        store: store.into(),
        name: name.into(),
        field: field.into(),
        env_var: env_var.into(),
    }
}

fn details(s: &Status) -> (Code, String, Vec<String>) {
    let d = s.get_error_details();
    let info = d.error_info().expect("ErrorInfo");
    let fields = d
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    (s.code(), info.reason.clone(), fields)
}

#[tokio::test]
async fn values_resolve_and_failures_never_show_them() {
    let root = tempfile::tempdir().unwrap();
    let s = stores(root.path());
    let ok = resolve(
        &s,
        &[env_ref(0, "vault", "db", "password", "DB_PASS")],
        &[],
        P,
    )
    .await
    .unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!(
        (ok[0].0.as_str(), ok[0].1.expose()),
        ("DB_PASS", "pw-1234567")
    );
    assert!(!format!("{ok:?}").contains("pw-1234567"));

    let f0 = format!("{P}.secret_stores[0].secrets[0]");
    let f1 = format!("{P}.secret_stores[0].secrets[1]");
    let cases = [
        (
            vec![env_ref(0, "nope", "db", "", "X")],
            (Code::FailedPrecondition, "CWSANDBOX_SECRET_STORE_NOT_FOUND"),
            "no secret store named \"nope\" is configured",
        ),
        (
            vec![env_ref(0, "vault", "missing", "", "X")],
            (Code::NotFound, "CWSANDBOX_SECRET_NOT_FOUND"),
            "secret \"missing\" not found in store \"vault\"",
        ),
        (
            vec![env_ref(0, "vault", "db", "user", "X")],
            (Code::NotFound, "CWSANDBOX_SECRET_NOT_FOUND"),
            "secret \"db\" in store \"vault\": has no field \"user\"",
        ),
        (
            vec![env_ref(0, "files", "plain", "password", "X")],
            (Code::FailedPrecondition, "CWSANDBOX_SECRET_UNUSABLE"),
            "not a JSON object",
        ),
        (
            vec![env_ref(0, "vault", "team/db", "", "X")],
            (Code::InvalidArgument, "CWSANDBOX_INVALID_REQUEST"),
            "contain no '/'",
        ),
    ];
    for (refs, (code, why), message) in cases {
        let e = resolve(&s, &refs, &[], P).await.unwrap_err();
        assert_eq!(
            details(&e),
            (code, why.to_owned(), vec![f0.clone()]),
            "{message}"
        );
        assert!(e.message().contains(message), "{}", e.message());
        assert!(e.message().contains(&format!("{f0}: ")), "{}", e.message());
        assert!(!format!("{e:?}").contains("pw-1234567"));
    }
    // Several failures: every one listed, the code of the strongest.
    let e = resolve(
        &s,
        &[
            env_ref(0, "vault", "missing", "", "X"),
            env_ref(1, "nope", "db", "", "Y"),
        ],
        &[],
        P,
    )
    .await
    .unwrap_err();
    assert_eq!(
        details(&e),
        (
            Code::FailedPrecondition,
            "CWSANDBOX_SECRET_STORE_NOT_FOUND".to_owned(),
            vec![f0.clone(), f1.clone()]
        )
    );
    let info = e.get_error_details();
    let info = info.error_info().unwrap();
    assert_eq!(
        (
            info.metadata["secret_store"].as_str(),
            info.metadata["secret"].as_str()
        ),
        ("nope", "db")
    );
    assert_eq!(info.metadata["field"], format!("{f0},{f1}"));

    // Values and variables count against the environment's cap.
    let big = vec![("BIG".to_owned(), "x".repeat(MAX_ENV_BYTES))];
    let e = resolve(&s, &[env_ref(0, "vault", "db", "password", "X")], &big, P)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}
