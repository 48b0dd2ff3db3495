//! A sandbox's security settings on real namespaces: its processes' user
//! and capabilities (applied by the agent), its read-only root (mounted by
//! the spawner). Root only, like `sandbox_privileged.rs`.
#![cfg(feature = "privileged-tests")]

use sandpit_runtime::{capability_by_name, capability_mask, DEFAULT_CAPS};
use sandpit_wire::client::ClientError;
use sandpit_wire::{ErrorKind, ExitStatus, InitFile, MainStatus, RunAs};

mod common;
use common::*;

fn status_line(agent: &sandpit_wire::client::AgentClient, pid: &str, key: &str) -> String {
    let (out, status) = sh(agent, &format!("grep '^{key}:' /proc/{pid}/status"));
    assert_eq!(status, ExitStatus::Code(0), "{key} of {pid}: {out}");
    out.split_whitespace().nth(1).unwrap_or_default().to_owned()
}

#[test]
fn processes_files_and_the_main_command_run_as_the_user() {
    let rt = runtime();
    let mut s = spec(
        "user",
        python(),
        &["sh", "-c", "id -u > /tmp/main-id; exec sleep 1000"],
    );
    // By name: resolved in the image's /etc/passwd (nobody:x:65534:65534).
    s.init.run_as = RunAs {
        user: "nobody".into(),
        group: String::new(),
    };
    s.init.files = vec![InitFile {
        path: "/srv/app/config".into(),
        mode: 0o644,
        content: b"x".to_vec(),
    }];
    let sb = start(rt, s);
    let a = sb.agent();
    let (out, _) = sh(&a, "id -u; id -g; echo $HOME; cat /tmp/main-id");
    assert_eq!(out, "65534\n65534\n/nonexistent\n65534\n");
    // Not root: no capabilities left, the bounding set is the default one.
    assert_eq!(status_line(&a, "self", "CapEff"), "0000000000000000");
    assert_eq!(
        status_line(&a, "self", "CapBnd"),
        format!("{:016x}", capability_mask(DEFAULT_CAPS))
    );
    // The agent stays root of the sandbox.
    assert_eq!(status_line(&a, "1", "Uid"), "0");
    // Mounted files and written files, and the directories made for them.
    a.write_file("/srv/app/data/new.txt", 0o644, b"w").unwrap();
    let (out, _) = sh(
        &a,
        "stat -c '%u:%g %n' /srv/app/config /srv/app /srv/app/data/new.txt /srv/app/data /srv",
    );
    assert_eq!(
        out,
        "65534:65534 /srv/app/config\n65534:65534 /srv/app\n\
         65534:65534 /srv/app/data/new.txt\n65534:65534 /srv/app/data\n0:0 /srv\n"
    );
    // The user cannot write where root owns the directory.
    let (out, status) = sh(&a, "touch /etc/x 2>&1");
    assert_ne!(status, ExitStatus::Code(0));
    assert!(out.contains("Permission denied"), "{out}");
    // On the host, the user is the mapped uid: the main command's `sleep`
    // and the agent's root.
    let mut uids: Vec<u32> = sb
        .cgroup()
        .pids()
        .unwrap()
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|st| {
            let line = st.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .collect();
    uids.sort();
    assert_eq!(uids, [HOST_BASE, HOST_BASE + 65534]);
}

#[test]
fn an_unmapped_uid_fails_the_start() {
    let rt = runtime();
    let mut s = spec("unmapped", busybox(), &["true"]);
    s.init.run_as = RunAs {
        user: "70000".into(),
        group: String::new(),
    };
    let sb = start(rt, s);
    assert_eq!(
        sb.agent().ping().unwrap(),
        MainStatus::StartFailed(
            "run as user: uid 70000 is not mapped in the sandbox's user namespace".into()
        )
    );
}

#[test]
fn dropped_capabilities_are_gone_from_every_process() {
    let rt = runtime();
    let give_away = "touch /tmp/f && chown 1 /tmp/f 2>&1 && echo chowned";
    // With the default set, root may give files away (CAP_CHOWN).
    let sb = start(rt, spec("caps-default", busybox(), &[]));
    assert_eq!(sh(&sb.agent(), give_away).0, "chowned\n");
    drop(sb);

    let dropped = [
        capability_by_name("CHOWN").unwrap(),
        capability_by_name("NET_RAW").unwrap(),
    ];
    let keep: Vec<u32> = DEFAULT_CAPS
        .iter()
        .copied()
        .filter(|c| !dropped.contains(c))
        .collect();
    let mask = capability_mask(&keep);
    let mut s = spec("caps-drop", busybox(), &["sleep", "1000"]);
    s.init.capabilities = Some(mask);
    let sb = start(rt, s);
    let a = sb.agent();
    let (out, status) = sh(&a, give_away);
    assert_ne!(status, ExitStatus::Code(0));
    assert!(out.contains("Operation not permitted"), "{out}");
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            status_line(&a, "self", key),
            format!("{mask:016x}"),
            "{key}"
        );
    }
    // The main command too; the agent keeps Docker's set.
    let MainStatus::Running { pid } = a.ping().unwrap() else {
        panic!("main not running");
    };
    assert_eq!(
        status_line(&a, &pid.to_string(), "CapBnd"),
        format!("{mask:016x}")
    );
    assert_eq!(
        status_line(&a, "1", "CapBnd"),
        format!("{:016x}", capability_mask(DEFAULT_CAPS))
    );
    // Dropping everything leaves root with nothing.
    let mut s = spec("caps-none", busybox(), &[]);
    s.init.capabilities = Some(0);
    let sb = start(rt, s);
    let a = sb.agent();
    assert_eq!(status_line(&a, "self", "CapEff"), "0000000000000000");
    assert_eq!(status_line(&a, "self", "CapBnd"), "0000000000000000");
    let (out, status) = sh(&a, give_away);
    assert_ne!(status, ExitStatus::Code(0), "{out}");
}

