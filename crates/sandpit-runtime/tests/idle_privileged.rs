//! A warm pool's sandbox on real namespaces: created idle (agent listening,
//! nothing started), then claimed with the request's init.
//! Root only: `cargo test -p sandpit-runtime --features privileged-tests`.
#![cfg(feature = "privileged-tests")]

use sandpit_wire::client::ClientError;
use sandpit_wire::{ErrorKind, ExecRequest, ExitStatus, InitFile, InitSpec, MainStatus};

mod common;
use common::*;

fn idle(prefix: &str) -> Guard<'static> {
    let rt = runtime();
    let mut spec = spec(prefix, python(), &["must-not-run"]);
    // Ignored for an idle sandbox: were it applied, this file would exist.
    spec.init.files = vec![InitFile {
        path: "/planted".into(),
        mode: 0o644,
        content: b"x".to_vec(),
    }];
    let sb = rt.create_idle(&spec).unwrap();
    Guard { rt, sb }
}

fn init(argv: &[&str], env: &[(&str, &str)]) -> InitSpec {
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push((
        "PATH".into(),
        "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
    ));
    InitSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env,
        cwd: "/work".into(),
        files: vec![InitFile {
            path: "/work/given.txt".into(),
            mode: 0o600,
            content: b"from the claim".to_vec(),
        }],
        ..Default::default()
    }
}

#[test]
fn an_idle_sandbox_runs_nothing_and_serves_nothing_but_pings_until_claimed() {
    let sb = idle("idle");
    let agent = sb.agent();
    assert_eq!(agent.ping().unwrap(), MainStatus::Idle);
    // No exec, no file read before the claim.
    let refused = agent.run(
        ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        },
        None,
    );
    assert!(
        matches!(&refused, Err(ClientError::Agent { kind: ErrorKind::NotRunning, message }) if message.contains("not claimed")),
        "{refused:?}"
    );
    assert!(agent.read_file("/etc/hostname").is_err());
    // The only process of the sandbox is its agent: the cgroup holds one.
    let procs = sb.cgroup().pids().unwrap();
    assert_eq!(procs.len(), 1, "{procs:?}");

    // The claim brings the user's init: main command, env, cwd, files.
    let status = agent
        .claim(&init(
            &["sh", "-c", "echo $GREETING > /work/main.out; sleep 60"],
            &[("GREETING", "hello")],
        ))
        .unwrap();
    assert!(matches!(status, MainStatus::Running { .. }), "{status:?}");
    let (out, code) = sh(
        &agent,
        "sleep 0.2; cat /work/main.out /work/given.txt; pwd; test -e /planted && echo planted",
    );
    assert_eq!(code, ExitStatus::Code(1), "{out}");
    assert_eq!(out, "hello\nfrom the claim/work\n");
    let (env, _) = sh(&agent, "echo $GREETING");
    assert_eq!(env, "hello\n");
    // A second claim is refused: a pooled sandbox is handed out once.
    let again = agent.claim(&init(&["true"], &[]));
    assert!(
        matches!(
            &again,
            Err(ClientError::Agent {
                kind: ErrorKind::Protocol,
                ..
            })
        ),
        "{again:?}"
    );
}

#[test]
fn a_claim_whose_main_cannot_start_reports_it() {
    let sb = idle("idle-fail");
    let status = sb.agent().claim(&init(&["/no/such/program"], &[])).unwrap();
    assert!(matches!(status, MainStatus::StartFailed(_)), "{status:?}");
}
