//! Volumes bound into sandboxes (`SandboxSpec::mounts`), end to end on real
//! mounts. Root only: `cargo test -p sandpit-runtime --features
//! privileged-tests`; needs what `sandbox_privileged.rs` needs.
#![cfg(feature = "privileged-tests")]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sandpit_runtime::cgroup::Limits;
use sandpit_runtime::{BindMount, RuntimeError};
use sandpit_volume::{LocalVolumes, Medium, VolumeBackend, VolumeKey, VolumeRequest};
use sandpit_wire::ExitStatus;

mod common;
use common::*;

/// Volumes in a temporary root, removed at the end (declare before the
/// sandboxes that use them: those are destroyed first).
struct Volumes {
    vols: LocalVolumes,
    _dir: tempfile::TempDir,
}

impl Volumes {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vols = LocalVolumes::open(&dir.path().join("volumes")).unwrap();
        Self { vols, _dir: dir }
    }

    fn provision(&self, key: &str, size_bytes: u64, medium: Medium) -> PathBuf {
        let key: VolumeKey = key.parse().unwrap();
        let req = VolumeRequest {
            size_bytes,
            medium,
            owner: (HOST_BASE, HOST_BASE),
            mode: 0o755,
        };
        self.vols.provision(&key, &req).unwrap()
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        for key in self.vols.list().unwrap_or_default() {
            let _ = self.vols.remove(&key);
        }
    }
}

fn bind(source: &Path, sub_path: Option<&str>, target: &str, read_only: bool) -> BindMount {
    BindMount {
        source: source.to_path_buf(),
        sub_path: sub_path.map(String::from),
        target: target.into(),
        read_only,
    }
}

/// The sandbox's mountinfo line for `target`.
fn mount_line(sb: &Guard<'_>, target: &str) -> String {
    let (out, _) = sh(&sb.agent(), "cat /proc/1/mountinfo");
    out.lines()
        .find(|l| l.split_whitespace().nth(4) == Some(target))
        .unwrap_or_else(|| panic!("{target} not mounted: {out}"))
        .to_string()
}

#[test]
fn volumes_are_writable_or_read_only_inside_and_private() {
    let rt = runtime();
    let vols = Volumes::new();
    let disk = vols.provision("rw-disk", 16 << 20, Medium::Disk);
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("given"), "from the host").unwrap();
    let mut s = spec("mounts", busybox(), &[]);
    // With a read-only root: the volumes keep their own flags.
    s.read_only_root = true;
    s.mounts = vec![
        bind(&disk, None, "/data", false),
        bind(ro.path(), None, "/srv/ro", true),
    ];
    let sb = start(rt, s);
    let (out, st) = sh(
        &sb.agent(),
        "echo written inside > /data/f && cat /srv/ro/given",
    );
    assert_eq!((out.as_str(), st), ("from the host", ExitStatus::Code(0)));
    // A file written at the target is in the volume, owned by the
    // sandbox's root.
    let f = disk.join("f");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "written inside\n");
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), HOST_BASE);
    // Read-only: EROFS inside, nothing reaches the host directory.
    let (out, st) = sh(
        &sb.agent(),
        "echo x > /srv/ro/new 2>&1; rm /srv/ro/given 2>&1",
    );
    assert!(out.contains("Read-only file system"), "{out}");
    assert_ne!(st, ExitStatus::Code(0));
    assert_eq!(std::fs::read_dir(ro.path()).unwrap().count(), 1);
    // nosuid,nodev on both; private: no propagation peer or master.
    for (target, ro_flag) in [("/data", false), ("/srv/ro", true)] {
        let line = mount_line(&sb, target);
        let opts = line.split_whitespace().nth(5).unwrap();
        assert!(opts.contains("nosuid") && opts.contains("nodev"), "{line}");
        assert_eq!(opts.split(',').any(|o| o == "ro"), ro_flag, "{line}");
        assert!(
            !line.contains("shared:") && !line.contains("master:"),
            "{line}"
        );
    }
    // The root stays read-only around them.
    let (out, _) = sh(&sb.agent(), "touch /srv/x 2>&1");
    assert!(out.contains("Read-only file system"), "{out}");
    // Nothing of the sandbox's mounts shows in the host's namespace.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = rt.config().state_dir.join(sb.id().as_str());
    assert!(!host.contains(state.to_str().unwrap()), "{host}");
}

