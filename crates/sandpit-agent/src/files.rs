//! File reads and atomic writes on behalf of the host. The agent runs inside
//! the sandbox's root, so every path (and every symlink on it) resolves there.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sandpit_wire::{read_frame, write_frame, ErrorKind, Frame, CHUNK_LEN};

use crate::sys;

/// A failed file operation, as reported to the host.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct FileError {
    /// Category.
    pub(crate) kind: ErrorKind,
    /// `path: reason`.
    pub(crate) message: String,
}

impl FileError {
    fn new(kind: ErrorKind, path: &str, reason: &str) -> Self {
        Self {
            kind,
            message: format!("{path}: {reason}"),
        }
    }

    fn io(path: &str, e: &io::Error) -> Self {
        Self::new(ErrorKind::from_io(e), path, &sys::io_desc(e))
    }

    /// The error frame for the host.
    pub(crate) fn frame(self) -> Frame {
        Frame::Error {
            kind: self.kind,
            message: self.message,
        }
    }
}

/// Resolves a host-given path: relative paths start at the sandbox's cwd.
pub(crate) fn resolve(cwd: &str, path: &str) -> Result<PathBuf, FileError> {
    if path.is_empty() {
        return Err(FileError::new(
            ErrorKind::InvalidArgument,
            path,
            "empty path",
        ));
    }
    if path.contains('\0') {
        return Err(FileError::new(
            ErrorKind::InvalidArgument,
            path,
            "nul byte in path",
        ));
    }
    Ok(Path::new(cwd).join(path))
}

/// Serves `ReadFile`: `FileInfo`, exactly `size` bytes of `Data`, `End`.
pub(crate) fn serve_read(stream: &UnixStream, cwd: &str, path: &str) -> io::Result<()> {
    let mut w = stream;
    let (mut file, size, mode) = match open_for_read(cwd, path) {
        Ok(v) => v,
        Err(e) => return write_frame(&mut w, &e.frame()),
    };
    write_frame(&mut w, &Frame::FileInfo { size, mode })?;
    // The size announced is the size sent: a file growing meanwhile is cut.
    let mut left = size;
    let mut buf = vec![0u8; CHUNK_LEN];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match file.read(&mut buf[..want]) {
            Ok(0) => {
                let e = FileError::new(ErrorKind::Io, path, "file shrank while reading");
                return write_frame(&mut w, &e.frame());
            }
            Ok(n) => {
                write_frame(&mut w, &Frame::Data(buf[..n].to_vec()))?;
                left -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return write_frame(&mut w, &FileError::io(path, &e).frame()),
        }
    }
    write_frame(&mut w, &Frame::End)
}

fn open_for_read(cwd: &str, path: &str) -> Result<(File, u64, u32), FileError> {
    let full = resolve(cwd, path)?;
    // O_NONBLOCK: opening a FIFO must not hang the connection (it is refused
    // below anyway); regular files ignore the flag.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&full)
        .map_err(|e| FileError::io(path, &e))?;
    let meta = file.metadata().map_err(|e| FileError::io(path, &e))?;
    if meta.is_dir() {
        return Err(FileError::new(
            ErrorKind::IsDirectory,
            path,
            "is a directory",
        ));
    }
    if !meta.is_file() {
        return Err(FileError::new(
            ErrorKind::NotRegularFile,
            path,
            "not a regular file",
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    Ok((file, meta.len(), mode))
}

/// A file being written next to its target, renamed over it on commit.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    path: String,
    target: PathBuf,
    tmp: PathBuf,
    file: File,
    mode: u32,
    owner: Option<(u32, u32)>,
    committed: bool,
}

impl AtomicFile {
    /// Creates missing parent directories (0755) and the temp file. An
    /// existing regular file's mode and owner are kept; `mode` is for new
    /// files, and `new_owner` (the sandbox's user, when not root) owns new
    /// files and the directories created for them.
    pub(crate) fn create(
        cwd: &str,
        path: &str,
        mode: u32,
        new_owner: Option<(u32, u32)>,
    ) -> Result<Self, FileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let target = resolve(cwd, path)?;
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(FileError::new(
                ErrorKind::IsDirectory,
                path,
                "is a directory",
            ));
        };
        if path.ends_with('/') {
            return Err(FileError::new(
                ErrorKind::IsDirectory,
                path,
                "is a directory",
            ));
        }
        create_dirs(parent, new_owner).map_err(|e| FileError::io(path, &e))?;
        let (mode, owner) = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => {
                return Err(FileError::new(
                    ErrorKind::IsDirectory,
                    path,
                    "is a directory",
                ))
            }
            Ok(m) if m.is_file() => (m.permissions().mode() & 0o7777, Some((m.uid(), m.gid()))),
            // A symlink or special file is replaced, not written through.
            _ => (mode & 0o7777, new_owner),
        };
        let tmp = parent.join(format!(
            ".{}.sandpit-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| FileError::io(path, &e))?;
        Ok(Self {
            path: path.to_string(),
            target,
            tmp,
            file,
            mode,
            owner,
            committed: false,
        })
    }

    /// Appends data.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        self.file
            .write_all(data)
            .map_err(|e| FileError::io(&self.path, &e))
    }

    /// Sets mode and owner, then renames over the target.
    pub(crate) fn commit(mut self) -> Result<(), FileError> {
        let err = |e: io::Error| FileError::io(&self.path, &e);
        if let Some((uid, gid)) = self.owner {
            // Keeping (or giving) the owner needs CAP_CHOWN, which the agent
            // has; without it (an unprivileged agent in tests) the file stays
            // the agent's.
            let _ = std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid));
        }
        // fchmod, not the open mode: the umask must not trim what was asked.
        self.file
            .set_permissions(std::fs::Permissions::from_mode(self.mode))
            .map_err(err)?;
        std::fs::rename(&self.tmp, &self.target).map_err(err)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Creates `dir` and its missing parents (0755), the ones it creates owned
