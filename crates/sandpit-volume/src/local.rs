//! [`LocalVolumes`]: volumes in directories under the data dir.
//!
//! ```text
//! <root>/<key>/            one volume, mode 0700
//!     disk.img             Disk: sparse ext4 image of the volume's size
//!     disk.img.tmp         an image being formatted (never attached)
//!     mnt/                 the mounted root sandboxes bind-mount
//! ```
//!
//! A disk volume is an ext4 file system in a sparse image file on a loop
//! device, so its size is enforced by the file system itself (`ENOSPC`),
//! whatever the host file system under the data dir supports. A memory
//! volume is a tmpfs with a `size=`. Both are mounted `nosuid,nodev`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::statfs::{FsType, EXT4_SUPER_MAGIC, TMPFS_MAGIC};

use crate::{
    loopdev, validate, Medium, Usage, VolumeBackend, VolumeError, VolumeKey, VolumeRequest,
};

/// The smallest disk volume: below this ext4's own blocks leave next to
/// nothing for data.
pub(crate) const MIN_DISK_BYTES: u64 = 1 << 20;

const IMAGE: &str = "disk.img";
const IMAGE_TMP: &str = "disk.img.tmp";
const MOUNT_DIR: &str = "mnt";

/// ext4 mount options of every image: the inode tables mkfs left
/// unwritten (`lazy_itable_init`) are holes of a sparse file, which read as
/// zeros already, so the kernel's background zeroing of them (`ext4lazyinit`,
/// ~160 MB of writes for a 10 GiB image) would only cost disk and I/O.
const EXT4_OPTIONS: &str = "noinit_itable";

/// The most of `mkfs.ext4`'s output an error carries.
const MKFS_OUTPUT_LIMIT: u64 = 4096;

/// The embedded backend ("quota'd directories under the data dir").
///
/// Operations on one key are serialised within the process (two attaches
/// of one image would mount its file system twice); the daemon's lock on
/// its data dir keeps other processes out. A [`Medium::Memory`] volume
/// cannot be re-attached after a reboot or an unmount (its contents went
/// with the tmpfs): `provision` creates it again, empty.
#[derive(Debug)]
pub struct LocalVolumes {
    root: PathBuf,
    locks: Mutex<HashMap<VolumeKey, Arc<Mutex<()>>>>,
}

impl LocalVolumes {
    /// Opens (creating, mode 0700) the root directory that holds the volumes.
    pub fn open(root: &Path) -> Result<Self, VolumeError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(VolumeError::io("create volume root", root))?;
        // Absolute: the path goes to mkfs and into mount tables.
        let root = root
            .canonicalize()
            .map_err(VolumeError::io("resolve volume root", root))?;
        Ok(Self {
            root,
            locks: Mutex::default(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, key: &VolumeKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    fn mount_dir(&self, key: &VolumeKey) -> PathBuf {
        self.dir(key).join(MOUNT_DIR)
    }

    /// Runs `f` holding the key's lock.
    fn locked<T>(&self, key: &VolumeKey, f: impl FnOnce() -> T) -> T {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(key.clone()).or_default())
        };
        let result = {
            let _held = lock.lock().unwrap_or_else(|e| e.into_inner());
            f()
        };
        let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // The map's handle and ours: nobody else waits, drop the entry.
        if map.get(key).is_some_and(|l| Arc::strong_count(l) <= 2) {
            map.remove(key);
        }
        result
    }

    fn provision_locked(
        &self,
        key: &VolumeKey,
        req: &VolumeRequest,
    ) -> Result<PathBuf, VolumeError> {
        let dir = self.dir(key);
        let mnt = self.mount_dir(key);
        for d in [&dir, &mnt] {
            match std::fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(VolumeError::io("create volume dir", d)(e)),
            }
        }
        let image = dir.join(IMAGE);
        if is_mount_point(&mnt)? {
            let existing = medium_of(&mnt)?;
            if existing != Some(req.medium) {
                return Err(mismatch(key, existing, req.medium));
            }
            return Ok(mnt);
        }
        match req.medium {
            Medium::Memory => {
                if image.exists() {
                    return Err(mismatch(key, Some(Medium::Disk), req.medium));
                }
                let opts = format!(
                    "size={},mode={:o},uid={},gid={}",
                    req.size_bytes, req.mode, req.owner.0, req.owner.1
                );
                nix::mount::mount(
                    Some("sandpit-volume"),
                    &mnt,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(opts.as_str()),
                )
                .map_err(VolumeError::errno("mount tmpfs", &mnt))?;
            }
            Medium::Disk => {
                let fresh = !image.exists();
                if fresh {
                    create_image(&dir, req.size_bytes)?;
                }
                mount_image(&image, &mnt)?;
                if fresh {
                    if let Err(e) = init_root(&mnt, req) {
                        // Not handed out half set up: the next provision
                        // starts again from nothing.
                        let _ = unmount(&mnt);
                        let _ = std::fs::remove_file(&image);
                        return Err(e);
                    }
                }
            }
        }
        tracing::debug!(volume = %key, medium = req.medium.as_str(), "volume attached");
        Ok(mnt)
    }

