//! Commands that talk to a running `sandpitd` over its gRPC API: `ls`,
//! `get`, `stop`, `delete`, `logs`, `commit`.

use anyhow::{Context, Result};
use clap::Args;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Where the daemon is and who we are.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServerArgs {
    /// The daemon's address.
    #[arg(
        long,
        global = true,
        env = "SANDPIT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    server: String,
    /// API key (default: the key sandpitd generated in the data dir).
    #[arg(long, global = true, env = "SANDPIT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

pub(crate) type Auth =
    Box<dyn FnMut(tonic::Request<()>) -> tonic::Result<tonic::Request<()>> + Send>;
pub(crate) type Client = SandboxServiceClient<InterceptedService<Channel, Auth>>;

pub(crate) async fn connect(args: &ServerArgs, data_dir: &std::path::Path) -> Result<Client> {
    let (channel, auth) = connect_channel(args, data_dir).await?;
    Ok(SandboxServiceClient::with_interceptor(channel, auth).max_decoding_message_size(100 << 20))
}

/// The channel to the daemon and the interceptor that authenticates on it.
pub(crate) async fn connect_channel(
    args: &ServerArgs,
    data_dir: &std::path::Path,
) -> Result<(Channel, Auth)> {
    let key = match &args.api_key {
        Some(k) => k.clone(),
        None => {
            let path = data_dir.join("api-key");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no --api-key and no readable {} (set SANDPIT_API_KEY)",
                        path.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    let header: MetadataValue<_> = format!("Bearer {key}")
        .parse()
        .context("api key is not a valid header value")?;
    let channel = Channel::from_shared(args.server.clone())
        .with_context(|| format!("server address {:?}", args.server))?
        .connect()
        .await
        .with_context(|| format!("connect to {}", args.server))?;
    let auth: Auth = Box::new(move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", header.clone());
        Ok(req)
    });
    Ok((channel, auth))
}

/// The remote subcommands.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum RemoteCommand {
    /// List sandboxes.
    Ls {
        /// Include finished and stopped sandboxes.
        #[arg(long, short = 'a')]
        all: bool,
        /// Only sandboxes carrying all of these tags.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Print one JSON array of records (see docs/ops/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
        /// Print the record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop a sandbox: SIGTERM, then SIGKILL after the grace period.
    Stop {
        /// Sandbox id.
        id: String,
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 10)]
        grace: i32,
    },
    /// Stop a sandbox at once (SIGKILL).
    Delete {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Checkpoint a running sandbox's root file system into an image that
    /// new sandboxes start from (`container_image="NAME:TAG"`).
    Commit {
        /// Sandbox id.
        id: String,
        /// The image to store it as: NAME[:TAG].
        image: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's main-process output (kept after it ended).
    Logs {
        /// Sandbox id.
        id: String,
        /// Keep printing new output until the main process exits.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
        /// Prefix each line with its RFC 3339 time.
        #[arg(long, short = 't')]
        timestamps: bool,
    },
}

/// The single-threaded runtime a CLI verb drives its gRPC calls on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start async runtime")
}

/// Runs one remote command.
pub(crate) fn run(
    server: &ServerArgs,
    data_dir: &std::path::Path,
    command: RemoteCommand,
) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        if let RemoteCommand::Commit { id, image, json } = command {
            return commit(server, data_dir, id, image, json).await;
        }
        let mut client = connect(server, data_dir).await?;
        match command {
            RemoteCommand::Commit { .. } => unreachable!("handled above"),
            RemoteCommand::Ls { all, tags, json } => {
                let mut records = vec![];
                if !json {
                    println!(
                        "{:<14} {:<12} {:<20} {:>5} REASON",
                        "ID", "STATE", "CREATED", "EXIT"
                    );
                }
                let mut page_token = String::new();
                loop {
                    let page = client
                        .list_sandboxes(pb::ListSandboxesRequest {
                            page_token: page_token.clone(),
                            tags: tags.clone(),
                            show_terminated: all,
                            ..Default::default()
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    for sb in &page.sandboxes {
                        if json {
                            records.push(crate::output::sandbox(sb));
                        } else {
                            print_row(sb);
                        }
                    }
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    page_token = page.next_page_token;
                }
                if json {
                    crate::output::print(&serde_json::Value::Array(records));
                }
            }
            RemoteCommand::Get { id, json } => {
                let sb = client
                    .get_sandbox(pb::GetSandboxRequest { sandbox_id: id })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if json {
                    crate::output::print(&crate::output::sandbox(&sb));
                } else {
                    print_details(&sb);
                }
            }
            RemoteCommand::Stop { id, grace } => {
                let sb = delete(&mut client, id, grace).await?;
                print_row(&sb);
            }
            RemoteCommand::Delete { ids } => {
                for id in ids {
                    let sb = delete(&mut client, id, 0).await?;
                    print_row(&sb);
                }
            }
            RemoteCommand::Logs {
                id,
                follow,
                tail,
                timestamps,
            } => {
                use std::io::Write;
                let mut stream = client
                    .stream_logs(pb::StreamLogsRequest {
                        sandbox_id: id,
                        follow,
                        timestamps,
                        tail_lines: tail.map_or(0, |n| n.min(i32::MAX as u32) as i32),
                        ..Default::default()
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let mut out = std::io::stdout().lock();
                while let Some(entry) = stream.message().await.map_err(status_error)? {
                    if let Some(e) = entry.error {
                        anyhow::bail!("{}: {}", e.code, e.message);
                    }
                    out.write_all(&entry.data)?;
                    out.flush()?;
                }
            }
        }
        Ok(())
    })
}

async fn commit(
    server: &ServerArgs,
    data_dir: &std::path::Path,
    id: String,
    image: String,
    json: bool,
) -> Result<()> {
    use sandpit_proto::sandpit::v1 as spb;
    let (channel, auth) = connect_channel(server, data_dir).await?;
    let mut client =
        spb::checkpoint_service_client::CheckpointServiceClient::with_interceptor(channel, auth);
    let r = client
        .commit_sandbox(spb::CommitSandboxRequest {
            sandbox_id: id.clone(),
            image,
            request_id: String::new(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let value = serde_json::json!({
            "sandbox_id": id,
            "image": r.image,
            "image_id": r.image_id,
            "layer_digest": r.layer_digest,
            "layer_size_bytes": r.layer_size_bytes,
            "files": r.files,
            "duration_ms": r.duration_ms,
        });
        println!("{value}");
    } else {
        println!(
            "{}  {} ({} files, {} bytes, {} ms)",
            r.image, r.layer_digest, r.files, r.layer_size_bytes, r.duration_ms
        );
    }
    Ok(())
}

async fn delete(client: &mut Client, id: String, grace: i32) -> Result<pb::Sandbox> {
    let resp = client
        .delete_sandbox(pb::DeleteSandboxRequest {
            sandbox_id: id.clone(),
            grace_period_seconds: grace,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(resp.sandbox.unwrap_or(pb::Sandbox {
        sandbox_id: id,
        ..Default::default()
    }))
}

/// The daemon's refusal as `CODE (REASON): message`: the ErrorInfo reason
/// is what scripts match on.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    match status.get_error_details().error_info() {
        Some(info) if !info.reason.is_empty() => anyhow::anyhow!(
            "{:?} ({}): {}",
            status.code(),
            info.reason,
            status.message()
        ),
        _ => anyhow::anyhow!("{:?}: {}", status.code(), status.message()),
    }
}

pub(crate) fn state_name(sb: &pb::Sandbox) -> String {
    let state = sb.status.as_ref().map(|s| s.state).unwrap_or_default();
    pb::State::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("state {state}"))
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            let secs = t.seconds;
            let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            )
        }
        _ => "-".into(),
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn print_row(sb: &pb::Sandbox) {
    let status = sb.status.clone().unwrap_or_default();
    let exit = status
        .exit_code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "-".into());
    println!(
        "{:<14} {:<12} {:<20} {:>5} {}",
        sb.sandbox_id,
        state_name(sb),
        time(status.create_time.as_ref()),
        exit,
        status.state_reason
    );
}

fn print_details(sb: &pb::Sandbox) {
    let status = sb.status.clone().unwrap_or_default();
    println!("id:        {}", sb.sandbox_id);
    println!("state:     {}", state_name(sb));
    if !status.state_reason.is_empty() {
        println!("reason:    {}", status.state_reason);
    }
    if let Some(code) = status.exit_code {
        println!("exit code: {code}");
    }
    println!("created:   {}", time(status.create_time.as_ref()));
    println!("started:   {}", time(status.start_time.as_ref()));
    println!("ended:     {}", time(status.end_time.as_ref()));
    println!("lifetime:  {} s max", status.effective_max_lifetime_seconds);
    if let Some(spec) = &sb.spec {
        if !spec.tags.is_empty() {
            println!("tags:      {}", spec.tags.join(", "));
        }
        for c in &spec.containers {
            let argv: Vec<&str> = std::iter::once(c.command.as_str())
                .filter(|s| !s.is_empty())
                .chain(c.args.iter().map(String::as_str))
                .collect();
            println!("image:     {}", c.image);
            println!("command:   {}", argv.join(" "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(
            time(Some(&prost_types::Timestamp {
                seconds: 1_764_031_539,
                nanos: 0
            })),
            "2025-11-25 00:45:39"
        );
        assert_eq!(time(None), "-");
    }

    #[test]
    fn state_names_are_short() {
        let sb = pb::Sandbox {
            status: Some(pb::SandboxStatus {
                state: pb::State::Running as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(state_name(&sb), "running");
    }
}
