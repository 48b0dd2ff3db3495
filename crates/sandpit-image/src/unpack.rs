//! Hostile-input-safe unpacking of one layer tar into a staging directory.
//!
//! Every entry is checked; nothing is written through a symlink:
//!
//! - Paths are normalised (`./`, `/` and empty components dropped, so
//!   absolute paths land inside the layer). A `..` component fails the import.
//! - Parents are opened one component at a time with `O_NOFOLLOW`, from a
//!   directory fd of the layer root, and created (0755, shifted root) when
//!   missing. A parent that is a symlink, even one planted by an earlier entry
//!   pointing inside the layer, fails the import; so does a parent that is
//!   not a directory.
//! - The final component is created with `O_EXCL`/`mkdirat`/`symlinkat`/
//!   `linkat`/`mknodat`, after removing what an earlier entry put there
//!   (later entries win; a directory over a directory keeps its content).
//! - Hard link targets are normalised the same way and must name an existing
//!   non-directory of this layer; `linkat` does not follow a symlink target.
//! - Device nodes are skipped (counted, debug log): `/dev` of a sandbox is a
//!   tmpfs. Unknown entry types are skipped with a warning.
//! - OCI whiteouts become overlayfs whiteouts: `.wh.<name>` a 0/0 character
//!   device owned by the shifted root (skipped when this layer itself has an
//!   entry at `<name>`: whiteouts hide lower layers only), `.wh..wh..opq`
//!   the `trusted.overlay.opaque=y` xattr on its directory. Other `.wh..wh.*`
//!   names are skipped.
//! - Ownership is shifted ([`IdShift::map`]); modes keep setuid/setgid/sticky.
//! - Xattrs from PAX `SCHILY.xattr.*` records, best effort: `user.*` as is,
//!   `security.capability` rewritten to a v3 (namespaced) capability whose
//!   root is the shifted root, POSIX ACLs with their ids shifted; everything
//!   else (`trusted.*`, other `security.*`) is dropped.
//! - Directory mtimes are applied after all content.
//! - File content written counts against the size cap (sparse files cannot
//!   expand past it).
//!
//! Path resolution lives in `unpack/walk.rs`, the xattr policy in
//! `unpack/xattr.rs`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use tar::EntryType;

use crate::{IdShift, ImageError};

mod walk;
mod xattr;

use walk::{normalize, split_parent};
pub(crate) use xattr::fsetxattr;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const COPY_BUF: usize = 256 * 1024;

/// What an unpack did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct UnpackStats {
    pub(crate) entries: u64,
    pub(crate) files: u64,
    pub(crate) dirs: u64,
    pub(crate) symlinks: u64,
    pub(crate) hardlinks: u64,
    pub(crate) fifos: u64,
    pub(crate) whiteouts: u64,
    pub(crate) opaque_dirs: u64,
    pub(crate) skipped_devices: u64,
    pub(crate) skipped_other: u64,
    pub(crate) clamped_ids: u64,
    pub(crate) xattrs: u64,
    pub(crate) skipped_xattrs: u64,
    /// Bytes of file content written.
    pub(crate) content_bytes: u64,
}

/// Unpacks tar entries under `root` (an empty directory).
pub(crate) struct Unpacker {
    root_path: PathBuf,
    root: Rc<OwnedFd>,
    shift: IdShift,
    limit: u64,
    /// The parent directory of the previous entry: entries come grouped by
    /// directory. Dropped whenever a directory is removed.
    parent_cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    /// Directory mtimes, applied last. Key: normalised path, "" for the root.
    dir_mtimes: HashMap<Vec<u8>, TimeSpec>,
    buf: Vec<u8>,
    pub(crate) stats: UnpackStats,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker")
            .field("root", &self.root_path)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Metadata of one entry, shifted.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn bad(path: &[u8], reason: &'static str) -> ImageError {
    ImageError::BadEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}

fn entry_err(path: &[u8], source: impl Into<io::Error>) -> ImageError {
    ImageError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        source: source.into(),
    }
}

fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nanos += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
    }
    // "-1.5" is 1.5 s before the epoch.
    if secs < 0 || s.starts_with('-') {
        return Some(TimeSpec::new(
            secs - i64::from(nanos > 0),
            (1_000_000_000 - nanos) % 1_000_000_000,
        ));
    }
    Some(TimeSpec::new(secs, nanos))
}

impl Unpacker {
    /// `root` must be an empty directory only this unpacker writes to. Its
    /// ownership is set to the shifted root, its mode to 0755 (a tar entry for
    /// `./` overrides both).
    pub(crate) fn new(root_path: &Path, shift: IdShift, limit: u64) -> Result<Self, ImageError> {
        let root = openat(
            nix::fcntl::AT_FDCWD,
            root_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::io("open", root_path, e.into()))?;
        fchown(
            &root,
            Some(Uid::from_raw(shift.base)),
            Some(Gid::from_raw(shift.base)),
        )
        .map_err(|e| ImageError::io("chown", root_path, e.into()))?;
        fchmod(&root, Mode::from_bits_truncate(0o755))
            .map_err(|e| ImageError::io("chmod", root_path, e.into()))?;
        Ok(Self {
            root_path: root_path.to_owned(),
            root: Rc::new(root),
            shift,
            limit,
            parent_cache: None,
            dir_mtimes: HashMap::new(),
            buf: vec![0; COPY_BUF],
            stats: UnpackStats::default(),
        })
    }

