//! Starting processes without `std::process::Command`: the reaper thread owns
//! `waitpid(-1)`, and std's spawn would wait for its own children (and panic
//! when the reaper took their status first).
//!
//! The child is created with `clone(CLONE_VM | CLONE_VFORK)`, as glibc's
//! `posix_spawn` does: it borrows the agent's memory until it calls `execve`
//! (or exits) while the spawning thread waits. A `fork` would copy the page
//! tables of the whole multi-threaded agent and then take copy-on-write
//! faults, only for `execve` to throw it all away: on the development VM that
//! was ~150 us of a ~1 ms exec round trip. Everything is prepared before the
//! clone; the child only makes async-signal-safe calls on that memory and
//! reports a failed `chdir` or `execve` by storing the stage and errno in it.
//! Between the two it takes on the sandbox's user and capability set
//! ([`Creds`]), with raw system calls only.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;

use sandpit_wire::process::DEFAULT_PATH;
use sandpit_wire::ErrorKind;

use crate::creds::{self, Creds};
use crate::reaper::{ExitCell, Reaper};
use crate::sys;

/// Why a command did not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    /// `argv[0]` is not in `PATH`.
    #[error("{0}: command not found")]
    NotFound(String),
    /// The working directory is unusable.
    #[error("chdir {path}: {}", sys::errno_desc(*errno))]
    Chdir {
        /// The directory.
        path: String,
        /// Why `chdir` failed.
        errno: i32,
    },
    /// Taking on the sandbox's user or capabilities failed.
    #[error("{what}: {}", sys::errno_desc(*errno))]
    Creds {
        /// What was being set.
        what: String,
        /// Why it failed.
        errno: i32,
    },
    /// `execve` failed.
    #[error("{program}: {}", sys::errno_desc(*errno))]
    Exec {
        /// The program as given.
        program: String,
        /// Why `execve` failed.
        errno: i32,
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
    /// The protocol's category for this error: what a shell tells apart
    /// (127 for a command it cannot find, 126 for one it cannot run, see
    /// [`ErrorKind::spawn_exit_code`]) comes from the errno, never from the
    /// message.
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            SpawnError::NotFound(_) => ErrorKind::NotFound,
            SpawnError::Chdir { errno, .. }
            | SpawnError::Exec { errno, .. }
            | SpawnError::Creds { errno, .. } => errno_kind(*errno),
            SpawnError::Nul(_) => ErrorKind::InvalidArgument,
            SpawnError::Os { .. } => ErrorKind::Io,
        }
    }
}

/// The category of a failed `chdir` or `execve`.
fn errno_kind(errno: i32) -> ErrorKind {
    match errno {
        libc::ENOENT | libc::ENOTDIR => ErrorKind::NotFound,
        // EACCES is also what execve says of a directory or a file without
        // the exec bit; ENOEXEC of a file that is no executable format.
        libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::EISDIR => ErrorKind::PermissionDenied,
        _ => ErrorKind::SpawnFailed,
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
pub(crate) struct Command<'a> {
    /// Program and arguments; `argv[0]` without a slash is looked up in `PATH`.
    pub(crate) argv: &'a [String],
    /// The complete environment.
    pub(crate) env: &'a [(String, String)],
    /// Absolute working directory.
    pub(crate) cwd: &'a str,
    /// Descriptors for the child's 0, 1 and 2.
    pub(crate) stdio: [BorrowedFd<'a>; 3],
    /// Make the child's stdin its controlling terminal (a PTY slave).
    pub(crate) ctty: bool,
    /// The user and capabilities it runs with.
    pub(crate) creds: &'a Creds,
}

/// A started process: the leader of its own session and process group.
#[derive(Debug)]
pub(crate) struct Child {
    /// Its pid (also its process group id).
    pub(crate) pid: i32,
    /// Where its exit status lands.
    pub(crate) exit: Arc<ExitCell>,
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

/// Everything the child needs, as raw pointers into memory prepared before
/// the clone, and where it reports a failure (shared: the child runs in our
/// address space until `execve`).
struct Plan<'a> {
    path: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    stdio: [RawFd; 3],
    ctty: bool,
    creds: &'a Creds,
    /// 0 while the child got no further than `execve`; else the failed stage.
    failed_stage: AtomicU8,
    failed_errno: AtomicI32,
}

const STAGE_CHDIR: u8 = 1;
const STAGE_EXEC: u8 = 2;
const STAGE_CAPS: u8 = 3;
const STAGE_USER: u8 = 4;

/// The child's stack while it borrows our memory. It only makes a handful of
/// libc calls (glibc's `posix_spawn` uses 32 KiB plus the argument strings,
/// which we never copy).
const CHILD_STACK: usize = 64 * 1024;

/// Starts `cmd`. Returns once the child called `execve` successfully.
pub(crate) fn spawn(reaper: &Reaper, cmd: &Command<'_>) -> Result<Child, SpawnError> {
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
        creds: cmd.creds,
        failed_stage: AtomicU8::new(0),
        failed_errno: AtomicI32::new(0),
    };
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);

    let registration = reaper.lock();
    // No signal handler may run in the child while it shares our memory (it
    // would run on the child's stack, over our heap): block them all across
    // the clone; the child sets its own mask before `execve`.
    let blocked = SignalsBlocked::new();
    // SAFETY: `child_main` never returns into Rust code: it calls `execve` or
    // `_exit`. CLONE_VFORK suspends this thread until then, so `plan` and
    // `stack` (which the child uses) outlive the child's use of them, and no
    // other code of ours runs on this thread meanwhile. The child makes only
    // async-signal-safe calls that take no locks (other threads may hold
    // malloc's or the registry's lock). The stack top is 16-byte aligned as
    // the ABI requires, and `Vec::with_capacity` reserved CHILD_STACK bytes.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        let top = top.sub(top as usize % 16);
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&plan as *const Plan).cast_mut().cast(),
        )
    };
    let clone_err = std::io::Error::last_os_error();
    drop(blocked);
    if pid < 0 {
        return Err(os("clone")(clone_err));
    }
    registration.register(pid, Arc::clone(&exit));
    drop(stack);

    // The child is past `execve` or gone: what it stored is final.
    let stage = plan.failed_stage.load(Ordering::Acquire);
    if stage == 0 {
        return Ok(Child { pid, exit });
    }
    let errno = plan.failed_errno.load(Ordering::Acquire);
    // The child exited; the reaper collects it into `exit`, unread.
    Err(match stage {
        STAGE_CHDIR => SpawnError::Chdir {
            path: cmd.cwd.to_string(),
            errno,
        },
        STAGE_CAPS => SpawnError::Creds {
            what: "drop capabilities".into(),
            errno,
        },
        STAGE_USER => SpawnError::Creds {
            what: format!("switch to {}", cmd.creds.describe_user()),
            errno,
        },
        _ => SpawnError::Exec {
            program: program.to_string(),
            errno,
        },
    })
}