/// by `owner` when given: a user who gets a file at a new path can also
/// write next to it.
fn create_dirs(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let Some((uid, gid)) = owner else {
        return DirBuilder::new().recursive(true).mode(0o755).create(dir);
    };
    // The missing ones, deepest first.
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(d),
            Err(e) => return Err(e),
        }
        at = d.parent();
    }
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => std::os::unix::fs::lchown(d, Some(uid), Some(gid))?,
            // Created meanwhile by someone else: theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a whole file atomically (Init files).
pub(crate) fn write_all(
    cwd: &str,
    path: &str,
    mode: u32,
    data: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    let mut f = AtomicFile::create(cwd, path, mode, owner)?;
    f.write(data)?;
    f.commit()
}

/// Serves `WriteFile`: reads `Data`* `End`, answers `Ok` or `Error`. On an
/// early error the rest of the data is still read, so the host always gets
/// its answer after sending everything.
pub(crate) fn serve_write(
    stream: &UnixStream,
    cwd: &str,
    path: &str,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let mut r = io::BufReader::with_capacity(CHUNK_LEN + 64, stream);
    let mut file = AtomicFile::create(cwd, path, mode, owner);
    loop {
        let frame = match read_frame(&mut r) {
            Ok(Some(f)) => f,
            // The host gave up: nothing is renamed, the temp file goes.
            Ok(None) => return Ok(()),
            Err(e) => return Err(io::Error::other(e)),
        };
        match frame {
            Frame::Data(d) => {
                if let Ok(f) = &mut file {
                    if let Err(e) = f.write(&d) {
                        file = Err(e);
                    }
                }
            }
            Frame::End => break,
            _ => {
                let mut w = stream;
                return write_frame(
                    &mut w,
                    &Frame::Error {
                        kind: ErrorKind::Protocol,
                        message: "expected data or end".into(),
                    },
                );
            }
        }
    }
    let mut w = stream;
    match file.and_then(AtomicFile::commit) {
        Ok(()) => write_frame(&mut w, &Frame::Ok),
        Err(e) => write_frame(&mut w, &e.frame()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_keeps_existing_mode_and_replaces_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_str().unwrap();
        write_all(cwd, "a/b/new", 0o640, b"one", None).unwrap();
        let p = dir.path().join("a/b/new");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        write_all(cwd, "a/b/new", 0o600, b"two", None).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("link")).unwrap();
        write_all(cwd, "link", 0o644, b"new", None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert!(std::fs::symlink_metadata(dir.path().join("link"))
            .unwrap()
            .is_file());
        let e = write_all(cwd, "a", 0o644, b"x", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IsDirectory);
        assert_eq!(e.message, "a: is a directory");
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["new"]);
    }

    #[test]
    fn new_files_and_directories_get_the_owner_existing_ones_keep_theirs() {
        // chown needs CAP_CHOWN: as root (the agent's case) or not at all.
        // SAFETY: geteuid only returns a value.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: not root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_str().unwrap();
        let owner = Some((4242, 4343));
        write_all(cwd, "x/y/file", 0o644, b"1", owner).unwrap();
        let ids = |rel: &str| {
            let m = std::fs::metadata(dir.path().join(rel)).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(ids("x/y/file"), (4242, 4343));
        assert_eq!(ids("x/y"), (4242, 4343));
        assert_eq!(ids("x"), (4242, 4343));
        // The directory that existed stays root's.
        assert_eq!(ids("."), (0, 0));
        // A file that existed keeps its owner.
        std::fs::write(dir.path().join("root-file"), "r").unwrap();
        write_all(cwd, "root-file", 0o644, b"2", owner).unwrap();
        assert_eq!(ids("root-file"), (0, 0));
        assert_eq!(std::fs::read(dir.path().join("root-file")).unwrap(), b"2");
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_str().unwrap();
        let e = open_for_read(cwd, "missing").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, "missing: no such file or directory");
        let e = open_for_read(cwd, ".").unwrap_err();
        assert_eq!(e.kind, ErrorKind::IsDirectory);
        let e = open_for_read("/", "/dev/null").unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotRegularFile);
        assert_eq!(
            resolve("/", "").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }
}
