//! End-to-end tests of the engine on real namespaces, cgroups and overlayfs.
//! Root only: `cargo test -p sandpit-runtime --features privileged-tests`.
//! Needs the static agent (`scripts/build-agent.sh`) and the test rootfs
//! tarballs (`scripts/build-test-images.sh`); `.ci/run` prepares both.
#![cfg(feature = "privileged-tests")]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandpit_runtime::cgroup::Limits;
use sandpit_runtime::{NetworkNamespace, RuntimeError, SandboxId};
use sandpit_wire::client::{ClientError, ExecEvent, ExecSession};
use sandpit_wire::{ErrorKind, ExecRequest, ExitStatus, InitFile, MainStatus, Signal, WinSize};

mod common;
use common::*;

// ---------------------------------------------------------------- isolation

#[test]
fn probe_sees_an_isolated_unprivileged_environment() {
    let rt = runtime();
    let sb = start(rt, spec("probe", busybox(), &[]));
    let p = probe(&sb);
    let a = &p["attempts"];
    // Root inside, an unprivileged range outside.
    assert_eq!(p["uid"], 0);
    let base = HOST_BASE.to_string();
    assert_eq!(
        p["uid_map"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", base.as_str(), "65536"]
    );
    assert_eq!(p["hostname"], sb.id().as_str());
    // Own PID namespace: the agent is PID 1 and the host's processes are invisible.
    assert!(p["pids_visible"].as_u64().unwrap() < 5, "{p}");
    assert_eq!(p["no_new_privs"], 1);
    assert_eq!(p["seccomp"], 2);
    let bnd = u64::from_str_radix(p["cap_bnd"].as_str().unwrap(), 16).unwrap();
    assert_eq!(
        bnd,
        sandpit_runtime::capability_mask(sandpit_runtime::DEFAULT_CAPS)
    );
    for forbidden in [
        "mount_tmpfs",
        "unshare_user",
        "unshare_net",
        "init_module",
        "kexec_load",
        "bpf",
        "keyctl",
        "sethostname",
        "reboot",
        "swapon",
        "clock_settime",
        "open_kcore_read",
        "write_proc_sysrq",
        "write_sys",
    ] {
        assert_ne!(a[forbidden], "ok", "{forbidden} was allowed: {p}");
        assert!(a[forbidden].is_string(), "{forbidden} missing: {p}");
    }
    assert_eq!(a["chroot"], "ok", "default capabilities allow chroot: {p}");
}

#[test]
fn sandbox_processes_run_as_an_unprivileged_host_uid() {
    let rt = runtime();
    let sb = start(rt, spec("uid", busybox(), &["sleep", "1000"]));
    let MainStatus::Running { .. } = sb.agent().ping().unwrap() else {
        panic!("main not running")
    };
    let pids = sb.cgroup().pids().unwrap();
    assert_eq!(pids.len(), 2, "agent and sleep: {pids:?}");
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        for uid in uid_line.split_whitespace().skip(1) {
            assert_eq!(
                uid.parse::<u32>().unwrap(),
                HOST_BASE,
                "pid {pid}: {uid_line}"
            );
        }
    }
}

#[test]
fn host_files_outside_the_rootfs_are_invisible() {
    let rt = runtime();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "host secret").unwrap();
    let sb = start(rt, spec("hostfs", busybox(), &[]));
    let path = secret.path().to_str().unwrap();
    let (out, status) = sh(&sb.agent(), &format!("cat {path} 2>&1; ls /"));
    assert!(!out.contains("host secret"), "{out}");
    assert_eq!(status, ExitStatus::Code(0));
    // What `/` holds inside is the image, not the host.
    assert!(out.contains("bin"));
    assert!(!out.contains("work"), "{out}");
    assert_eq!(
        sh(&sb.agent(), "tr '\\0' ' ' < /proc/1/cmdline").0.trim(),
        "sandpit-agent serve --listen-fd 3 --init-fd 4"
    );
}

