//! Fuzzing of [`create_request`] (proptest): arbitrary CreateSandbox
//! requests (unicode, NULs, `..`, huge numbers and quantities) never panic;
//! each is accepted, or refused with violations that each name a field; an
//! accepted one holds the invariants the engine relies on. The seed corpus
//! `fuzz/corpus/validate/*.json` (request fields hitting edge cases, each
//! with the outcome it must get) is replayed first.
//!
//! `SANDPIT_FUZZ_CASES` sets the cases (256 by default); `scripts/fuzz.sh`
//! runs them long.

use std::collections::HashMap;
use std::path::PathBuf;

use proptest::prelude::*;
use sandpit_proto::sandbox::v1 as pb;
use tonic_types::StatusExt;

use super::{create_request, CreatePolicy, MAX_LABEL_LEN, MAX_PATH_LEN, MAX_TAGS};
use crate::model::{NewSandbox, ResourceSpec};

const MAX_LIFETIME: u32 = 86_400;

/// The request fields the fuzzer varies; the rest keep their defaults.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Fields {
    image: String,
    command: String,
    args: Vec<String>,
    env: HashMap<String, String>,
    working_dir: String,
    files: Vec<String>,
    cpu: String,
    memory: String,
    cpu_limit: String,
    memory_limit: String,
    tags: Vec<String>,
    annotations: HashMap<String, String>,
    max_lifetime_seconds: i32,
    display_name: String,
    request_id: String,
    /// Seeds only: "accepted" or "refused".
    expect: Option<String>,
}

fn request(f: &Fields) -> pb::CreateSandboxRequest {
    let resources = |cpu: &str, memory: &str| {
        (!cpu.is_empty() || !memory.is_empty()).then(|| pb::Resources {
            cpu: cpu.into(),
            memory: memory.into(),
            gpu: None,
        })
    };
    let requests = resources(&f.cpu, &f.memory);
    let limits = resources(&f.cpu_limit, &f.memory_limit);
    let container = pb::Container {
        name: "main".into(),
        image: f.image.clone(),
        command: f.command.clone(),
        args: f.args.clone(),
        environment_variables: f.env.clone(),
        working_dir: f.working_dir.clone(),
        files: f
            .files
            .iter()
            .map(|path| pb::FileMount {
                path: path.clone(),
                content: b"x".to_vec(),
            })
            .collect(),
        resource_requirements: (requests.is_some() || limits.is_some())
            .then_some(pb::ResourceRequirements { requests, limits }),
        ..Default::default()
    };
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            display_name: f.display_name.clone(),
            spec: Some(pb::SandboxSpec {
                containers: vec![container],
                tags: f.tags.clone(),
                annotations: f.annotations.clone(),
                max_lifetime_seconds: f.max_lifetime_seconds,
                ..Default::default()
            }),
            ..Default::default()
        }),
        request_id: f.request_id.clone(),
    }
}

fn validate(f: &Fields) -> Result<NewSandbox, tonic::Status> {
    create_request(
        &request(f),
        &CreatePolicy {
            runner_id: "r1".into(),
            default_resources: ResourceSpec::default(),
            max_lifetime_seconds: MAX_LIFETIME,
            network: None,
            storage: None,
            disk: DISK,
        },
    )
}

/// Writable layers as the daemon's defaults size them.
const DISK: super::DiskPolicy = super::DiskPolicy {
    default_bytes: Some(10 << 30),
    max_bytes: 1 << 40,
};

/// An absolute path without a `..` component or NUL, of a bounded length.
fn safe_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.split('/').any(|c| c == "..")
        && !p.contains('\0')
        && p.len() <= MAX_PATH_LEN
}

/// The invariants of an accepted request.
fn check_accepted(f: &Fields, s: &NewSandbox) -> Result<(), TestCaseError> {
    prop_assert!(!s.image.is_empty(), "accepted without an image: {f:?}");
    if let Some(n) = s.disk_bytes {
        prop_assert!(
            (super::MIN_DISK_BYTES..=DISK.max_bytes).contains(&n),
            "writable layer of {n} bytes accepted"
        );
    }
    if let Some(dir) = &s.working_dir {
        prop_assert!(safe_path(dir), "working_dir {dir:?} accepted");
    }
    for file in &s.files {
        prop_assert!(
            safe_path(&file.path) && file.path != "/",
            "file path {:?} accepted",
            file.path
        );
    }
    for (k, v) in &s.env {
        prop_assert!(
            !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0'),
            "variable {k:?}={v:?} accepted"
        );
    }
    for a in s.command.iter().chain(&s.args) {
        prop_assert!(!a.contains('\0'), "argument {a:?} accepted");
    }
    prop_assert!(s.tags.len() <= MAX_TAGS);
    for t in &s.tags {
        prop_assert!(!t.is_empty() && t.len() <= MAX_LABEL_LEN && !t.contains('\0'));
    }
    prop_assert!(s.max_lifetime_seconds.is_none_or(|l| l <= MAX_LIFETIME));
    let r = &s.resources;
    let within = |req: Option<u64>, lim: Option<u64>| match (req, lim) {
        (Some(req), Some(lim)) => req <= lim,
        _ => true,
    };
    prop_assert!(
        within(r.requests.cpu_millis, r.limits.cpu_millis),
        "cpu request over its limit: {r:?}"
    );
    prop_assert!(
        within(r.requests.memory_bytes, r.limits.memory_bytes),
        "memory request over its limit: {r:?}"
    );
    Ok(())
}

