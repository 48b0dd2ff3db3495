use sandpit_proto::sandbox::v1 as pb;
use sandpit_wire::{Probe, ProbeCheck};

use super::PROBE_ANNOTATION;
use crate::api::validate::test_support::{spec, validate, violations};

const P: &str = "sandbox.spec.containers[0].startup_probe";

fn annotation_field() -> String {
    format!("sandbox.spec.annotations[\"{PROBE_ANNOTATION}\"]")
}

fn proto(p: pb::Probe) -> pb::SandboxSpec {
    spec(|s| s.containers[0].startup_probe = Some(p))
}

fn annotated(json: &str) -> pb::SandboxSpec {
    spec(|s| {
        s.annotations
            .insert(PROBE_ANNOTATION.into(), json.to_owned());
    })
}

fn probe_of(s: pb::SandboxSpec) -> Probe {
    validate(s)
        .expect("accepted")
        .startup_probe
        .expect("a probe")
}

fn exec(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|s| s.to_string()).collect()
}

#[test]
fn an_exec_probe_gets_kubernetes_defaults() {
    assert_eq!(validate(spec(|_| {})).unwrap().startup_probe, None);
    let p = probe_of(proto(pb::Probe {
        exec: exec(&["test", "-e", "/ready"]),
        ..Default::default()
    }));
    assert_eq!(
        p,
        Probe {
            check: ProbeCheck::Exec(exec(&["test", "-e", "/ready"])),
            initial_delay_ms: 0,
            period_ms: 10_000,
            timeout_ms: 1000,
            failure_threshold: 3,
        }
    );
    let p = probe_of(proto(pb::Probe {
        exec: exec(&["true"]),
        initial_delay_seconds: 2,
        period_seconds: 1,
        timeout_seconds: 5,
        failure_threshold: 60,
    }));
    assert_eq!(
        (
            p.initial_delay_ms,
            p.period_ms,
            p.timeout_ms,
            p.failure_threshold
        ),
        (2000, 1000, 5000, 60)
    );
}

#[test]
fn bad_protocol_probes_name_each_field() {
    let v = violations(proto(pb::Probe {
        exec: vec![],
        initial_delay_seconds: -1,
        period_seconds: 3601,
        timeout_seconds: -2,
        failure_threshold: 10_001,
    }));
    let fields: Vec<String> = v.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(
        fields,
        [
            format!("{P}.exec"),
            format!("{P}.exec"),
            format!("{P}.initial_delay_seconds"),
            format!("{P}.period_seconds"),
            format!("{P}.timeout_seconds"),
            format!("{P}.failure_threshold"),
        ]
    );
    assert!(v[0]
        .1
        .starts_with("required: exec is the protocol's only probe"));
    assert!(v[0].1.contains(PROBE_ANNOTATION), "{}", v[0].1);
    assert_eq!(v[2].1, "-1 is negative");
    assert_eq!(v[3].1, "3601 is above 3600 s");
    assert_eq!(v[4].1, "-2 is below 1");
    assert_eq!(v[5].1, "10001 is not within 1-10000");
    let v = violations(proto(pb::Probe {
        exec: exec(&["", "x"]),
        ..Default::default()
    }));
    assert_eq!(
        v,
        [(format!("{P}.exec"), "a command is required".to_string())]
    );
}

#[test]
fn tcp_http_and_exec_probes_come_from_the_annotation() {
    let p = probe_of(annotated(r#"{"tcp": {"port": 8080}, "period_seconds": 1}"#));
    assert_eq!(p.check, ProbeCheck::Tcp { port: 8080 });
    assert_eq!((p.period_ms, p.failure_threshold), (1000, 3));
    let p = probe_of(annotated(
        r#"{"http": {"port": 80, "path": "/healthz?full=1"}, "failure_threshold": 30,
            "timeout_seconds": 2, "initial_delay_seconds": 1}"#,
    ));
    assert_eq!(
        p,
        Probe {
            check: ProbeCheck::Http {
                port: 80,
                path: "/healthz?full=1".into(),
            },
            initial_delay_ms: 1000,
            period_ms: 10_000,
            timeout_ms: 2000,
            failure_threshold: 30,
        }
    );
    let p = probe_of(annotated(r#"{"http": {"port": 8000}}"#));
    assert_eq!(
        p.check,
        ProbeCheck::Http {
            port: 8000,
            path: "/".into()
        }
    );
    let p = probe_of(annotated(r#"{"exec": ["cat", "/ready"]}"#));
    assert_eq!(p.check, ProbeCheck::Exec(exec(&["cat", "/ready"])));
}

#[test]
fn bad_annotations_are_refused_naming_the_member() {
    let refused = |json: &str| {
        let v = violations(annotated(json));
        assert_eq!(v.len(), 1, "{json}: {v:?}");
        assert_eq!(v[0].0, annotation_field(), "{json}");
        v[0].1.clone()
    };
    assert_eq!(
        refused(r#"{"tcp": {"port": 0}}"#),
        "tcp.port: 0 is not a port (1-65535)"
    );
    assert_eq!(
        refused(r#"{"http": {"port": 70000, "path": "/"}}"#),
        "http.port: 70000 is not a port (1-65535)"
    );
    assert_eq!(
        refused(r#"{"http": {"port": 80, "path": "healthz"}}"#),
        "http.path: \"healthz\" does not start with '/'"
    );
    assert_eq!(
        refused(r#"{"http": {"port": 80, "path": "/a b"}}"#),
        "http.path: only printable ASCII without spaces (percent-encode the rest)"
    );
    assert_eq!(
        refused(r#"{"tcp": {"port": 1}, "http": {"port": 2}}"#),
        "exec, tcp, http: exactly one of them is required"
    );
    assert_eq!(
        refused(r#"{"period_seconds": 1}"#),
        "exec, tcp, http: exactly one of them is required"
    );
    assert_eq!(
        refused(r#"{"tcp": {"port": 1}, "period_seconds": -5}"#),
        "period_seconds: -5 is below 1"
    );
    assert!(refused(r#"{"tcp": {"port": 1}, "periodSeconds": 5}"#)
        .starts_with("not a probe: unknown field `periodSeconds`"),);
    assert!(refused("tcp:8080").starts_with("not a probe: "));
    // Given twice.
    let mut twice = annotated(r#"{"tcp": {"port": 1}}"#);
    twice.containers[0].startup_probe = Some(pb::Probe {
        exec: exec(&["true"]),
        ..Default::default()
    });
    assert_eq!(
        violations(twice),
        [(
            annotation_field(),
            "the container's startup_probe is set too: give the probe once".to_string()
        )]
    );
}
