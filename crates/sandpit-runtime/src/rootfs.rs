//! Assembles a sandbox's root filesystem inside the spawner's private mount
//! namespace: the overlay of image layers, `/proc`, a read-only `/sys`, a
//! minimal `/dev`, the agent, and the masked and read-only paths of the OCI
//! default profile. Then pivots into it.
//!
//! Runs before any sandboxed code exists, so the only hostile input is the
//! image itself: every directory we mount on is checked with `lstat` to be a
//! real directory (an image whose `/proc` is a symlink to `/etc` must not make
//! us mount over a host path). Nothing else can change the tree meanwhile.
//! Volumes ([`BindMount`]s) are mounted last, before the read-only remount:
//! their targets in the tree are checked the same way (and never lie in
//! another volume, see [`crate::mounts::check`]), and their contents, which
//! other sandboxes may be changing, are only entered through
//! [`Syscalls::bind_beneath`].

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::mounts::{self, BindMount, MountSpecError};
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
    /// Volumes, mounted in this order.
    pub(crate) mounts: Vec<BindMount>,
    /// A mounted LXCFS: its views are bound over `/proc` and `/sys` files.
    pub(crate) lxcfs: Option<PathBuf>,
}

/// Files of an LXCFS mount bound over the sandbox's own (when both exist):
/// the views LXCFS computes from the reading process's cgroup.
const LXCFS_FILES: &[&str] = &[
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/loadavg",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
];

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
    /// The mounts of the spec are not acceptable.
    #[error(transparent)]
    Spec(#[from] MountSpecError),
    /// A volume could not be mounted.
    #[error("volume mount {target}")]
    Mount {
        /// Its target inside the sandbox.
        target: String,
        /// Why.
        #[source]
        source: Box<RootfsError>,
    },
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

    if let Some(lxcfs) = &plan.lxcfs {
        for rel in LXCFS_FILES {
            let source = lxcfs.join(rel);
            let target = at(rel);
            // Files of the fresh proc and sys mounts, so never a symlink
            // the image planted. An LXCFS that died (ENOTCONN) is no
            // reason to fail the create: the sandbox keeps the kernel's
            // figures, and the daemon starts LXCFS again.
            let serving = matches!(sys.kind(&source), Ok(Some(FileKind::File)));
            if serving && sys.kind(&target)?.is_some() {
                sys.mount(
                    Some(&source.to_string_lossy()),
                    &target,
                    None,
                    MsFlags::MS_BIND,
                    None,
                )?;
            }
        }
    }

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
    mounts::check(&plan.mounts)?;
    for m in &plan.mounts {
        bind_volume(sys, root, m, owner).map_err(|e| RootfsError::Mount {
            target: m.target.clone(),
            source: Box::new(e),
        })?;
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

/// Mounts one volume: its target's directories made (or checked to be
/// real directories) one component at a time, then the bind, then its
/// flags (a bind mount ignores all but `MS_BIND` in the first call).
fn bind_volume(
    sys: &dyn Syscalls,
    root: &Path,
    m: &BindMount,
    owner: (u32, u32),
) -> Result<(), RootfsError> {
    let mut rel = String::new();
    for c in mounts::target_components(&m.target)? {
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(c);
        ensure_dir(sys, root, &rel, owner)?;
    }
    let target = root.join(&rel);
    sys.bind_beneath(&m.source, m.sub_path.as_deref(), &target)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if m.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    sys.mount(None, &target, None, flags, None)?;
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
#[path = "rootfs_tests.rs"]
mod tests;
