//! The agent's startup probes and its processes' user and capabilities, on
//! the host (see `common`). The user tests need root (a non-root agent
//! cannot switch users) and say so when skipped.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use sandpit_wire::{ExitStatus, MainStatus, Probe, ProbeCheck, RunAs, Signal, StartupState};

mod common;
use common::*;

fn probe(check: ProbeCheck, period_ms: u32, failure_threshold: u32) -> Probe {
    Probe {
        check,
        initial_delay_ms: 0,
        period_ms,
        timeout_ms: 1000,
        failure_threshold,
    }
}

fn exec(argv: &[&str]) -> ProbeCheck {
    ProbeCheck::Exec(argv.iter().map(|s| s.to_string()).collect())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    // SAFETY: geteuid only returns a value.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root to switch users");
    }
    root
}

#[test]
fn without_a_probe_the_start_is_decided_at_once() {
    let a = start(&["sleep", "100"]);
    assert_eq!(a.client.await_startup().unwrap(), StartupState::Ready);
    stop(a);
}

#[test]
fn an_exec_probe_passes_once_its_command_succeeds() {
    let a = start_with(
        &["sh", "-c", "sleep 0.6; touch ready; exec sleep 100"],
        |i, _| {
            i.startup_probe = Some(probe(exec(&["test", "-e", "ready"]), 100, 1000));
        },
    );
    let started = Instant::now();
    assert_eq!(a.client.await_startup().unwrap(), StartupState::Ready);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "ready after {took:?}");
    // Asked again (a restarted daemon): the same verdict, at once.
    assert_eq!(a.client.await_startup().unwrap(), StartupState::Ready);
    stop(a);
}

#[test]
fn a_probe_that_never_passes_fails_with_its_last_output() {
    let a = start_with(&["sleep", "100"], |i, _| {
        let check = exec(&[
            "sh",
            "-c",
            "echo not ready yet; echo check failed >&2; exit 1",
        ]);
        i.startup_probe = Some(Probe {
            initial_delay_ms: 300,
            ..probe(check, 100, 3)
        });
    });
    let started = Instant::now();
    let state = a.client.await_startup().unwrap();
    // The delay, then three checks 100 ms apart.
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        state,
        StartupState::Failed(
            "3 consecutive checks failed; last: exec exited with code 1: \
             not ready yet\ncheck failed"
                .into()
        )
    );
    // The main command is not the probe's to stop: the host destroys the
    // sandbox.
    assert!(matches!(
        a.client.ping().unwrap(),
        MainStatus::Running { .. }
    ));
    stop(a);
}

#[test]
fn a_check_that_outlives_its_timeout_is_killed_and_fails() {
    let a = start_with(&["sleep", "100"], |i, _| {
        i.startup_probe = Some(Probe {
            timeout_ms: 200,
            ..probe(exec(&["sh", "-c", "echo waiting; exec sleep 30"]), 100, 2)
        });
    });
    let started = Instant::now();
    let state = a.client.await_startup().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        state,
        StartupState::Failed(
            "2 consecutive checks failed; last: exec timed out after 0.2 s: waiting".into()
        )
    );
    // Both checks' processes are gone (killed, reaped).
    let out = sh(&a, "ps -eo args | grep -c '^sleep 30$' || true");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    stop(a);
}

#[test]
fn the_main_process_ending_fails_the_probe_at_once() {
    let a = start_with(&["sh", "-c", "sleep 0.3; exit 3"], |i, _| {
        i.startup_probe = Some(probe(exec(&["false"]), 10_000, 100));
    });
    let started = Instant::now();
    let state = a.client.await_startup().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited a period"
    );
    assert_eq!(
        state,
        StartupState::Failed(
            "main process exited with code 3 before the probe succeeded; \
             last check: exec exited with code 1"
                .into()
        )
    );
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(3));
}

/// The agent's main command outlives a killed agent on the host (no PID
/// namespace here): stop it with the agent.
fn stop(a: Agent) {
    let _ = a.client.signal_main(Signal::KILL);
    let _ = wait_main_exit(&a.client);
}

