//! [`archive`]: a volume directory (hostile: a sandbox wrote it, and may
//! still be writing it) into a deterministic zstd-compressed tar.
//!
//! The walk never resolves a path: the root is opened with `O_NOFOLLOW`,
//! every entry by name from its parent's directory fd (`openat` with
//! `O_NOFOLLOW`), and what is archived is the `fstat` of the fd that was
//! opened, compared with the `fstatat` that classified the name (same inode
//! and type, or [`SnapshotError::Changed`]). Symlinks are read with
//! `readlinkat`, never followed. Depth, entry count and content bytes are
//! bounded by [`Limits`] before anything is read.
//!
//! Format (same tree => same bytes):
//! - ustar headers, entries depth first with the names of each directory in
//!   byte order, a directory before its content; the root is `./`,
//!   directories end in `/`, other names have no `./` prefix;
//! - a name or link target over 100 bytes gets a pax `x` header
//!   (`path`/`linkpath`) named `././@PaxHeader`, mtime 0;
//! - uid/gid UNshifted (host id - base); an id outside the shift range is
//!   archived as 65534 (the container's nobody, what the kernel shows for
//!   it inside the sandbox's user namespace) and counted;
//! - mode `& 0o7777`, mtime in whole seconds (clamped to 0..8^11), no
//!   user/group names, no xattrs, no atime/ctime;
//! - hard links are stored as separate copies; sockets, fifos and device
//!   nodes are skipped and counted;
//! - zstd level 1, single-threaded (deterministic output).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode};
use sandpit_image::IdShift;
use tar::{EntryType, Header};

use crate::{check_shift, ArchiveStats, Limits, SnapshotError};

/// The id out-of-range host ids are archived as.
const NOBODY: u32 = 65534;
/// Name and link fields of a ustar header.
const USTAR_NAME_LEN: usize = 100;
/// Largest mtime an 11-digit octal field holds.
const MAX_MTIME: u64 = 0o77777777777;
const COPY_BUF: usize = 256 * 1024;
/// The walk recurses once per directory level: whatever the limits say, it
/// stops here, well inside a 2 MiB stack (tokio's blocking pool threads).
pub(crate) const MAX_DEPTH: u32 = 256;

/// Archives `dir` (see the module docs for the format) into `out`.
pub fn archive(
    dir: &Path,
    shift: IdShift,
    limits: &Limits,
    out: impl Write,
) -> Result<ArchiveStats, SnapshotError> {
    check_shift(&shift)?;
    let root = openat(
        nix::fcntl::AT_FDCWD,
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SnapshotError::io("open", dir, e.into()))?;
    let st = fstat(&root).map_err(|e| SnapshotError::io("stat", dir, e.into()))?;
    let encoder = zstd::Encoder::new(out, 1).map_err(SnapshotError::Write)?;
    let mut walker = Walker {
        tar: tar::Builder::new(encoder),
        shift,
        limits: Limits {
            max_depth: limits.max_depth.min(MAX_DEPTH),
            ..*limits
        },
        // The root counts.
        entries: 1,
        stats: ArchiveStats::default(),
    };
    walker.dir(&root, &st, &mut Vec::new(), 0)?;
    let encoder = walker.tar.into_inner().map_err(SnapshotError::Write)?;
    let mut out = encoder.finish().map_err(SnapshotError::Write)?;
    out.flush().map_err(SnapshotError::Write)?;
    Ok(walker.stats)
}

struct Walker<W: Write> {
    tar: tar::Builder<zstd::Encoder<'static, W>>,
    shift: IdShift,
    limits: Limits,
    entries: u64,
    stats: ArchiveStats,
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn changed(path: &[u8]) -> SnapshotError {
    SnapshotError::Changed { path: lossy(path) }
}

fn entry_err(path: &[u8], e: impl Into<io::Error>) -> SnapshotError {
    SnapshotError::Entry {
        path: lossy(path),
        source: e.into(),
    }
}

/// Whether `opened` is the inode `listed` described, of the same type.
fn same(listed: &FileStat, opened: &FileStat) -> bool {
    listed.st_dev == opened.st_dev
        && listed.st_ino == opened.st_ino
        && listed.st_mode & libc::S_IFMT == opened.st_mode & libc::S_IFMT
}

/// One pax record, `"<len> <key>=<value>\n"` where `<len>` counts itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + rest.to_string().len();
    if len.to_string().len() != (len - rest) {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Copies `field.len()` bytes at most of `value` into a header field.
fn set_field(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
    field[n..].fill(0);
}

/// Reads exactly `left` bytes of a file, or fails: a file that shrank
/// after its header was written would corrupt the tar.
struct Exact<'a> {
    file: &'a mut File,
    left: u64,
    short: bool,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

impl<W: Write> Walker<W> {
    /// Container id of host id `id`.
    fn unshift(&self, id: u32) -> (u64, bool) {
        match id.checked_sub(self.shift.base) {
            Some(c) if c < self.shift.count => (u64::from(c), false),
            _ => (u64::from(NOBODY), true),
        }
    }

    fn count_entry(&mut self) -> Result<(), SnapshotError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(SnapshotError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Writes one header (and a pax header before it when needed), then
    /// `data`.
    fn append(
        &mut self,
        kind: EntryType,
        path: &[u8],
        link: Option<&[u8]>,
        st: &FileStat,
        size: u64,
        data: impl Read,
    ) -> io::Result<()> {
        let mut pax = Vec::new();
        if path.len() > USTAR_NAME_LEN {
            pax_record(&mut pax, "path", path);
        }
        if let Some(link) = link.filter(|l| l.len() > USTAR_NAME_LEN) {
            pax_record(&mut pax, "linkpath", link);
        }
        if !pax.is_empty() {
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::XHeader);
            set_field(&mut h.as_old_mut().name, b"././@PaxHeader");
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(pax.len() as u64);
            h.set_cksum();
            self.tar.append(&h, pax.as_slice())?;
        }
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        set_field(&mut h.as_old_mut().name, path);
        if let Some(link) = link {
            set_field(&mut h.as_old_mut().linkname, link);
        }
        let (uid, uid_out) = self.unshift(st.st_uid);
        let (gid, gid_out) = self.unshift(st.st_gid);
        if uid_out || gid_out {
            self.stats.unmapped_ids += 1;
        }
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mode(st.st_mode & 0o7777);
        h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0).min(MAX_MTIME));
        h.set_size(size);
        h.set_cksum();
        self.tar.append(&h, data)
    }