#[test]
fn a_sub_path_mounts_only_that_directory_and_never_follows_links() {
    let rt = runtime();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("inner/dir")).unwrap();
    std::fs::write(src.path().join("inner/dir/only"), "this").unwrap();
    std::fs::write(src.path().join("outside"), "not this").unwrap();
    let mut s = spec("subpath", busybox(), &[]);
    s.mounts = vec![bind(src.path(), Some("inner/dir"), "/data", false)];
    let sb = start(rt, s);
    let (out, _) = sh(&sb.agent(), "ls /data; cat /data/only");
    assert_eq!(out, "only\nthis");
    drop(sb);

    // Hostile contents: links to the host's root, as the last component or
    // on the way.
    std::os::unix::fs::symlink("/", src.path().join("root-link")).unwrap();
    std::fs::create_dir(src.path().join("real")).unwrap();
    std::os::unix::fs::symlink("../..", src.path().join("real/up")).unwrap();
    for sub in ["root-link", "root-link/etc", "real/up", "inner/dir/only"] {
        let mut s = spec("subpath-bad", busybox(), &[]);
        s.mounts = vec![bind(src.path(), Some(sub), "/data", false)];
        let id = s.id.clone();
        let err = rt.create(&s).unwrap_err();
        let msg = sandpit_errors::chain(&err);
        assert!(matches!(err, RuntimeError::Spawn(_)), "{sub}: {msg}");
        assert!(
            msg.starts_with("root filesystem: volume mount /data: open volume sub_path"),
            "{sub}: {msg}"
        );
        assert!(!rt.list().unwrap().contains(&id), "{sub}: left behind");
    }
    // `..` never reaches the spawner.
    let mut s = spec("subpath-dots", busybox(), &[]);
    s.mounts = vec![bind(src.path(), Some("../.."), "/data", false)];
    let msg = rt.create(&s).unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid mounts: sub_path \"../..\" of target /data is not a plain relative path"
    );
}

#[test]
fn an_image_whose_target_parent_is_a_symlink_is_refused() {
    let rt = runtime();
    let src = tempfile::tempdir().unwrap();
    // A layer on top of busybox whose /opt points at the host's /etc.
    let layer = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", layer.path().join("opt")).unwrap();
    let mut layers = vec![layer.path().to_path_buf()];
    layers.extend(busybox());
    let mut s = spec("target-link", layers, &[]);
    s.mounts = vec![bind(src.path(), None, "/opt/sandpit-volume-test", false)];
    let err = sandpit_errors::chain(&rt.create(&s).unwrap_err());
    assert_eq!(
        err,
        "root filesystem: volume mount /opt/sandpit-volume-test: image path /opt is not a directory"
    );
    assert!(!Path::new("/etc/sandpit-volume-test").exists());
    // Reserved and relative targets are refused before anything starts.
    for (target, want) in [
        ("/proc/x", "invalid mounts: target /proc/x is reserved"),
        ("/", "invalid mounts: target / is reserved"),
        (
            "data",
            "invalid mounts: target \"data\" is not a plain absolute path",
        ),
    ] {
        let mut s = spec("target-bad", busybox(), &[]);
        s.mounts = vec![bind(src.path(), None, target, false)];
        let msg = rt.create(&s).unwrap_err().to_string();
        assert!(msg.starts_with(want), "{msg}");
    }
}

#[test]
fn writes_to_a_memory_volume_are_charged_to_the_sandbox() {
    let rt = runtime();
    let vols = Volumes::new();
    let mem = vols.provision("charged", 128 << 20, Medium::Memory);
    let mut s = spec("tmpfs-charge", busybox(), &[]);
    s.limits = Limits {
        memory_bytes: Some(512 << 20),
        ..Default::default()
    };
    s.mounts = vec![bind(&mem, None, "/scratch", false)];
    let sb = start(rt, s);
    let before = sb.cgroup().memory_current().unwrap();
    let (out, st) = sh(
        &sb.agent(),
        "dd if=/dev/zero of=/scratch/f bs=1M count=64 2>&1",
    );
    assert_eq!(st, ExitStatus::Code(0), "{out}");
    assert_eq!(std::fs::metadata(mem.join("f")).unwrap().len(), 64 << 20);
    let after = sb.cgroup().memory_current().unwrap();
    assert!(
        after >= before + (60 << 20),
        "memory went from {before} to {after} bytes"
    );
}