/// Every signal blocked on this thread until dropped.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: sigfillset and pthread_sigmask write into the local sets,
        // which live across the calls.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            Self(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`, a valid sigset_t.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// The clone's entry point.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Plan` that `spawn` keeps alive until we exec or
    // exit (CLONE_VFORK), and we are the freshly cloned child.
    unsafe { child(&*(arg as *const Plan)) }
}

/// The cloned child: set up and exec, or record why not and exit.
///
/// # Safety
/// Must only run in a child created by `spawn`'s clone (our memory, its own
/// stack, the parent suspended): it never returns, and calls only
/// async-signal-safe functions that take no locks, on the prepared `plan`.
unsafe fn child(plan: &Plan) -> ! {
    // SAFETY: each call below is async-signal-safe and takes pointers to
    // stack values or to `plan`, which stays valid until we exec or exit.
    unsafe {
        // Handlers reset themselves at execve; ignored dispositions do not.
        // SIGPIPE is the only signal the agent ignores (serve::prepare_process
        // cleared every inherited one), so it is the only one to restore.
        // Without CLONE_SIGHAND the child has its own copy of the table, so
        // this leaves the agent's disposition alone.
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
        // Before chdir: the working directory must be the user's to enter.
        match plan.creds.apply() {
            Ok(()) => {}
            Err(creds::Failed::Caps) => report(plan, STAGE_CAPS),
            Err(creds::Failed::User) => report(plan, STAGE_USER),
        }
        if libc::chdir(plan.cwd.as_ptr()) < 0 {
            report(plan, STAGE_CHDIR);
        }
        libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        report(plan, STAGE_EXEC);
    }
}

/// Records `stage` and errno for the parent and exits.
///
/// # Safety
/// Same as [`child`].
unsafe fn report(plan: &Plan, stage: u8) -> ! {
    // SAFETY: __errno_location and _exit are async-signal-safe; the atomics
    // live in the parent's `plan`, which outlives us.
    unsafe {
        let errno = *libc::__errno_location();
        plan.failed_errno.store(errno, Ordering::Release);
        plan.failed_stage.store(stage, Ordering::Release);
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
    fn spawn_errors_are_categorised_by_errno() {
        let exec = |errno| SpawnError::Exec {
            program: "p".into(),
            errno,
        };
        let chdir = |errno| SpawnError::Chdir {
            path: "/d".into(),
            errno,
        };
        for (errno, kind) in [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::ENOTDIR, ErrorKind::NotFound),
            (libc::EACCES, ErrorKind::PermissionDenied),
            (libc::EPERM, ErrorKind::PermissionDenied),
            (libc::ENOEXEC, ErrorKind::PermissionDenied),
            (libc::EISDIR, ErrorKind::PermissionDenied),
            (libc::E2BIG, ErrorKind::SpawnFailed),
            (libc::ENOMEM, ErrorKind::SpawnFailed),
            (libc::ETXTBSY, ErrorKind::SpawnFailed),
        ] {
            assert_eq!(exec(errno).kind(), kind, "execve errno {errno}");
            assert_eq!(chdir(errno).kind(), kind, "chdir errno {errno}");
        }
        assert_eq!(SpawnError::NotFound("x".into()).kind(), ErrorKind::NotFound);
        assert_eq!(
            SpawnError::Nul("argument").kind(),
            ErrorKind::InvalidArgument
        );
        let os = SpawnError::Os {
            what: "pipe",
            desc: "too many open files".into(),
        };
        assert_eq!(os.kind(), ErrorKind::Io);
        // The messages stay what they were.
        assert_eq!(exec(libc::EACCES).to_string(), "p: permission denied");
        assert_eq!(
            chdir(libc::ENOENT).to_string(),
            "chdir /d: no such file or directory"
        );
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
