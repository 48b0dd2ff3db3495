//! An in-memory agent: speaks the real agent protocol (`sandpit-wire`
//! frames) over in-memory pipes, so the daemon's data plane (the async agent
//! client, the exec, file and log handlers) runs in tests without root.
//!
//! It keeps a file system as a map and "runs" a handful of commands:
//!
//! | argv | does |
//! | --- | --- |
//! | `echo ARGS...` | prints the arguments, space-separated, and a newline |
//! | `cat` | copies stdin to stdout until stdin ends |
//! | `true`, `false`, `exit N` | exits with 0, 1, N |
//! | `printenv NAME` | prints the variable (sandbox env, then the exec's), exit 1 if unset |
//! | `pwd` | prints the working directory |
//! | `warn TEXT...` | prints the text on stderr |
//! | `spew N` | prints N bytes of `x` |
//! | `sleep` | runs until signalled (exits by that signal) or disconnected |
//! | `/not-executable` | refused like an `execve` that gets EACCES |
//!
//! Anything else is "command not found". A command is killed (its
//! connection dropped) when the host hangs up before it exited, like the
//! real agent kills the process group. `AwaitStartup` answers once the test
//! decided the startup ([`FakeAgent::set_startup`]); ready from the start
//! unless told otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use sandpit_wire::{
    ErrorKind, ExecRequest, ExitStatus, Frame, MainStatus, StartupState, CHUNK_LEN,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// What an in-memory agent knows; shared by its connections.
#[derive(Debug)]
struct AgentState {
    /// Regular files by absolute path.
    files: BTreeMap<String, (u32, Vec<u8>)>,
    /// Directories by absolute path (`/` always exists).
    dirs: BTreeSet<String>,
    /// The sandbox's environment.
    env: Vec<(String, String)>,
    /// The sandbox's working directory.
    cwd: String,
    /// What Ping answers.
    main: MainStatus,
    /// Commands that were started, in order.
    execs: Vec<ExecRequest>,
    /// What AwaitStartup answers (`None`: not decided yet).
    startup: watch::Sender<Option<StartupState>>,
}

/// One sandbox's in-memory agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

