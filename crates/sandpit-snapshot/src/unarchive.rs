//! [`unarchive`]: a snapshot archive (hostile: a blob store, or whoever can
//! write to it, may have crafted it) into an empty directory.
//!
//! Own code rather than `sandpit-image`'s layer unpacker: that one applies
//! OCI layer semantics (whiteouts from `.wh.` names, absolute names
//! rewritten into the layer, later entries replacing earlier ones), which
//! would let a volume's file named `.wh.x` turn into a whiteout. This one is
//! strict, because the only producer is [`crate::archive`]:
//!
//! - **Refused** (error; [`crate::restore_dir`] empties the directory): an
//!   absolute name, a `..`, `.` or empty component, NUL; an entry whose
//!   parent is missing (parents come first in our archives), a symlink or
//!   not a directory (parents are opened one component at a time with
//!   `O_NOFOLLOW` from a directory fd of the root); a second entry with the
//!   same name (everything is created with `O_EXCL`/`mkdirat`/`symlinkat`,
//!   so nothing is ever replaced or written through); hard links (ours
//!   are stored as copies, so a link can never point out of the tree);
//!   fifos, devices, sparse and unknown entry types, pax global headers;
//!   more than [`Limits`] allows (content, entries, depth), and more
//!   decompressed bytes than those limits can explain.
//! - **Kept**: modes with setuid/setgid/sticky (sandboxes run with
//!   `no_new_privs` and shifted ids), mtimes (directories' set when their
//!   content is done), symlink targets verbatim (they resolve inside the
//!   sandbox; nothing here follows them).
//! - **Shifted**: ids become `base + id`; ids outside the range are clamped
//!   ([`IdShift::map`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstatat, futimens, mkdirat, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, symlinkat, Gid, Uid};
use sandpit_image::IdShift;
use tar::EntryType;

use crate::{check_shift, read_error, ArchiveStats, Limits, SnapshotError};

const COPY_BUF: usize = 256 * 1024;
/// Decompressed tar bytes an entry may take besides its content: header,
/// pax header with a long name, padding.
const ENTRY_OVERHEAD: u64 = 4096;
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Unpacks the archive `input` into `dir`, an existing empty directory,
/// shifting ids. On error, what was written stays: [`crate::restore_dir`]
/// empties the directory.
pub fn unarchive(
    input: impl Read,
    dir: &Path,
    shift: IdShift,
    limits: &Limits,
) -> Result<ArchiveStats, SnapshotError> {
    check_shift(&shift)?;
    let root = check_empty(dir)?;
    let decoder = zstd::Decoder::new(input).map_err(SnapshotError::Read)?;
    // The tar reader buffers whole pax headers in memory: bound what the
    // archive can inflate to by what the limits allow.
    let cap = limits
        .max_content_bytes
        .saturating_add(limits.max_entries.saturating_mul(ENTRY_OVERHEAD))
        .saturating_add(1 << 20);
    let capped = Capped {
        inner: decoder,
        left: cap,
        limit: limits.max_content_bytes,
    };
    let mut archive = tar::Archive::new(capped);
    let mut u = Unpacker {
        stack: vec![Frame {
            path: Vec::new(),
            fd: root,
            mtime: None,
        }],
        shift,
        limits: *limits,
        entries: 0,
        stats: ArchiveStats::default(),
        buf: vec![0; COPY_BUF],
    };
    for entry in archive.entries().map_err(read_error)? {
        let mut entry = entry.map_err(read_error)?;
        u.entry(&mut entry)?;
    }
    while let Some(frame) = u.stack.pop() {
        frame.finish()?;
    }
    Ok(u.stats)
}

/// Opens `dir` (not through a symlink) and checks that it is empty.
pub(crate) fn check_empty(dir: &Path) -> Result<OwnedFd, SnapshotError> {
    let fd = openat(nix::fcntl::AT_FDCWD, dir, DIR_FLAGS, Mode::empty())
        .map_err(|e| SnapshotError::io("open", dir, e.into()))?;
    let dup = fd
        .try_clone()
        .map_err(|e| SnapshotError::io("dup", dir, e))?;
    let mut listing = Dir::from_fd(dup).map_err(|e| SnapshotError::io("list", dir, e.into()))?;
    for entry in listing.iter() {
        let entry = entry.map_err(|e| SnapshotError::io("list", dir, e.into()))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            return Err(SnapshotError::NotEmpty { path: dir.into() });
        }
    }
    Ok(fd)
}

