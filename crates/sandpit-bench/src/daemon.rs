//! `--daemon`: the same kind of measures through `sandpitd` and its gRPC API
//! (`coreweave.sandbox.v1`), with the generated tonic client.
//!
//! Starts its own daemon (`sandpitd` next to this binary) on `127.0.0.1:0`
//! with a fresh data dir under the bench's `--data-dir`, imports the bench's
//! rootfs there as `python:3.11` (with `sandpit image import`, as the e2e
//! harness does), measures, deletes its sandboxes, stops the daemon with
//! SIGTERM and removes the data dir. The daemon gets a config file raising
//! `max_sandboxes` above the density count; its sandboxes have the default
//! network (`--daemon-no-network`: loopback only, for an A/B).
//!
//! Host memory for density is `MemTotal - MemFree - Buffers - Cached -
//! SReclaimable` from /proc/meminfo, before and after the N sandboxes are up
//! (page cache and reclaimable slab excluded; system-wide, so other work on
//! the host adds noise). The memory cgroups' usage is summed too (v1
//! `memory.usage_in_bytes`, which counts the page cache charged to them).

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
#[derive(Debug, Clone)]
pub(crate) struct Counts {
    /// Cold starts (create, first exec, delete).
    pub cold: usize,
    /// StreamExec `true` round trips.
    pub exec: usize,
    /// 1 MiB writes and reads.
    pub small_files: usize,
    /// 32 MiB writes and reads.
    pub large_files: usize,
    /// Throughput: (concurrency, create+exec+delete cycles per task).
    pub cycles: Vec<(usize, usize)>,
    /// Density: idle sandboxes to hold at once (0: skip).
    pub density: usize,
    /// Python client block: the interpreter (with `cwsandbox`) and the
    /// number of timed iterations; `explicit`: fail (not warn) if it fails.
    pub python: Option<PythonRun>,
    /// Sandboxes get the daemon's default network (off: loopback only).
    pub network: bool,
    /// Writable layers get the default size limit (off: unbounded).
    pub disk_limit: bool,
    /// Creates from a warm pool (0: no pool; see `pool.rs`). With a pool,
    /// the Python block waits for it to be full before each iteration.
    pub pool: usize,
}

/// The Python client block's settings.
#[derive(Debug, Clone)]
pub(crate) struct PythonRun {
    pub interpreter: PathBuf,
    pub iterations: usize,
    pub explicit: bool,
}

/// A single figure (not a latency distribution): a rate, a memory size.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

fn fig(name: &str, value: f64, unit: &'static str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit,
    }
}

