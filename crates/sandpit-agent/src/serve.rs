//! `sandpit-agent serve`: start-up from `Init`, then one thread per connection,
//! one operation per connection.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandpit_wire::{decode, read_frame, write_frame, ErrorKind, Frame, InitSpec};

use crate::creds::Creds;
use crate::files;
use crate::mainproc::Main;
use crate::reaper::Reaper;
use crate::startup::Startup;
use crate::sys;
use crate::user;

/// Why the agent could not start serving.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// The init descriptor did not hold one `Init` frame.
    #[error("init spec: {0}")]
    Init(String),
    /// A start-up step failed.
    #[error("{0}")]
    Os(&'static str, #[source] io::Error),
}

/// What every connection needs.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// The sandbox's environment (default `PATH` included).
    pub(crate) env: Vec<(String, String)>,
    /// The sandbox's absolute working directory.
    pub(crate) cwd: String,
    /// The reaper, for spawning.
    pub(crate) reaper: Arc<Reaper>,
    /// The main command.
    pub(crate) main: Arc<Main>,
    /// The user and capabilities of every process started.
    pub(crate) creds: Creds,
    /// The sandbox's start, as its probe decides it.
    pub(crate) startup: Arc<Startup>,
}

/// The largest `Init` accepted (files included); the spawner is trusted, this
/// only keeps a corrupt descriptor from exhausting memory.
const MAX_INIT: u64 = 1 << 30;

/// What the init descriptor says to do.
#[derive(Debug)]
pub(crate) enum Start {
    /// Apply this init and start the main command now.
    Now(Box<InitSpec>),
    /// Serve, and wait for a host's `Claim` to bring the init (a warm
    /// pool's sandbox).
    OnClaim,
}

/// Reads the single `Init` (or `Idle`) frame at the start of `fd` (a memfd
/// or file).
pub(crate) fn read_init(fd: OwnedFd) -> Result<Start, ServeError> {
    let file = std::fs::File::from(fd);
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, 0)
        .map_err(|e| ServeError::Init(sys::io_desc(&e)))?;
    let len = u32::from_le_bytes(len) as u64;
    if len > MAX_INIT {
        return Err(ServeError::Init(format!("{len} bytes is too large")));
    }
    let mut body = vec![0u8; len as usize];
    file.read_exact_at(&mut body, 4)
        .map_err(|e| ServeError::Init(sys::io_desc(&e)))?;
    // Not `read_frame`: its size limit is for the hostile direction, and Init
    // carries whole files.
    match decode(&body) {
        Ok(Frame::Init(spec)) => Ok(Start::Now(Box::new(spec))),
        Ok(Frame::Idle) => Ok(Start::OnClaim),
        Ok(_) => Err(ServeError::Init("not an init frame".into())),
        Err(e) => Err(ServeError::Init(e.to_string())),
    }
}

