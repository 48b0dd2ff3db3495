//! `--daemon`: the same kind of measures through `sandpitd` and its gRPC API
//! (`coreweave.sandbox.v1`), with the generated tonic client.
//!
//! Starts its own daemon (`sandpitd` next to this binary) on `127.0.0.1:0`
//! with a fresh data dir under the bench's `--data-dir`, imports the bench's
//! rootfs there as `python:3.11` (with `sandpit image import`, as the e2e
//! harness does), measures, deletes its sandboxes, stops the daemon with
//! SIGTERM and removes the data dir.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::Stats;

const API_KEY: &str = "sandpitbench0123456789abcdef0123456789abcdef";
const IMAGE: &str = "python:3.11";
/// The cwsandbox client's default main command (`_defaults.py`).
const IDLE: [&str; 2] = ["-c", "trap \"exit 0\" TERM INT; sleep infinity & wait"];

/// How many of each measure.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    /// Cold starts (create, first exec, delete).
    pub cold: usize,
    /// StreamExec `true` round trips.
    pub exec: usize,
    /// 1 MiB writes and reads.
    pub small_files: usize,
    /// 32 MiB writes and reads.
    pub large_files: usize,
}

/// Runs the daemon measures; `bin_dir` holds `sandpitd` and `sandpit`.
pub fn run(bin_dir: &Path, rootfs: &Path, bench_data_dir: &Path, n: Counts) -> Result<Vec<Stats>> {
    let data_dir = bench_data_dir.join(format!("daemon-{}", std::process::id()));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    std::fs::create_dir_all(&data_dir)?;
    let t = Instant::now();
    import_image(&bin_dir.join("sandpit"), &data_dir, rootfs)?;
    eprintln!(
        "daemon: image imported in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let mut daemon = Daemon::start(&bin_dir.join("sandpitd"), &data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut live = Vec::new();
    let result = rt.block_on(measure(daemon.port, n, &mut live));
    // Whatever happened, leave nothing behind: sandboxes survive a daemon stop.
    if !live.is_empty() {
        let cleanup = rt.block_on(async {
            let mut c = connect(daemon.port).await?;
            for id in &live {
                let _ = delete(&mut c, id).await;
            }
            anyhow::Ok(())
        });
        if let Err(e) = cleanup {
            eprintln!("daemon: cleanup of {live:?} failed: {e:#}");
        }
    }
    drop(rt);
    let stopped = daemon.stop();
    if stopped.is_ok() && result.is_ok() {
        if let Err(e) = std::fs::remove_dir_all(&data_dir) {
            eprintln!("daemon: could not remove {}: {e}", data_dir.display());
        }
    } else {
        eprintln!("daemon: kept {} (log: sandpitd.log)", data_dir.display());
    }
    let stats = result?;
    stopped?;
    Ok(stats)
}

fn import_image(sandpit: &Path, data_dir: &Path, rootfs: &Path) -> Result<()> {
    let out = Command::new(sandpit)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["image", "import", IMAGE])
        .arg(rootfs)
        .args([
            "--env",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--workdir",
            "/",
            "--cmd",
            "python3",
        ])
        .output()
        .with_context(|| format!("run {}", sandpit.display()))?;
    if !out.status.success() {
        bail!(
            "sandpit image import failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A `sandpitd` child process.
#[derive(Debug)]
struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(sandpitd: &Path, data_dir: &Path) -> Result<Self> {
        let mut child = Command::new(sandpitd)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--api-key", API_KEY])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", sandpitd.display()))?;
        let stderr = child.stderr.take().context("sandpitd stderr")?;
        let log_path: PathBuf = data_dir.join("sandpitd.log");
        let mut log = std::fs::File::create(&log_path)?;
        let (tx, rx) = mpsc::channel();
        // Copies the daemon's stderr to its log (so it never blocks on a full
        // pipe) and reports the address it listens on.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let _ = writeln!(log, "{line}");
                if let Some(rest) = line
                    .find("sandpitd listening on ")
                    .map(|i| &line[i + "sandpitd listening on ".len()..])
                {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "sandpitd did not report its address within 60 s (log: {})",
                    log_path.display()
                );
            }
        };
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("port in {addr:?}"))?;
        eprintln!("daemon: sandpitd listening on 127.0.0.1:{port}");
        Ok(Self { child, port })
    }

    /// SIGTERM, then up to 30 s for a clean exit (SIGKILL after that).
    fn stop(&mut self) -> Result<()> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        kill(pid, Signal::SIGTERM).context("SIGTERM sandpitd")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("sandpitd exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("sandpitd did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

type Client = SandboxServiceClient<Channel>;

async fn connect(port: u16) -> Result<Client> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await
        .context("connect to sandpitd")?;
    Ok(SandboxServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {API_KEY}")).expect("ascii header"),
    );
    r
}

