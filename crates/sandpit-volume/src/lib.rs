//! Storage for sandbox volumes, blocking and free of gRPC types.
//!
//! The daemon keeps two kinds of volumes on a [`VolumeBackend`]: scratch
//! volumes (one per volume of a sandbox, removed with it) and registered
//! volumes (named, with their own lifetime, mounted by several sandboxes).
//! A backend only hands out a host directory, the mounted root of the
//! volume; the engine bind-mounts it into sandboxes.
//!
//! [`LocalVolumes`] is the embedded backend: one directory per key under a
//! root in the data dir, holding an ext4 image on a loop device
//! ([`Medium::Disk`], size-enforced) or a tmpfs ([`Medium::Memory`]).
//!
//! Volume contents are written by sandboxes: hostile. Nothing here reads
//! them; the backend only mounts, measures (`statvfs`) and removes whole
//! file systems.

pub mod disk;
mod key;
mod local;
mod loopdev;

use std::path::PathBuf;

pub use disk::DiskPool;
pub use key::{InvalidVolumeKey, VolumeKey, MAX_KEY_LEN};
pub use local::LocalVolumes;

/// The largest volume a request may ask for (16 TiB): anything larger is a
/// mistake (a size in bits, a unit gone wrong), not a plan.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;

/// Where a volume's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Medium {
    /// On disk, surviving restarts and reboots.
    Disk,
    /// In memory (tmpfs): pages are charged to the memory cgroup of the
    /// process that writes them, so a sandbox's writes count against its
    /// own memory limit. Gone with a reboot (or an unmount).
    Memory,
}

impl Medium {
    /// `"disk"` or `"memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Disk => "disk",
            Medium::Memory => "memory",
        }
    }
}

/// What to provision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeRequest {
    /// Capacity; writes past it fail with `ENOSPC`.
    pub size_bytes: u64,
    /// Disk or memory.
    pub medium: Medium,
    /// Host uid and gid owning the volume's root directory.
    pub owner: (u32, u32),
    /// Permission bits of the root directory (e.g. `0o777`).
    pub mode: u32,
}

/// How full a volume is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in use (data and the file system's own blocks in use).
    pub used_bytes: u64,
    /// Bytes the file system offers in all.
    pub capacity_bytes: u64,
}

/// Errors of a backend. None repeats its source in its message: print them
/// with their `source()` chain (`a: b: c`).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request cannot be honoured as given.
    #[error("invalid volume request: {0}")]
    InvalidRequest(String),
    /// The volume is not mounted (never provisioned, removed, or detached
    /// since).
    #[error("volume {0} is not attached")]
    NotAttached(VolumeKey),
    /// The volume exists with the other medium.
    #[error("volume {key} exists on {existing}, not {requested}")]
    MediumMismatch {
        /// The volume.
        key: VolumeKey,
        /// What it is.
        existing: &'static str,
        /// What was asked for.
        requested: &'static str,
    },
    /// `mkfs.ext4` failed; its own output says why.
    #[error("mkfs.ext4 {status}: {output}")]
    Mkfs {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed (trimmed, bounded).
        output: String,
    },
    /// A system call or file operation failed.
    #[error("{step} {}", path.display())]
    Io {
        /// What we were doing.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl VolumeError {
    pub(crate) fn io(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> VolumeError {
        let path = path.into();
        move |source| VolumeError::Io { step, path, source }
    }

    pub(crate) fn errno(
        step: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(nix::errno::Errno) -> VolumeError {
        let path = path.into();
        move |e| VolumeError::Io {
            step,
            path,
            source: std::io::Error::from(e),
        }
    }
}

/// Somewhere volumes live. Blocking: call it from a blocking thread.
pub trait VolumeBackend: Send + Sync + std::fmt::Debug {
    /// The backend's kind, for logs and records: `"local"` for [`LocalVolumes`].
    fn kind(&self) -> &'static str;

    /// Creates the volume, or re-attaches an existing one (after a daemon
    /// restart or a reboot: the image is there but not mounted), and returns
    /// the host directory (its mounted root) that sandboxes bind-mount.
    /// Idempotent: provisioning a mounted volume returns its root as it is.
    fn provision(&self, key: &VolumeKey, req: &VolumeRequest) -> Result<PathBuf, VolumeError>;

    /// The mounted root when attached, `None` otherwise.
    fn path(&self, key: &VolumeKey) -> Option<PathBuf>;

    /// How full the attached volume is.
    fn usage(&self, key: &VolumeKey) -> Result<Usage, VolumeError>;

    /// Unmounts the volume and deletes its data. Idempotent: a missing
    /// volume is `Ok`.
    fn remove(&self, key: &VolumeKey) -> Result<(), VolumeError>;

    /// Keys present under the backend's root, sorted (for sweeps of
    /// orphans after a crash).
    fn list(&self) -> Result<Vec<VolumeKey>, VolumeError>;
}

/// Checks a request's bounds, before anything is created.
pub(crate) fn validate(req: &VolumeRequest) -> Result<(), VolumeError> {
    let bad = |s: String| Err(VolumeError::InvalidRequest(s));
    if req.size_bytes == 0 {
        return bad("size must be more than 0 bytes".into());
    }
    if req.size_bytes > MAX_VOLUME_BYTES {
        return bad(format!(
            "size {} bytes is more than the limit of 16 TiB",
            req.size_bytes
        ));
    }
    if req.medium == Medium::Disk && req.size_bytes < local::MIN_DISK_BYTES {
        return bad(format!(
            "size {} bytes is less than the 1 MiB a disk volume needs",
            req.size_bytes
        ));
    }
    if req.mode & !0o7777 != 0 {
        return bad(format!("mode {:o} has bits beyond 0o7777", req.mode));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size_bytes: u64, medium: Medium) -> VolumeRequest {
        VolumeRequest {
            size_bytes,
            medium,
            owner: (0, 0),
            mode: 0o777,
        }
    }

    #[test]
    fn sizes_out_of_bounds_are_refused_clearly() {
        assert!(validate(&req(1 << 30, Medium::Disk)).is_ok());
        assert!(validate(&req(1, Medium::Memory)).is_ok());
        assert!(validate(&req(MAX_VOLUME_BYTES, Medium::Disk)).is_ok());
        assert_eq!(
            validate(&req(0, Medium::Memory)).unwrap_err().to_string(),
            "invalid volume request: size must be more than 0 bytes"
        );
        assert_eq!(
            validate(&req(MAX_VOLUME_BYTES + 1, Medium::Disk))
                .unwrap_err()
                .to_string(),
            "invalid volume request: size 17592186044417 bytes is more than the limit of 16 TiB"
        );
        assert!(validate(&req(4096, Medium::Disk))
            .unwrap_err()
            .to_string()
            .contains("1 MiB"));
        let mut r = req(1 << 20, Medium::Memory);
        r.mode = 0o10777;
        assert!(validate(&r).is_err());
    }
}
