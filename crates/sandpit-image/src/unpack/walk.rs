//! Resolving entry paths inside the layer: normalised, opened one
//! component at a time from the layer root's fd with `O_NOFOLLOW`, so that
//! no entry is ever written through a symlink (see `unpack.rs`).

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::{bad, Unpacker};
use crate::ImageError;

/// Normalises a tar path: drops empty, `.` and leading `/` components;
/// refuses `..` and NUL. `""` is the layer root.
pub(super) fn normalize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(raw.len());
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => continue,
            b".." => return Err("path contains \"..\""),
            c if c.contains(&0) => return Err("path contains NUL"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// Splits a normalised non-root path into parent and name.
pub(super) fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

impl Unpacker {
    /// Opens directory `dir` (normalised, "" = root) one component at a time
    /// without following symlinks, creating missing components when `create`.
    pub(super) fn walk(
        &mut self,
        dir: &[u8],
        create: bool,
        entry: &[u8],
    ) -> Result<Rc<OwnedFd>, ImageError> {
        let mut cur = self.root.clone();
        if dir.is_empty() {
            return Ok(cur);
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut end = 0;
        for component in dir.split(|b| *b == b'/') {
            end += component.len();
            let here = &dir[..end];
            let next = match openat(&*cur, component, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => self.mkdir_implicit(&cur, component, here)?,
                Err(Errno::ENOENT) => return Err(bad(entry, "parent directory missing")),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let st = fstatat(&*cur, component, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
                    let file_type = st.map(|st| st.st_mode & libc::S_IFMT);
                    let whiteout =
                        file_type == Some(libc::S_IFCHR) && st.is_some_and(|st| st.st_rdev == 0);
                    if create && whiteout {
                        // `.wh.d` then `d/f`: the directory is recreated.
                        unlinkat(&*cur, component, UnlinkatFlags::NoRemoveDir)
                            .map_err(|e| self.io_err("unlink", here, e))?;
                        self.mkdir_implicit(&cur, component, here)?
                    } else if file_type == Some(libc::S_IFLNK) {
                        return Err(bad(entry, "path goes through a symlink"));
                    } else {
                        return Err(bad(entry, "parent is not a directory"));
                    }
                }
                Err(e) => return Err(self.io_err("open", here, e)),
            };
            cur = Rc::new(next);
            end += 1;
        }
        Ok(cur)
    }

    /// Creates directory `dir/name` as an implicit parent: shifted root, 0755.
    fn mkdir_implicit(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        path: &[u8],
    ) -> Result<OwnedFd, ImageError> {
        mkdirat(dir, name, Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io_err("mkdir", path, e))?;
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd =
            openat(dir, name, flags, Mode::empty()).map_err(|e| self.io_err("open", path, e))?;
        self.set_owner_mode(fd.as_fd(), self.shift.base, self.shift.base, 0o755, path)?;
        Ok(fd)
    }

    /// The parent directory of `path` (created when missing) and the name.
    pub(super) fn parent<'p>(
        &mut self,
        path: &'p [u8],
    ) -> Result<(Rc<OwnedFd>, &'p [u8]), ImageError> {
        let (dir, name) = split_parent(path);
        if dir.is_empty() {
            return Ok((self.root.clone(), name));
        }
        if let Some((cached, fd)) = &self.parent_cache {
            if cached.as_slice() == dir {
                return Ok((fd.clone(), name));
            }
        }
        let fd = self.walk(dir, true, path)?;
        self.parent_cache = Some((dir.to_vec(), fd.clone()));
        Ok((fd, name))
    }

    /// Removes what is at `dir/name` so that a new entry can take its place
    /// (later entries win).
    pub(super) fn clear(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        path: &[u8],
    ) -> Result<(), ImageError> {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(self.io_err("stat", path, e)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            // The parents of `path` were just opened without following
            // symlinks, and only this unpacker writes under the root.
            let full = self.root_path.join(OsStr::from_bytes(path));
            std::fs::remove_dir_all(&full).map_err(|e| ImageError::io("remove", &full, e))?;
            self.parent_cache = None;
            self.dir_mtimes.retain(|k, _| {
                !(k.as_slice() == path || (k.starts_with(path) && k.get(path.len()) == Some(&b'/')))
            });
        } else {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
                .map_err(|e| self.io_err("unlink", path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize(b"./a/b/").unwrap(), b"a/b");
        assert_eq!(normalize(b"/etc/x").unwrap(), b"etc/x");
        assert_eq!(normalize(b"//a//./b").unwrap(), b"a/b");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(normalize(b"").unwrap(), b"");
        assert_eq!(normalize(b"a/..b/c..").unwrap(), b"a/..b/c..");
        assert!(normalize(b"../x").is_err());
        assert!(normalize(b"a/../../x").is_err());
        assert!(normalize(b"a/..").is_err());
        assert!(normalize(b"a\0b").is_err());
    }
}
