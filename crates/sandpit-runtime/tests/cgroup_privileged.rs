//! The cgroup manager on this host's real cgroups (v1 or v2, as detected).
//! Root only: `cargo test -p sandpit-runtime --features privileged-tests --test cgroup_privileged`.
#![cfg(feature = "privileged-tests")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandpit_runtime::cgroup::{Cgroup, CgroupManager, CgroupVersion, Limits};

/// A parent group of its own per test, removed (with anything left in it)
/// when the test ends.
struct Parent {
    manager: CgroupManager,
}

fn parent_name(test: &str) -> String {
    format!("sandpit-test-cg-{test}-{}", std::process::id())
}

impl Parent {
    fn new(test: &str) -> Self {
        Self {
            manager: CgroupManager::detect(&parent_name(test)).unwrap(),
        }
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        for id in self.manager.list().unwrap_or_default() {
            let _ = self.manager.open(&id).destroy();
        }
        for dir in self.manager.parent_dirs() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The directory of `cg` that holds `file`.
fn file_of(cg: &Cgroup, file: &str) -> PathBuf {
    cg.paths()
        .into_iter()
        .map(|d| d.join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no {file} in {:?}", cg.paths()))
}

/// A shell that waits for a line on stdin before running `script`, so it
/// can be moved into the cgroup before it starts anything.
fn gated_shell(script: &str) -> Child {
    Command::new("sh")
        .args(["-c", &format!("read _go; {script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn join(cg: &Cgroup, child: &mut Child) {
    let pid = child.id().to_string();
    for procs in cg.procs_files() {
        std::fs::write(&procs, &pid).unwrap_or_else(|e| panic!("{}: {e}", procs.display()));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
}

fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 2..]
                .split(' ')
                .next()
                .unwrap();
            state == "Z" || state == "X"
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn limits_are_written_and_destroy_kills_and_removes() {
    let parent = Parent::new("limits");
    let m = &parent.manager;
    eprintln!("cgroup version: {:?}", m.version());
    let limits = Limits {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
        pids_max: Some(32),
        cpu_request_millis: Some(100),
        memory_request_bytes: Some(16 << 20),
        cpus: None,
    };
    let cg = m.create("sb", &limits).unwrap();
    match m.version() {
        CgroupVersion::V2 => {
            assert_eq!(read(&file_of(&cg, "cpu.max")), "25000 100000");
            assert_eq!(read(&file_of(&cg, "memory.max")), "67108864");
            assert_eq!(read(&file_of(&cg, "cpu.weight")), "4");
            assert_eq!(read(&file_of(&cg, "memory.low")), "16777216");
            let swap = cg.paths()[0].join("memory.swap.max");
            if swap.exists() {
                assert_eq!(read(&swap), "0");
            }
            assert_eq!(read(&file_of(&cg, "pids.max")), "32");
        }
        CgroupVersion::V1 => {
            assert_eq!(read(&file_of(&cg, "cpu.cfs_period_us")), "100000");
            assert_eq!(read(&file_of(&cg, "cpu.cfs_quota_us")), "25000");
            assert_eq!(read(&file_of(&cg, "memory.limit_in_bytes")), "67108864");
            assert_eq!(read(&file_of(&cg, "cpu.shares")), "102");
            assert_eq!(
                read(&file_of(&cg, "memory.soft_limit_in_bytes")),
                "16777216"
            );
            let memsw =
                file_of(&cg, "memory.limit_in_bytes").with_file_name("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                assert_eq!(read(&memsw), "67108864");
            }
            assert_eq!(read(&file_of(&cg, "pids.max")), "32");
        }
    }
    assert_eq!(m.list().unwrap(), ["sb"]);
    assert!(cg.pids().unwrap().is_empty());

    let mut child = gated_shell("sleep 1000 & sleep 1000 & wait");
    join(&cg, &mut child);
    wait_for("three processes", Duration::from_secs(5), || {
        cg.pids().unwrap().len() == 3
    });
    let pids = cg.pids().unwrap();
    assert!(pids.contains(&(child.id() as i32)));
    let own_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    assert!(own_cgroup.contains("/sb\n"), "{own_cgroup}");
    assert_eq!(cg.oom_kills().unwrap(), 0);
    cg.cpu_usage_usec().unwrap();
    cg.memory_current().unwrap();

    cg.destroy().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    // The sleeps were orphaned to init, which reaps them.
    for pid in pids {
        wait_for("a killed process to go", Duration::from_secs(5), || {
            is_gone(pid)
        });
    }
    for dir in cg.paths() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(m.list().unwrap().is_empty());
    assert!(cg.procs_files().iter().all(|p| !p.exists()));
    // Idempotent.
    cg.destroy().unwrap();
}

#[test]
fn pids_limit_holds() {
    let parent = Parent::new("pids");
    let m = &parent.manager;
    let cg = m
        .create(
            "sb",
            &Limits {
                pids_max: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
    let mut child = gated_shell("for i in 1 2 3 4 5 6 7 8; do sleep 1000 & done; wait");
    join(&cg, &mut child);
    std::thread::sleep(Duration::from_millis(500));
    let n = cg.pids().unwrap().len();
    assert!(n <= 4, "{n} processes despite pids.max=4");
    assert!(n >= 2, "the shell did not fork at all ({n})");
    assert!(cg.pids_limit_hits().unwrap() >= 1, "no fork was refused");
    cg.destroy().unwrap();
    child.wait().unwrap();
    assert!(m.list().unwrap().is_empty());
}

#[test]
fn memory_hog_is_oom_killed_and_counted() {
    let parent = Parent::new("oom");
    let m = &parent.manager;
    let cg = m
        .create(
            "sb",
            &Limits {
                memory_bytes: Some(32 << 20),
                ..Default::default()
            },
        )
        .unwrap();
    // `tail -c` keeps the last 200 MB in memory: far over the limit.
    let mut child = gated_shell("head -c 400000000 /dev/zero | tail -c 200000000 >/dev/null");
    join(&cg, &mut child);
    let status = child.wait().unwrap();
    assert!(!status.success(), "the hog survived a 32 MiB limit");
    assert!(cg.oom_kills().unwrap() >= 1, "oom kill not counted");
    cg.destroy().unwrap();
}

#[test]
fn leftovers_are_reused_or_refused() {
    let parent = Parent::new("stale");
    let m = &parent.manager;
    // An empty leftover (a crash between create and spawn) is replaced.
    let first = m.create("sb", &Limits::default()).unwrap();
    let again = m
        .create(
            "sb",
            &Limits {
                pids_max: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(read(&file_of(&again, "pids.max")), "7");
    // One with a process in it is not.
    let mut child = gated_shell("sleep 1000");
    join(&first, &mut child);
    let err = m.create("sb", &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    again.destroy().unwrap();
    child.wait().unwrap();
    assert!(m.list().unwrap().is_empty());
}

/// The v2 teardown (`cgroup.kill`) on a real unified tree, even on a v1 host
/// whose cgroup2 mount holds no controllers: no limits, but processes,
/// `cgroup.procs` and `rmdir` are real.
#[test]
fn unified_tree_teardown_kills_and_removes() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mount) = mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
    else {
        eprintln!("skipped: no cgroup2 mount");
        return;
    };
    let parent = Parent {
        manager: CgroupManager::with_root(CgroupVersion::V2, Path::new(mount), &parent_name("v2"))
            .unwrap(),
    };
    let m = &parent.manager;
    let cg = m.create("sb", &Limits::default()).unwrap();
    assert_eq!(cg.procs_files().len(), 1);
    let mut child = gated_shell("sleep 1000 & sleep 1000 & wait");
    join(&cg, &mut child);
    wait_for("three processes", Duration::from_secs(5), || {
        cg.pids().unwrap().len() == 3
    });
    let pids = cg.pids().unwrap();
    cg.cpu_usage_usec().unwrap();
    cg.destroy().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    for pid in pids {
        wait_for("a killed process to go", Duration::from_secs(5), || {
            is_gone(pid)
        });
    }
    assert!(!cg.paths()[0].exists());
    assert!(m.list().unwrap().is_empty());
}
