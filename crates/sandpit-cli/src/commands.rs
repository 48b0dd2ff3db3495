//! `sandpit commands ID [--json]`: a sandbox's command records (CPU time,
//! peak memory, how each exec and the main process ended) from the
//! daemon's `sandpit.v1.Accounting` service.

use anyhow::Result;
use clap::Args;
use sandpit_proto::sandpit::v1 as spb;

use crate::remote::{connect_channel, status_error, ServerArgs};

/// `sandpit commands`.
#[derive(Args, Debug)]
pub(crate) struct CommandsArgs {
    /// Sandbox id.
    id: String,
    /// Print one JSON object per line, one per command.
    #[arg(long)]
    json: bool,
}

/// Prints the sandbox's command records, oldest first.
pub(crate) fn run(
    server: &ServerArgs,
    data_dir: &std::path::Path,
    args: CommandsArgs,
) -> Result<()> {
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let (channel, auth) = connect_channel(server, data_dir).await?;
        let mut client = spb::accounting_client::AccountingClient::with_interceptor(channel, auth);
        let r = client
            .list_commands(spb::ListCommandsRequest {
                sandbox_id: args.id,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            for c in &r.commands {
                println!("{}", json(c));
            }
        } else {
            println!(
                "{:<10} {:<22} {:>5} {:>9} {:>9} {:>10}  COMMAND",
                "ID", "OUTCOME", "CODE", "SECONDS", "CPU_S", "PEAK_MEM"
            );
            for c in &r.commands {
                println!("{}", row(c));
            }
        }
        Ok(())
    })
}

/// The outcome's label, as the daemon's metrics and docs name it.
fn outcome_name(c: &spb::CommandRecord) -> &'static str {
    use spb::CommandOutcome as O;
    match O::try_from(c.outcome).unwrap_or(O::Unspecified) {
        O::Unspecified => "unknown",
        O::Exited => "exited",
        O::Signaled => "signaled",
        O::OomKilled => "oom_killed",
        O::TimedOut => "timed_out",
        O::SandboxStopped => "sandbox_stopped",
        O::Cancelled => "cancelled",
        O::InfrastructureError => "infrastructure_error",
    }
}

fn rfc3339(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    t.as_ref()
        .map_or(serde_json::Value::Null, |t| t.to_string().into())
}

fn json(c: &spb::CommandRecord) -> serde_json::Value {
    serde_json::json!({
        "id": c.id,
        "argv": c.argv,
        "start_time": rfc3339(&c.start_time),
        "end_time": rfc3339(&c.end_time),
        "duration_seconds": c.duration_seconds,
        "cpu_user_seconds": c.cpu_user_seconds,
        "cpu_system_seconds": c.cpu_system_seconds,
        "peak_memory_bytes": c.peak_memory_bytes,
        "outcome": outcome_name(c),
        "exit_code": c.exit_code,
        "signal": c.signal,
        "detail": c.detail,
    })
}

fn row(c: &spb::CommandRecord) -> String {
    let outcome = match c.signal {
        Some(s) => format!("{}({s})", outcome_name(c)),
        None => outcome_name(c).to_string(),
    };
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let cpu = match (c.cpu_user_seconds, c.cpu_system_seconds) {
        (Some(u), Some(s)) => Some(format!("{:.3}", u + s)),
        _ => None,
    };
    format!(
        "{:<10} {:<22} {:>5} {:>9.3} {:>9} {:>10}  {}",
        c.id,
        outcome,
        opt(c.exit_code.map(|v| v.to_string())),
        c.duration_seconds,
        opt(cpu),
        opt(c.peak_memory_bytes.map(crate::human_size)),
        c.argv.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_print_as_rows_and_json() {
        let c = spb::CommandRecord {
            id: "exec-2".into(),
            argv: vec!["sh".into(), "-c".into(), "exit 3".into()],
            duration_seconds: 0.25,
            cpu_user_seconds: Some(0.5),
            cpu_system_seconds: Some(0.25),
            peak_memory_bytes: Some(2 << 20),
            outcome: spb::CommandOutcome::Exited as i32,
            exit_code: Some(3),
            ..Default::default()
        };
        let r = row(&c);
        assert!(r.starts_with("exec-2"), "{r}");
        assert!(
            r.contains("exited") && r.contains("0.750") && r.ends_with("sh -c exit 3"),
            "{r}"
        );
        let j = json(&c);
        assert_eq!(j["outcome"], "exited");
        assert_eq!(j["exit_code"], 3);
        assert_eq!(j["signal"], serde_json::Value::Null);
        assert_eq!(j["peak_memory_bytes"], 2 << 20);
    }
}
