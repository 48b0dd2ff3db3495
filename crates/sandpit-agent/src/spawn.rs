//! Starting processes without `std::process::Command`: the reaper thread owns
//! `waitpid(-1)`, and std's spawn would wait for its own children (and panic
//! when the reaper took their status first).
//!
//! Everything is prepared before `fork`; the child only makes async-signal-safe
//! calls and reports a failed `chdir` or `execve` through a close-on-exec pipe.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sandpit_wire::ErrorKind;

use crate::reaper::{ExitCell, Reaper};
use crate::sys;

/// `PATH` for commands when the sandbox's environment sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a command did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `argv[0]` is not in `PATH`.
    #[error("{0}: command not found")]
    NotFound(String),
    /// The working directory is unusable.
    #[error("chdir {path}: {desc}")]
    Chdir {
        /// The directory.
        path: String,
        /// What went wrong.
        desc: String,
    },
    /// `execve` failed.
    #[error("{program}: {desc}")]
    Exec {
        /// The program as given.
        program: String,
        /// What went wrong.
        desc: String,
    },
    /// The request cannot be turned into C strings.
    #[error("{0} contains a nul byte")]
    Nul(&'static str),
    /// The agent itself failed (fork, pipes).
    #[error("{what}: {desc}")]
    Os {
        /// The failed step.
        what: &'static str,
        /// What went wrong.
        desc: String,
    },
}

impl SpawnError {
    /// The protocol's category for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SpawnError::Nul(_) => ErrorKind::InvalidArgument,
            SpawnError::Os { .. } => ErrorKind::Io,
            _ => ErrorKind::SpawnFailed,
        }
    }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> SpawnError {
    move |e| SpawnError::Os {
        what,
        desc: sys::io_desc(&e),
    }
}

/// What to start.
#[derive(Debug)]
pub struct Command<'a> {
    /// Program and arguments; `argv[0]` without a slash is looked up in `PATH`.
    pub argv: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// Absolute working directory.
    pub cwd: &'a str,
    /// Descriptors for the child's 0, 1 and 2.
    pub stdio: [BorrowedFd<'a>; 3],
    /// Make the child's stdin its controlling terminal (a PTY slave).
    pub ctty: bool,
}

/// A started process: the leader of its own session and process group.
#[derive(Debug)]
pub struct Child {
    /// Its pid (also its process group id).
    pub pid: i32,
    /// Where its exit status lands.
    pub exit: Arc<ExitCell>,
}