/// Process-wide set-up that must precede any thread or child.
fn prepare_process() {
    // SAFETY: each call takes plain integers, null pointers or pointers to
    // locals, and changes only process attributes; no other thread exists yet.
    unsafe {
        // Ignored dispositions survive execve: drop any we inherited (a
        // daemon started under nohup ignores SIGHUP) so that children start
        // clean without resetting 64 signals on every exec. SIGCHLD matters
        // most: an inherited SIG_IGN would make the kernel reap our children
        // itself, and their exit statuses would be lost.
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // Writes to a departed host must fail with EPIPE, not kill PID 1.
        // The one ignored signal, reset in every child (see spawn::child).
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Off PID 1 (tests on the host), orphans must still come to us.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // Not dumpable: the sandbox's processes (same uid, no
        // CAP_SYS_PTRACE) can neither ptrace the agent nor read its memory,
        // environment or descriptors through /proc/1. Every exec resets it
        // for the programs the agent starts.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        // Children get 0-2 from descriptors we create: keep these slots taken so
        // nothing we open lands there (the spawner provides /dev/null). A new
        // descriptor takes the lowest free slot, so each hole fills in order.
        for fd in 0..3 {
            if libc::fcntl(fd, libc::F_GETFD) < 0
                && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) < 0
            {
                let mut p = [0; 2];
                libc::pipe(p.as_mut_ptr());
            }
        }
        // Inherited descriptors (the listener and init spec included) must not
        // leak into the commands we start.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Runs the agent: never returns unless start-up fails.
pub(crate) fn run(listen_fd: RawFd, init_fd: RawFd) -> Result<(), ServeError> {
    prepare_process();
    // SAFETY: the spawner hands these descriptors to us and nothing else in this
    // process refers to them.
    let (listen, init) = unsafe {
        (
            OwnedFd::from_raw_fd(listen_fd),
            OwnedFd::from_raw_fd(init_fd),
        )
    };
    let start = read_init(init)?;
    let listener = UnixListener::from(listen);
    let reaper = Reaper::start().map_err(|e| ServeError::Os("reaper thread", e))?;
    let ctx = match start {
        Start::Now(init) => setup(*init, reaper)?,
        Start::OnClaim => await_claim(&listener, reaper)?,
    };
    accept_loop(&listener, &ctx)
}

/// An idle agent's life until its claim: pings are answered (the sandbox
/// is alive, nothing runs), every other operation is refused, and the first
/// `Claim` sets the sandbox up as an `Init` would have. One connection at a
/// time: only the host reaches this socket, and nothing else runs yet.
fn await_claim(listener: &UnixListener, reaper: Arc<Reaper>) -> Result<Arc<Ctx>, ServeError> {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOTSOCK | libc::EBADF | libc::EINVAL) => {
                    return Err(ServeError::Os("accept", e))
                }
                _ => continue,
            },
        };
        let _ = stream.set_read_timeout(Some(FIRST_FRAME_TIMEOUT));
        let mut w = &stream;
        let answer = match read_frame(&mut &stream) {
            Ok(Some(Frame::Claim(init))) => {
                let ctx = setup(init, reaper)?;
                let _ = write_frame(&mut w, &Frame::Pong(ctx.main.status()));
                return Ok(ctx);
            }
            Ok(Some(Frame::Ping)) => Frame::Pong(sandpit_wire::MainStatus::Idle),
            Ok(Some(_)) => Frame::Error {
                kind: ErrorKind::NotRunning,
                message: "sandbox not claimed yet".into(),
            },
            Ok(None) | Err(_) => continue,
        };
        let _ = write_frame(&mut w, &answer);
    }
}

/// Applies an init: the user, the files, the working dir, the main command
/// and the startup probe; returns what every connection needs.
fn setup(init: InitSpec, reaper: Arc<Reaper>) -> Result<Arc<Ctx>, ServeError> {
    let cwd = if init.cwd.is_empty() {
        "/".to_string()
    } else {
        Path::new("/")
            .join(&init.cwd)
            .to_string_lossy()
            .into_owned()
    };
    let mut env = sandpit_wire::process::merge_env(&init.env, &[]);
    // Resolved before anything is written or started: every file and
    // process of the sandbox is the user's.
    let (creds, mut failed) = match identity(&init.run_as) {
        Ok(who) => {
            if let Some(w) = &who {
                // As Docker does: the user's home, unless the image or the
                // request set one.
                if !env.iter().any(|(k, _)| k == "HOME") {
                    env.push(("HOME".into(), w.home.clone().unwrap_or_else(|| "/".into())));
                }
            }
            (Creds::new(who.as_ref(), init.capabilities), None)
        }
        Err(e) => (Creds::new(None, init.capabilities), Some(e)),
    };
    if failed.is_none() {
        for f in &init.files {
            if let Err(e) = files::write_all(&cwd, &f.path, f.mode, &f.content, creds.owner()) {
                eprintln!("sandpit-agent: init file {e}");
                failed.get_or_insert(format!("init file {e}"));
            }
        }
    }
    // Like a WORKDIR, the working directory is created when missing.
    if !Path::new(&cwd).is_dir() {
        let _ = std::fs::DirBuilder::new().recursive(true).create(&cwd);
    }
    let main = match (init.argv.is_empty(), failed) {
        // Without a main command, a user that does not resolve still fails
        // the sandbox: every exec would run as nobody it asked for.
        (true, Some(reason)) if init.run_as != Default::default() => {
            Main::not_started(Some(reason))
        }
        (true, _) => Main::not_started(None),
        (false, Some(reason)) => Main::not_started(Some(reason)),
        (false, None) => Main::start(&reaper, &init.argv, &env, &cwd, &creds),
    };
    let startup = match init.startup_probe {
        Some(_) => Startup::pending(),
        None => Startup::ready(),
    };
    let ctx = Arc::new(Ctx {
        env,
        cwd,
        reaper,
        main,
        creds,
        startup,
    });
    if let Some(probe) = init.startup_probe {
        Startup::run(Arc::clone(&ctx), probe).map_err(|e| ServeError::Os("probe thread", e))?;
    }
    Ok(ctx)
}

