//! `sandpit create`: a sandbox through the daemon's CreateSandbox, as
//! `docker run -d` starts a container: prints the id once it runs.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use sandpit_proto::sandbox::v1 as pb;

use crate::remote::{self, ServerArgs};

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Environment variable `KEY=VALUE` (repeatable); `KEY` alone takes the
    /// value from this environment.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Memory limit: `512Mi`, `1g`, `256m`, `1000000` (bytes).
    #[arg(long, short = 'm', value_parser = parse_memory)]
    memory: Option<u64>,
    /// CPU limit: `1.5`, `500m`.
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<u64>,
    /// Tag (repeatable); `sandpit ls --tag` and the client filter on them.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Longest lifetime: `3600` (seconds), `30m`, `2h`, `1h30m`.
    #[arg(long, value_parser = parse_lifetime)]
    lifetime: Option<u32>,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Working directory of the main command.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Return once the daemon accepted the sandbox, without waiting until
    /// it runs.
    #[arg(long)]
    no_wait: bool,
    /// Print the record as one JSON object instead of the id.
    #[arg(long)]
    json: bool,
    /// The image, e.g. `python:3.11`.
    image: String,
    /// The main command and its arguments (default: the image's).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Docker's `-e KEY=VALUE`, or `-e KEY` for this process's value.
pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    let (key, value) = match s.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => {
            let value = std::env::var(s).map_err(|_| format!("{s} is not set here"))?;
            (s.to_string(), value)
        }
    };
    if key.is_empty() {
        return Err("empty variable name".into());
    }
    Ok((key, value))
}

/// Memory in bytes: Kubernetes quantities (`512Mi`, `1G`) and Docker's
/// lowercase binary suffixes (`b`, `k`, `m`, `g`: `1g` is 1 GiB).
pub(crate) fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let docker = |suffix: char, shift: u32| {
        t.strip_suffix(suffix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .map(|n| (n, shift))
    };
    let lower = docker('b', 0)
        .or_else(|| docker('k', 10))
        .or_else(|| docker('m', 20))
        .or_else(|| docker('g', 30));
    if let Some((n, shift)) = lower {
        let n: u64 = n.parse().map_err(|_| format!("{s:?} is too large"))?;
        return n
            .checked_mul(1 << shift)
            .filter(|&b| b > 0)
            .ok_or_else(|| format!("{s:?} must be positive and below 16 EiB"));
    }
    sandpit_runtime::quantity::parse_memory(t).map_err(|e| e.to_string())
}

/// CPUs in thousandths: `1.5` or `1500m`.
pub(crate) fn parse_cpus(s: &str) -> Result<u64, String> {
    sandpit_runtime::quantity::parse_cpu_millis(s).map_err(|e| e.to_string())
}

/// A lifetime in seconds: a plain number, or numbers each followed by `s`,
/// `m`, `h` or `d` (`1h30m`).
pub(crate) fn parse_lifetime(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a lifetime (examples: 3600, 30m, 2h, 1h30m)");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        // A trailing bare number: seconds (`3600`), never after a unit.
        if number.len() != t.len() {
            return Err(bad());
        }
        total = number.parse().map_err(|_| bad())?;
    }
    if total == 0 {
        return Err(format!("{s:?} must be positive"));
    }
    u32::try_from(total)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// The CreateSandbox request for `args`.
fn request(args: &CreateArgs) -> pb::CreateSandboxRequest {
    let (command, rest) = match args.command.split_first() {
        Some((c, rest)) => (c.clone(), rest.to_vec()),
        None => (String::new(), vec![]),
    };
    let limits = (args.memory.is_some() || args.cpus.is_some()).then(|| pb::Resources {
        cpu: args.cpus.map(|m| format!("{m}m")).unwrap_or_default(),
        memory: args.memory.map(|b| b.to_string()).unwrap_or_default(),
        gpu: None,
    });
    let environment_variables: HashMap<String, String> = args.env.iter().cloned().collect();
    let container = pb::Container {
        name: "main".into(),
        image: args.image.clone(),
        command,
        args: rest,
        environment_variables,
        working_dir: args.workdir.clone().unwrap_or_default(),
        // Docker's --memory and --cpus are caps: a limit alone also
        // requests itself.
        resource_requirements: limits.map(|l| pb::ResourceRequirements {
            requests: None,
            limits: Some(l),
        }),
        ..Default::default()
    };
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(pb::SandboxSpec {
                containers: vec![container],
                max_lifetime_seconds: args.lifetime.map_or(0, |s| s as i32),
                tags: args.tags.clone(),
                ..Default::default()
            }),
            display_name: args.name.clone().unwrap_or_default(),
            ..Default::default()
        }),
        request_id: request_id(),
    }
}

