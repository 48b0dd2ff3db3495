//! The agent on the host, as the tests start it: a normal child with its
//! listening socket at fd 3 and the `Init` frame at fd 4, exactly as the
//! spawner hands them over, driven through the real client.

// Each test file uses its own part of this.
#![allow(dead_code)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandpit_wire::client::AgentClient;
use sandpit_wire::{encode, ExecRequest, ExitStatus, Frame, InitSpec, MainStatus};

pub(crate) const AGENT: &str = env!("CARGO_BIN_EXE_sandpit-agent");

pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) client: AgentClient,
}

impl Agent {
    /// The sandbox's working directory (Init cwd).
    pub(crate) fn cwd(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_with(argv: &[&str], tweak: impl FnOnce(&mut InitSpec, &Path)) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let mut init = InitSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: dir.path().join("work").to_str().unwrap().to_string(),
        ..Default::default()
    };
    tweak(&mut init, dir.path());
    launch(Command::new(AGENT), dir, init)
}

/// Runs `cmd` (which ends in the agent) with `serve --listen-fd 3 --init-fd 4`.
pub(crate) fn launch(mut cmd: Command, dir: tempfile::TempDir, init: InitSpec) -> Agent {
    let sock = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut buf = Vec::new();
    encode(&Frame::Init(init), &mut buf);
    let mut init_file = tempfile::tempfile().unwrap();
    init_file.write_all(&buf).unwrap();
    let (lfd, ifd) = (listener.as_raw_fd(), init_file.as_raw_fd());
    cmd.args(["serve", "--listen-fd", "3", "--init-fd", "4"])
        .env_clear()
        .stdin(Stdio::null());
    // SAFETY: only async-signal-safe fcntl/dup2 calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Move both out of the way first so neither dup2 clobbers the other.
            let l = libc::fcntl(lfd, libc::F_DUPFD_CLOEXEC, 10);
            let i = libc::fcntl(ifd, libc::F_DUPFD_CLOEXEC, 10);
            if l < 0 || i < 0 || libc::dup2(l, 3) < 0 || libc::dup2(i, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    Agent {
        child,
        dir,
        client: AgentClient::new(sock).with_timeout(Duration::from_secs(30)),
    }
}

pub(crate) fn start(argv: &[&str]) -> Agent {
    start_with(argv, |_, _| {})
}

pub(crate) fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub(crate) fn sh(agent: &Agent, script: &str) -> sandpit_wire::client::Output {
    agent.client.run(req(&["sh", "-c", script]), None).unwrap()
}

pub(crate) fn wait_main_exit(client: &AgentClient) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.ping().unwrap() {
            MainStatus::Exited(s) => return s,
            other => assert!(Instant::now() < deadline, "main still {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
