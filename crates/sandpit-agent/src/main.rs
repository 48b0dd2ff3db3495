//! `sandpit-agent`: PID 1 of every sandbox.
//!
//! - `sandpit-agent serve --listen-fd 3 --init-fd 4`: read the `Init` frame from
//!   the init descriptor, start the main command, reap every process, and serve
//!   the host over the listening Unix socket (see `sandpit_wire`).
//! - `sandpit-agent probe`: print one JSON object describing the sandbox as seen
//!   from the inside (used by the engine's isolation tests).
//!
//! Built fully static (`scripts/build-agent.sh`), so it runs in any image; it
//! reads the image's `/etc/passwd` and `/etc/group` itself (`user`) and never
//! resolves hosts, so glibc's NSS is never needed.
//!
//! Every process it starts runs as the sandbox's user with the sandbox's
//! capability set (`creds`); the startup probe runs here too (`startup`).

mod creds;
mod exec;
mod files;
mod mainproc;
mod pool;
mod probe;
mod reaper;
mod serve;
mod spawn;
mod startup;
mod sys;
mod user;

use std::process::ExitCode;

const USAGE: &str = "usage: sandpit-agent serve --listen-fd N --init-fd N | sandpit-agent probe";

fn parse_serve(args: &[String]) -> Result<(i32, i32), String> {
    let (mut listen, mut init) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--listen-fd" => &mut listen,
            "--init-fd" => &mut init,
            other => return Err(format!("unknown argument {other:?}")),
        };
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let fd: i32 = value
            .parse()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| format!("{flag}: bad descriptor {value:?}"))?;
        *slot = Some(fd);
    }
    match (listen, init) {
        (Some(l), Some(i)) if l != i => Ok((l, i)),
        (Some(_), Some(_)) => Err("--listen-fd and --init-fd must differ".into()),
        _ => Err("--listen-fd and --init-fd are required".into()),
    }
}

use sandpit_errors::chain;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match args.first().map(String::as_str) {
        Some("serve") => match parse_serve(&args[1..]) {
            Ok((listen, init)) => match serve::run(listen, init) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sandpit-agent: {}", chain(&e));
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("sandpit-agent: {e}\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some("probe") => probe::run(),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn errors_do_not_repeat_their_sources() {
        let e = serve::ServeError::Os("reaper thread", std::io::Error::other("no threads"));
        let source = e.source().expect("os errors have a source").to_string();
        assert!(!e.to_string().contains(&source), "{e}");
        // What the Display alone said before the source was split off.
        assert_eq!(chain(&e), "reaper thread: no threads");
        let e = serve::ServeError::Init("not an init frame".into());
        assert!(e.source().is_none());
        assert_eq!(chain(&e), "init spec: not an init frame");
    }

    #[test]
    fn serve_arguments() {
        assert_eq!(
            parse_serve(&args(&["--listen-fd", "3", "--init-fd", "4"])),
            Ok((3, 4))
        );
        assert!(parse_serve(&args(&["--listen-fd", "3"])).is_err());
        assert!(parse_serve(&args(&["--listen-fd", "x", "--init-fd", "4"])).is_err());
        assert!(parse_serve(&args(&["--listen-fd", "3", "--init-fd", "3"])).is_err());
        assert!(parse_serve(&args(&["--bogus"])).is_err());
    }
}
