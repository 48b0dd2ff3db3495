//! File helpers shared by both cgroup versions: reading and writing control
//! files, walking a group's tree, killing what is in it, and removing it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::CgroupError;

/// How long a freeze may take to complete (teardown then kills anyway; a
/// snapshot fails). Tasks in the middle of I/O freeze only once it ends,
/// and a writable layer's writes now go through a loop device: 1 s was seen
/// to be too short for a process writing while its sandbox was snapshotted.
pub(super) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `rmdir` may keep failing with `EBUSY` (tasks that have exited
/// but are not yet released by the kernel).
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(10);

pub(super) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |e| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        errno: errno_of(&e),
    }
}

fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_error("read", path))
}

/// Writes a control file with a single `write(2)`, as the kernel expects.
/// `create` only matters for the plain directories of tests: every real
/// control file written here exists (controllers are checked first).
pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_error("open", path))?;
    f.write_all(value.as_bytes())
        .map_err(io_error("write", path))
}

pub(super) fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    read(path)?
        .trim()
        .parse()
        .map_err(|_| CgroupError::Parse(path.to_path_buf()))
}

/// The value of `key` in a flat-keyed file (`key value` per line).
pub(super) fn read_key(path: &Path, key: &str) -> Result<u64, CgroupError> {
    read(path)?
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            if words.next() != Some(key) {
                return None;
            }
            words.next()?.parse().ok()
        })
        .ok_or_else(|| CgroupError::Parse(path.to_path_buf()))
}

pub(super) fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    read(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| CgroupError::Parse(path.to_path_buf()))
        })
        .collect()
}

/// Pids in `dir` and every cgroup below it; directories that vanish are
/// empty (teardown races with exiting processes).
pub(super) fn pids_below(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    match read_pids(&dir.join("cgroup.procs")) {
        Ok(p) => out.extend(p),
        Err(CgroupError::Io {
            errno: Errno::ENOENT,
            ..
        }) => return Ok(()),
        Err(e) => return Err(e),
    }
    for child in child_dirs(dir)? {
        pids_below(&child, out)?;
    }
    Ok(())
}

/// Sub-cgroups of `dir` (missing `dir`: none).
pub(super) fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_error("list", dir)(e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", dir))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    Ok(dirs)
}

/// `mkdir` that tolerates an existing directory; says whether it created one.
pub(super) fn ensure_dir(path: &Path) -> Result<bool, CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("mkdir", path)(e)),
    }
}

/// Creates a sandbox's group directory, replacing an empty leftover.
pub(super) fn make_group_dir(path: &Path) -> Result<(), CgroupError> {
    if path.exists() {
        // A leftover of a crashed run: rmdir succeeds only when it has no
        // process and no child, and then it is safe to reuse the name.
        // Otherwise the caller must destroy it first.
        match fs::remove_dir(path) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) => {
                return Err(CgroupError::InUse(path.to_path_buf()))
            }
            Err(e) => return Err(io_error("rmdir", path)(e)),
        }
    }
    fs::create_dir(path).map_err(io_error("mkdir", path))
}

pub(super) fn kill_pids(pids: &[i32]) {
    let me = std::process::id() as i32;
    for &pid in pids {
        // pid <= 0 would signal process groups or everything; never from a
        // sane cgroup.procs, but this is the line that must not be crossed.
        if pid > 0 && pid != me {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `done` until it holds or `timeout` passes; says which.
pub(super) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::default();
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        backoff.sleep();
    }
}

/// Sleeps that start short and double up to [`POLL`]: a killed sandbox
/// usually empties within a millisecond, and a fixed 10 ms poll would make
/// every teardown cost at least that.
#[derive(Debug)]
pub(super) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_micros(200))
    }
}

impl Backoff {
    pub(super) fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(POLL);
    }
}

/// Removes `dir` and the cgroups below it, deepest first. On cgroupfs,
/// `rmdir` takes the control files with it; `EBUSY` is retried briefly.
pub(super) fn remove_tree(
    dir: &Path,
    rmdir: &dyn Fn(&Path) -> io::Result<()>,
) -> Result<(), CgroupError> {
    for child in child_dirs(dir)? {
        remove_tree(&child, rmdir)?;
    }
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    let mut backoff = Backoff::default();
    loop {
        match rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                backoff.sleep()
            }
            Err(e) => return Err(io_error("rmdir", dir)(e)),
        }
    }
}
