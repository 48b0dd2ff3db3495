//! Unit tests of the mount plan over a fake [`Syscalls`].

use super::*;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// One recorded mount(2): source, target, fstype, flags, data.
type MountCall = (
    Option<String>,
    PathBuf,
    Option<String>,
    MsFlags,
    Option<String>,
);

/// An in-memory tree that records every call.
#[derive(Default)]
struct FakeSys {
    tree: RefCell<BTreeMap<PathBuf, FileKind>>,
    mounts: RefCell<Vec<MountCall>>,
    pivoted: RefCell<Option<PathBuf>>,
}

impl FakeSys {
    fn with(paths: &[(&str, FileKind)]) -> Self {
        let s = Self::default();
        for (p, k) in paths {
            s.tree.borrow_mut().insert(PathBuf::from(p), *k);
        }
        s
    }
    fn mount_of(&self, target: &str) -> Vec<(Option<String>, MsFlags, Option<String>)> {
        self.mounts
            .borrow()
            .iter()
            .filter(|m| m.1 == Path::new(target))
            .map(|m| (m.0.clone(), m.3, m.4.clone()))
            .collect()
    }
}

impl Syscalls for FakeSys {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError> {
        if !self.tree.borrow().contains_key(target) {
            return Err(SysError {
                op: "mount",
                path: target.into(),
                errno: nix::errno::Errno::ENOENT,
            });
        }
        self.mounts.borrow_mut().push((
            source.map(String::from),
            target.into(),
            fstype.map(String::from),
            flags,
            data.map(String::from),
        ));
        Ok(())
    }
    fn mkdir(&self, path: &Path, _mode: u32, _owner: (u32, u32)) -> Result<(), SysError> {
        self.tree.borrow_mut().insert(path.into(), FileKind::Dir);
        Ok(())
    }
    fn create_file(&self, path: &Path, _mode: u32) -> Result<(), SysError> {
        self.tree.borrow_mut().insert(path.into(), FileKind::File);
        Ok(())
    }
    fn symlink(&self, _target: &str, link: &Path) -> Result<(), SysError> {
        self.tree
            .borrow_mut()
            .insert(link.into(), FileKind::Symlink);
        Ok(())
    }
    fn kind(&self, path: &Path) -> Result<Option<FileKind>, SysError> {
        Ok(self.tree.borrow().get(path).copied())
    }
    fn pivot_root(&self, new_root: &Path) -> Result<(), SysError> {
        *self.pivoted.borrow_mut() = Some(new_root.into());
        Ok(())
    }
    fn bind_beneath(
        &self,
        source: &Path,
        sub_path: Option<&str>,
        target: &Path,
    ) -> Result<(), SysError> {
        let source = match sub_path {
            Some(sub) => source.join(sub),
            None => source.to_path_buf(),
        };
        self.mount(
            Some(&source.to_string_lossy()),
            target,
            None,
            MsFlags::MS_BIND,
            None,
        )
    }
}

fn plan() -> RootfsPlan {
    RootfsPlan {
        root: "/r".into(),
        lower_dirs: vec!["/l/top".into(), "/l/base".into()],
        upper_dir: "/s/upper".into(),
        work_dir: "/s/work".into(),
        agent_binary: "/host/agent".into(),
        root_id: 1000,
        read_only: false,
        mounts: Vec::new(),
        lxcfs: None,
    }
}

#[test]
fn assembles_the_default_profile() {
    let sys = FakeSys::with(&[
        ("/r", FileKind::Dir),
        ("/r/proc", FileKind::Dir),
        ("/r/proc/kcore", FileKind::File),
        ("/r/proc/sys", FileKind::Dir),
        ("/r/proc/acpi", FileKind::Dir),
        ("/r/sys/firmware", FileKind::Dir),
    ]);
    build_and_enter(&sys, &plan()).unwrap();

    let overlay = &sys.mount_of("/r")[0];
    assert_eq!(
        overlay.2.as_deref(),
        Some("lowerdir=/l/top:/l/base,upperdir=/s/upper,workdir=/s/work")
    );
    let proc = &sys.mount_of("/r/proc")[0];
    assert!(proc
        .1
        .contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC));
    let sysfs = &sys.mount_of("/r/sys")[0];
    assert!(sysfs.1.contains(MsFlags::MS_RDONLY));
    // Image lacked /sys and /dev: created, owned by the sandbox's root.
    assert_eq!(sys.kind(Path::new("/r/sys")).unwrap(), Some(FileKind::Dir));
    let dev = &sys.mount_of("/r/dev")[0];
    assert!(dev.2.as_deref().unwrap().contains("uid=1000,gid=1000"));
    for d in DEVICES {
        let m = &sys.mount_of(&format!("/r/dev/{d}"))[0];
        assert_eq!(m.0.as_deref(), Some(format!("/dev/{d}").as_str()));
        assert!(m.1.contains(MsFlags::MS_BIND));
    }
    assert!(sys.mount_of("/r/dev/pts")[0]
        .2
        .as_deref()
        .unwrap()
        .contains("gid=1005"));
    // The agent is bound read-only, never copied.
    let agent = sys.mount_of("/r/dev/.sandpit-agent");
    assert_eq!(agent[0].0.as_deref(), Some("/host/agent"));
    assert!(agent[1]
        .1
        .contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY));
    // Masked and read-only paths, only where they exist.
    assert_eq!(
        sys.mount_of("/r/proc/kcore")[0].0.as_deref(),
        Some("/r/dev/null")
    );
    assert!(sys.mount_of("/r/proc/keys").is_empty());
    assert!(sys.mount_of("/r/proc/acpi")[0]
        .1
        .contains(MsFlags::MS_RDONLY));
    assert!(sys.mount_of("/r/sys/firmware")[0]
        .1
        .contains(MsFlags::MS_RDONLY));
    let procsys = sys.mount_of("/r/proc/sys");
    assert!(procsys[1]
        .1
        .contains(MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT));
    assert_eq!(sys.pivoted.borrow().as_deref(), Some(Path::new("/r")));
}