/// Merges `overrides` into `base` (same key: the override wins) and adds the
/// default `PATH` when neither sets one.
pub fn merge_env(
    base: &[(String, String)],
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(base.len() + overrides.len() + 1);
    for (k, v) in base.iter().chain(overrides) {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env
}

/// Looks `program` up like a shell does: as given when it has a slash, else in
/// `PATH` (relative entries start at `cwd`).
fn resolve(program: &str, env: &[(String, String)], cwd: &str) -> Result<PathBuf, SpawnError> {
    if program.is_empty() {
        return Err(SpawnError::NotFound(String::new()));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(cwd).join(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(SpawnError::NotFound(program.to_string()))
}

fn cstring(s: &str, what: &'static str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(what))
}

/// Everything the child needs, as raw pointers into memory prepared before fork.
struct Plan {
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdio: [RawFd; 3],
    ctty: bool,
    report: RawFd,
}

const STAGE_CHDIR: u8 = 1;
const STAGE_EXEC: u8 = 2;

/// Starts `cmd`. Returns once the child called `execve` successfully.
pub fn spawn(reaper: &Reaper, cmd: &Command<'_>) -> Result<Child, SpawnError> {
    let program = cmd.argv.first().map(String::as_str).unwrap_or_default();
    let path = resolve(program, cmd.env, cmd.cwd)?;
    let path = CString::new(path.into_os_string().into_encoded_bytes())
        .map_err(|_| SpawnError::Nul("program"))?;
    let argv = cmd
        .argv
        .iter()
        .map(|a| cstring(a, "argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = cmd
        .env
        .iter()
        .map(|(k, v)| {
            if k.contains('=') {
                return Err(SpawnError::Nul("environment name with '='"));
            }
            cstring(&format!("{k}={v}"), "environment")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = cstring(cmd.cwd, "working directory")?;
    let (report_r, report_w) = sys::pipe().map_err(os("pipe"))?;
    let exit = Arc::new(ExitCell::new().map_err(os("pipe"))?);
    let plan = Plan {
        argv: argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        envp: envp
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        path,
        cwd,
        stdio: cmd.stdio.map(|fd| fd.as_raw_fd()),
        ctty: cmd.ctty,
        report: report_w.as_raw_fd(),
    };

    let registration = reaper.lock();
    // SAFETY: the child runs only `child`, which makes async-signal-safe calls
    // on memory prepared above and never returns; locks held by other threads
    // at fork time (including the registry lock we hold) are never touched there.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `child`.
        unsafe { child(&plan) }
    }
    if pid < 0 {
        return Err(os("fork")(std::io::Error::last_os_error()));
    }
    registration.register(pid, Arc::clone(&exit));
    drop(report_w);

    // EOF: the pipe closed at exec, so the program runs.
    let mut msg = [0u8; 5];
    let mut got = 0;
    while got < msg.len() {
        match sys::read(report_r.as_fd(), &mut msg[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    if got == 0 {
        return Ok(Child { pid, exit });
    }
    let errno = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
    let desc = sys::errno_desc(errno);
    // The child exits right away; the reaper collects it into `exit`, unread.
    Err(match msg[0] {
        STAGE_CHDIR => SpawnError::Chdir {
            path: cmd.cwd.to_string(),
            desc,
        },
        _ => SpawnError::Exec {
            program: program.to_string(),
            desc,
        },
    })
}

/// The forked child: set up and exec, or report why not and exit.
///
/// # Safety
/// Must only run in a child right after `fork`: it never returns, and calls
/// only async-signal-safe functions on the prepared `plan`.
unsafe fn child(plan: &Plan) -> ! {
    // SAFETY: each call below is async-signal-safe and takes pointers to
    // stack values or to `plan`, which the fork copied intact.
    unsafe {
        // Handlers reset themselves at execve; ignored dispositions do not.
        // SIGPIPE is the only signal the agent ignores (serve::prepare_process
        // cleared every inherited one), so it is the only one to restore.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        libc::setsid();
        // Sources are all >= 3 (the agent keeps 0-2 open), so no dup2 below
        // clobbers a descriptor still to be moved.
        for (target, &fd) in plan.stdio.iter().enumerate() {
            let target = target as RawFd;
            if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0);
            } else {
                libc::dup2(fd, target);
            }
        }
        if plan.ctty {
            libc::ioctl(0, libc::TIOCSCTTY, 0);
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            report(plan.report, STAGE_CHDIR);
        }
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        report(plan.report, STAGE_EXEC);
    }
}

/// Sends `stage` and errno to the parent and exits.
///
/// # Safety
/// Same as [`child`].
unsafe fn report(fd: RawFd, stage: u8) -> ! {
    // SAFETY: __errno_location, write and _exit are async-signal-safe; `msg`
    // lives on the stack across the write.
    unsafe {
        let errno = *libc::__errno_location();
        let e = errno.to_le_bytes();
        let msg = [stage, e[0], e[1], e[2], e[3]];
        libc::write(fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_and_default_path() {
        let env = merge_env(&kv(&[("A", "1"), ("B", "2")]), &kv(&[("B", "3")]));
        assert_eq!(env, kv(&[("A", "1"), ("B", "3"), ("PATH", DEFAULT_PATH)]));
        let env = merge_env(&kv(&[("PATH", "/x")]), &[]);
        assert_eq!(env, kv(&[("PATH", "/x")]));
    }

    #[test]
    fn resolution_follows_path() {
        let env = kv(&[("PATH", "/nonexistent:/bin:/usr/bin")]);
        let sh = resolve("sh", &env, "/").unwrap();
        assert!(sh.ends_with("sh"));
        assert_eq!(resolve("/x/y", &env, "/").unwrap(), PathBuf::from("/x/y"));
        assert_eq!(
            resolve("nope-cmd", &env, "/").unwrap_err().to_string(),
            "nope-cmd: command not found"
        );
    }
}