/// Runs the daemon measures; `bin_dir` holds `sandpitd` and `sandpit`.
pub(crate) fn run(
    bin_dir: &Path,
    rootfs: &Path,
    bench_data_dir: &Path,
    n: Counts,
) -> Result<(Vec<Stats>, Vec<Figure>)> {
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

    // The default cap (256 live sandboxes) would stop a larger density run.
    let config = data_dir.join("sandpitd.toml");
    // The network as `sandpitd` defaults it (egress denied, so no name is
    // ever resolved upstream: none is configured), or none. Its host names,
    // subnets and public listeners are its own (docs/networking.md: two
    // daemons on one host): a daemon already on the host is not touched, and
    // what the bench's daemon leaves on the host is its own to remove.
    let network = if n.network {
        format!(
            "[network]\nupstream_dns = []\ngateway_link = \"{BENCH_LINK}\"\n\
             link_prefix = \"{BENCH_LINK_PREFIX}\"\ntable = \"{BENCH_TABLE}\"\n\
             subnet_v4 = \"10.214.0.0/16\"\nsubnet_v6 = \"fd5a:9d17:4e40::/64\"\n\
             public_http_listen = \"\"\npublic_tls_listen = \"\"\npublic_tcp_ports = \"\"\n"
        )
    } else {
        "[network]\nenabled = false\n".to_owned()
    };
    // Admission by requests would stop a density run past the host's CPUs
    // (the default request is 50m): allocate far more than there is.
    let disk = if n.disk_limit {
        ""
    } else {
        "ephemeral_storage = \"0\"\n"
    };
    // The default data dir reserve (5% of the disk, up to 20 GiB) would
    // refuse creates on a host whose shared disk has less free: 1 GiB keeps
    // the bench's throwaway daemon from filling the disk all the same.
    let mut limits = format!(
        "[limits]\nallocatable_cpu = \"100000\"\nallocatable_memory = \"64Ti\"\n\
         data_dir_reserve = \"1Gi\"\n{disk}"
    );
    if let Ok(extra) = std::env::var("SANDPIT_BENCH_DAEMON_TOML") {
        // Appended as is: tables of its own (`[resources]`, ...) for A/Bs.
        limits.push_str(&extra.replace("\\n", "\n"));
        limits.push('\n');
    }
    let metrics_port = if n.pool > 0 {
        let port = crate::pool::free_port()?;
        limits.push_str(&crate::pool::config(IMAGE, port));
        Some(port)
    } else {
        None
    };
    std::fs::write(
        &config,
        format!(
            "max_sandboxes = {}\n{network}{limits}",
            (n.density + 64).max(256)
        ),
    )?;
    let mut daemon = Daemon::start(&bin_dir.join("sandpitd"), &data_dir, &config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut live = Vec::new();
    let mut figures = Vec::new();
    let mut result = rt.block_on(measure(daemon.port, &n, &mut live, &mut figures));
    if let (Ok(stats), Some(mport)) = (&mut result, metrics_port) {
        match rt.block_on(crate::pool::measure(daemon.port, mport, n.pool, &mut live)) {
            Ok(s) => stats.extend(s),
            Err(e) => result = Err(e),
        }
    }
    if let (Ok(stats), Some(py)) = (&mut result, &n.python) {
        match python_block(py, daemon.port, &data_dir, metrics_port) {
            Ok((s, f)) => {
                stats.extend(s);
                figures.extend(f);
            }
            Err(e) if py.explicit => result = Err(e),
            Err(e) => eprintln!("daemon: Python client block skipped: {e:#}"),
        }
    }
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
    if n.network && stopped.is_ok() {
        remove_host_network();
    }
    // `SANDPIT_BENCH_KEEP=1`: keep the data dir (the daemon's log) for a look.
    if stopped.is_ok() && result.is_ok() && std::env::var_os("SANDPIT_BENCH_KEEP").is_none() {
        if let Err(e) = std::fs::remove_dir_all(&data_dir) {
            eprintln!("daemon: could not remove {}: {e}", data_dir.display());
        }
    } else {
        eprintln!("daemon: kept {} (log: sandpitd.log)", data_dir.display());
    }
    let stats = result?;
    stopped?;
    Ok((stats, figures))
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
    fn start(sandpitd: &Path, data_dir: &Path, config: &Path) -> Result<Self> {
        let mut child = Command::new(sandpitd)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--config")
            .arg(config)
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

pub(crate) async fn connect(port: u16) -> Result<Client> {
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

pub(crate) async fn create(c: &mut Client, i: usize) -> Result<String> {
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

pub(crate) async fn delete(c: &mut Client, id: &str) -> Result<()> {
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
pub(crate) async fn exec(c: &mut Client, id: &str, argv: &[&str]) -> Result<i32> {
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

async fn measure(
    port: u16,
    n: &Counts,
    live: &mut Vec<String>,
    figures: &mut Vec<Figure>,
) -> Result<Vec<Stats>> {
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
    // Sections left out with `--only` have no samples.
    stats.retain(|s| !s.samples.is_empty());
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
        if count > 0 {
            stats.push(Stats::new(&format!("daemon: WriteFile {label}"), writes).with_bytes(size));
            stats.push(Stats::new(&format!("daemon: ReadFile {label}"), reads).with_bytes(size));
        }
    }
    delete(&mut c, &id).await?;
    live.pop();

    for &(conc, per_task) in &n.cycles {
        let (s, f) = throughput(&c, conc, per_task).await?;
        stats.push(s);
        figures.push(f);
    }
    if n.density > 0 {
        let (s, f) = density(&mut c, n.density, live).await?;
        stats.extend(s);
        figures.extend(f);
    }
    Ok(stats)
}

/// One create + StreamExec `true` + delete (grace 0) cycle.
async fn cycle(c: &mut Client, key: usize) -> Result<()> {
    let id = create(c, key).await?;
    let r = exec(c, &id, &["true"]).await;
    let d = delete(c, &id).await;
    match r? {
        0 => d,
        code => bail!("true exited with {code}"),
    }
}

/// `conc` tasks on one channel, each running `per_task` cycles back to back.
async fn throughput(c: &Client, conc: usize, per_task: usize) -> Result<(Stats, Figure)> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..conc {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for k in 0..per_task {
                let t = Instant::now();
                cycle(&mut c, 10_000_000 * conc + 10_000 * task + k).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    let mut first_err = None;
    for task in tasks {
        match task.await.context("throughput task")? {
            Ok(l) => lat.extend(l),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let wall = t.elapsed();
    if let Some(e) = first_err {
        return Err(e.context(format!("throughput at concurrency {conc}")));
    }
    let rate = lat.len() as f64 / wall.as_secs_f64();
    Ok((
        Stats::new(
            &format!("daemon: create+exec+delete cycle, concurrency {conc}"),
            lat,
        ),
        fig(
            &format!("daemon: create+exec+delete cycles per second, concurrency {conc}"),
            rate,
            "cycles/s",
        ),
    ))
}

/// Host memory in use, page cache excluded, from /proc/meminfo (bytes):
/// MemTotal - MemFree - Buffers - Cached - SReclaimable.
fn host_used_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let get = |key: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("{key} in /proc/meminfo"))
    };
    Ok(get("MemTotal")?
        .saturating_sub(get("MemFree")?)
        .saturating_sub(get("Buffers")?)
        .saturating_sub(get("Cached")?)
        .saturating_sub(get("SReclaimable")?))
}

/// Sum of the memory cgroups of `ids` (v1 `memory.usage_in_bytes` under
/// /sys/fs/cgroup/memory/sandpit, or v2 `memory.current` under
/// /sys/fs/cgroup/sandpit) and how many were found.
fn cgroup_memory(ids: &[String]) -> (u64, usize) {
    let mut sum = 0;
    let mut found = 0;
    for id in ids {
        for f in [
            format!("/sys/fs/cgroup/memory/sandpit/{id}/memory.usage_in_bytes"),
            format!("/sys/fs/cgroup/sandpit/{id}/memory.current"),
        ] {
            if let Some(v) = std::fs::read_to_string(&f)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                sum += v;
                found += 1;
                break;
            }
        }
    }
    (sum, found)
}

fn median(d: &[Duration]) -> Duration {
    let mut v = d.to_vec();
    v.sort();
    v[v.len() / 2]
}

const MIB: f64 = 1024.0 * 1024.0;

/// `count` idle sandboxes at once: creation time as they pile up, host memory
/// per sandbox, then deleting them all.
async fn density(
    c: &mut Client,
    count: usize,
    live: &mut Vec<String>,
) -> Result<(Vec<Stats>, Vec<Figure>)> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = host_used_bytes()?;
    let mut created = Vec::with_capacity(count);
    let t_all = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        let id = create(c, 20_000_000 + i).await?;
        created.push(t.elapsed());
        live.push(id);
    }
    let create_total = t_all.elapsed();
    // Let the sandboxes settle (the idle command started, the agent idle).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = host_used_bytes()?;
    let (cg_sum, cg_found) = cgroup_memory(live);
    let per_sandbox = after.saturating_sub(before) as f64 / count as f64 / MIB;
    eprintln!(
        "daemon: density {count}: host used {:.1} -> {:.1} MiB; {cg_found} memory cgroups",
        before as f64 / MIB,
        after as f64 / MIB
    );

    let mut figures = vec![
        fig(
            &format!("daemon: density {count}: host memory per idle sandbox (page cache excluded)"),
            per_sandbox,
            "MiB",
        ),
        fig(
            &format!("daemon: density {count}: create, 1st sandbox"),
            ms(created[0]),
            "ms",
        ),
        fig(
            &format!("daemon: density {count}: create, last sandbox"),
            ms(created[count - 1]),
            "ms",
        ),
        fig(
            &format!("daemon: density {count}: all creates, total"),
            create_total.as_secs_f64(),
            "s",
        ),
    ];
    let k = 10.min(count);
    figures.push(fig(
        &format!("daemon: density {count}: create p50 of the first {k}"),
        ms(median(&created[..k])),
        "ms",
    ));
    figures.push(fig(
        &format!("daemon: density {count}: create p50 of the last {k}"),
        ms(median(&created[count - k..])),
        "ms",
    ));
    if cg_found > 0 {
        figures.push(fig(
            &format!(
                "daemon: density {count}: memory cgroup usage per sandbox ({cg_found} found, cache included)"
            ),
            cg_sum as f64 / cg_found as f64 / MIB,
            "MiB",
        ));
    }

    let mut deleted = Vec::with_capacity(count);
    let t_all = Instant::now();
    while let Some(id) = live.last().cloned() {
        let t = Instant::now();
        delete(c, &id).await?;
        deleted.push(t.elapsed());
        live.pop();
    }
    figures.push(fig(
        &format!("daemon: density {count}: delete all, total"),
        t_all.elapsed().as_secs_f64(),
        "s",
    ));
    Ok((
        vec![
            Stats::new(
                &format!("daemon: density: CreateSandbox (idle), 1..{count}"),
                created,
            ),
            Stats::new(
                &format!("daemon: density: DeleteSandbox, {count} live down to 0"),
                deleted,
            ),
        ],
        figures,
    ))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs in one interpreter, so start-up and imports are outside the timings;
/// the first iteration (channel set-up) is a warm-up, not a sample.
/// With a warm pool (argv 2: its `/metrics` URL, argv 3: its size), each
/// iteration starts once the pool is full again (not timed). The client's
/// own floor is timed too: a bare unary RPC (`Sandbox.list` of a tag no
/// sandbox has) from the same client.
const PY_SCRIPT: &str = r#"
import json, sys, time, urllib.request
from cwsandbox import Sandbox
n = int(sys.argv[1])
metrics, size = sys.argv[2], int(sys.argv[3])
def pool_full():
    if not metrics:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(metrics, timeout=10).read().decode()
        ready = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("sandpit_pool_ready{"))
        if ready >= size:
            return
        time.sleep(0.005)
    raise SystemExit("the warm pool did not fill")
samples = []
for i in range(n + 1):
    pool_full()
    t = time.perf_counter()
    with Sandbox.run() as sb:
        sb.exec(["true"]).result()
    if i:
        samples.append(time.perf_counter() - t)
    else:
        first = time.perf_counter() - t
floor = []
for i in range(n + 1):
    t = time.perf_counter()
    Sandbox.list(tags=["sandpit-bench-floor"]).result()
    if i:
        floor.append(time.perf_counter() - t)
print(json.dumps({"first": first, "samples": samples, "floor": floor}))
"#;

/// The Python client end to end: `with Sandbox.run() as sb:
/// sb.exec(["true"]).result()` through `cwsandbox`, timed inside Python.
fn python_block(
    py: &PythonRun,
    port: u16,
    data_dir: &Path,
    pool_metrics: Option<u16>,
) -> Result<(Vec<Stats>, Vec<Figure>)> {
    let out_path = data_dir.join("python-bench.out");
    let err_path = data_dir.join("python-bench.err");
    let mut child = Command::new(&py.interpreter)
        .arg("-c")
        .arg(PY_SCRIPT)
        .arg(py.iterations.to_string())
        .arg(pool_metrics.map_or(String::new(), |p| format!("http://127.0.0.1:{p}/metrics")))
        .arg(crate::pool::POOL_SIZE.to_string())
        .env("CWSANDBOX_BASE_URL", format!("http://127.0.0.1:{port}"))
        .env("CWSANDBOX_API_KEY", API_KEY)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("run {}", py.interpreter.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60 + 2 * py.iterations as u64);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the Python client block did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        let tail: String = err.lines().rev().take(15).collect::<Vec<_>>().join("\n");
        bail!("the Python client block exited with {status}: {tail}");
    }
    let out = std::fs::read_to_string(&out_path)?;
    let last = out
        .lines()
        .last()
        .context("no output from the Python block")?;
    let v: serde_json::Value = serde_json::from_str(last).context("Python block output")?;
    let samples: Vec<Duration> = v["samples"]
        .as_array()
        .context("samples")?
        .iter()
        .filter_map(|x| x.as_f64())
        .map(Duration::from_secs_f64)
        .collect();
    if samples.is_empty() {
        bail!("the Python client block gave no samples");
    }
    let first = v["first"].as_f64().unwrap_or(0.0);
    let floor: Vec<Duration> = v["floor"]
        .as_array()
        .context("floor")?
        .iter()
        .filter_map(|x| x.as_f64())
        .map(Duration::from_secs_f64)
        .collect();
    Ok((
        vec![
            Stats::new(
                "python cwsandbox: with Sandbox.run() as sb: sb.exec([\"true\"]).result()",
                samples,
            ),
            Stats::new(
                "python cwsandbox: bare RPC round trip (Sandbox.list)",
                floor,
            ),
        ],
        vec![fig(
            "python cwsandbox: first iteration (warm-up, channel set-up)",
            first * 1000.0,
            "ms",
        )],
    ))
}

/// The bench daemon's host-side network names (none is the default
/// daemon's: see the config above).
const BENCH_TABLE: &str = "sandpit_benchd";
const BENCH_LINK: &str = "spbenchd0";
const BENCH_LINK_PREFIX: &str = "spd-";

/// Removes what the bench's stopped daemon left on the host by design (a
/// daemon's table and gateway link outlive it, for its next start), unless
/// a sandbox link of it is still there (then it is reported, not hidden).
fn remove_host_network() {
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let left: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .filter(|name| name.starts_with(BENCH_LINK_PREFIX))
        .collect();
    if !left.is_empty() {
        eprintln!("daemon: sandbox links left on the host: {left:?}");
        return;
    }
    for argv in [
        &["nft", "delete", "table", "inet", BENCH_TABLE][..],
        &["ip", "link", "del", BENCH_LINK][..],
    ] {
        let _ = std::process::Command::new(argv[0])
            .args(&argv[1..])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