#[test]
fn a_read_only_root_gets_a_tmp_and_is_remounted_last() {
    let sys = FakeSys::with(&[("/r", FileKind::Dir)]);
    build(&sys, &plan()).unwrap();
    // Writable by default: one mount of the root, no /tmp of ours.
    assert_eq!(sys.mount_of("/r").len(), 1);
    assert!(sys.mount_of("/r/tmp").is_empty());

    let sys = FakeSys::with(&[("/r", FileKind::Dir)]);
    let p = RootfsPlan {
        read_only: true,
        ..plan()
    };
    build(&sys, &p).unwrap();
    let tmp = &sys.mount_of("/r/tmp")[0];
    assert_eq!(tmp.0.as_deref(), Some("tmpfs"));
    assert!(tmp.1.contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV));
    assert!(!tmp.1.contains(MsFlags::MS_RDONLY));
    assert_eq!(
        tmp.2.as_deref(),
        Some("mode=1777,size=256m,uid=1000,gid=1000")
    );
    // Created in the image where it was missing, before the remount.
    assert_eq!(sys.kind(Path::new("/r/tmp")).unwrap(), Some(FileKind::Dir));
    let root = sys.mount_of("/r");
    assert_eq!(root.len(), 2);
    assert!(root[1]
        .1
        .contains(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY));
    // The remount is the last mount of all.
    let last = sys.mounts.borrow().last().cloned().unwrap();
    assert_eq!(last.1, Path::new("/r"));
    // An image whose /tmp is a symlink is refused, as for /proc.
    let sys = FakeSys::with(&[("/r", FileKind::Dir), ("/r/tmp", FileKind::Symlink)]);
    assert_eq!(
        build(&sys, &p).unwrap_err().to_string(),
        "image path /tmp is not a directory"
    );
}

#[test]
fn refuses_an_image_whose_proc_is_a_symlink() {
    let sys = FakeSys::with(&[("/r", FileKind::Dir), ("/r/proc", FileKind::Symlink)]);
    let err = build_and_enter(&sys, &plan()).unwrap_err();
    assert_eq!(err.to_string(), "image path /proc is not a directory");
    // Nothing was mounted through the link, and we never pivoted.
    assert!(sys.mount_of("/r/proc").is_empty());
    assert!(sys.pivoted.borrow().is_none());
}

#[test]
fn overlay_paths_are_escaped_and_bounded() {
    let mut p = plan();
    p.lower_dirs = vec!["/a,b:c".into()];
    assert!(overlay_options(&p)
        .unwrap()
        .starts_with("lowerdir=/a\\,b\\:c,"));
    p.lower_dirs = vec![PathBuf::from("/x".repeat(300)); 10];
    assert!(matches!(
        overlay_options(&p),
        Err(RootfsError::TooManyLayers(_))
    ));
    p.lower_dirs.clear();
    assert!(matches!(overlay_options(&p), Err(RootfsError::NoLayers)));
}

fn volume(source: &str, sub_path: Option<&str>, target: &str, read_only: bool) -> BindMount {
    BindMount {
        source: source.into(),
        sub_path: sub_path.map(String::from),
        target: target.into(),
        read_only,
    }
}

/// Position of the first mount(2) on `target`.
fn position(sys: &FakeSys, target: &str) -> usize {
    sys.mounts
        .borrow()
        .iter()
        .position(|m| m.1 == Path::new(target))
        .unwrap_or_else(|| panic!("nothing mounted on {target}"))
}