#[test]
fn a_read_only_root_leaves_tmp_and_dev_shm_writable() {
    let rt = runtime();
    let mut s = spec("ro", python(), &[]);
    s.read_only_root = true;
    let sb = start(rt, s);
    let a = sb.agent();
    let (out, status) = sh(&a, "touch /x 2>&1; touch /etc/x 2>&1");
    assert_eq!(status, ExitStatus::Code(1));
    assert_eq!(
        out,
        "touch: cannot touch '/x': Read-only file system\n\
         touch: cannot touch '/etc/x': Read-only file system\n"
    );
    let (out, status) = sh(
        &a,
        "echo t > /tmp/t && echo s > /dev/shm/s && cat /tmp/t /dev/shm/s",
    );
    assert_eq!((out.as_str(), status), ("t\ns\n", ExitStatus::Code(0)));
    // /tmp is the bounded tmpfs; the root mount is read-only.
    let (out, _) = sh(&a, "grep -E ' / | /tmp ' /proc/self/mounts");
    let root = out
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .unwrap();
    assert!(
        root.split(' ')
            .nth(3)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{out}"
    );
    let tmp = out
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/tmp"))
        .unwrap();
    assert!(tmp.starts_with("tmpfs /tmp tmpfs rw,nosuid,nodev"), "{tmp}");
    assert!(tmp.contains("size=262144k"), "{tmp}");
    // The host's writes go through the agent and meet the same root.
    match a.write_file("/etc/config", 0o644, b"x") {
        Err(ClientError::Agent { kind, message }) => {
            assert_eq!(kind, ErrorKind::PermissionDenied);
            assert_eq!(message, "/etc/config: read-only file system");
        }
        other => panic!("{other:?}"),
    }
    a.write_file("/tmp/config", 0o644, b"x").unwrap();
    assert_eq!(a.read_file("/tmp/config").unwrap(), b"x");
    // The sandbox cannot make it writable again.
    let (out, status) = sh(&a, "mount -o remount,rw / 2>&1");
    assert_ne!(status, ExitStatus::Code(0), "{out}");
}