impl FakeAgent {
    /// An agent for a sandbox with this environment, working dir and files.
    pub fn new(env: Vec<(String, String)>, cwd: String) -> Self {
        let mut dirs = BTreeSet::new();
        dirs.insert("/".to_owned());
        dirs.insert("/tmp".to_owned());
        Self {
            state: Arc::new(Mutex::new(AgentState {
                files: BTreeMap::new(),
                dirs,
                env,
                cwd,
                main: MainStatus::Idle,
                execs: Vec::new(),
                startup: watch::channel(Some(StartupState::Ready)).0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a file in place (mounted files, tests).
    pub fn put_file(&self, path: &str, mode: u32, content: Vec<u8>) {
        let mut st = self.lock();
        st.mkdir_p(parent(path));
        st.files.insert(path.to_owned(), (mode, content));
    }

    /// A file's content.
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.lock().files.get(path).map(|(_, c)| c.clone())
    }

    /// Commands started so far.
    pub fn execs(&self) -> Vec<ExecRequest> {
        self.lock().execs.clone()
    }

    /// What Ping answers from now on.
    pub fn set_main(&self, status: MainStatus) {
        self.lock().main = status;
    }

    /// What AwaitStartup answers from now on (`None`: it waits).
    pub fn set_startup(&self, state: Option<StartupState>) {
        self.lock().startup.send_replace(state);
    }

    /// Serves one connection until the host hangs up.
    pub async fn serve<R, W>(self, reader: R, mut writer: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut reader = BufReader::with_capacity(CHUNK_LEN + 64, reader);
        let Ok(Some(first)) = sandpit_wire::async_client::read_frame(&mut reader).await else {
            return;
        };
        let _ = match first {
            Frame::Ping => {
                let status = self.lock().main.clone();
                send(&mut writer, &Frame::Pong(status)).await
            }
            Frame::SignalMain(_) => {
                let running = matches!(self.lock().main, MainStatus::Running { .. });
                let answer = if running {
                    Frame::Ok
                } else {
                    error(ErrorKind::NotRunning, "main process is not running".into())
                };
                send(&mut writer, &answer).await
            }
            Frame::AwaitStartup => {
                let mut rx = self.lock().startup.subscribe();
                let decided = rx.wait_for(Option::is_some).await.map(|s| s.clone());
                match decided {
                    Ok(Some(state)) => send(&mut writer, &Frame::Startup(state)).await,
                    _ => Ok(()),
                }
            }
            Frame::Exec(req) => self.exec(req, &mut reader, &mut writer).await,
            Frame::ReadFile { path } => self.read(&path, &mut writer).await,
            Frame::WriteFile { path, mode } => {
                self.write(&path, mode, &mut reader, &mut writer).await
            }
            _ => {
                send(
                    &mut writer,
                    &error(ErrorKind::Protocol, "unexpected first frame".into()),
                )
                .await
            }
        };
    }

    fn absolute(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else {
            let cwd = self.lock().cwd.clone();
            format!("{}/{path}", cwd.trim_end_matches('/'))
        }
    }

    async fn read<W: AsyncWrite + Unpin>(&self, path: &str, w: &mut W) -> std::io::Result<()> {
        let abs = self.absolute(path);
        let found = {
            let st = self.lock();
            if st.dirs.contains(&abs) {
                Err(error(
                    ErrorKind::IsDirectory,
                    format!("{path}: is a directory"),
                ))
            } else {
                st.files.get(&abs).cloned().ok_or_else(|| {
                    error(
                        ErrorKind::NotFound,
                        format!("{path}: no such file or directory"),
                    )
                })
            }
        };
        let (mode, content) = match found {
            Ok(f) => f,
            Err(e) => return send(w, &e).await,
        };
        send(
            w,
            &Frame::FileInfo {
                size: content.len() as u64,
                mode,
            },
        )
        .await?;
        for chunk in content.chunks(CHUNK_LEN) {
            send(w, &Frame::Data(chunk.to_vec())).await?;
        }
        send(w, &Frame::End).await
    }

    async fn write<R, W>(&self, path: &str, mode: u32, r: &mut R, w: &mut W) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut data = Vec::new();
        loop {
            match sandpit_wire::async_client::read_frame(r).await {
                Ok(Some(Frame::Data(d))) => data.extend_from_slice(&d),
                Ok(Some(Frame::End)) => break,
                _ => {
                    return send(
                        w,
                        &error(ErrorKind::Protocol, "expected data or end".into()),
                    )
                    .await
                }
            }
        }
        let abs = self.absolute(path);
        let answer = {
            let mut st = self.lock();
            if st.dirs.contains(&abs) {
                error(ErrorKind::IsDirectory, format!("{path}: is a directory"))
            } else if st.files.contains_key(parent(&abs)) {
                error(ErrorKind::NotFound, format!("{path}: not a directory"))
            } else {
                st.mkdir_p(parent(&abs));
                // An existing file keeps its mode, as with the real agent.
                let mode = st.files.get(&abs).map_or(mode, |(m, _)| *m);
                st.files.insert(abs, (mode, data));
                Frame::Ok
            }
        };
        send(w, &answer).await
    }

    async fn exec<R, W>(&self, req: ExecRequest, r: &mut R, w: &mut W) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (env, cwd) = {
            let mut st = self.lock();
            st.execs.push(req.clone());
            let mut env = st.env.clone();
            env.extend(req.env.iter().cloned());
            (env, req.cwd.clone().unwrap_or_else(|| st.cwd.clone()))
        };
        let argv: Vec<&str> = req.argv.iter().map(String::as_str).collect();
        let program = argv.first().copied().unwrap_or_default();
        let known = [
            "echo", "cat", "true", "false", "exit", "printenv", "pwd", "warn", "spew", "sleep",
        ];
        if program == "/not-executable" {
            return send(
                w,
                &error(
                    ErrorKind::PermissionDenied,
                    format!("{program}: Permission denied"),
                ),
            )
            .await;
        }
        if !known.contains(&program) {
            return send(
                w,
                &error(ErrorKind::NotFound, format!("{program}: command not found")),
            )
            .await;
        }
        send(w, &Frame::Started { pid: 2 }).await?;
        let args = &argv[1..];
        let status = match program {
            "echo" => {
                send(w, &Frame::Stdout(format!("{}\n", args.join(" ")).into())).await?;
                ExitStatus::Code(0)
            }
            "warn" => {
                send(w, &Frame::Stderr(format!("{}\n", args.join(" ")).into())).await?;
                ExitStatus::Code(0)
            }
            "pwd" => {
                send(w, &Frame::Stdout(format!("{cwd}\n").into())).await?;
                ExitStatus::Code(0)
            }
            "true" => ExitStatus::Code(0),
            "false" => ExitStatus::Code(1),
            "exit" => ExitStatus::Code(args.first().and_then(|a| a.parse().ok()).unwrap_or(0)),
            "printenv" => {
                let name = args.first().copied().unwrap_or_default();
                match env.iter().rev().find(|(k, _)| k == name) {
                    Some((_, v)) => {
                        send(w, &Frame::Stdout(format!("{v}\n").into())).await?;
                        ExitStatus::Code(0)
                    }
                    None => ExitStatus::Code(1),
                }
            }
            "spew" => {
                let mut left: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(0);
                while left > 0 {
                    let n = left.min(CHUNK_LEN);
                    send(w, &Frame::Stdout(vec![b'x'; n])).await?;
                    left -= n;
                }
                ExitStatus::Code(0)
            }
            // cat and sleep read the host's frames until their end.
            _ => loop {
                match sandpit_wire::async_client::read_frame(r).await {
                    Ok(Some(Frame::Stdin(d))) if program == "cat" => {
                        send(w, &Frame::Stdout(d)).await?;
                    }
                    Ok(Some(Frame::StdinEof)) if program == "cat" => break ExitStatus::Code(0),
                    Ok(Some(Frame::Signal(sig))) => break ExitStatus::Signal(sig),
                    Ok(Some(_)) => {}
                    // The host hung up: the command is killed, nothing more
                    // is sent.
                    Ok(None) | Err(_) => return Ok(()),
                }
            },
        };
        send(w, &Frame::Exited(status)).await?;
        // What the real agent sends next: the command's usage.
        send(w, &Frame::Usage(FAKE_USAGE)).await
    }
}

/// The usage the fake agent reports for every exec.
pub const FAKE_USAGE: sandpit_wire::Usage = sandpit_wire::Usage {
    user_us: 1_500,
    sys_us: 500,
    max_rss_bytes: 1 << 20,
};

impl AgentState {
    fn mkdir_p(&mut self, dir: &str) {
        let mut at = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            self.dirs.insert(at.clone());
        }
    }
}

fn error(kind: ErrorKind, message: String) -> Frame {
    Frame::Error { kind, message }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64);
    sandpit_wire::encode(frame, &mut buf);
    w.write_all(&buf).await
}