#[test]
fn network_is_loopback_only() {
    let rt = runtime();
    let sb = start(rt, spec("net", busybox(), &[]));
    let (out, _) = sh(&sb.agent(), "ls /sys/class/net");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let (out, _) = sh(&sb.agent(), "cat /sys/class/net/lo/flags");
    let flags = u32::from_str_radix(out.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "loopback not up: {out}");
}

/// A network namespace made the way its owner (sandpit-net) makes one: a
/// thread unshares itself into it and keeps a descriptor.
fn new_netns() -> std::os::fd::OwnedFd {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap()
            .into()
    })
    .join()
    .unwrap()
}

#[test]
fn a_given_network_namespace_is_joined_and_outlives_the_sandbox() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let rt = runtime();
    let ns = new_netns();
    let inode = std::fs::File::from(ns.try_clone().unwrap())
        .metadata()
        .unwrap()
        .ino();
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        ns.as_raw_fd()
    ));
    // Two sandboxes join the same namespace (pod-like).
    let mut specs = [
        spec("netns-a", busybox(), &[]),
        spec("netns-b", busybox(), &[]),
    ];
    for s in &mut specs {
        s.network_namespace = Some(NetworkNamespace {
            path: path.clone(),
            resolv_conf: b"nameserver 10.209.0.1\n".to_vec(),
            hosts: format!("127.0.0.1 localhost\n10.209.0.9 {}\n", s.id).into_bytes(),
            ca_certificates: b"# test CA\n".to_vec(),
        });
    }
    let [a, b] = specs;
    let a = start(rt, a);
    let b = start(rt, b);
    for sb in [&a, &b] {
        // The shell's, not the agent's: the agent is not dumpable, so its
        // /proc/1/ns links are not the sandbox's to read.
        let (out, _) = sh(&sb.agent(), "readlink /proc/self/ns/net");
        assert_eq!(out.trim(), format!("net:[{inode}]"));
        // Its owner did not bring `lo` up: the spawner leaves a joined
        // namespace as it is.
        let (out, _) = sh(&sb.agent(), "cat /sys/class/net/lo/flags");
        let flags = u32::from_str_radix(out.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 0, "lo was brought up in a joined namespace");
        // The network's name files, over the image's, owned by the
        // sandbox's root.
        let (out, _) = sh(
            &sb.agent(),
            "cat /etc/resolv.conf; stat -c %u:%a /etc/hosts",
        );
        assert_eq!(out, "nameserver 10.209.0.1\n0:644\n");
        let (out, _) = sh(&sb.agent(), "cat /etc/hosts");
        assert!(out.contains(&format!("10.209.0.9 {}", sb.id())), "{out}");
        // The extra CAs, in the bundle and where update-ca-certificates looks.
        let (out, _) = sh(
            &sb.agent(),
            "tail -n1 /etc/ssl/certs/ca-certificates.crt; cat /usr/local/share/ca-certificates/sandpit-extra.crt",
        );
        assert_eq!(out, "# test CA\n# test CA\n");
    }
    drop(a);
    drop(b);
    // The namespace is the owner's: still there after both sandboxes.
    let again = std::fs::File::open(&path)
        .unwrap()
        .metadata()
        .unwrap()
        .ino();
    assert_eq!(again, inode);
    // Not a network namespace: refused, nothing left.
    let mut bad = spec("netns-bad", busybox(), &[]);
    bad.network_namespace = Some(NetworkNamespace {
        path: "/proc/self/ns/pid".into(),
        resolv_conf: vec![],
        hosts: vec![],
        ca_certificates: vec![],
    });
    let err = rt.create(&bad).unwrap_err().to_string();
    assert!(err.contains("join network namespace"), "{err}");
    assert!(!rt.list().unwrap().contains(&bad.id));
}

