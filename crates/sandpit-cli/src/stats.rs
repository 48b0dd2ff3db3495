//! `sandpit stats`: live CPU, memory, network and tasks of running
//! sandboxes, Docker-like, from the daemon's `sandpit.v1.Operations`
//! SandboxStats. CPU % comes from two samples (100 % = one CPU busy).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use sandpit_proto::sandpit::v1 as spb;
use sandpit_proto::sandpit::v1::operations_client::OperationsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::remote::{connect_channel, Auth, ServerArgs};

/// `sandpit stats` arguments.
#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// Sandbox ids (default: every running sandbox of the caller).
    ids: Vec<String>,
    /// Print one sample and exit (CPU % over one interval).
    #[arg(long)]
    no_stream: bool,
    /// Print JSON (one array per sample) instead of a table.
    #[arg(long)]
    json: bool,
    /// Seconds between samples.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    interval: f64,
}

type Client = OperationsClient<InterceptedService<Channel, Auth>>;

/// One sample of all the sandboxes asked for.
struct Sample {
    at: Instant,
    entries: Vec<spb::SandboxStatsEntry>,
}

async fn sample(client: &mut Client, ids: &[String]) -> Result<Sample> {
    let at = Instant::now();
    let response = client
        .sandbox_stats(spb::SandboxStatsRequest {
            sandbox_ids: ids.to_vec(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("sandbox stats")?
        .into_inner();
    Ok(Sample {
        at,
        entries: response.sandboxes,
    })
}

/// One row: the latest figures and the CPU % since the previous sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Row {
    id: String,
    name: String,
    tags: Vec<String>,
    /// `None` for a sandbox not in the previous sample.
    cpu_percent: Option<f64>,
    cpu_usage_ns: u64,
    memory_bytes: u64,
    memory_limit_bytes: Option<u64>,
    memory_percent: Option<f64>,
    memory_peak_bytes: Option<u64>,
    net_rx_bytes: Option<u64>,
    net_tx_bytes: Option<u64>,
    pids: u64,
}

fn rows(before: &Sample, now: &Sample) -> Vec<Row> {
    let earlier: HashMap<&str, u64> = before
        .entries
        .iter()
        .map(|e| (e.sandbox_id.as_str(), e.cpu_usage_ns))
        .collect();
    let wall = now.at.saturating_duration_since(before.at).as_nanos() as f64;
    now.entries
        .iter()
        .map(|e| Row {
            id: e.sandbox_id.clone(),
            name: e.display_name.clone(),
            tags: e.tags.clone(),
            cpu_percent: earlier
                .get(e.sandbox_id.as_str())
                .filter(|_| wall > 0.0)
                .map(|b| e.cpu_usage_ns.saturating_sub(*b) as f64 / wall * 100.0),
            cpu_usage_ns: e.cpu_usage_ns,
            memory_bytes: e.memory_bytes,
            memory_limit_bytes: e.memory_limit_bytes,
            memory_percent: e
                .memory_limit_bytes
                .filter(|l| *l > 0)
                .map(|l| e.memory_bytes as f64 / l as f64 * 100.0),
            memory_peak_bytes: e.memory_peak_bytes,
            net_rx_bytes: e.net_rx_bytes,
            net_tx_bytes: e.net_tx_bytes,
            pids: e.pids,
        })
        .collect()
}

/// Bytes as Docker prints them (`1.5MiB`, `12kB` style, binary units).
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.2}{}", UNITS[unit])
    }
}

fn percent(p: Option<f64>) -> String {
    p.map_or_else(|| "--".into(), |p| format!("{p:.2}%"))
}

pub(crate) fn table(rows: &[Row]) -> String {
    let opt = |b: Option<u64>| b.map_or_else(|| "--".into(), human);
    let mut lines = vec![[
        "ID".to_string(),
        "NAME/TAGS".into(),
        "CPU %".into(),
        "MEM USAGE / LIMIT".into(),
        "MEM %".into(),
        "NET I/O".into(),
        "PIDS".into(),
    ]];
    for r in rows {
        let name = if r.name.is_empty() {
            r.tags.join(",")
        } else {
            r.name.clone()
        };
        let limit = r
            .memory_limit_bytes
            .map_or_else(|| "unlimited".into(), human);
        lines.push([
            r.id.clone(),
            if name.is_empty() { "--".into() } else { name },
            percent(r.cpu_percent),
            format!("{} / {limit}", human(r.memory_bytes)),
            percent(r.memory_percent),
            format!("{} / {}", opt(r.net_rx_bytes), opt(r.net_tx_bytes)),
            r.pids.to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs `sandpit stats`.
pub(crate) fn run(server: &ServerArgs, data_dir: &std::path::Path, args: StatsArgs) -> Result<()> {
    if !(args.interval > 0.0 && args.interval <= 3600.0) {
        anyhow::bail!("--interval must be above 0 and at most 3600 seconds");
    }
    let interval = Duration::from_secs_f64(args.interval);
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        let (channel, auth) = connect_channel(server, data_dir).await?;
        let mut client = OperationsClient::with_interceptor(channel, auth);
        let mut before = sample(&mut client, &args.ids).await?;
        loop {
            tokio::time::sleep(interval).await;
            let now = sample(&mut client, &args.ids).await?;
            let rows = rows(&before, &now);
            if args.json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                if !args.no_stream {
                    // Clear the screen and go home, as `docker stats` does.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{}", table(&rows));
            }
            if args.no_stream {
                return Ok(());
            }
            before = now;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, cpu_ns: u64, mem: u64, limit: Option<u64>) -> spb::SandboxStatsEntry {
        spb::SandboxStatsEntry {
            sandbox_id: id.into(),
            cpu_usage_ns: cpu_ns,
            memory_bytes: mem,
            memory_limit_bytes: limit,
            pids: 2,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_percent_is_the_cpu_time_over_the_wall_time_between_samples() {
        let t0 = Instant::now();
        let before = Sample {
            at: t0,
            entries: vec![entry("a", 1_000_000_000, 0, None)],
        };
        let now = Sample {
            at: t0 + Duration::from_secs(2),
            entries: vec![
                entry("a", 2_000_000_000, 512 << 20, Some(1 << 30)),
                entry("new", 5, 0, None),
            ],
        };
        let r = rows(&before, &now);
        // One CPU-second in two seconds: half a CPU.
        assert!((r[0].cpu_percent.unwrap() - 50.0).abs() < 1e-9);
        assert!((r[0].memory_percent.unwrap() - 50.0).abs() < 1e-9);
        // Not in the first sample: no rate yet.
        assert_eq!(r[1].cpu_percent, None);
        assert_eq!(r[1].memory_percent, None);
        let t = table(&r);
        assert!(t.starts_with("ID "), "{t}");
        assert!(
            t.contains("50.00%") && t.contains("512.00MiB / 1.00GiB"),
            "{t}"
        );
        assert!(t.contains("0B / unlimited"), "{t}");
    }

    #[test]
    fn bytes_print_in_binary_units() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(1023), "1023B");
        assert_eq!(human(1536), "1.50KiB");
        assert_eq!(human(3 << 30), "3.00GiB");
    }
}