#[test]
fn volumes_are_bound_last_and_before_the_read_only_remount() {
    let sys = FakeSys::with(&[
        ("/r", FileKind::Dir),
        ("/r/proc", FileKind::Dir),
        ("/r/proc/sys", FileKind::Dir),
        ("/r/opt", FileKind::Dir),
    ]);
    let p = RootfsPlan {
        read_only: true,
        mounts: vec![
            volume("/vol/a/mnt", Some("sub"), "/data", false),
            volume("/vol/b/mnt", None, "/opt/cache/x", true),
        ],
        ..plan()
    };
    build(&sys, &p).unwrap();
    // Missing directories on the way were made, as real directories.
    for d in ["/r/data", "/r/opt/cache", "/r/opt/cache/x"] {
        assert_eq!(sys.kind(Path::new(d)).unwrap(), Some(FileKind::Dir), "{d}");
    }
    let data = sys.mount_of("/r/data");
    assert_eq!(
        data,
        [
            (Some("/vol/a/mnt/sub".into()), MsFlags::MS_BIND, None),
            (
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None
            ),
        ]
    );
    let cache = sys.mount_of("/r/opt/cache/x");
    assert_eq!(cache[0].0.as_deref(), Some("/vol/b/mnt"));
    assert!(cache[1].1.contains(
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
    ));
    // After the system mounts (the last of them: /proc's read-only paths,
    // and /tmp), in the spec's order; the root's remount is still last.
    assert!(position(&sys, "/r/proc/sys") < position(&sys, "/r/data"));
    assert!(position(&sys, "/r/tmp") < position(&sys, "/r/data"));
    assert!(position(&sys, "/r/data") < position(&sys, "/r/opt/cache/x"));
    let last = sys.mounts.borrow().last().cloned().unwrap();
    assert_eq!(last.1, Path::new("/r"));
    assert!(last.3.contains(MsFlags::MS_RDONLY));
}

#[test]
fn a_volume_target_through_an_image_symlink_is_refused() {
    // The image's /opt is a link (to /etc, say): mounting on /opt/cache
    // would land on whatever it points to.
    let sys = FakeSys::with(&[("/r", FileKind::Dir), ("/r/opt", FileKind::Symlink)]);
    let p = RootfsPlan {
        mounts: vec![volume("/vol/a/mnt", None, "/opt/cache", false)],
        ..plan()
    };
    let err = build_and_enter(&sys, &p).unwrap_err();
    assert_eq!(
        sandpit_errors::chain(&err),
        "volume mount /opt/cache: image path /opt is not a directory"
    );
    assert!(sys.kind(Path::new("/r/opt/cache")).unwrap().is_none());
    assert!(sys.pivoted.borrow().is_none());
    // A file where the target should be is refused too.
    let sys = FakeSys::with(&[("/r", FileKind::Dir), ("/r/data", FileKind::File)]);
    let p = RootfsPlan {
        mounts: vec![volume("/vol/a/mnt", None, "/data", false)],
        ..plan()
    };
    assert_eq!(
        sandpit_errors::chain(&build(&sys, &p).unwrap_err()),
        "volume mount /data: image path /data is not a directory"
    );
    assert!(sys.mount_of("/r/data").is_empty());
}

#[test]
fn reserved_and_overlapping_targets_are_refused_before_any_volume() {
    for (mounts, msg) in [
        (
            vec![volume("/v", None, "/proc/x", false)],
            "target /proc/x is reserved",
        ),
        (vec![volume("/v", None, "/", false)], "target / is reserved"),
        (
            vec![volume("/v", None, "/a/../dev", false)],
            "target \"/a/../dev\" is not a plain absolute path",
        ),
        (
            vec![
                volume("/v", None, "/a", false),
                volume("/w", None, "/a/b", false),
            ],
            "targets /a and /a/b overlap",
        ),
    ] {
        let sys = FakeSys::with(&[("/r", FileKind::Dir)]);
        let p = RootfsPlan { mounts, ..plan() };
        let err = build(&sys, &p).unwrap_err().to_string();
        assert!(err.starts_with(msg), "{err}");
        assert!(sys.mount_of("/r/a").is_empty());
    }
}

#[test]
fn lxcfs_views_are_bound_over_the_files_that_exist_on_both_sides() {
    let sys = FakeSys::with(&[
        ("/r", FileKind::Dir),
        ("/lx/proc/meminfo", FileKind::File),
        ("/lx/proc/cpuinfo", FileKind::File),
        // A view LXCFS offers that the sandbox's /proc lacks: left alone.
        ("/lx/proc/swaps", FileKind::File),
        // Not a file on the LXCFS side: never bound.
        ("/lx/sys/devices/system/cpu/online", FileKind::Dir),
    ]);
    // What the fresh proc and sys mounts hold (the fake does not mount).
    for p in [
        "/r/proc/meminfo",
        "/r/proc/cpuinfo",
        "/r/sys/devices/system/cpu/online",
    ] {
        sys.tree.borrow_mut().insert(p.into(), FileKind::File);
    }
    let p = RootfsPlan {
        lxcfs: Some("/lx".into()),
        ..plan()
    };
    build(&sys, &p).unwrap();
    for (target, source) in [
        ("/r/proc/meminfo", "/lx/proc/meminfo"),
        ("/r/proc/cpuinfo", "/lx/proc/cpuinfo"),
    ] {
        let m = sys.mount_of(target);
        assert_eq!(m.len(), 1, "{target}: {m:?}");
        assert_eq!(m[0].0.as_deref(), Some(source));
        assert_eq!(m[0].1, MsFlags::MS_BIND);
    }
    assert!(sys.mount_of("/r/proc/swaps").is_empty());
    assert!(sys.mount_of("/r/sys/devices/system/cpu/online").is_empty());
}
