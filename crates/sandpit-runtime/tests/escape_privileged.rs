//! Known container-escape routes, tried from inside a sandbox by the agent's
//! probe (its `escape` part): every one is refused. Root only, like
//! `sandbox_privileged.rs`; tests/e2e/test_escape.py asserts the same
//! through the daemon and the real client.
#![cfg(feature = "privileged-tests")]

mod common;
use common::*;

const DENIED: &[&str] = &["EPERM", "EACCES"];
/// A kernel file a sandbox must not write: refused, absent or read-only.
const NO_FILE: &[&str] = &["EPERM", "EACCES", "ENOENT", "EROFS"];

/// Each route of the probe's `escape` part and the refusals it may answer.
fn routes() -> Vec<(String, Vec<&'static str>)> {
    let with = |base: &[&'static str], more: &[&'static str]| -> Vec<&'static str> {
        base.iter().chain(more).copied().collect()
    };
    let mut r: Vec<(String, Vec<&'static str>)> = vec![
        ("mount_proc".into(), DENIED.to_vec()),
        ("mount_tmpfs".into(), DENIED.to_vec()),
        ("mount_cgroup2".into(), DENIED.to_vec()),
        ("mount_cgroup_v1".into(), with(DENIED, &["ENODEV"])),
        ("write_cgroup_release_agent".into(), NO_FILE.to_vec()),
        ("open_write_proc1_exe".into(), with(NO_FILE, &["ETXTBSY"])),
        ("open_write_self_exe".into(), with(NO_FILE, &["ETXTBSY"])),
        (
            "process_vm_readv_pid1".into(),
            with(DENIED, &["ESRCH", "ENOSYS"]),
        ),
        ("io_uring_setup".into(), with(DENIED, &["ENOSYS"])),
        ("userfaultfd".into(), with(DENIED, &["ENOSYS"])),
        ("add_key".into(), with(DENIED, &["ENOSYS"])),
        ("request_key".into(), with(DENIED, &["ENOSYS"])),
        (
            "perf_event_open".into(),
            with(DENIED, &["ENOSYS", "ENOENT", "ENODEV"]),
        ),
        ("mknod_dev_mem".into(), DENIED.to_vec()),
        ("open_dev_mem".into(), NO_FILE.to_vec()),
        ("open_block_device".into(), NO_FILE.to_vec()),
        ("klogctl_read_all".into(), DENIED.to_vec()),
        ("read_dev_kmsg".into(), NO_FILE.to_vec()),
    ];
    for ns in [
        "user", "mount", "net", "pid", "ipc", "uts", "cgroup", "time",
    ] {
        r.push((format!("unshare_{ns}"), with(DENIED, &["EINVAL"])));
    }
    for ns in ["mnt", "net", "pid", "ipc", "uts", "cgroup", "user", "time"] {
        r.push((format!("setns_pid1_{ns}"), with(DENIED, &["ENOENT"])));
    }
    r
}

/// Open routes, found by this test: each must still be "ok" here, so that
/// closing one fails the test until it moves to the refused ones. None
/// today: io_uring is refused by seccomp, and the agent (PID 1) is not
/// dumpable, so it cannot be ptrace-seized (both were open when the probe
/// was written).
const KNOWN_GAPS: &[(&str, &str)] = &[];

#[test]
fn every_escape_route_is_refused() {
    let rt = runtime();
    let sb = start(rt, spec("escape", busybox(), &[]));
    let p = probe(&sb);
    let e = p["escape"].as_object().expect("an escape object");
    let routes = routes();
    let mut failures = Vec::new();
    for (key, refusals) in &routes {
        if KNOWN_GAPS.contains(&("escape", key.as_str())) {
            continue;
        }
        match e.get(key).and_then(|v| v.as_str()) {
            None => failures.push(format!("{key}: missing")),
            Some("ok") => failures.push(format!("{key}: allowed")),
            Some(got) if !refusals.contains(&got) => failures.push(format!(
                "{key}: unexpected {got} (want one of {refusals:?})"
            )),
            Some(_) => {}
        }
    }
    assert_eq!(
        e["kallsyms_addresses"], "hidden",
        "kallsyms_addresses: kernel addresses visible"
    );
    for key in e.keys() {
        assert!(
            key == "kallsyms_addresses" || routes.iter().any(|(k, _)| k == key),
            "{key}: a route of the probe without an assertion here"
        );
    }
    assert!(failures.is_empty(), "{failures:#?}\n{p}");
    // The agent is not dumpable: no ptrace of PID 1 from inside.
    assert_eq!(
        p["attempts"]["ptrace_attach_pid1"], "EPERM",
        "ptrace of the agent: {p}"
    );
    // The older part of the probe, for the routes of the same list.
    for (part, key) in KNOWN_GAPS {
        assert_eq!(
            p[part][key], "ok",
            "{key}: a known gap closed, move it to the refused: {p}"
        );
    }
    for key in ["bpf", "keyctl", "write_proc_sysrq", "mknod_char"] {
        assert!(p["attempts"][key].is_string(), "{key} missing: {p}");
        assert_ne!(p["attempts"][key], "ok", "{key} was allowed: {p}");
    }
}
