//! `sandpit run`: one sandbox, one command, attached to this terminal, then
//! teardown. With a terminal on both ends the command gets a PTY (raw mode,
//! resize followed); otherwise stdin, stdout and stderr are streamed as pipes
//! and SIGINT/SIGTERM/SIGHUP are forwarded to the command.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use sandpit_image::{ImageConfig, Reference};
use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory};
use sandpit_runtime::{
    default_agent_binary, default_spawner_binary, Limits, Runtime, RuntimeConfig, SandboxId,
    SandboxSpec,
};
use sandpit_wire::client::ExecEvent;
use sandpit_wire::process::{self, ImageProcess, Process, ProcessOverrides};
use sandpit_wire::{ExecRequest, InitSpec, WinSize};

use crate::term::RawMode;

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
        // Docker's --cpus/--memory are caps; no separate requests here.
        ..Limits::default()
    };
    let store = crate::open_store(data_dir)?;
    let reference = Reference::parse(&args.image)?;
    let image = store.get(&reference).with_context(|| {
        format!(
            "image {reference} is not in the store (sandpit image import {reference} ROOTFS.tar)"
        )
    })?;

    let Process { argv, mut env, cwd } = resolve(
        &image.config,
        &args.command,
        &args.env,
        args.workdir.as_deref(),
    )?;
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
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: data_dir.join("sandboxes"),
        agent_binary: default_agent_binary(),
        spawner_binary: default_spawner_binary(),
        id_map: Default::default(),
        cgroup_parent: "sandpit".into(),
        disk_pool: None,
        lxcfs: None,
    })?;
    let id = SandboxId::generate_prefixed("run");
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
            ..Default::default()
        },
        limits,
        read_only_root: false,
        network_namespace: None,
        mounts: Vec::new(),
        disk_bytes: None,
    };
    // Signals are handled by a dedicated thread from here on, so that a
    // Ctrl-C still tears the sandbox down.
    let mut forwarded = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        forwarded.add(s);
    }
    forwarded.thread_block().context("block signals")?;

    // Leased while mounted: a gc (here or in sandpitd) must not collect
    // the layers under the sandbox. The guard releases the lease if the
    // sandbox cannot be created.
    let lease = store.lease_guard(id.as_str(), &image.layers)?;
    let sandbox = runtime.create(&spec).context("start sandbox")?;
    let result = attach(&sandbox, argv, cwd, tty, forwarded);
    match runtime.destroy(&id) {
        Ok(()) => {
            if let Err(e) = lease.release() {
                eprintln!(
                    "sandpit: release image lease {id}: {e:#}",
                    e = anyhow::Error::from(e)
                );
            }
        }
        Err(e) => {
            // Still mounted: the layers stay leased.
            lease.keep();
            eprintln!("sandpit: remove sandbox {id}: {:#}", anyhow::Error::from(e));
        }
    }
    result
}

/// The command to run: the image's config under `-- CMD ARGS` (which
/// replace its entrypoint and cmd), `-e KEY=VALUE` entries and `-w`, merged
/// as the daemon merges them ([`process::resolve`]); `sh` when neither the
/// image nor the user names a program.
fn resolve(
    config: &ImageConfig,
    command: &[String],
    env: &[String],
    workdir: Option<&str>,
) -> Result<Process> {
    let env = env
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("environment entry {kv:?}: expected KEY=VALUE"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let (program, args) = match command.split_first() {
        Some((program, args)) => (Some(program.as_str()), args),
        None => (None, &[][..]),
    };
    let mut process = process::resolve(
        &ImageProcess {
            entrypoint: &config.entrypoint,
            cmd: &config.cmd,
            env: &config.env,
            working_dir: &config.working_dir,
        },
        &ProcessOverrides {
            command: program,
            args,
            env: &env,
            working_dir: workdir,
        },
    );
    if process.argv.is_empty() {
        process.argv.push("sh".into());
    }
    Ok(process)
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
    let _raw = if tty { Some(RawMode::enter()?) } else { None };

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

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn config() -> ImageConfig {
        ImageConfig {
            env: strings(&["LANG=C.UTF-8", "HOME=/root", "FLAG"]),
            entrypoint: strings(&["/entry"]),
            cmd: strings(&["default-arg"]),
            working_dir: "/app".into(),
            user: String::new(),
        }
    }

    #[test]
    fn the_command_replaces_entrypoint_and_cmd() {
        let p = resolve(&config(), &strings(&["ls", "-l"]), &[], None).unwrap();
        assert_eq!(p.argv, ["ls", "-l"]);
        let p = resolve(&config(), &[], &[], None).unwrap();
        assert_eq!(p.argv, ["/entry", "default-arg"]);
        assert_eq!(p.cwd, "/app");
        let bare = ImageConfig {
            entrypoint: vec![],
            cmd: vec![],
            working_dir: String::new(),
            ..config()
        };
        let p = resolve(&bare, &[], &[], None).unwrap();
        assert_eq!(p.argv, ["sh"]);
        assert_eq!(p.cwd, "/");
        let p = resolve(&bare, &[], &[], Some("/w")).unwrap();
        assert_eq!(p.cwd, "/w");
    }

    #[test]
    fn env_entries_override_the_image_and_must_have_a_value() {
        let p = resolve(&config(), &[], &strings(&["HOME=/home/me", "X=a=b"]), None).unwrap();
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(
            p.env,
            [
                kv("LANG", "C.UTF-8"),
                kv("HOME", "/home/me"),
                // An image entry without '=' is an empty value, as in the daemon.
                kv("FLAG", ""),
                kv("X", "a=b"),
                kv("PATH", process::DEFAULT_PATH),
            ]
        );
        let err = resolve(&config(), &[], &strings(&["NOVALUE"]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment entry \"NOVALUE\": expected KEY=VALUE"
        );
    }
}
