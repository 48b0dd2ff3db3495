//! Copying a sandbox's overlay writable layer (its "upper" dir) into a new
//! layer directory, and hashing the equivalent OCI layer tar in the same
//! pass (never writing a tar anywhere).
//!
//! The upper dir belongs to a sandbox: its names, symlinks, sizes and
//! depth are hostile. It is walked by directory fds, every component opened
//! with `O_NOFOLLOW` and checked with `fstat` on the fd that was opened, so
//! no symlink is ever followed and no path is resolved twice; depth, entry
//! count and bytes are bounded.
//!
//! The copy keeps what overlayfs needs for the layer to be a lower dir:
//! whiteouts (0/0 character devices) and opaque directories
//! (`trusted.overlay.opaque=y`), ownership as stored (already shifted into
//! the sandboxes' range; ids outside it are clamped to its nobody), modes,
//! mtimes, hard links within the layer, and the xattrs the unpacker keeps
//! (`user.*`, `security.capability`, POSIX ACLs). Skipped (counted): other
//! device nodes, FIFOs and sockets. Refused: overlayfs redirects and
//! metacopy files (the data would be elsewhere; the runtime never enables
//! them).
//!
//! The tar form, whose sha256 is the layer's diff id: GNU headers, entries
//! depth first in byte order of their names, a directory before its
//! children; whiteouts as empty `.wh.<name>` files (mode 0, ids 0, mtime 0),
//! an opaque directory's marker `.wh..wh..opq` right after it; ids
//! unshifted; kept xattrs as `SCHILY.xattr.*` PAX records (values as
//! stored); hard links as link entries to the first path; no entry for the
//! root.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, mknodat, FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use tar::{EntryType, Header};

use crate::{DigestWriter, IdShift, ImageError};

/// Bytes of file content a commit copies at most.
pub const COMMIT_MAX_BYTES: u64 = 64 << 30;
/// Entries (files, directories, links, whiteouts) a commit copies at most.
pub const COMMIT_MAX_ENTRIES: u64 = 4_000_000;
/// Directory depth a commit descends to at most.
pub const COMMIT_MAX_DEPTH: usize = 512;

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
/// Overlayfs features that keep a file's data or a directory's content
/// elsewhere: a copy of the upper dir alone would be wrong.
const REFUSED_XATTRS: [&[u8]; 2] = [b"trusted.overlay.redirect", b"trusted.overlay.metacopy"];
const XATTR_LIST_MAX: usize = 64 << 10;
const XATTR_VALUE_MAX: usize = 64 << 10;
const HASH_BUF: usize = 1 << 20;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CopyStats {
    /// Entries copied (the root excluded), whiteouts and links included.
    pub(crate) entries: u64,
    /// Bytes of regular file content.
    pub(crate) content_bytes: u64,
    /// Device nodes, FIFOs and sockets left out.
    pub(crate) skipped: u64,
}

fn err<'a>(op: &'static str, path: &'a [u8]) -> impl FnOnce(Errno) -> ImageError + 'a {
    move |e| ImageError::io(op, shown(path), e.into())
}

fn shown(path: &[u8]) -> String {
    format!("upper/{}", String::from_utf8_lossy(path))
}

fn refused(path: &[u8], reason: &'static str) -> ImageError {
    ImageError::BadEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn xattr_kept(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// `flistxattr(2)`, bounded.
fn list_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; XATTR_LIST_MAX];
    // SAFETY: `fd` is open for the call and `buf` is valid for its length.
    let n = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(vec![]),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// `fgetxattr(2)`, bounded; `None` when absent.
fn get_xattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; XATTR_VALUE_MAX];
    // SAFETY: `fd` is open for the call, `cname` is NUL-terminated and
    // `buf` is valid for its length.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            cname.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// The walker: one source tree in, one layer root and one tar hash out.
