//! Assembles a sandbox's root filesystem inside the spawner's private mount
//! namespace: the overlay of image layers, `/proc`, a read-only `/sys`, a
//! minimal `/dev`, the agent, and the masked and read-only paths of the OCI
//! default profile. Then pivots into it.
//!
//! Runs before any sandboxed code exists, so the only hostile input is the
//! image itself: every directory we mount on is checked with `lstat` to be a
//! real directory (an image whose `/proc` is a symlink to `/etc` must not make
//! us mount over a host path). Nothing else can change the tree meanwhile.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::syscalls::{FileKind, SysError, Syscalls};

/// Where the agent binary appears inside every sandbox. It lives on the `/dev`
/// tmpfs, so the image is never modified to hold it.
pub(crate) const AGENT_PATH_IN_SANDBOX: &str = "/dev/.sandpit-agent";

/// Device nodes bind-mounted from the host into the sandbox's `/dev`.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// `/proc` files hidden behind `/dev/null` (OCI runtime-spec defaults).
const MASKED_FILES: &[&str] = &[
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
];

/// Directories hidden behind an empty read-only tmpfs.
const MASKED_DIRS: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// `/proc` entries made read-only.
const READONLY_PATHS: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Everything needed to build one sandbox's root.
#[derive(Debug, Clone)]
pub(crate) struct RootfsPlan {
    /// Mount point of the overlay (a directory in the sandbox's state dir).
    pub(crate) root: PathBuf,
    /// Image layers, top-most first.
    pub(crate) lower_dirs: Vec<PathBuf>,
    /// Writable layer.
    pub(crate) upper_dir: PathBuf,
    /// Overlayfs work dir (same filesystem as `upper_dir`).
    pub(crate) work_dir: PathBuf,
    /// Host path of the static agent binary.
    pub(crate) agent_binary: PathBuf,
    /// Host uid/gid that is root inside the sandbox.
    pub(crate) root_id: u32,
    /// Mount the root read-only, with a writable tmpfs at `/tmp`.
    pub(crate) read_only: bool,
}

/// Size of the `/tmp` tmpfs of a read-only root. Its pages count against
/// the sandbox's memory limit too.
pub(crate) const READ_ONLY_TMP_SIZE: &str = "256m";

/// Why the root filesystem could not be assembled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RootfsError {
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The image has something other than a directory where we need one.
    #[error("image path /{0} is not a directory")]
    NotADirectory(String),
    /// No layers were given.
    #[error("no image layers")]
    NoLayers,
    /// The overlay options do not fit in one page.
    #[error("too many image layers for one overlay mount ({0} bytes of options)")]
    TooManyLayers(usize),
}

const MS_NONE: MsFlags = MsFlags::empty();

/// Mounts everything and pivots into the new root.
pub(crate) fn build_and_enter(sys: &dyn Syscalls, plan: &RootfsPlan) -> Result<(), RootfsError> {
    build(sys, plan)?;
    sys.pivot_root(&plan.root)?;
    Ok(())
}

