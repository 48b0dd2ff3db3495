//! `sandpit exec [-i] [-t] ID -- CMD...`: a command in a running sandbox
//! over StreamExec, as `docker exec` runs one.
//!
//! Exit codes: the command's own status (128 + N when signal N killed it;
//! 126 when it cannot run, 127 when it is not found, as the agent reports
//! them), and 125 when the daemon or the connection failed (`main`'s code
//! for any error of ours). A signal that ends `sandpit` itself (SIGINT,
//! SIGTERM, SIGHUP) ends the call, whose cancellation kills the command,
//! and the exit code is 128 + N.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context, Result};
use clap::Args;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::exec_stream_output::Stream as PbStream;
use sandpit_proto::sandbox::v1::exec_stream_request::Message as In;
use sandpit_proto::sandbox::v1::exec_stream_response::Message as Out;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::remote::{self, ServerArgs};
use crate::term::RawMode;

#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
    /// Forward standard input to the command (its EOF closes the command's
    /// stdin); without it the command's stdin is closed at once.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the command on a pseudo-terminal (stdout and stderr merged),
    /// with this terminal in raw mode and its size followed.
    #[arg(long, short = 't')]
    tty: bool,
    /// Environment variable `KEY=VALUE` (repeatable); `KEY` alone takes the
    /// value from this environment.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = crate::create::parse_env)]
    env: Vec<(String, String)>,
    /// Working directory of the command.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Sandbox id.
    id: String,
    /// The command and its arguments (after `--` or not).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// The argv to send: the protocol has no working directory, so `-w` goes
/// through `sh`, as the client does it.
fn argv(command: &[String], workdir: Option<&str>) -> Vec<String> {
    match workdir {
        None => command.to_vec(),
        Some(dir) => [
            "sh",
            "-c",
            "cd -- \"$1\" && shift && exec \"$@\"",
            "sh",
            dir,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(command.iter().cloned())
        .collect(),
    }
}

/// Runs the command; returns its exit code.
pub(crate) fn run(server: &ServerArgs, data_dir: &std::path::Path, args: ExecArgs) -> Result<i32> {
    let rt = crate::remote::runtime()?;
    rt.block_on(exec(server, data_dir, args))
}

async fn exec(server: &ServerArgs, data_dir: &std::path::Path, args: ExecArgs) -> Result<i32> {
    // Caught before the terminal goes raw, so that no signal's default
    // action can leave it raw.
    let mut winch = signal(SignalKind::window_change()).context("watch SIGWINCH")?;
    let mut int = signal(SignalKind::interrupt()).context("watch SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("watch SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("watch SIGHUP")?;
    // Restored when this future ends or is dropped: every return, an
    // error, a signal above, a panic's unwinding (`block_on` drops it).
    let _raw = if args.tty && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let mut env: std::collections::HashMap<String, String> = args.env.into_iter().collect();
    let size = if args.tty { terminal_size() } else { None };
    if args.tty && !env.contains_key("TERM") {
        env.insert(
            "TERM".into(),
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
        );
    }
    let init = pb::ExecStreamInit {
        sandbox_id: args.id.clone(),
        command: argv(&args.command, args.workdir.as_deref()),
        tty: args.tty,
        tty_width: size.map_or(0, |(cols, _)| cols.into()),
        tty_height: size.map_or(0, |(_, rows)| rows.into()),
        env,
        container: String::new(),
    };
    let mut client = remote::connect(server, data_dir).await?;
    let (tx, rx) = mpsc::channel(16);
    let send = |m: In| pb::ExecStreamRequest { message: Some(m) };
    tx.send(send(In::Init(init))).await.ok();
    if args.interactive {
        forward_input(std::io::stdin(), tx.clone());
    } else if !args.tty {
        // No stdin: EOF at once (with a PTY the agent would type ^D, so
        // stdin just stays unused there, as with `docker exec -t`).
        tx.send(send(In::Close(pb::ExecStreamClose {}))).await.ok();
    }
    let mut stream = client
        .stream_exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(remote::status_error)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    loop {
        let message = tokio::select! {
            m = stream.message() => m.map_err(remote::status_error)?,
            _ = winch.recv(), if args.tty => {
                if let Some((cols, rows)) = terminal_size() {
                    let resize = pb::ExecStreamResize { width: cols.into(), height: rows.into() };
                    tx.send(send(In::Resize(resize))).await.ok();
                }
                continue;
            }
            // Returning drops the call: the daemon kills the command.
            _ = int.recv() => return Ok(128 + libc::SIGINT),
            _ = term.recv() => return Ok(128 + libc::SIGTERM),
            _ = hup.recv() => return Ok(128 + libc::SIGHUP),
        };
        let Some(response) = message else {
            bail!("the daemon ended the exec without an exit status");
        };
        let Some(message) = response.message else {
            continue;
        };
        match message {
            Out::Ready(_) => {}
            Out::Output(o) if o.stream == PbStream::Stderr as i32 => {
                stderr.write_all(&o.data).context("write stderr")?;
                stderr.flush().ok();
            }
            Out::Output(o) => {
                stdout.write_all(&o.data).context("write stdout")?;
                stdout.flush().context("write stdout")?;
            }
            Out::Exit(e) => return Ok(e.exit_code),
            Out::Error(e) if e.code.is_empty() => bail!("exec: {}", e.message),
            Out::Error(e) => bail!("exec: {} ({})", e.message, e.code),
        }
    }
}

/// `input` to the command's stdin, from a thread of its own (reads block);
/// its EOF closes the command's stdin.
pub(crate) fn forward_input(
    mut input: impl Read + Send + 'static,
    tx: mpsc::Sender<pb::ExecStreamRequest>,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let message = match input.read(&mut buf) {
                Ok(0) | Err(_) => In::Close(pb::ExecStreamClose {}),
                Ok(n) => In::Stdin(buf[..n].to_vec()),
            };
            let last = matches!(message, In::Close(_));
            let sent = tx.blocking_send(pb::ExecStreamRequest {
                message: Some(message),
            });
            if last || sent.is_err() {
                return;
            }
        }
    });
}

/// This terminal's size (columns, rows), from stdout or else stdin.
fn terminal_size() -> Option<(u16, u16)> {
    [1, 0].into_iter().find_map(|fd| {
        // SAFETY: winsize is plain old data; all-zero is a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExecArgs,
    }

    #[test]
    fn the_command_follows_the_id_with_or_without_dashes() {
        let cli = Cli::try_parse_from(["x", "-it", "-e", "A=1", "sb", "--", "ls", "-l"]).unwrap();
        assert!(cli.args.interactive && cli.args.tty);
        assert_eq!(cli.args.id, "sb");
        assert_eq!(cli.args.command, ["ls", "-l"]);
        let cli = Cli::try_parse_from(["x", "sb", "sh", "-c", "exit 3"]).unwrap();
        assert!(!cli.args.interactive && !cli.args.tty);
        assert_eq!(cli.args.command, ["sh", "-c", "exit 3"]);
        assert!(Cli::try_parse_from(["x", "sb"]).is_err());
    }

    #[test]
    fn a_workdir_goes_through_sh() {
        let cmd = vec!["ls".to_string(), "-l".to_string()];
        assert_eq!(argv(&cmd, None), cmd);
        let wrapped = argv(&cmd, Some("/my dir"));
        assert_eq!(wrapped[..2], ["sh", "-c"]);
        assert_eq!(wrapped[3..], ["sh", "/my dir", "ls", "-l"]);
    }
}