    /// Unpacks every entry, then applies directory mtimes.
    pub(crate) fn unpack<R: Read>(
        &mut self,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), ImageError> {
        for entry in archive.entries().map_err(ImageError::Archive)? {
            let mut entry = entry.map_err(ImageError::Archive)?;
            self.stats.entries += 1;
            self.entry(&mut entry)?;
        }
        self.finish()
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            tracing::debug!("skipping pax global header");
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let path = normalize(&raw).map_err(|reason| bad(&raw, reason))?;

        // Whiteouts are recognised by name, whatever their entry type.
        let (parent, name) = split_parent(&path);
        if name == WHITEOUT_OPAQUE {
            return self.opaque(parent, &path);
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            tracing::debug!(path = %String::from_utf8_lossy(&path), "skipping whiteout metadata entry");
            self.stats.skipped_other += 1;
            return Ok(());
        }
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if target.is_empty() || target == b"." || target == b".." {
                return Err(bad(&raw, "invalid whiteout"));
            }
            let mut target_path = parent.to_vec();
            if !target_path.is_empty() {
                target_path.push(b'/');
            }
            target_path.extend_from_slice(target);
            return self.whiteout(&target_path);
        }

        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if path.is_empty() {
                    return Err(bad(&raw, "file at the layer root"));
                }
                let meta = self.meta(entry, &path)?;
                self.file(entry, &path, &meta)
            }
            EntryType::Directory => {
                let meta = self.meta(entry, &path)?;
                self.dir(&path, &meta)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| bad(&raw, "symlink without target"))?;
                if path.is_empty() {
                    return Err(bad(&raw, "symlink at the layer root"));
                }
                let meta = self.meta(entry, &path)?;
                self.symlink(&path, &target, &meta)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(&raw, "hard link without target"))?;
                let target = normalize(&target)
                    .map_err(|_| bad(&raw, "hard link target outside the layer"))?;
                if path.is_empty() || target.is_empty() {
                    return Err(bad(&raw, "hard link to or at the layer root"));
                }
                self.hardlink(&path, &target)
            }
            EntryType::Fifo => {
                if path.is_empty() {
                    return Err(bad(&raw, "fifo at the layer root"));
                }
                let meta = self.meta(entry, &path)?;
                self.fifo(&path, &meta)
            }
            EntryType::Char | EntryType::Block => {
                tracing::debug!(path = %String::from_utf8_lossy(&path), "skipping device node");
                self.stats.skipped_devices += 1;
                Ok(())
            }
            other => {
                tracing::warn!(path = %String::from_utf8_lossy(&path), kind = ?other, "skipping tar entry of unsupported type");
                self.stats.skipped_other += 1;
                Ok(())
            }
        }
    }

    fn meta<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &[u8],
    ) -> Result<Meta, ImageError> {
        let header = entry.header();
        let mode = header.mode().map_err(|e| entry_err(path, e))? & 0o7777;
        let (uid, clamped_uid) = self
            .shift
            .map(header.uid().map_err(|e| entry_err(path, e))?);
        let (gid, clamped_gid) = self
            .shift
            .map(header.gid().map_err(|e| entry_err(path, e))?);
        if clamped_uid || clamped_gid {
            self.stats.clamped_ids += 1;
            tracing::debug!(path = %String::from_utf8_lossy(path), "id outside the shift range, clamped");
        }
        let mtime = header.mtime().map_err(|e| entry_err(path, e))?;
        let mut mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(|e| entry_err(path, e))? {
            for extension in extensions {
                let extension = extension.map_err(|e| entry_err(path, e))?;
                let key = extension.key_bytes();
                if key == b"mtime" {
                    if let Some(t) = parse_pax_time(extension.value_bytes()) {
                        mtime = t;
                    }
                } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), extension.value_bytes().to_vec()));
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    fn io_err(&self, op: &'static str, path: &[u8], e: impl Into<io::Error>) -> ImageError {
        ImageError::io(op, self.root_path.join(OsStr::from_bytes(path)), e.into())
    }

    fn set_owner_mode(
        &self,
        fd: BorrowedFd<'_>,
        uid: u32,
        gid: u32,
        mode: u32,
        path: &[u8],
    ) -> Result<(), ImageError> {
        // chown first: it clears setuid/setgid bits.
        fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| self.io_err("chown", path, e))?;
        fchmod(fd, Mode::from_bits_truncate(mode)).map_err(|e| self.io_err("chmod", path, e))
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        let fd = openat(
            &*dir,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.io_err("create", path, e))?;
        let mut file = File::from(fd);
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(entry_err(path, e)),
            };
            self.stats.content_bytes += n as u64;
            if self.stats.content_bytes > self.limit {
                return Err(ImageError::TooLarge { limit: self.limit });
            }
            file.write_all(&self.buf[..n])
                .map_err(|e| self.io_err("write", path, e))?;
        }
        self.set_owner_mode(file.as_fd(), meta.uid, meta.gid, meta.mode, path)?;
        self.set_xattrs(file.as_fd(), &meta.xattrs, path);
        futimens(&file, &meta.mtime, &meta.mtime).map_err(|e| self.io_err("set times", path, e))?;
        self.stats.files += 1;
        Ok(())
    }

    fn dir(&mut self, path: &[u8], meta: &Meta) -> Result<(), ImageError> {
        let fd = if path.is_empty() {
            self.root.clone()
        } else {
            let (dir, name) = self.parent(path)?;
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            match openat(&*dir, name, flags, Mode::empty()) {
                Ok(fd) => Rc::new(fd),
                Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {
                    self.clear(&dir, name, path)?;
                    mkdirat(&*dir, name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| self.io_err("mkdir", path, e))?;
                    Rc::new(
                        openat(&*dir, name, flags, Mode::empty())
                            .map_err(|e| self.io_err("open", path, e))?,
                    )
                }
                Err(e) => return Err(self.io_err("open", path, e)),
            }
        };
        self.set_owner_mode(fd.as_fd(), meta.uid, meta.gid, meta.mode, path)?;
        self.set_xattrs(fd.as_fd(), &meta.xattrs, path);
        self.dir_mtimes.insert(path.to_vec(), meta.mtime);
        self.stats.dirs += 1;
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], target: &[u8], meta: &Meta) -> Result<(), ImageError> {
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        symlinkat(target, &*dir, name).map_err(|e| self.io_err("symlink", path, e))?;
        fchownat(
            &*dir,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("chown", path, e))?;
        utimensat(
            &*dir,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io_err("set times", path, e))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, path: &[u8], target: &[u8]) -> Result<(), ImageError> {
        if path == target {
            return Ok(());
        }
        let (target_dir, target_name) = split_parent(target);
        let target_dir = self.walk(target_dir, false, path).map_err(|e| match e {
            ImageError::BadEntry {
                path,
                reason: "parent directory missing",
            } => ImageError::BadEntry {
                path,
                reason: "hard link target missing",
            },
            e => e,
        })?;
        match fstatat(&*target_dir, target_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(bad(path, "hard link to a directory"))
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => return Err(bad(path, "hard link target missing")),
            Err(e) => return Err(self.io_err("stat", target, e)),
        }
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        linkat(&*target_dir, target_name, &*dir, name, AtFlags::empty())
            .map_err(|e| self.io_err("link", path, e))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn fifo(&mut self, path: &[u8], meta: &Meta) -> Result<(), ImageError> {
        let (dir, name) = self.parent(path)?;
        self.clear(&dir, name, path)?;
        mknodat(
            &*dir,
            name,
            SFlag::S_IFIFO,
            Mode::from_bits_truncate(0o600),
            0,
        )
        .map_err(|e| self.io_err("mkfifo", path, e))?;
        self.chown_chmod_at(&dir, name, meta.uid, meta.gid, meta.mode, path)?;
        utimensat(
            &*dir,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io_err("set times", path, e))?;
        self.stats.fifos += 1;
        Ok(())
    }

    /// chown + chmod of a non-symlink just created at `dir/name`.
    fn chown_chmod_at(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        uid: u32,
        gid: u32,
        mode: u32,
        path: &[u8],
    ) -> Result<(), ImageError> {
        fchownat(
            dir,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io_err("chown", path, e))?;
        // The entry was created by this unpacker and is no symlink.
        fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| self.io_err("chmod", path, e))
    }

    fn whiteout(&mut self, path: &[u8]) -> Result<(), ImageError> {
        let (dir, name) = self.parent(path)?;
        match fstatat(&*dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_whiteout = st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0;
                if !is_whiteout {
                    // Whiteouts hide lower layers only; this layer's own entry stays.
                    tracing::debug!(path = %String::from_utf8_lossy(path), "whiteout of an entry of the same layer ignored");
                }
                return Ok(());
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(self.io_err("stat", path, e)),
        }
        mknodat(&*dir, name, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(|e| self.io_err("mknod whiteout", path, e))?;
        self.chown_chmod_at(&dir, name, self.shift.base, self.shift.base, 0, path)?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    fn opaque(&mut self, dir: &[u8], entry: &[u8]) -> Result<(), ImageError> {
        let fd = self.walk(dir, true, entry)?;
        fsetxattr(fd.as_fd(), OPAQUE_XATTR.as_bytes(), b"y")
            .map_err(|e| self.io_err("set opaque xattr", dir, e))?;
        self.stats.opaque_dirs += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        self.parent_cache = None;
        let mtimes = std::mem::take(&mut self.dir_mtimes);
        for (path, mtime) in &mtimes {
            let fd = self.walk(path, false, path)?;
            futimens(&*fd, mtime, mtime).map_err(|e| self.io_err("set times", path, e))?;
        }
        tracing::debug!(stats = ?self.stats, root = %self.root_path.display(), "layer unpacked");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pax_times() {
        assert_eq!(parse_pax_time(b"12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(
            parse_pax_time(b"12.5"),
            Some(TimeSpec::new(12, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12.000000001"), Some(TimeSpec::new(12, 1)));
        assert_eq!(
            parse_pax_time(b"-1.5"),
            Some(TimeSpec::new(-2, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"x"), None);
        assert_eq!(parse_pax_time(b"1.x"), None);
    }
}