    fn remove_locked(&self, key: &VolumeKey) -> Result<(), VolumeError> {
        let dir = self.dir(key);
        let mnt = self.mount_dir(key);
        if !dir.exists() {
            return Ok(());
        }
        unmount(&mnt)?;
        for name in [IMAGE, IMAGE_TMP] {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VolumeError::io("remove volume image", path)(e)),
            }
        }
        // rmdir, never a recursive delete: anything left in these is not
        // ours to guess about (and cannot be under a mount any more).
        for d in [&mnt, &dir] {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VolumeError::io("remove volume dir", d)(e)),
            }
        }
        tracing::debug!(volume = %key, "volume removed");
        Ok(())
    }
}

impl VolumeBackend for LocalVolumes {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn provision(&self, key: &VolumeKey, req: &VolumeRequest) -> Result<PathBuf, VolumeError> {
        validate(req)?;
        self.locked(key, || self.provision_locked(key, req))
    }

    fn path(&self, key: &VolumeKey) -> Option<PathBuf> {
        let mnt = self.mount_dir(key);
        is_mount_point(&mnt).ok()?.then_some(mnt)
    }

    fn usage(&self, key: &VolumeKey) -> Result<Usage, VolumeError> {
        let mnt = self
            .path(key)
            .ok_or_else(|| VolumeError::NotAttached(key.clone()))?;
        let st = nix::sys::statvfs::statvfs(&mnt).map_err(VolumeError::errno("statvfs", &mnt))?;
        let frsize = st.fragment_size();
        let blocks = st.blocks();
        Ok(Usage {
            used_bytes: blocks.saturating_sub(st.blocks_free()) * frsize,
            capacity_bytes: blocks * frsize,
        })
    }

    fn remove(&self, key: &VolumeKey) -> Result<(), VolumeError> {
        self.locked(key, || self.remove_locked(key))
    }

    fn list(&self) -> Result<Vec<VolumeKey>, VolumeError> {
        let mut keys = Vec::new();
        let entries =
            std::fs::read_dir(&self.root).map_err(VolumeError::io("list volumes", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(VolumeError::io("list volumes", &self.root))?;
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            match entry.file_name().to_str().map(VolumeKey::parse) {
                Some(Ok(key)) if is_dir => keys.push(key),
                _ => tracing::debug!(
                    name = %entry.file_name().to_string_lossy(),
                    "not a volume: skipped"
                ),
            }
        }
        keys.sort();
        Ok(keys)
    }
}

fn mismatch(key: &VolumeKey, existing: Option<Medium>, requested: Medium) -> VolumeError {
    VolumeError::MediumMismatch {
        key: key.clone(),
        existing: existing.map_or("another file system", Medium::as_str),
        requested: requested.as_str(),
    }
}

/// Whether something is mounted on `dir`: it sits on another device than
/// its parent (both of ours, so neither is a symlink).
pub(crate) fn is_mount_point(dir: &Path) -> Result<bool, VolumeError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(VolumeError::io("stat volume mount", dir)(e)),
    };
    let parent = dir.parent().unwrap_or(dir);
    let parent_meta =
        std::fs::symlink_metadata(parent).map_err(VolumeError::io("stat volume dir", parent))?;
    Ok(meta.dev() != parent_meta.dev())
}

/// The medium of the file system mounted on `mnt`, `None` when it is
/// neither of ours.
fn medium_of(mnt: &Path) -> Result<Option<Medium>, VolumeError> {
    let st = nix::sys::statfs::statfs(mnt).map_err(VolumeError::errno("statfs", mnt))?;
    let t: FsType = st.filesystem_type();
    Ok(if t == EXT4_SUPER_MAGIC {
        Some(Medium::Disk)
    } else if t == TMPFS_MAGIC {
        Some(Medium::Memory)
    } else {
        None
    })
}