fn http_server(port: u16) -> String {
    format!("sleep 0.5; exec python3 -m http.server {port} --bind 127.0.0.1")
}

#[test]
fn tcp_and_http_probes_reach_a_server_the_main_command_starts() {
    for check in [
        |port| ProbeCheck::Tcp { port },
        |port| ProbeCheck::Http {
            port,
            path: "/".into(),
        },
    ] {
        let port = free_port();
        let a = start_with(&["sh", "-c", &http_server(port)], |i, _| {
            i.startup_probe = Some(probe(check(port), 100, 100));
        });
        let started = Instant::now();
        assert_eq!(
            a.client.await_startup().unwrap(),
            StartupState::Ready,
            "{:?}",
            check(port)
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        stop(a);
    }
    let port = free_port();
    let a = start_with(&["sh", "-c", &http_server(port)], |i, _| {
        let check = ProbeCheck::Http {
            port,
            path: "/missing".into(),
        };
        i.startup_probe = Some(probe(check, 200, 10));
    });
    let StartupState::Failed(why) = a.client.await_startup().unwrap() else {
        panic!("a 404 passed");
    };
    assert!(
        why.starts_with(&format!(
            "10 consecutive checks failed; last: http GET /missing on port {port}: status 404: "
        )),
        "{why}"
    );
    stop(a);
}

#[test]
fn a_refused_tcp_probe_names_the_address() {
    let port = free_port();
    let a = start_with(&["sleep", "100"], |i, _| {
        i.startup_probe = Some(probe(ProbeCheck::Tcp { port }, 50, 2));
    });
    assert_eq!(
        a.client.await_startup().unwrap(),
        StartupState::Failed(format!(
            "2 consecutive checks failed; last: tcp connect 127.0.0.1:{port}: connection refused"
        ))
    );
    stop(a);
}

#[test]
fn processes_and_files_belong_to_the_requested_user() {
    if !is_root() {
        return;
    }
    let a = start_with(&["sh", "-c", "id -u; id -g; echo $HOME"], |i, dir| {
        // The user must be able to enter its working directory.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        i.run_as = RunAs {
            user: "4242".into(),
            group: "4343".into(),
        };
        i.files = vec![sandpit_wire::InitFile {
            path: "mounted/dir/file".into(),
            mode: 0o644,
            content: b"m".to_vec(),
        }];
    });
    assert_eq!(wait_main_exit(&a.client), ExitStatus::Code(0));
    let out = sh(
        &a,
        "id -u; id -g; id -G; grep -E '^Cap(Eff|Prm)' /proc/self/status",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "4242\n4343\n4343\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n"
    );
    let owner = |rel: &str| {
        let m = std::fs::metadata(a.cwd().join(rel)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("mounted/dir/file"), (4242, 4343));
    assert_eq!(owner("mounted/dir"), (4242, 4343));
    a.client.write_file("written", 0o644, b"w").unwrap();
    assert_eq!(owner("written"), (4242, 4343));
}

#[test]
fn a_user_name_that_does_not_resolve_fails_the_start() {
    let a = start_with(&["true"], |i, _| {
        i.run_as = RunAs {
            user: "no-such-user-here".into(),
            group: String::new(),
        };
    });
    assert_eq!(
        a.client.ping().unwrap(),
        MainStatus::StartFailed(
            "run as user: user \"no-such-user-here\" not found in /etc/passwd".into()
        )
    );
}

#[test]
fn the_capability_mask_bounds_every_process() {
    if !is_root() {
        return;
    }
    // Docker's default set without NET_RAW (13).
    let mask: u64 = 0xa804_25fb & !(1 << 13);
    let a = start_with(&["sleep", "100"], |i, _| i.capabilities = Some(mask));
    let agent = std::fs::read_to_string(format!("/proc/{}/status", a.child.id())).unwrap();
    let out = sh(&a, "grep -E '^Cap(Bnd|Eff)' /proc/self/status");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("CapEff:\t{mask:016x}\nCapBnd:\t{mask:016x}\n")
    );
    // The agent keeps its own.
    assert!(!agent.contains(&format!("CapBnd:\t{mask:016x}")), "{agent}");
    stop(a);
}