pub(crate) struct Copier {
    shift: IdShift,
    tar: tar::Builder<DigestWriter>,
    /// (device, inode) of multiply-linked files already copied -> path.
    links: HashMap<(u64, u64), Vec<u8>>,
    dest_root: OwnedFd,
    pub(crate) stats: CopyStats,
}

impl Copier {
    /// `dest` must be an empty directory only this copier writes to; it
    /// becomes the layer root (owned by the shifted root, mode 0755, as the
    /// unpacker makes it).
    pub(crate) fn new(dest: &Path, shift: IdShift) -> Result<Self, ImageError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dest_root = openat(nix::fcntl::AT_FDCWD, dest, flags, Mode::empty())
            .map_err(|e| ImageError::io("open", dest, e.into()))?;
        fchown(
            &dest_root,
            Some(Uid::from_raw(shift.base)),
            Some(Gid::from_raw(shift.base)),
        )
        .map_err(|e| ImageError::io("chown", dest, e.into()))?;
        nix::sys::stat::fchmod(&dest_root, Mode::from_bits_truncate(0o755))
            .map_err(|e| ImageError::io("chmod", dest, e.into()))?;
        Ok(Self {
            shift,
            tar: tar::Builder::new(DigestWriter::new()),
            links: HashMap::new(),
            dest_root,
            stats: CopyStats::default(),
        })
    }

    /// Copies the tree under `upper` and returns the tar's digest.
    pub(crate) fn copy(mut self, upper: &Path) -> Result<(crate::Digest, CopyStats), ImageError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let src = openat(nix::fcntl::AT_FDCWD, upper, flags, Mode::empty())
            .map_err(|e| ImageError::io("open", upper, e.into()))?;
        let dest = self
            .dest_root
            .try_clone()
            .map_err(|e| ImageError::io("dup", upper, e))?;
        self.dir(&src, &dest, b"", 0)?;
        let stats = self.stats;
        let digest = self
            .tar
            .into_inner()
            .map_err(|e| ImageError::io("hash", upper, e))?
            .finish();
        Ok((digest, stats))
    }

    /// Copies the entries of directory `src` (tar path `path`) into `dest`.
    fn dir(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        path: &[u8],
        depth: usize,
    ) -> Result<(), ImageError> {
        if depth >= COMMIT_MAX_DEPTH {
            return Err(refused(path, "directory tree too deep"));
        }
        let mut names = Vec::new();
        {
            let dup = src
                .try_clone()
                .map_err(|e| ImageError::io("dup", shown(path), e))?;
            let mut dir = Dir::from_fd(dup).map_err(err("list", path))?;
            for entry in dir.iter() {
                let entry = entry.map_err(err("list", path))?;
                let name = entry.file_name().to_bytes();
                if name != b"." && name != b".." {
                    names.push(name.to_vec());
                }
            }
        }
        // A stable order makes the same tree hash to the same diff id.
        names.sort_unstable();
        for name in names {
            self.stats.entries += 1;
            if self.stats.entries > COMMIT_MAX_ENTRIES {
                return Err(refused(path, "too many entries"));
            }
            self.entry(src, dest, path, &name, depth)?;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        parent: &[u8],
        name: &[u8],
        depth: usize,
    ) -> Result<(), ImageError> {
        let path = join(parent, name);
        let st = fstatat(src, OsStr::from_bytes(name), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(err("stat", &path))?;
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        match kind {
            SFlag::S_IFDIR => self.directory(src, dest, &path, name, depth),
            SFlag::S_IFREG => self.file(src, dest, &path, name, &st),
            SFlag::S_IFLNK => self.symlink(src, dest, &path, name, &st),
            SFlag::S_IFCHR if st.st_rdev == 0 => self.whiteout(dest, parent, &path, name, &st),
            _ => {
                tracing::debug!(path = %shown(&path), "special file left out of the commit");
                self.stats.skipped += 1;
                self.stats.entries -= 1;
                Ok(())
            }
        }
    }

    fn open_src(
        &self,
        src: &OwnedFd,
        path: &[u8],
        name: &[u8],
        extra: OFlag,
    ) -> Result<(OwnedFd, FileStat), ImageError> {
        // O_NONBLOCK: a FIFO swapped in after the stat must not hang us;
        // the fstat below is what counts.
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK
            | extra;
        let fd = openat(src, OsStr::from_bytes(name), flags, Mode::empty())
            .map_err(err("open", path))?;
        let st = fstat(&fd).map_err(err("stat", path))?;
        Ok((fd, st))
    }

    /// Ids as stored in the layer (in the range, else its nobody) and as the
    /// tar spells them (unshifted).
    fn ids(&self, st: &FileStat) -> ((u32, u32), (u64, u64)) {
        let one = |id: u32| {
            let s = self.shift;
            if id >= s.base && id - s.base < s.count {
                (id, u64::from(id - s.base))
            } else {
                (s.overflow_id(), u64::from(s.overflow_id() - s.base))
            }
        };
        let (u, tu) = one(st.st_uid);
        let (g, tg) = one(st.st_gid);
        ((u, g), (tu, tg))
    }

    fn header(&self, kind: EntryType, st: &FileStat, size: u64) -> Header {
        let (_, (uid, gid)) = self.ids(st);
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        h.set_size(size);
        h
    }

    /// Copies the kept xattrs of `src` onto `dest`; returns them for the
    /// tar's PAX records. Refuses overlayfs redirects and metacopy.
    fn xattrs(
        &mut self,
        src: BorrowedFd<'_>,
        dest: BorrowedFd<'_>,
        path: &[u8],
    ) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
        let io_err = |op| move |e| ImageError::io(op, shown(path), e);
        let mut kept = Vec::new();
        let mut names = list_xattrs(src).map_err(io_err("list xattrs"))?;
        names.sort_unstable();
        for name in names {
            if REFUSED_XATTRS.contains(&name.as_slice()) {
                return Err(refused(path, "overlayfs redirect or metacopy"));
            }
            let Ok(text) = std::str::from_utf8(&name) else {
                continue;
            };
            if !xattr_kept(&name) {
                continue;
            }
            let Some(value) = get_xattr(src, &name).map_err(io_err("read xattr"))? else {
                continue;
            };
            crate::unpack::fsetxattr(dest, &name, &value).map_err(io_err("write xattr"))?;
            kept.push((format!("SCHILY.xattr.{text}"), value));
        }
        Ok(kept)
    }

    fn pax(&mut self, records: &[(String, Vec<u8>)], path: &[u8]) -> Result<(), ImageError> {
        if records.is_empty() {
            return Ok(());
        }
        self.tar
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|e| ImageError::io("hash", shown(path), e))
    }

    fn append(&mut self, mut h: Header, path: &[u8], data: impl Read) -> Result<(), ImageError> {
        self.tar
            .append_data(&mut h, Path::new(OsStr::from_bytes(path)), data)
            .map_err(|e| ImageError::io("hash", shown(path), e))
    }

    fn set_meta(&self, fd: BorrowedFd<'_>, st: &FileStat, path: &[u8]) -> Result<(), ImageError> {
        let ((uid, gid), _) = self.ids(st);
        fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(err("chown", path))?;
        // After chown, which clears setuid/setgid bits.
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777))
            .map_err(err("chmod", path))?;
        let times = [
            TimeSpec::new(st.st_atime, st.st_atime_nsec),
            TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        ];
        nix::sys::stat::futimens(fd, &times[0], &times[1]).map_err(err("set times", path))
    }

    fn directory(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        path: &[u8],
        name: &[u8],
        depth: usize,
    ) -> Result<(), ImageError> {
        let (sfd, st) = self.open_src(src, path, name, OFlag::O_DIRECTORY)?;
        let name_os = OsStr::from_bytes(name);
        mkdirat(dest, name_os, Mode::from_bits_truncate(0o700)).map_err(err("mkdir", path))?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dfd = openat(dest, name_os, flags, Mode::empty()).map_err(err("open", path))?;
        let opaque = get_xattr(sfd.as_fd(), OPAQUE_XATTR)
            .map_err(|e| ImageError::io("read xattr", shown(path), e))?
            .is_some_and(|v| v == b"y");
        let records = self.xattrs(sfd.as_fd(), dfd.as_fd(), path)?;
        if opaque {
            crate::unpack::fsetxattr(dfd.as_fd(), OPAQUE_XATTR, b"y")
                .map_err(|e| ImageError::io("write xattr", shown(path), e))?;
        }
        self.pax(&records, path)?;
        self.append(self.header(EntryType::Directory, &st, 0), path, io::empty())?;
        if opaque {
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0);
            h.set_mtime(0);
            h.set_size(0);
            self.append(h, &join(path, b".wh..wh..opq"), io::empty())?;
        }
        self.dir(&sfd, &dfd, path, depth + 1)?;
        // Last: the children's creation changed the directory's mtime.
        self.set_meta(dfd.as_fd(), &st, path)
    }

    fn file(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        path: &[u8],
        name: &[u8],
        lst: &FileStat,
    ) -> Result<(), ImageError> {
        if lst.st_nlink > 1 {
            if let Some(first) = self.links.get(&(lst.st_dev, lst.st_ino)).cloned() {
                return self.hard_link(dest, path, name, lst, &first);
            }
        }
        let (sfd, st) = self.open_src(src, path, name, OFlag::empty())?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(refused(path, "changed type while copied"));
        }
        let dfd = openat(
            dest,
            OsStr::from_bytes(name),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(err("create", path))?;
        let size = self.copy_data(&sfd, &dfd, path)?;
        let records = self.xattrs(sfd.as_fd(), dfd.as_fd(), path)?;
        self.set_meta(dfd.as_fd(), &st, path)?;
        // The tar hashes what was stored: read back the copy (just written,
        // in the page cache), exactly `size` bytes.
        self.pax(&records, path)?;
        let header = self.header(EntryType::Regular, &st, size);
        let reader = PositionalReader {
            fd: dfd.as_fd(),
            offset: 0,
            left: size,
        };
        self.append(header, path, reader)?;
        if st.st_nlink > 1 {
            self.links.insert((st.st_dev, st.st_ino), path.to_vec());
        }
        Ok(())
    }

    /// Content bytes the commit may still copy; an error once none are
    /// left.
    fn budget(&self) -> Result<u64, ImageError> {
        match COMMIT_MAX_BYTES.saturating_sub(self.stats.content_bytes) {
            0 => Err(ImageError::TooLarge {
                limit: COMMIT_MAX_BYTES,
            }),
            left => Ok(left),
        }
    }

    /// `copy_file_range` until the source ends (its size may not be what
    /// the stat said when the sandbox is not frozen), within the bound.
    fn copy_data(&mut self, src: &OwnedFd, dest: &OwnedFd, path: &[u8]) -> Result<u64, ImageError> {
        let mut copied = 0u64;
        loop {
            let left = self.budget()?;
            let chunk = left.min(1 << 30) as usize;
            // SAFETY: both fds are open for the call; null offsets use and
            // advance the files' own positions.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    std::ptr::null_mut(),
                    dest.as_raw_fd(),
                    std::ptr::null_mut(),
                    chunk,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Another file system (a writable layer on its own
                    // disk): the kernel copies only within one.
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP) if copied == 0 => {
                        return self.read_write(src, dest, path);
                    }
                    _ => return Err(ImageError::io("copy", shown(path), e)),
                }
            }
            if n == 0 {
                return Ok(copied);
            }
            copied += n as u64;
            self.stats.content_bytes += n as u64;
        }
    }

    /// What `copy_data` does, through a buffer: for files on another file
    /// system than the store.
    fn read_write(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        path: &[u8],
    ) -> Result<u64, ImageError> {
        let mut buf = vec![0u8; 256 << 10];
        let mut copied = 0u64;
        loop {
            let left = self.budget()?;
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            // SAFETY: `buf` is valid for `want` bytes; the fd is open.
            let n = unsafe { libc::read(src.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ImageError::io("copy", shown(path), e));
            }
            if n == 0 {
                return Ok(copied);
            }
            let n = n as usize;
            let mut at = 0;
            while at < n {
                // SAFETY: `buf[at..n]` is initialised and valid; the fd is open.
                let w =
                    unsafe { libc::write(dest.as_raw_fd(), buf[at..n].as_ptr().cast(), n - at) };
                if w < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(ImageError::io("copy", shown(path), e));
                }
                at += w as usize;
            }
            copied += n as u64;
            self.stats.content_bytes += n as u64;
        }
    }

    fn hard_link(
        &mut self,
        dest: &OwnedFd,
        path: &[u8],
        name: &[u8],
        st: &FileStat,
        first: &[u8],
    ) -> Result<(), ImageError> {
        // `first` is a path of directories this copier made itself (no
        // symlink among them), relative to the layer root.
        linkat(
            &self.dest_root,
            OsStr::from_bytes(first),
            dest,
            OsStr::from_bytes(name),
            AtFlags::empty(),
        )
        .map_err(err("link", path))?;
        let mut h = self.header(EntryType::Link, st, 0);
        self.tar
            .append_link(
                &mut h,
                Path::new(OsStr::from_bytes(path)),
                Path::new(OsStr::from_bytes(first)),
            )
            .map_err(|e| ImageError::io("hash", shown(path), e))
    }

    fn symlink(
        &mut self,
        src: &OwnedFd,
        dest: &OwnedFd,
        path: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> Result<(), ImageError> {
        let name_os = OsStr::from_bytes(name);
        // The target is data: stored verbatim, resolved only inside a
        // sandbox, never by us.
        let target = readlinkat(src, name_os).map_err(err("readlink", path))?;
        symlinkat(target.as_os_str(), dest, name_os).map_err(err("symlink", path))?;
        let ((uid, gid), _) = self.ids(st);
        fchownat(
            dest,
            name_os,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(err("chown", path))?;
        let times = [
            TimeSpec::new(st.st_atime, st.st_atime_nsec),
            TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        ];
        nix::sys::stat::utimensat(
            dest,
            name_os,
            &times[0],
            &times[1],
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(err("set times", path))?;
        let mut h = self.header(EntryType::Symlink, st, 0);
        self.tar
            .append_link(
                &mut h,
                Path::new(OsStr::from_bytes(path)),
                Path::new(target.as_os_str()),
            )
            .map_err(|e| ImageError::io("hash", shown(path), e))
    }

    fn whiteout(
        &mut self,
        dest: &OwnedFd,
        parent: &[u8],
        path: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> Result<(), ImageError> {
        mknodat(
            dest,
            OsStr::from_bytes(name),
            SFlag::S_IFCHR,
            Mode::empty(),
            0,
        )
        .map_err(err("mknod", path))?;
        let ((uid, gid), _) = self.ids(st);
        fchownat(
            dest,
            OsStr::from_bytes(name),
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(err("chown", path))?;
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name);
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0);
        h.set_mtime(0);
        h.set_size(0);
        self.append(h, &join(parent, &wh), io::empty())
    }
}

/// Reads `left` bytes of a file from `offset` with `pread`, leaving the
/// file position alone; fails when the file is shorter.
struct PositionalReader<'a> {
    fd: BorrowedFd<'a>,
    offset: u64,
    left: u64,
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(HASH_BUF as u64) as usize);
        let n = nix::sys::uio::pread(self.fd, &mut buf[..want], self.offset as i64)
            .map_err(io::Error::from)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}
