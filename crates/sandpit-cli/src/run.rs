//! `sandpit run`: one sandbox, one command, attached to this terminal, then
//! teardown. With a terminal on both ends the command gets a PTY (raw mode,
//! resize followed); otherwise stdin, stdout and stderr are streamed as pipes
//! and SIGINT/SIGTERM/SIGHUP are forwarded to the command.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios;
use sandpit_image::Reference;
use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory};
use sandpit_runtime::{
    default_agent_binary, default_spawner_binary, Limits, Runtime, RuntimeConfig, SandboxSpec,
};
use sandpit_wire::client::ExecEvent;
use sandpit_wire::{ExecRequest, InitSpec, WinSize};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// Memory limit, e.g. `256Mi`.
    #[arg(long)]
    memory: Option<String>,
    /// CPU limit, e.g. `0.5` or `500m`.
    #[arg(long)]
    cpus: Option<String>,
    /// Maximum number of processes.
    #[arg(long)]
    pids: Option<u64>,
    /// Environment variables (`KEY=VALUE`, repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Hostname inside the sandbox (default: the sandbox id).
    #[arg(long)]
    hostname: Option<String>,
    /// Allocate a PTY: `auto` when stdin and stdout are terminals.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    tty: String,
    /// The image, e.g. `python:3.11`.
    pub image: String,
    /// Command and arguments (default: the image's command, or `sh`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs the command and returns its shell-style exit code.
pub(crate) fn run(data_dir: &Path, args: RunArgs) -> Result<i32> {
    let limits = Limits {
        memory_bytes: args
            .memory
            .as_deref()
            .map(parse_memory)
            .transpose()
            .context("--memory")?,
        cpu_millis: args
            .cpus
            .as_deref()
            .map(parse_cpu_millis)
            .transpose()
            .context("--cpus")?,
        pids_max: args.pids,
    };
    let store = crate::open_store(data_dir)?;
    let reference = Reference::parse(&args.image)?;
    let image = store.get(&reference).with_context(|| {
        format!(
            "image {reference} is not in the store (sandpit image import {reference} ROOTFS.tar)"
        )
    })?;

    let mut env: Vec<(String, String)> = Vec::new();
    for kv in image.config.env.iter().chain(&args.env) {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("environment entry {kv:?}: expected KEY=VALUE"))?;
        env.retain(|(existing, _)| existing != k);
        env.push((k.to_string(), v.to_string()));
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    let tty = match args.tty.as_str() {
        "always" => true,
        "never" => false,
        _ => is_terminal(0) && is_terminal(1),
    };
    if tty && !env.iter().any(|(k, _)| k == "TERM") {
        env.push((
            "TERM".into(),
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        ));
    }
    let argv = if !args.command.is_empty() {
        args.command.clone()
    } else {
        let mut argv: Vec<String> = image.config.entrypoint.clone();
        argv.extend(image.config.cmd.iter().cloned());
        if argv.is_empty() {
            argv.push("sh".into());
        }
        argv
    };
    let cwd = args.workdir.clone().unwrap_or_else(|| {
        if image.config.working_dir.is_empty() {
            "/".into()
        } else {
            image.config.working_dir.clone()
        }
    });

    let runtime = Runtime::new(RuntimeConfig {
        state_dir: data_dir.join("sandboxes"),
        agent_binary: default_agent_binary(),
        spawner_binary: default_spawner_binary(),
        id_map: Default::default(),
        cgroup_parent: "sandpit".into(),
    })?;
    let id = format!("run-{}", random_hex());
    // The sandbox idles (no main command); the user's command runs as an
    // exec so its output streams back and its exit code is ours.
    let spec = SandboxSpec {
        id: id.clone(),
        hostname: args.hostname.clone(),
        lower_dirs: store.lower_dirs(&image),
        init: InitSpec {
            argv: vec![],
            env,
            cwd: cwd.clone(),
            files: vec![],
        },
        limits,
    };
    // Signals are handled by a dedicated thread from here on, so that a
    // Ctrl-C still tears the sandbox down.
    let mut forwarded = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        forwarded.add(s);
    }
    forwarded.thread_block().context("block signals")?;

    // Leased while mounted: a gc (here or in sandpitd) must not collect
    // the layers under the sandbox.
    store.lease(&id, &image.layers)?;
    let sandbox = match runtime.create(&spec) {
        Ok(sandbox) => sandbox,
        Err(e) => {
            let _ = store.release(&id);
            return Err(e.into());
        }
    };
    let result = attach(&sandbox, argv, cwd, tty, forwarded);
    match runtime.destroy(&id) {
        Ok(()) => {
            if let Err(e) = store.release(&id) {
                eprintln!("sandpit: release image lease {id}: {e}");
            }
        }
        Err(e) => eprintln!("sandpit: remove sandbox {id}: {e}"),
    }
    result
}

fn attach(
    sandbox: &sandpit_runtime::Sandbox,
    argv: Vec<String>,
    cwd: String,
    tty: bool,
    forwarded: SigSet,
) -> Result<i32> {
    let size = if tty { terminal_size() } else { None };
    let mut session = sandbox
        .agent()
        .exec(ExecRequest {
            argv,
            env: vec![],
            cwd: Some(cwd),
            tty: if tty {
                Some(size.unwrap_or(WinSize { cols: 80, rows: 24 }))
            } else {
                None
            },
        })
        .context("start command")?;
    let control = session.stdin_writer().context("attach")?;

    // Raw mode for the lifetime of the session; restored on every path out.
    let _raw = if tty { RawMode::enter()? } else { None };

    let mut stdin_control = control.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = stdin_control.close_stdin();
                    return;
                }
                Ok(n) => {
                    if stdin_control.send_stdin(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut signal_control = control.clone();
    std::thread::spawn(move || {
        while let Ok(sig) = forwarded.wait() {
            // Only SIGINT, SIGTERM and SIGHUP are waited for: all in range.
            let Some(sig) = sandpit_wire::Signal::new(sig as i32) else {
                continue;
            };
            if signal_control.signal(sig).is_err() {
                return;
            }
        }
    });
    if tty {
        let mut resize_control = control.clone();
        std::thread::spawn(move || {
            // Polling avoids a SIGWINCH handler; a quarter second is below
            // what a person notices while dragging a window.
            let mut last = size;
            loop {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let now = terminal_size();
                if let Some(ws) = now.filter(|_| now != last) {
                    last = now;
                    if resize_control.resize(ws).is_err() {
                        return;
                    }
                }
            }
        });
    }

    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    loop {
        match session.next_event()? {
            Some(ExecEvent::Stdout(data)) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Some(ExecEvent::Stderr(data)) => {
                stderr.write_all(&data)?;
            }
            Some(ExecEvent::Exited(status)) => return Ok(status.shell_code()),
            None => anyhow::bail!("the sandbox ended the session without an exit status"),
        }
    }
}

/// Restores the terminal's settings when dropped.
struct RawMode {
    saved: termios::Termios,
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}

impl RawMode {
    fn enter() -> Result<Option<Self>> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("read terminal settings")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw)
            .context("set raw mode")?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(
            std::io::stdin().as_fd(),
            termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn terminal_size() -> Option<WinSize> {
    // SAFETY: winsize is plain old data; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some(WinSize {
        cols: ws.ws_col,
        rows: ws.ws_row,
    })
}

fn random_hex() -> String {
    let mut bytes = [0u8; 6];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if filled.is_err() {
        // Unique enough for a one-off name: pid and clock.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        bytes[..4].copy_from_slice(&nanos.to_le_bytes());
        bytes[4..].copy_from_slice(&(std::process::id() as u16).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