#[test]
fn symlink_planted_inside_cannot_reach_host_files() {
    let rt = runtime();
    let host_dir = tempfile::tempdir().unwrap();
    let host_file = host_dir.path().join("victim");
    std::fs::write(&host_file, "untouched").unwrap();
    let sb = start(rt, spec("symlink", busybox(), &[]));
    let agent = sb.agent();
    let (_, st) = sh(
        &agent,
        &format!(
            // The same absolute path exists inside too: links must resolve there.
            "ln -s {} /tmp/escape && mkdir -p /tmp/d {dir} && ln -s {dir} /tmp/d/up",
            host_file.display(),
            dir = host_dir.path().display()
        ),
    );
    assert_eq!(st, ExitStatus::Code(0));
    match agent.read_file("/tmp/escape") {
        Err(ClientError::Agent {
            kind: ErrorKind::NotFound,
            ..
        }) => {}
        other => panic!("read through planted symlink: {other:?}"),
    }
    agent.write_file("/tmp/escape", 0o644, b"pwned").unwrap();
    agent
        .write_file("/tmp/d/up/victim", 0o644, b"pwned")
        .unwrap();
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "untouched");
    // The writes landed inside the sandbox.
    assert_eq!(agent.read_file("/tmp/escape").unwrap(), b"pwned");
    let inside = host_dir.path().join("victim");
    assert_eq!(agent.read_file(inside.to_str().unwrap()).unwrap(), b"pwned");
    assert_eq!(
        std::fs::read_dir(host_dir.path()).unwrap().count(),
        1,
        "nothing new in the host directory"
    );
}

// ------------------------------------------------------------------- limits

#[test]
fn memory_hog_is_oom_killed_and_reported() {
    let rt = runtime();
    let mut s = spec(
        "oom",
        python(),
        &["python3", "-c", "b = b'x' * (512 << 20); print(len(b))"],
    );
    s.limits = Limits {
        memory_bytes: Some(64 << 20),
        ..Default::default()
    };
    let sb = start(rt, s);
    assert_eq!(
        wait_main_exit(&sb.agent()),
        ExitStatus::Signal(Signal::KILL)
    );
    assert!(sb.oom_kills() >= 1, "oom kill not recorded");
    // The agent survived and still answers.
    assert!(matches!(sb.agent().ping().unwrap(), MainStatus::Exited(_)));
}

#[test]
fn fork_bomb_is_contained_by_the_pids_limit() {
    let rt = runtime();
    let mut s = spec(
        "forkbomb",
        busybox(),
        &["sh", "-c", "f() { f | f & }; f; sleep 1000"],
    );
    s.limits = Limits {
        pids_max: Some(64),
        cpu_millis: Some(500),
        ..Default::default()
    };
    let sb = start(rt, s);
    std::thread::sleep(Duration::from_millis(1500));
    let n = sb.cgroup().pids().unwrap().len();
    assert!(n <= 64, "{n} processes despite pids.max=64");
    // The bomb's processes are short-lived, so a sample of the cgroup is
    // noisy; the kernel's own count of refused forks is not.
    let hits = sb.cgroup().pids_limit_hits().unwrap();
    assert!(hits >= 1, "the bomb never hit the limit ({n} processes)");
    // The host stays responsive: it can still start processes.
    let t = Instant::now();
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    eprintln!("host `true` during the fork bomb: {:?}", t.elapsed());
    let id = sb.id().clone();
    drop(sb);
    assert!(rt.open(&id).is_err(), "state left behind");
}

#[test]
fn cpu_quota_is_enforced() {
    let rt = runtime();
    let mut s = spec("cpu", busybox(), &[]);
    s.limits = Limits {
        cpu_millis: Some(200),
        ..Default::default()
    };
    let sb = start(rt, s);
    let before = sb.cgroup().cpu_usage_usec().unwrap();
    let t = Instant::now();
    sh(&sb.agent(), "timeout 1 sh -c 'while :; do :; done'");
    let wall = t.elapsed().as_micros() as u64;
    let used = sb.cgroup().cpu_usage_usec().unwrap() - before;
    // A busy loop would use ~100% of one CPU; 200m allows ~20% of the wall time.
    assert!(used < wall / 2, "used {used} us of CPU in {wall} us");
    assert!(
        used > wall / 20,
        "the loop barely ran: {used} us in {wall} us"
    );
}

// --------------------------------------------------------------- no debris

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

fn link_count() -> usize {
    std::fs::read_dir("/sys/class/net").unwrap().count()
}