/// The user to run as: `None` for the agent's own (root, unless the host
/// asked for another), else resolved in the sandbox's user databases and
/// checked against its user namespace's id maps.
fn identity(run_as: &sandpit_wire::RunAs) -> Result<Option<user::Identity>, String> {
    if run_as.is_root_default() {
        return Ok(None);
    }
    let who = user::resolve(
        run_as,
        &user::read_db("/etc/passwd"),
        &user::read_db("/etc/group"),
    )
    .and_then(|who| user::check_mapped(&who).map(|()| who))
    .map_err(|e| format!("run as user: {e}"))?;
    Ok(Some(who))
}

fn accept_loop(listener: &UnixListener, ctx: &Arc<Ctx>) -> Result<(), ServeError> {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::ENOTSOCK | libc::EBADF | libc::EINVAL) => {
                    return Err(ServeError::Os("accept", e))
                }
                // EMFILE, ENOMEM...: wait for resources to come back.
                _ => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        let c = Arc::clone(ctx);
        let spawned = crate::pool::spawn(move || {
            let _ = handle(&c, stream);
        });
        if spawned.is_err() {
            // Out of threads (the pids limit counts them): the host retries.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// How long a host may take to send an operation's first frame.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

fn handle(ctx: &Ctx, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(FIRST_FRAME_TIMEOUT))?;
    // Malformed input only costs the host its connection.
    let first = match read_frame(&mut &stream) {
        Ok(Some(f)) => f,
        Ok(None) | Err(_) => return Ok(()),
    };
    stream.set_read_timeout(None)?;
    let mut w = &stream;
    match first {
        Frame::Ping => write_frame(&mut w, &Frame::Pong(ctx.main.status())),
        Frame::Exec(req) => crate::exec::serve(ctx, stream, req),
        Frame::ReadFile { path } => files::serve_read(&stream, &ctx.cwd, &path),
        Frame::WriteFile { path, mode } => {
            files::serve_write(&stream, &ctx.cwd, &path, mode, ctx.creds.owner())
        }
        Frame::AwaitStartup => match ctx.startup.wait(&stream) {
            Some(state) => write_frame(&mut w, &Frame::Startup(state)),
            None => Ok(()),
        },
        Frame::MainOutput { offset, follow } => ctx.main.serve_output(&stream, offset, follow),
        Frame::SignalMain(sig) => match ctx.main.signal(sig) {
            Ok(()) => write_frame(&mut w, &Frame::Ok),
            Err((kind, message)) => write_frame(&mut w, &Frame::Error { kind, message }),
        },
        Frame::MainUsage => match ctx.main.usage() {
            Some(usage) => write_frame(&mut w, &Frame::Usage(usage)),
            None => write_frame(
                &mut w,
                &Frame::Error {
                    kind: ErrorKind::NotRunning,
                    message: "main process has not ended".into(),
                },
            ),
        },
        _ => write_frame(
            &mut w,
            &Frame::Error {
                kind: ErrorKind::Protocol,
                message: "unexpected first frame".into(),
            },
        ),
    }
}