/// Formats a new sparse image of `size` bytes as `dir/disk.img`. Formatted
/// under a temporary name first: a crash mid-way never leaves a
/// half-formatted `disk.img` that a later provision would attach.
fn create_image(dir: &Path, size: u64) -> Result<(), VolumeError> {
    let tmp = dir.join(IMAGE_TMP);
    format_sparse(&tmp, size, &[])?;
    let image = dir.join(IMAGE);
    std::fs::rename(&tmp, &image).map_err(VolumeError::io("rename volume image", &tmp))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(VolumeError::io("sync volume dir", dir))
}

/// Creates `path` as a sparse file of `size` bytes and formats it as ext4
/// with `extra` arguments for `mkfs.ext4`; removes it again on failure.
pub(crate) fn format_sparse(tmp: &Path, size: u64, extra: &[&str]) -> Result<(), VolumeError> {
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)
        .map_err(VolumeError::io("create volume image", tmp))?;
    file.set_len(size)
        .map_err(VolumeError::io("size volume image", tmp))?;
    drop(file);
    if let Err(e) = mkfs(tmp, extra) {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    Ok(())
}

fn mkfs_binary() -> PathBuf {
    // The daemon's PATH may lack the sbin directories.
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

/// `mkfs.ext4` tuned for speed on a new sparse file: inode tables and the
/// journal are initialised lazily (in the background once mounted), no
/// discard pass, no blocks reserved for root (the volume is the sandbox's).
fn mkfs(image: &Path, extra: &[&str]) -> Result<(), VolumeError> {
    let bin = mkfs_binary();
    let mut child = Command::new(&bin)
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .args(extra)
        .arg(image)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VolumeError::io("run", &bin))?;
    let mut output = String::new();
    if let Some(stderr) = child.stderr.take() {
        let _ = stderr.take(MKFS_OUTPUT_LIMIT).read_to_string(&mut output);
    }
    let status = child.wait().map_err(VolumeError::io("wait for", &bin))?;
    if status.success() {
        Ok(())
    } else {
        Err(VolumeError::Mkfs {
            status,
            output: output.trim().to_string(),
        })
    }
}

/// Mounts the ext4 `image` on `mnt` through a loop device: the one it is
/// still attached to if any (its file system may live on in a sandbox's
/// mount namespace after an unmount here), else a new one.
pub(crate) fn mount_image(image: &Path, mnt: &Path) -> Result<(), VolumeError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(image)
        .map_err(VolumeError::io("open volume image", image))?;
    let meta = file
        .metadata()
        .map_err(VolumeError::io("stat volume image", image))?;
    if let Some(dev) = loopdev::find_attached(&meta) {
        // It may have been freed meanwhile (its last unmount): then attach anew.
        if nix::mount::mount(Some(&dev), mnt, Some("ext4"), flags, Some(EXT4_OPTIONS)).is_ok() {
            return Ok(());
        }
    }
    let dev =
        loopdev::attach(&file, image).map_err(VolumeError::io("attach loop device", image))?;
    nix::mount::mount(
        Some(&dev.path),
        mnt,
        Some("ext4"),
        flags,
        Some(EXT4_OPTIONS),
    )
    .map_err(VolumeError::errno("mount volume", &dev.path))?;
    // The mount holds the device now; our descriptor goes with `dev`, and
    // the last unmount frees the device (autoclear).
    Ok(())
}

/// A fresh file system's root: no `lost+found`, the requested owner and mode.
fn init_root(mnt: &Path, req: &VolumeRequest) -> Result<(), VolumeError> {
    let lost = mnt.join("lost+found");
    match std::fs::remove_dir(&lost) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(VolumeError::io("remove", lost)(e)),
    }
    std::os::unix::fs::chown(mnt, Some(req.owner.0), Some(req.owner.1))
        .map_err(VolumeError::io("chown volume root", mnt))?;
    // After the chown, which clears set-id bits.
    std::fs::set_permissions(mnt, std::fs::Permissions::from_mode(req.mode))
        .map_err(VolumeError::io("chmod volume root", mnt))
}

/// Unmounts everything on `mnt` (mounts may be stacked); a busy file
/// system is detached lazily and goes once its last user does.
pub(crate) fn unmount(mnt: &Path) -> Result<(), VolumeError> {
    for _ in 0..16 {
        if !is_mount_point(mnt)? {
            return Ok(());
        }
        match nix::mount::umount2(mnt, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                tracing::warn!(path = %mnt.display(), "volume busy: detached lazily");
                nix::mount::umount2(mnt, MntFlags::MNT_DETACH)
                    .map_err(VolumeError::errno("unmount volume", mnt))?;
            }
            Err(e) => return Err(VolumeError::errno("unmount volume", mnt)(e)),
        }
    }
    Err(VolumeError::errno("unmount volume", mnt)(
        nix::errno::Errno::EBUSY,
    ))
}