/// Processes whose cgroup path mentions `marker`.
fn processes_in(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup")).is_ok_and(|c| c.contains(marker))
        })
        .count()
}

#[test]
fn hundred_cycles_and_a_killed_main_leave_no_debris() {
    // A runtime of its own, so counts are not disturbed by the other tests.
    let rt = new_runtime("debris");
    rt.sweep(|_| true).unwrap();
    let marker = "sandpit-test-debris";
    let (mounts, links) = (mount_count(), link_count());
    assert_eq!(rt.cgroups().list().unwrap().len(), 0);
    assert_eq!(processes_in(marker), 0);

    for i in 0..100 {
        let argv: &[&str] = if i % 2 == 0 { &[] } else { &["sleep", "1000"] };
        let sb = rt.create(&spec("cycle", busybox(), argv)).unwrap();
        if i % 10 == 0 {
            assert!(sb.agent().ping().is_ok());
            assert_eq!(sh(&sb.agent(), "echo hi").0, "hi\n");
            assert!(processes_in(marker) >= 1);
        }
        rt.destroy(sb.id()).unwrap();
    }

    // A main process killed from the host with SIGKILL.
    let sb = rt
        .create(&spec("killed", busybox(), &["sleep", "1000"]))
        .unwrap();
    let MainStatus::Running { .. } = sb.agent().ping().unwrap() else {
        panic!("main not running")
    };
    let sleeper = sb
        .cgroup()
        .pids()
        .unwrap()
        .into_iter()
        .find(|&p| p != sb.pid())
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        wait_main_exit(&sb.agent()),
        ExitStatus::Signal(Signal::KILL)
    );
    rt.destroy(sb.id()).unwrap();

    // Killing PID 1 itself.
    let sb = rt
        .create(&spec("killed-init", busybox(), &["sleep", "1000"]))
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    rt.destroy(sb.id()).unwrap();

    assert_eq!(mount_count(), mounts, "mounts leaked");
    assert_eq!(link_count(), links, "network devices leaked");
    assert_eq!(rt.cgroups().list().unwrap().len(), 0, "cgroups leaked");
    assert_eq!(rt.list().unwrap().len(), 0, "state dirs leaked");
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_in(marker) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(processes_in(marker), 0, "processes leaked");
}

#[test]
fn sweep_removes_the_debris_of_a_crash() {
    let rt = new_runtime("sweep");
    rt.sweep(|_| true).unwrap();
    let a = rt
        .create(&spec("keep", busybox(), &["sleep", "1000"]))
        .unwrap();
    let b = rt
        .create(&spec("lost", busybox(), &["sleep", "1000"]))
        .unwrap();
    // As if the daemon crashed and forgot `b`: a new runtime instance sweeps it.
    let rt2 = new_runtime("sweep");
    let keep = HashSet::from([a.id().clone()]);
    let report = rt2.sweep(|id| !keep.contains(id)).unwrap();
    assert_eq!(report.state_dirs, 1);
    assert!(!b.is_running());
    assert!(a.is_running());
    let adopted = rt2.open(a.id()).unwrap();
    assert!(adopted.agent().ping().is_ok());
    rt2.destroy(a.id()).unwrap();
    assert!(rt2.list().unwrap().is_empty());
    assert!(rt2.cgroups().list().unwrap().is_empty());
}

#[test]
fn sweep_takes_only_what_the_predicate_picks() {
    // The daemon's sweep: its own (generated) ids, never `sandpit run`'s.
    let rt = new_runtime("sweep-pick");
    rt.sweep(|_| true).unwrap();
    let mut daemons = spec("unused", busybox(), &["sleep", "1000"]);
    daemons.id = SandboxId::generate();
    let mut runs = spec("unused", busybox(), &["sleep", "1000"]);
    runs.id = SandboxId::generate_prefixed("run");
    let daemons = rt.create(&daemons).unwrap();
    let runs = start(&rt, runs);
    let report = rt.sweep(|id| id.is_generated()).unwrap();
    assert_eq!(report.state_dirs, 1);
    assert!(!daemons.is_running());
    for dir in daemons.cgroup().paths() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(runs.is_running());
    assert!(runs.agent().ping().is_ok());
    assert_eq!(rt.list().unwrap(), [runs.id().clone()]);
}