/// Mounts everything under `plan.root` (without pivoting).
pub(crate) fn build(sys: &dyn Syscalls, plan: &RootfsPlan) -> Result<(), RootfsError> {
    let root = &plan.root;
    let owner = (plan.root_id, plan.root_id);
    let at = |rel: &str| root.join(rel);

    sys.mount(
        Some("overlay"),
        root,
        Some("overlay"),
        MS_NONE,
        Some(&overlay_options(plan)?),
    )?;

    ensure_dir(sys, root, "proc", owner)?;
    sys.mount(
        Some("proc"),
        &at("proc"),
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;

    ensure_dir(sys, root, "sys", owner)?;
    sys.mount(
        Some("sysfs"),
        &at("sys"),
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;

    ensure_dir(sys, root, "dev", owner)?;
    let id = plan.root_id;
    sys.mount(
        Some("tmpfs"),
        &at("dev"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!("mode=755,size=65536k,uid={id},gid={id}")),
    )?;
    for dev in DEVICES {
        let target = at(&format!("dev/{dev}"));
        sys.create_file(&target, 0o666)?;
        sys.mount(
            Some(&format!("/dev/{dev}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    sys.mkdir(&at("dev/pts"), 0o755, owner)?;
    sys.mount(
        Some("devpts"),
        &at("dev/pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid={}",
            id + 5
        )),
    )?;
    sys.symlink("pts/ptmx", &at("dev/ptmx"))?;
    sys.mkdir(&at("dev/shm"), 0o1777, owner)?;
    sys.mount(
        Some("shm"),
        &at("dev/shm"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(&format!("mode=1777,size=65536k,uid={id},gid={id}")),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        sys.symlink(target, &at(&format!("dev/{name}")))?;
    }

    let agent = at(AGENT_PATH_IN_SANDBOX.trim_start_matches('/'));
    sys.create_file(&agent, 0o555)?;
    let agent_src = plan.agent_binary.to_string_lossy();
    sys.mount(Some(&agent_src), &agent, None, MsFlags::MS_BIND, None)?;
    sys.mount(
        None,
        &agent,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None,
    )?;

    let dev_null = at("dev/null");
    let dev_null = dev_null.to_string_lossy();
    for rel in MASKED_FILES {
        if sys.kind(&at(rel))?.is_some() {
            sys.mount(Some(&dev_null), &at(rel), None, MsFlags::MS_BIND, None)?;
        }
    }
    for rel in MASKED_DIRS {
        if sys.kind(&at(rel))? == Some(FileKind::Dir) {
            sys.mount(
                Some("tmpfs"),
                &at(rel),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )?;
        }
    }
    if plan.read_only {
        // The one writable place of a read-only root (as `docker run
        // --read-only --tmpfs /tmp`); `/dev/shm` stays writable too.
        ensure_dir(sys, root, "tmp", owner)?;
        sys.mount(
            Some("tmpfs"),
            &at("tmp"),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&format!(
                "mode=1777,size={READ_ONLY_TMP_SIZE},uid={id},gid={id}"
            )),
        )?;
    }
    for rel in READONLY_PATHS {
        let path = at(rel);
        if sys.kind(&path)?.is_some() {
            let p = path.to_string_lossy();
            sys.mount(
                Some(&p),
                &path,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            sys.mount(
                None,
                &path,
                None,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                None,
            )?;
        }
    }
    if plan.read_only {
        // Last, once every mount point exists: only this mount of the
        // overlay becomes read-only (a bind remount changes the mount, not
        // the file system), and the mounts on it keep their own flags. The
        // sandbox cannot undo it: it may not mount at all.
        sys.mount(
            None,
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// Makes sure `root/rel` is a real directory, creating it when the image lacks it.
fn ensure_dir(
    sys: &dyn Syscalls,
    root: &Path,
    rel: &str,
    owner: (u32, u32),
) -> Result<(), RootfsError> {
    let path = root.join(rel);
    match sys.kind(&path)? {
        Some(FileKind::Dir) => Ok(()),
        None => Ok(sys.mkdir(&path, 0o755, owner)?),
        Some(_) => Err(RootfsError::NotADirectory(rel.to_string())),
    }
}

fn overlay_options(plan: &RootfsPlan) -> Result<String, RootfsError> {
    if plan.lower_dirs.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    let lower: Vec<String> = plan
        .lower_dirs
        .iter()
        .map(|p| escape_overlay_path(&p.to_string_lossy()))
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        escape_overlay_path(&plan.upper_dir.to_string_lossy()),
        escape_overlay_path(&plan.work_dir.to_string_lossy()),
    );
    // The kernel copies mount options into a single page.
    if opts.len() >= 4096 {
        return Err(RootfsError::TooManyLayers(opts.len()));
    }
    Ok(opts)
}

/// Overlayfs splits options on `,` and lower dirs on `:`; both can be escaped.
fn escape_overlay_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
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
}
