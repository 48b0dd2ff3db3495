//! Size-limited writable layers: each sandbox's overlay upper dir lives on
//! an ext4 file system of its own, in a sparse image file on a loop device,
//! so a sandbox that writes past its size gets `ENOSPC` and the host's disk
//! never sees more than that size from it. This works whatever the host
//! file system supports (project quotas need XFS or ext4 with the `quota`
//! feature and a kernel built with `CONFIG_QUOTA`; many hosts have neither).
//!
//! Formatting costs ~3 ms (`mkfs.ext4` without a journal: the layer is
//! ephemeral, a crash discards it anyway; without the online-resize
//! reservation: it never grows), a third of a whole sandbox start, so a
//! [`DiskPool`] keeps images of the default size formatted ahead of
//! time, refilled by a background thread; a create takes one by `rename`
//! and only pays for the loop device and the mount.
//!
//! ```text
//! <pool>/<size>-<n>.img       formatted images, ready
//! <pool>/<size>-<n>.img.tmp   an image being formatted (removed at open)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::local::{format_sparse, is_mount_point, mount_image, unmount, MIN_DISK_BYTES};
use crate::VolumeError;

/// `mkfs.ext4` arguments of a writable layer: no journal (see the module
/// doc), and no blocks reserved for growing the file system online (a
/// layer never grows): that reservation is 4 MiB of writes per 10 GiB
/// image and 5 of the 8 ms mkfs takes; without it, ~3 ms and 228 KiB.
const LAYER_MKFS: &[&str] = &["-O", "^has_journal,^resize_inode"];

/// Formats a new sparse image of `size_bytes` at `image` for a writable
/// layer. The image must not exist.
pub fn format_disk(image: &Path, size_bytes: u64) -> Result<(), VolumeError> {
    if size_bytes < MIN_DISK_BYTES {
        return Err(VolumeError::InvalidRequest(format!(
            "size {size_bytes} bytes is less than the 1 MiB a disk needs"
        )));
    }
    format_sparse(image, size_bytes, LAYER_MKFS)
}

/// Mounts the ext4 `image` on the directory `mnt` (`nosuid,nodev`), through
/// a loop device that goes away with its last unmount.
pub fn attach_disk(image: &Path, mnt: &Path) -> Result<(), VolumeError> {
    mount_image(image, mnt)
}

/// Unmounts what is mounted on `mnt`; a busy file system (a sandbox's mount
/// namespace still holding it) is detached lazily. Nothing mounted: `Ok`.
pub fn detach_disk(mnt: &Path) -> Result<(), VolumeError> {
    unmount(mnt)
}

/// Whether a file system other than its parent's is mounted on `dir`.
pub fn is_mounted(dir: &Path) -> bool {
    is_mount_point(dir).unwrap_or(false)
}

/// Images of one size formatted ahead of time (see the module doc).
#[derive(Debug)]
pub struct DiskPool {
    dir: PathBuf,
    size_bytes: u64,
    target: usize,
    ready: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    wake: Condvar,
}

