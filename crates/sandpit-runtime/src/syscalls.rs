//! The privileged system calls the spawner makes, behind a trait so that the
//! rootfs logic in [`crate::rootfs`] can be unit-tested without root.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::MsFlags;

/// A failed system call, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {errno}", path.display())]
pub(crate) struct SysError {
    /// The operation (`mount`, `mkdir`...).
    pub(crate) op: &'static str,
    /// The path it acted on.
    pub(crate) path: PathBuf,
    /// The error number.
    pub(crate) errno: nix::errno::Errno,
}

impl SysError {
    fn new(op: &'static str, path: &Path, errno: nix::errno::Errno) -> Self {
        Self {
            op,
            path: path.to_path_buf(),
            errno,
        }
    }
}

/// What an `lstat` found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link (never followed).
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// The system calls used to assemble a sandbox's root filesystem.
pub(crate) trait Syscalls {
    /// mount(2).
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError>;
    /// mkdir(2) with an owner.
    fn mkdir(&self, path: &Path, mode: u32, owner: (u32, u32)) -> Result<(), SysError>;
    /// Creates an empty regular file (a bind-mount target).
    fn create_file(&self, path: &Path, mode: u32) -> Result<(), SysError>;
    /// symlink(2).
    fn symlink(&self, target: &str, link: &Path) -> Result<(), SysError>;
    /// lstat(2): `None` when nothing is there.
    fn kind(&self, path: &Path) -> Result<Option<FileKind>, SysError>;
    /// Makes `new_root` the root of the mount namespace and detaches the old one.
    fn pivot_root(&self, new_root: &Path) -> Result<(), SysError>;
    /// Bind-mounts (not recursively) the directory `sub_path` of `source`
    /// onto `target`. `source` is trusted; `sub_path` lies in hostile
    /// contents: it is resolved from a descriptor of `source` without
    /// following symlinks, leaving `source` or crossing a mount, and the
    /// descriptor it resolved to is what gets mounted (nothing can swap a
    /// component between the check and the mount).
    fn bind_beneath(
        &self,
        source: &Path,
        sub_path: Option<&str>,
        target: &Path,
    ) -> Result<(), SysError>;
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LinuxSyscalls;

impl Syscalls for LinuxSyscalls {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError> {
        nix::mount::mount(source, target, fstype, flags, data)
            .map_err(|e| SysError::new("mount", target, e))
    }

    fn mkdir(&self, path: &Path, mode: u32, owner: (u32, u32)) -> Result<(), SysError> {
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) => return Err(SysError::new("mkdir", path, io_errno(&e))),
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| SysError::new("chmod", path, io_errno(&e)))?;
        std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))
            .map_err(|e| SysError::new("chown", path, io_errno(&e)))
    }

    fn create_file(&self, path: &Path, mode: u32) -> Result<(), SysError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map(drop)
            .map_err(|e| SysError::new("create", path, io_errno(&e)))
    }

    fn symlink(&self, target: &str, link: &Path) -> Result<(), SysError> {
        std::os::unix::fs::symlink(target, link)
            .map_err(|e| SysError::new("symlink", link, io_errno(&e)))
    }

    fn kind(&self, path: &Path) -> Result<Option<FileKind>, SysError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) => {
                let ft = m.file_type();
                Ok(Some(if ft.is_symlink() {
                    FileKind::Symlink
                } else if ft.is_dir() {
                    FileKind::Dir
                } else if ft.is_file() {
                    FileKind::File
                } else {
                    FileKind::Other
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SysError::new("lstat", path, io_errno(&e))),
        }
    }

    fn pivot_root(&self, new_root: &Path) -> Result<(), SysError> {
        // pivot_root(".", ".") stacks the old root on top of the new one; the
        // lazy unmount then drops it without needing a directory for it.
        nix::unistd::chdir(new_root).map_err(|e| SysError::new("chdir", new_root, e))?;
        nix::unistd::pivot_root(".", ".").map_err(|e| SysError::new("pivot_root", new_root, e))?;
        nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| SysError::new("umount old root", new_root, e))?;
        nix::unistd::chdir("/").map_err(|e| SysError::new("chdir", Path::new("/"), e))
    }

    fn bind_beneath(
        &self,
        source: &Path,
        sub_path: Option<&str>,
        target: &Path,
    ) -> Result<(), SysError> {
        let src = nix::fcntl::open(
            source,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| SysError::new("open volume", source, e))?;
        let rel: Vec<&str> = sub_path
            .unwrap_or_default()
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let shown = source.join(rel.join("/"));
        let dir = if rel.is_empty() {
            src
        } else {
            open_beneath(&src, &rel, &shown)?
        };
        // The host's /proc (we have not pivoted yet): the magic link names
        // exactly the directory resolved above.
        let by_fd = format!("/proc/self/fd/{}", dir.as_raw_fd());
        nix::mount::mount(
            Some(by_fd.as_str()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| SysError::new("bind volume", &shown, e))
    }
}

/// Opens the directory `rel` beneath `dir` (see [`Syscalls::bind_beneath`]).
fn open_beneath(dir: &OwnedFd, rel: &[&str], shown: &Path) -> Result<OwnedFd, SysError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_NO_XDEV,
    );
    match nix::fcntl::openat2(dir, rel.join("/").as_str(), how) {
        Ok(fd) => return Ok(fd),
        // Before Linux 5.6: the same walk by hand, below.
        Err(nix::errno::Errno::ENOSYS) => {}
        Err(e) => return Err(SysError::new("open volume sub_path", shown, e)),
    }
    let dev = nix::sys::stat::fstat(dir)
        .map_err(|e| SysError::new("stat volume", shown, e))?
        .st_dev;
    let mut cur = dir
        .try_clone()
        .map_err(|e| SysError::new("dup", shown, io_errno(&e)))?;
    for c in rel {
        // O_NOFOLLOW with O_DIRECTORY: a symlink is ENOTDIR, never followed.
        let next = nix::fcntl::openat(&cur, *c, flags, nix::sys::stat::Mode::empty())
            .map_err(|e| SysError::new("open volume sub_path", shown, e))?;
        let st = nix::sys::stat::fstat(&next)
            .map_err(|e| SysError::new("stat volume sub_path", shown, e))?;
        if st.st_dev != dev {
            return Err(SysError::new(
                "open volume sub_path",
                shown,
                nix::errno::Errno::EXDEV,
            ));
        }
        cur = next;
    }
    Ok(cur)
}

fn io_errno(e: &std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