// -------------------------------------------------------------------- pidfd

fn readable(fd: &std::os::fd::OwnedFd, timeout_ms: u16) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, timeout_ms).unwrap() == 1
}

#[test]
fn pidfd_becomes_readable_when_the_sandbox_is_destroyed() {
    let rt = runtime();
    let sb = rt
        .create(&spec("pidfd", busybox(), &["sleep", "1000"]))
        .unwrap();
    let fd = sb.pidfd().unwrap().expect("init runs");
    assert!(!readable(&fd, 100), "readable while the sandbox runs");
    // An adopted handle (a restarted daemon) gets one too.
    let adopted = rt.open(sb.id()).unwrap().pidfd().unwrap().expect("adopted");
    rt.destroy(sb.id()).unwrap();
    assert!(readable(&fd, 5000), "not readable after destroy");
    assert!(readable(&adopted, 5000), "adopted pidfd not readable");
    assert!(sb.pidfd().unwrap().is_none(), "a pidfd for a gone init");
}

#[test]
fn pidfd_becomes_readable_when_init_dies_on_its_own() {
    let rt = runtime();
    let sb = start(rt, spec("pidfd-kill", busybox(), &["sleep", "1000"]));
    let fd = sb.pidfd().unwrap().expect("init runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(readable(&fd, 5000), "not readable after init was killed");
}

// -------------------------------------------------------------------- agent

#[test]
fn exec_exit_codes_signals_and_stdin() {
    let rt = runtime();
    let sb = start(rt, spec("exec", busybox(), &[]));
    let agent = sb.agent();
    assert_eq!(exec(&agent, &["true"]).status, ExitStatus::Code(0));
    assert_eq!(sh(&agent, "exit 42").1, ExitStatus::Code(42));
    assert_eq!(
        sh(&agent, "kill -TERM $$").1,
        ExitStatus::Signal(Signal::TERM)
    );
    let input: Vec<u8> = (0..=255u8).cycle().take(200 * 1024).collect();
    let out = agent
        .run(
            ExecRequest {
                argv: vec!["cat".into()],
                ..Default::default()
            },
            Some(&input),
        )
        .unwrap();
    assert_eq!(out.stdout, input, "binary stdin round trip");
    let out = exec(&agent, &["sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn fifty_megabytes_of_output_arrive_intact() {
    let rt = runtime();
    let sb = start(rt, spec("bigout", busybox(), &[]));
    let out = exec(&sb.agent(), &["head", "-c", "52428800", "/dev/urandom"]);
    assert_eq!(out.stdout.len(), 52_428_800);
    assert_eq!(out.status, ExitStatus::Code(0));
}

fn read_until(session: &mut ExecSession, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        assert!(Instant::now() < deadline, "never saw {want:?} in {seen:?}");
        match session.next_event().unwrap() {
            Some(ExecEvent::Stdout(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("stream ended: {seen:?}"),
        }
    }
}

#[test]
fn pty_reports_size_and_follows_resize() {
    let rt = runtime();
    let sb = start(rt, spec("pty", busybox(), &[]));
    let mut session = sb
        .agent()
        .exec(ExecRequest {
            argv: vec!["sh".into()],
            tty: Some(WinSize { cols: 91, rows: 17 }),
            ..Default::default()
        })
        .unwrap();
    let mut seen = String::new();
    session.send_stdin(b"stty size\n").unwrap();
    read_until(&mut session, &mut seen, "17 91");
    session
        .resize(WinSize {
            cols: 120,
            rows: 40,
        })
        .unwrap();
    session.send_stdin(b"stty size; exit 5\n").unwrap();
    read_until(&mut session, &mut seen, "40 120");
    loop {
        match session.next_event().unwrap() {
            Some(ExecEvent::Exited(s)) => {
                assert_eq!(s, ExitStatus::Code(5));
                break;
            }
            Some(_) => {}
            None => panic!("no exit"),
        }
    }
}

#[test]
fn cancelled_exec_is_killed() {
    let rt = runtime();
    let sb = start(rt, spec("cancel", busybox(), &[]));
    let before = sb.cgroup().pids().unwrap().len();
    let session = sb
        .agent()
        .exec(ExecRequest {
            argv: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(sb.cgroup().pids().unwrap().len(), before + 1);
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sb.cgroup().pids().unwrap().len() > before {
        assert!(Instant::now() < deadline, "cancelled command still running");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn main_command_env_cwd_files_and_output() {
    let rt = runtime();
    let mut s = spec(
        "main",
        busybox(),
        &[
            "sh",
            "-c",
            "echo \"$GREETING from $(pwd)\"; cat note.txt; echo oops >&2; exit 3",
        ],
    );
    s.init.env.push(("GREETING".into(), "hello".into()));
    s.init.cwd = "/work".into();
    s.init.files.push(InitFile {
        path: "/work/note.txt".into(),
        mode: 0o644,
        content: b"mounted file\n".to_vec(),
    });
    let sb = start(rt, s);
    let agent = sb.agent();
    assert_eq!(wait_main_exit(&agent), ExitStatus::Code(3));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    for chunk in agent.main_output(0, false).unwrap() {
        match chunk.unwrap() {
            sandpit_wire::Frame::MainChunk {
                stream: 1, data, ..
            } => stdout.extend(data),
            sandpit_wire::Frame::MainChunk {
                stream: 2, data, ..
            } => stderr.extend(data),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        String::from_utf8(stdout).unwrap(),
        "hello from /work\nmounted file\n"
    );
    assert_eq!(stderr, b"oops\n");
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_fails_clearly_without_debris() {
    let rt = new_runtime("bad");
    rt.sweep(|_| true).unwrap();
    let mounts = mount_count();

    let mut s = spec("nolayer", vec![PathBuf::from("/nonexistent/layer")], &[]);
    let err = rt.create(&s).unwrap_err();
    assert!(
        matches!(err, RuntimeError::Spawn(ref m) if m.contains("root filesystem") && m.contains("ENOENT")),
        "{err}"
    );

    s = spec("emptyargv0", busybox(), &[""]);
    assert!(matches!(
        rt.create(&s).unwrap_err(),
        RuntimeError::InvalidSpec {
            field: "command",
            ..
        }
    ));
    // An invalid id cannot reach `create` at all: a spec holds a SandboxId.
    let bad = SandboxId::parse("Bad/Id").unwrap_err();
    assert_eq!(bad.to_string(), "invalid sandbox id \"Bad/Id\"");

    // A main command that does not exist: the sandbox starts, the agent says why.
    let sb = rt
        .create(&spec("nobin", busybox(), &["/no/such/binary"]))
        .unwrap();
    match sb.agent().ping().unwrap() {
        MainStatus::StartFailed(msg) => assert!(msg.contains("/no/such/binary"), "{msg}"),
        other => panic!("expected StartFailed, got {other:?}"),
    }
    let agent = sb.agent();
    let empty = agent.run(ExecRequest::default(), None).unwrap_err();
    assert!(
        matches!(
            empty,
            ClientError::Agent {
                kind: ErrorKind::InvalidArgument,
                ..
            }
        ),
        "{empty}"
    );
    let nobin = agent
        .run(
            ExecRequest {
                argv: vec!["nope-cmd".into()],
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(&nobin, ClientError::Agent { kind: ErrorKind::NotFound, message } if message.contains("nope-cmd")),
        "{nobin}"
    );
    let nocwd = agent
        .run(
            ExecRequest {
                argv: vec!["true".into()],
                cwd: Some("/no/dir".into()),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
    assert!(
        matches!(&nocwd, ClientError::Agent { kind: ErrorKind::NotFound, message } if message.contains("/no/dir")),
        "{nocwd}"
    );
    rt.destroy(sb.id()).unwrap();

    assert_eq!(mount_count(), mounts);
    assert!(
        rt.list().unwrap().is_empty(),
        "state dirs left: {:?}",
        rt.list()
    );
    assert!(rt.cgroups().list().unwrap().is_empty(), "cgroups left");
}