/// A refusal lists at least one violation, each naming a field of the request.
fn check_refused(f: &Fields, status: &tonic::Status) -> Result<(), TestCaseError> {
    let details = status.get_error_details();
    let violations = details
        .bad_request()
        .map(|b| b.field_violations.clone())
        .unwrap_or_default();
    prop_assert!(
        !violations.is_empty(),
        "refused without a field violation: {status:?} for {f:?}"
    );
    for v in &violations {
        prop_assert!(
            v.field == "request_id" || v.field.starts_with("sandbox."),
            "violation names no field of the request: {v:?}"
        );
        prop_assert!(!v.description.is_empty(), "violation without why: {v:?}");
    }
    Ok(())
}

fn check(f: &Fields) -> Result<bool, TestCaseError> {
    match validate(f) {
        Ok(s) => check_accepted(f, &s).map(|()| true),
        Err(status) => check_refused(f, &status).map(|()| false),
    }
}

#[test]
fn fuzz_validate_corpus_replays_as_labelled() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/validate");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "corpus too small: {}", seeds.len());
    for path in seeds {
        let text = std::fs::read_to_string(&path).expect("seed");
        let f: Fields =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let accepted = check(&f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let want = f.expect.as_deref().expect("a seed says what it expects");
        assert_eq!(
            if accepted { "accepted" } else { "refused" },
            want,
            "{}",
            path.display()
        );
    }
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => "[a-zA-Z0-9_./:=-]{1,12}",
        2 => any::<String>(),
        1 => Just("a\0b".to_string()),
        1 => Just("x".repeat(MAX_PATH_LEN + 1)),
    ]
    .boxed()
}

fn path() -> BoxedStrategy<String> {
    prop_oneof![
        text(),
        "(/[a-z.]{0,3}){1,5}/?",
        Just("/a/../b".to_string()),
        Just("/a/..".to_string()),
        Just("/".to_string()),
        Just("//a//./b".to_string()),
        Just("/a\0b".to_string()),
    ]
    .boxed()
}

fn image() -> BoxedStrategy<String> {
    prop_oneof![
        Just("python:3.11".to_string()),
        Just("docker.io/library/busybox@sha256:".to_string() + &"a".repeat(64)),
        "[a-z0-9./:@_-]{0,40}",
        text(),
    ]
    .boxed()
}

fn quantity() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[0-9]{1,22}(\\.[0-9]{0,4})?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E|e[0-9]{1,3})?",
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e308".to_string()),
        Just("0.0001m".to_string()),
        text(),
    ]
    .boxed()
}

fn map() -> BoxedStrategy<HashMap<String, String>> {
    proptest::collection::hash_map(text(), text(), 0..4).boxed()
}

fn fields() -> impl Strategy<Value = Fields> {
    let strings = || proptest::collection::vec(text(), 0..4);
    (
        (image(), text(), strings(), map(), path()),
        (
            proptest::collection::vec(path(), 0..3),
            quantity(),
            quantity(),
        ),
        (quantity(), quantity(), strings(), map()),
        (
            prop_oneof![any::<i32>(), 0..=(MAX_LIFETIME as i32 + 1)],
            text(),
            text(),
        ),
    )
        .prop_map(
            |(
                (image, command, args, env, working_dir),
                (files, cpu, memory),
                (cpu_limit, memory_limit, tags, annotations),
                (max_lifetime_seconds, display_name, request_id),
            )| Fields {
                image,
                command,
                args,
                env,
                working_dir,
                files,
                cpu,
                memory,
                cpu_limit,
                memory_limit,
                tags,
                annotations,
                max_lifetime_seconds,
                display_name,
                request_id,
                expect: None,
            },
        )
}

fn config() -> ProptestConfig {
    let cases = std::env::var("SANDPIT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_validate_arbitrary_requests(f in fields()) {
        check(&f)?;
    }
}