impl DiskPool {
    /// Opens the pool in `dir` (created, mode 0700) for images of
    /// `size_bytes`, keeping `target` ready. Images left by an earlier run
    /// are kept when of this size; half-formatted ones and other sizes are
    /// removed. Nothing is formatted here: see [`DiskPool::fill`].
    pub fn open(dir: &Path, size_bytes: u64, target: usize) -> Result<Arc<Self>, VolumeError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(VolumeError::io("create disk pool", dir))?;
        let prefix = format!("{size_bytes}-");
        let mut ready = Vec::new();
        let mut next = 0u64;
        for entry in std::fs::read_dir(dir).map_err(VolumeError::io("list disk pool", dir))? {
            let entry = entry.map_err(VolumeError::io("list disk pool", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".img"))
                .and_then(|n| n.parse::<u64>().ok());
            match ours {
                Some(n) if entry.file_type().is_ok_and(|t| t.is_file()) => {
                    next = next.max(n + 1);
                    ready.push(entry.path());
                }
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            size_bytes,
            target,
            ready: Mutex::new(ready),
            next: AtomicU64::new(next),
            wake: Condvar::new(),
        }))
    }

    /// The size of the pool's images.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Images ready now.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves a ready image to `dest` (same file system) and wakes the
    /// refiller. `false` when none is ready or the move failed: the caller
    /// formats one itself.
    pub fn take_into(&self, dest: &Path) -> bool {
        let taken = self.lock().pop();
        self.wake.notify_one();
        match taken {
            Some(image) => match std::fs::rename(&image, dest) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, image = %image.display(), "take pooled disk");
                    let _ = std::fs::remove_file(&image);
                    false
                }
            },
            None => false,
        }
    }

    /// Formats images until `target` are ready; returns how many it made.
    pub fn fill(&self) -> Result<usize, VolumeError> {
        let mut made = 0;
        while self.ready() < self.target {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let image = self.dir.join(format!("{}-{n}.img", self.size_bytes));
            let tmp = image.with_extension("img.tmp");
            format_disk(&tmp, self.size_bytes)?;
            std::fs::rename(&tmp, &image).map_err(VolumeError::io("rename pooled disk", &tmp))?;
            self.lock().push(image);
            made += 1;
        }
        Ok(made)
    }

    /// Starts the background thread that keeps the pool filled. It ends
    /// once every other handle on the pool is dropped.
    pub fn start_refiller(self: &Arc<Self>) -> std::io::Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("sandpit-disk-pool".into())
            .spawn(move || {
                background_priority();
                loop {
                    let Some(pool) = weak.upgrade() else { return };
                    if let Err(e) = pool.fill() {
                        tracing::warn!(error = %sandpit_errors::chain(&e), "refill disk pool");
                    }
                    let guard = pool.lock();
                    // Woken by a take, or every few seconds to notice the
                    // last handle going.
                    let _ = pool.wake.wait_timeout(guard, Duration::from_secs(2));
                }
            })
            .map(drop)
    }

    /// Removes every ready image (the pool dir stays).
    pub fn drain(&self) {
        for image in self.lock().drain(..) {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// Makes this thread, and the `mkfs` processes it starts (they inherit
/// both), yield to everything else: the lowest CPU priority and the idle
/// I/O class, so refilling the pool never slows the creates it serves.
fn background_priority() {
    // SAFETY: gettid takes nothing and returns this thread's id.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: integer arguments only; on Linux PRIO_PROCESS with a thread id
    // sets that thread's nice value.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set takes integers only and changes this thread's I/O
    // priority; a refusal leaves it as it was.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_keeps_ready_images_of_its_size_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "1048576-3.img",
            "1048576-1.img",
            "2097152-0.img",
            "1048576-4.img.tmp",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let pool = DiskPool::open(dir.path(), 1 << 20, 2).unwrap();
        assert_eq!(pool.ready(), 2);
        assert_eq!(pool.next.load(Ordering::Relaxed), 4);
        assert!(!dir.path().join("2097152-0.img").exists());
        assert!(!dir.path().join("1048576-4.img.tmp").exists());
        let dest = dir.path().join("taken");
        assert!(pool.take_into(&dest));
        assert!(dest.exists());
        assert_eq!(pool.ready(), 1);
        pool.drain();
        assert_eq!(pool.ready(), 0);
        assert!(!pool.take_into(&dir.path().join("none")));
    }

    #[test]
    fn too_small_a_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = format_disk(&dir.path().join("x.img"), 4096).unwrap_err();
        assert!(err.to_string().contains("1 MiB"), "{err}");
    }

    #[cfg(feature = "privileged-tests")]
    #[test]
    fn a_pooled_disk_mounts_and_ends_in_enospc() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DiskPool::open(&dir.path().join("pool"), 8 << 20, 1).unwrap();
        assert_eq!(pool.fill().unwrap(), 1);
        let image = dir.path().join("disk.img");
        assert!(pool.take_into(&image));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        attach_disk(&image, &mnt).unwrap();
        assert!(is_mounted(&mnt));
        let big = vec![7u8; 16 << 20];
        let err = std::fs::write(mnt.join("big"), &big).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        detach_disk(&mnt).unwrap();
        assert!(!is_mounted(&mnt));
    }
}