    /// Archives the directory open as `fd` (at `path`, "" for the root) and
    /// everything below it.
    fn dir(
        &mut self,
        fd: &OwnedFd,
        st: &FileStat,
        path: &mut Vec<u8>,
        depth: u32,
    ) -> Result<(), SnapshotError> {
        let name: Vec<u8> = if path.is_empty() {
            b"./".to_vec()
        } else {
            [path.as_slice(), b"/"].concat()
        };
        self.append(EntryType::Directory, &name, None, st, 0, io::empty())
            .map_err(SnapshotError::Write)?;
        self.stats.dirs += 1;

        // Names first (bounded by the entry limit), then in byte order.
        let dup = fd.try_clone().map_err(|e| entry_err(path, e))?;
        let mut listing = Dir::from_fd(dup).map_err(|e| entry_err(path, e))?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let entry = entry.map_err(|e| entry_err(path, e))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            self.count_entry()?;
            names.push(name.to_vec());
        }
        drop(listing);
        names.sort_unstable();

        for name in names {
            let base = path.len();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            let result = self.child(fd, &name, path, depth);
            path.truncate(base);
            result?;
        }
        Ok(())
    }

    fn child(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        path: &mut Vec<u8>,
        depth: u32,
    ) -> Result<(), SnapshotError> {
        let listed = match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(changed(path)),
            Err(e) => return Err(entry_err(path, e)),
        };
        match listed.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if depth + 1 > self.limits.max_depth {
                    return Err(SnapshotError::TooDeep {
                        limit: self.limits.max_depth,
                    });
                }
                let flags =
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                let fd = match openat(parent, name, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {
                        return Err(changed(path))
                    }
                    Err(e) => return Err(entry_err(path, e)),
                };
                let st = fstat(&fd).map_err(|e| entry_err(path, e))?;
                if !same(&listed, &st) {
                    return Err(changed(path));
                }
                self.dir(&fd, &st, path, depth + 1)
            }
            libc::S_IFREG => self.file(parent, name, path, &listed),
            libc::S_IFLNK => {
                let target = match readlinkat(parent, name) {
                    Ok(t) => t,
                    Err(Errno::ENOENT | Errno::EINVAL) => return Err(changed(path)),
                    Err(e) => return Err(entry_err(path, e)),
                };
                let target = target.as_bytes().to_vec();
                self.append(
                    EntryType::Symlink,
                    path,
                    Some(&target),
                    &listed,
                    0,
                    io::empty(),
                )
                .map_err(SnapshotError::Write)?;
                self.stats.symlinks += 1;
                Ok(())
            }
            _ => {
                tracing::debug!(path = %lossy(path), "skipping socket, fifo or device node");
                self.stats.skipped += 1;
                Ok(())
            }
        }
    }

    fn file(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        path: &[u8],
        listed: &FileStat,
    ) -> Result<(), SnapshotError> {
        // O_NONBLOCK: a fifo swapped in after the fstatat must not block
        // the open; O_NOCTTY: nor become our terminal.
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY;
        let fd = match openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ELOOP) => return Err(changed(path)),
            Err(e) => return Err(entry_err(path, e)),
        };
        let st = fstat(&fd).map_err(|e| entry_err(path, e))?;
        if !same(listed, &st) {
            return Err(changed(path));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        // Sparse files count at their apparent size: that is what a
        // restore writes.
        let total = self.stats.content_bytes.saturating_add(size);
        if total > self.limits.max_content_bytes {
            return Err(SnapshotError::TooLarge {
                limit: self.limits.max_content_bytes,
            });
        }
        let mut file = File::from(fd);
        let mut exact = Exact {
            file: &mut file,
            left: size,
            short: false,
        };
        let mut buffered = io::BufReader::with_capacity(COPY_BUF, &mut exact);
        let result = self.append(EntryType::Regular, path, None, &st, size, &mut buffered);
        drop(buffered);
        match result {
            Ok(()) => {}
            Err(_) if exact.short => return Err(changed(path)),
            Err(e) => return Err(entry_err(path, e)),
        }
        self.stats.files += 1;
        self.stats.content_bytes = total;
        Ok(())
    }
}