/// A fresh idempotency key (the daemon's retries key): time and pid.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("sandpit-cli-{nanos:x}-{}", std::process::id())
}

fn state_failed(state: i32) -> bool {
    state == pb::State::Failed as i32
}

fn state(sb: &pb::Sandbox) -> pb::State {
    let state = sb.status.as_ref().map(|s| s.state).unwrap_or_default();
    pb::State::try_from(state).unwrap_or(pb::State::Unspecified)
}

/// Creates the sandbox; prints its id (or record).
pub(crate) fn run(server: &ServerArgs, data_dir: &std::path::Path, args: CreateArgs) -> Result<()> {
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let mut client = remote::connect(server, data_dir).await?;
        let mut sb = client
            .create_sandbox(request(&args))
            .await
            .map_err(remote::status_error)?
            .into_inner();
        // Like `docker run -d`: back once it runs (the daemon answers
        // PENDING while it pulls, CREATING while a probe gates it).
        while !args.no_wait && matches!(state(&sb), pb::State::Pending | pb::State::Creating) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sb = client
                .get_sandbox(pb::GetSandboxRequest {
                    sandbox_id: sb.sandbox_id.clone(),
                })
                .await
                .map_err(remote::status_error)?
                .into_inner();
        }
        if args.json {
            crate::output::print(&crate::output::sandbox(&sb));
        } else {
            println!("{}", sb.sandbox_id);
        }
        // One that never started (its image, its command) is an error; one
        // whose command already ended is not (`docker run -d true` is fine).
        let status = sb.status.unwrap_or_default();
        if !args.no_wait && state_failed(status.state) && status.start_time.is_none() {
            bail!("sandbox {} failed: {}", sb.sandbox_id, status.state_reason);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_takes_both_spellings() {
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("1g"), Ok(1 << 30));
        assert_eq!(parse_memory("256m"), Ok(256 << 20));
        assert_eq!(parse_memory("64k"), Ok(64 << 10));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1000000"), Ok(1_000_000));
        assert!(parse_memory("0g").is_err());
        assert!(parse_memory("1.5g").is_err());
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("99999999999999g").is_err());
    }

    #[test]
    fn cpus_are_thousandths() {
        assert_eq!(parse_cpus("1.5"), Ok(1500));
        assert_eq!(parse_cpus("500m"), Ok(500));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("-1").is_err());
    }

    #[test]
    fn lifetimes_are_seconds() {
        assert_eq!(parse_lifetime("3600"), Ok(3600));
        assert_eq!(parse_lifetime("30m"), Ok(1800));
        assert_eq!(parse_lifetime("2h"), Ok(7200));
        assert_eq!(parse_lifetime("1h30m"), Ok(5400));
        assert_eq!(parse_lifetime("1d"), Ok(86400));
        assert_eq!(parse_lifetime("45s"), Ok(45));
        for bad in ["", "0", "m", "1x", "1h30", "-5", "99999999999"] {
            assert!(parse_lifetime(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_entries_need_a_name() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("SANDPIT_SURELY_UNSET_VARIABLE").is_err());
    }

    #[test]
    fn the_request_carries_every_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: CreateArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "-e",
            "A=1",
            "--memory",
            "1g",
            "--cpus",
            "1.5",
            "--tag",
            "t1",
            "--tag",
            "t2",
            "--lifetime",
            "30m",
            "--name",
            "n",
            "python:3.11",
            "--",
            "sleep",
            "60",
        ])
        .unwrap();
        let req = request(&cli.args);
        let sb = req.sandbox.unwrap();
        let spec = sb.spec.unwrap();
        let c = &spec.containers[0];
        assert_eq!((c.name.as_str(), c.image.as_str()), ("main", "python:3.11"));
        assert_eq!(
            (c.command.as_str(), c.args.clone()),
            ("sleep", vec!["60".to_string()])
        );
        assert_eq!(c.environment_variables["A"], "1");
        let limits = c.resource_requirements.clone().unwrap().limits.unwrap();
        assert_eq!(
            (limits.cpu.as_str(), limits.memory.as_str()),
            ("1500m", "1073741824")
        );
        assert_eq!(spec.tags, ["t1", "t2"]);
        assert_eq!(spec.max_lifetime_seconds, 1800);
        assert_eq!(sb.display_name, "n");
        assert!(!req.request_id.is_empty());
    }
}