/// Removes everything inside `dir`, following no symlink
/// (`std::fs::remove_dir_all` works by directory fds).
pub(crate) fn empty_dir(dir: &Path) -> Result<(), SnapshotError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SnapshotError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| SnapshotError::io("list", dir, e))?;
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(|e| SnapshotError::io("stat", &path, e))?
            .is_dir();
        let result = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| SnapshotError::io("remove", &path, e))?;
    }
    Ok(())
}

/// Fails reads past `left` decompressed bytes.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other(SnapshotError::TooLarge {
                limit: self.limit,
            }));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// An open directory on the way from the root to the current entry.
struct Frame {
    /// Normalised path, "" for the root.
    path: Vec<u8>,
    fd: OwnedFd,
    /// Set once its content is done; `None` for a directory reopened.
    mtime: Option<TimeSpec>,
}

impl Frame {
    fn finish(self) -> Result<(), SnapshotError> {
        if let Some(t) = self.mtime {
            futimens(&self.fd, &t, &t).map_err(|e| entry_err(&self.path, e))?;
        }
        Ok(())
    }
}

struct Unpacker {
    /// The root, then each directory down to the last entry's parent.
    stack: Vec<Frame>,
    shift: IdShift,
    limits: Limits,
    entries: u64,
    stats: ArchiveStats,
    buf: Vec<u8>,
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn bad(path: &[u8], reason: &'static str) -> SnapshotError {
    SnapshotError::BadEntry {
        path: lossy(path),
        reason,
    }
}

fn entry_err(path: &[u8], e: impl Into<io::Error>) -> SnapshotError {
    SnapshotError::Entry {
        path: lossy(path),
        source: e.into(),
    }
}

/// An entry's name as a relative path ("" for the root): an optional `./`
/// prefix and trailing `/` dropped, anything unusual refused.
pub(crate) fn normalize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("name contains NUL");
    }
    if raw.starts_with(b"/") {
        return Err("absolute name");
    }
    let mut s = raw.strip_prefix(b"./").unwrap_or(raw);
    while let Some(rest) = s.strip_suffix(b"/") {
        s = rest;
    }
    if s.is_empty() || s == b"." {
        return Ok(Vec::new());
    }
    for component in s.split(|b| *b == b'/') {
        match component {
            b".." => return Err("name contains \"..\""),
            b"" | b"." => return Err("name has an empty or \".\" component"),
            _ => {}
        }
    }
    Ok(s.to_vec())
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// Whether directory `dir` is `path` or above it.
fn contains(dir: &[u8], path: &[u8]) -> bool {
    dir.is_empty() || dir == path || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), SnapshotError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(SnapshotError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        let raw = entry.path_bytes().into_owned();
        let path = normalize(&raw).map_err(|reason| bad(&raw, reason))?;
        let kind = entry.header().entry_type();
        let depth = if path.is_empty() {
            0
        } else {
            path.iter().filter(|b| **b == b'/').count() + 1
        };
        // A directory at `max_depth` may hold files (depth + 1).
        let max = self.limits.max_depth as usize + usize::from(!kind.is_dir());
        if depth > max {
            return Err(SnapshotError::TooDeep {
                limit: self.limits.max_depth,
            });
        }
        if path.is_empty() && !kind.is_dir() {
            return Err(bad(&raw, "the root must be a directory"));
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => {
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
                if target.contains(&0) {
                    return Err(bad(&raw, "symlink target contains NUL"));
                }
                let meta = self.meta(entry, &path)?;
                self.symlink(&path, &target, &meta)
            }
            EntryType::Link => Err(bad(&raw, "hard link")),
            _ => Err(bad(&raw, "unsupported entry type")),
        }
    }

    fn meta<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        path: &[u8],
    ) -> Result<Meta, SnapshotError> {
        let h = entry.header();
        let mode = h.mode().map_err(|e| entry_err(path, e))? & 0o7777;
        let (uid, _) = self.shift.map(h.uid().map_err(|e| entry_err(path, e))?);
        let (gid, _) = self.shift.map(h.gid().map_err(|e| entry_err(path, e))?);
        let mtime = h.mtime().map_err(|e| entry_err(path, e))?;
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0),
        })
    }

    /// The open parent of `path` (a non-root normalised path) on top of
    /// the stack, and the name in it.
    fn parent<'p>(&mut self, path: &'p [u8]) -> Result<(usize, &'p [u8]), SnapshotError> {
        let (dir, name) = split_parent(path);
        while self.stack.len() > 1 && !contains(&self.stack[self.stack.len() - 1].path, dir) {
            let frame = self.stack.pop().expect("more than the root");
            frame.finish()?;
        }
        let top = &self.stack[self.stack.len() - 1].path;
        let start = if top.is_empty() { 0 } else { top.len() + 1 };
        if start < dir.len() {
            let mut end = start;
            for component in dir[start..].split(|b| *b == b'/') {
                end += component.len();
                let here = &dir[..end];
                let cur = &self.stack[self.stack.len() - 1].fd;
                let fd = match openat(cur, component, DIR_FLAGS, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => return Err(bad(path, "parent directory missing")),
                    Err(Errno::ELOOP | Errno::ENOTDIR) => {
                        let st = fstatat(cur, component, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
                        return Err(
                            if st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK) {
                                bad(path, "path goes through a symlink")
                            } else {
                                bad(path, "parent is not a directory")
                            },
                        );
                    }
                    Err(e) => return Err(entry_err(here, e)),
                };
                self.stack.push(Frame {
                    path: here.to_vec(),
                    fd,
                    mtime: None,
                });
                end += 1;
            }
        }
        Ok((self.stack.len() - 1, name))
    }

    fn created(path: &[u8], e: Errno) -> SnapshotError {
        match e {
            Errno::EEXIST => bad(path, "duplicate entry"),
            e => entry_err(path, e),
        }
    }

    fn owner_mode(fd: BorrowedFd<'_>, meta: &Meta, path: &[u8]) -> Result<(), SnapshotError> {
        // chown first: it clears setuid/setgid.
        fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| entry_err(path, e))?;
        fchmod(fd, Mode::from_bits_truncate(meta.mode)).map_err(|e| entry_err(path, e))
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &[u8],
        meta: &Meta,
    ) -> Result<(), SnapshotError> {
        let limit = self.limits.max_content_bytes;
        if self.stats.content_bytes.saturating_add(entry.size()) > limit {
            return Err(SnapshotError::TooLarge { limit });
        }
        let (i, name) = self.parent(path)?;
        let fd = openat(
            &self.stack[i].fd,
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| Self::created(path, e))?;
        let mut file = File::from(fd);
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            self.stats.content_bytes += n as u64;
            if self.stats.content_bytes > limit {
                return Err(SnapshotError::TooLarge { limit });
            }
            file.write_all(&self.buf[..n])
                .map_err(|e| entry_err(path, e))?;
        }
        Self::owner_mode(file.as_fd(), meta, path)?;
        futimens(&file, &meta.mtime, &meta.mtime).map_err(|e| entry_err(path, e))?;
        self.stats.files += 1;
        Ok(())
    }

    fn dir(&mut self, path: &[u8], meta: &Meta) -> Result<(), SnapshotError> {
        if path.is_empty() {
            if self.stats.dirs > 0 || self.stats.files > 0 || self.stats.symlinks > 0 {
                return Err(bad(b"./", "root entry not first"));
            }
            let root = &mut self.stack[0];
            Self::owner_mode(root.fd.as_fd(), meta, b"./")?;
            root.mtime = Some(meta.mtime);
            self.stats.dirs += 1;
            return Ok(());
        }
        let (i, name) = self.parent(path)?;
        let parent = &self.stack[i].fd;
        mkdirat(parent, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| Self::created(path, e))?;
        let fd = openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(|e| entry_err(path, e))?;
        Self::owner_mode(fd.as_fd(), meta, path)?;
        self.stack.push(Frame {
            path: path.to_vec(),
            fd,
            mtime: Some(meta.mtime),
        });
        self.stats.dirs += 1;
        Ok(())
    }

    fn symlink(&mut self, path: &[u8], target: &[u8], meta: &Meta) -> Result<(), SnapshotError> {
        let (i, name) = self.parent(path)?;
        let parent = &self.stack[i].fd;
        symlinkat(target, parent, name).map_err(|e| Self::created(path, e))?;
        fchownat(
            parent,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| entry_err(path, e))?;
        utimensat(
            parent,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| entry_err(path, e))?;
        self.stats.symlinks += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_strictly() {
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(normalize(b".").unwrap(), b"");
        assert_eq!(normalize(b"a/b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"./a").unwrap(), b"a");
        assert_eq!(normalize(b"a/..b/c..").unwrap(), b"a/..b/c..");
        for bad in [
            &b"/etc/passwd"[..],
            b"../x",
            b"a/../../x",
            b"a/..",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"//x",
        ] {
            assert!(
                normalize(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn knows_which_dirs_contain_a_path() {
        assert!(contains(b"", b"a"));
        assert!(contains(b"a", b"a"));
        assert!(contains(b"a", b"a/b"));
        assert!(!contains(b"a", b"ab"));
        assert!(!contains(b"a/b", b"a"));
    }
}