async fn create(c: &mut Client, i: usize) -> Result<String> {
    let spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: IMAGE.into(),
            command: "/bin/sh".into(),
            args: IDLE.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        tags: vec!["sandpit-bench".into()],
        ..Default::default()
    };
    let sb = c
        .create_sandbox(req(pb::CreateSandboxRequest {
            sandbox: Some(pb::Sandbox {
                spec: Some(spec),
                ..Default::default()
            }),
            request_id: format!("sandpit-bench-{}-{i}", std::process::id()),
        }))
        .await
        .context("CreateSandbox")?
        .into_inner();
    Ok(sb.sandbox_id)
}

async fn delete(c: &mut Client, id: &str) -> Result<()> {
    c.delete_sandbox(req(pb::DeleteSandboxRequest {
        sandbox_id: id.into(),
        grace_period_seconds: 0,
        ..Default::default()
    }))
    .await
    .context("DeleteSandbox")?;
    Ok(())
}

/// StreamExec `argv`: init, half-close, read until the exit frame.
async fn exec(c: &mut Client, id: &str, argv: &[&str]) -> Result<i32> {
    use pb::exec_stream_request::Message as In;
    use pb::exec_stream_response::Message as Out;
    let init = pb::ExecStreamRequest {
        message: Some(In::Init(pb::ExecStreamInit {
            sandbox_id: id.into(),
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    // The request stream ends after init: the client's half-close (stdin EOF).
    let mut stream = c
        .stream_exec(req(tokio_stream::iter(vec![init])))
        .await
        .context("StreamExec")?
        .into_inner();
    while let Some(frame) = stream.message().await.context("StreamExec frame")? {
        match frame.message {
            Some(Out::Exit(e)) => return Ok(e.exit_code),
            Some(Out::Error(e)) => bail!("StreamExec error frame: {e:?}"),
            _ => {}
        }
    }
    bail!("StreamExec ended without an exit frame")
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

async fn measure(port: u16, n: Counts, live: &mut Vec<String>) -> Result<Vec<Stats>> {
    let mut c = connect(port).await?;

    // Warm-up: page cache, overlay dentries, the daemon's first-use paths.
    for i in 0..2 {
        let id = create(&mut c, i).await?;
        live.push(id.clone());
        exec(&mut c, &id, &["true"]).await?;
        delete(&mut c, &id).await?;
        live.pop();
    }

    let mut cold = Vec::new();
    let mut del = Vec::new();
    for i in 0..n.cold {
        let t = Instant::now();
        let id = create(&mut c, 100 + i).await?;
        live.push(id.clone());
        let code = exec(&mut c, &id, &["true"]).await?;
        cold.push(t.elapsed());
        if code != 0 {
            bail!("true exited with {code}");
        }
        let t = Instant::now();
        delete(&mut c, &id).await?;
        del.push(t.elapsed());
        live.pop();
    }

    let id = create(&mut c, 1_000_000).await?;
    live.push(id.clone());
    let mut rtt = Vec::new();
    for _ in 0..n.exec {
        let t = Instant::now();
        let code = exec(&mut c, &id, &["true"]).await?;
        rtt.push(t.elapsed());
        if code != 0 {
            bail!("true exited with {code}");
        }
    }

    let mut stats = vec![
        Stats::new("daemon: create until first `true` exit", cold),
        Stats::new("daemon: delete (grace 0)", del),
        Stats::new("daemon: StreamExec `true` round trip", rtt),
    ];
    for (label, size, count) in [
        ("1 MiB", 1usize << 20, n.small_files),
        ("32 MiB", 32 << 20, n.large_files),
    ] {
        let data = pseudo_random(size);
        let path = format!("/tmp/bench-{size}.bin");
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..count {
            // Built outside the timed part: the copy of `data` is ours, not the daemon's.
            let write = req(pb::WriteFileRequest {
                sandbox_id: id.clone(),
                path: path.clone(),
                content: data.clone(),
                ..Default::default()
            });
            let t = Instant::now();
            c.write_file(write).await.context("WriteFile")?;
            writes.push(t.elapsed());
            let t = Instant::now();
            let got = c
                .read_file(req(pb::ReadFileRequest {
                    sandbox_id: id.clone(),
                    path: path.clone(),
                    ..Default::default()
                }))
                .await
                .context("ReadFile")?
                .into_inner();
            reads.push(t.elapsed());
            if got.content.len() != size || got.content[..] != data[..] {
                bail!("ReadFile of {path} returned other bytes than written");
            }
        }
        stats.push(Stats::new(&format!("daemon: WriteFile {label}"), writes).with_bytes(size));
        stats.push(Stats::new(&format!("daemon: ReadFile {label}"), reads).with_bytes(size));
    }
    delete(&mut c, &id).await?;
    live.pop();
    Ok(stats)
}
