//! `sandpit-bench`: measures the engine's latency budget on this host and, with
//! `--podman`, the same workloads through `podman --runtime runc`.
//!
//! Measures (medians and p99 over `--iterations` runs):
//! - create: `Runtime::create` until the agent answers a ping (cached image);
//! - create + first exec: until `true` has run and returned;
//! - exec: the round trip of `true` through the agent of a running sandbox;
//! - destroy: `Runtime::destroy` until everything is gone.
//!
//! With `--daemon`, also through `sandpitd`'s gRPC API (see `daemon.rs`):
//! cold start (CreateSandbox until the first StreamExec `true` exits), delete,
//! the StreamExec `true` round trip, and WriteFile/ReadFile of 1 MiB and
//! 32 MiB (p50 throughput in the table's last column); create + exec +
//! delete cycles per second at concurrency 1, 8 and 32; density (`--density
//! N` idle sandboxes at once: host memory per sandbox, creation time from the
//! 1st to the Nth, deleting them all); and the Python client end to end
//! (`with Sandbox.run() as sb: sb.exec(["true"]).result()` through
//! `cwsandbox`, timed inside one interpreter) when `.venv/bin/python` exists
//! or `--python` names one. Single figures (rates, MiB) are printed after the
//! latency table and appear in the JSON as `{"measure", "value", "unit"}`.
//!
//! With `--net` (root), networking in private namespaces (see `net.rs`):
//! iperf3 over a plain veth against a sandbox through NAT, HTTP bulk and
//! new connections through the egress proxy against NAT, and podman's
//! cold start with `--network bridge` against `none`; `--only net --net`
//! runs just that.
//!
//! `--only snapshot`: volume snapshots into the local blob store and back,
//! next to `tar | zstd -1` (see `snapshot.rs`).
//!
//! Prints a table and writes JSON to `--json FILE`. `--quick` runs few
//! iterations (for CI), runs the throughput cycles at concurrency 1 and 8
//! only (8 cycles each), skips density and the Python block, and asserts
//! nothing about speed.

#![forbid(unsafe_code)]

mod daemon;
mod net;
mod pool;
mod snapshot;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sandpit_image::{IdShift, ImageConfig, ImageStore, Reference};
use sandpit_runtime::{Runtime, RuntimeConfig, SandboxId, SandboxSpec};
use sandpit_wire::{ExecRequest, ExitStatus, InitSpec};

#[derive(Parser, Debug)]
#[command(about = "Sandpit engine benchmark")]
struct Args {
    /// Rootfs tarball used as the (cached) image.
    #[arg(long, default_value = ".cache/images/python311.tar")]
    image: PathBuf,
    /// Scratch data dir (image store and sandbox state).
    #[arg(long, default_value = "/var/tmp/sandpit-bench")]
    data_dir: PathBuf,
    /// Static agent binary.
    #[arg(
        long,
        default_value = "target/agent/x86_64-unknown-linux-gnu/release/sandpit-agent"
    )]
    agent: PathBuf,
    /// The sandpit-spawn helper; next to this binary by default.
    #[arg(long)]
    spawner: Option<PathBuf>,
    /// Iterations per measure.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Few iterations, for CI.
    #[arg(long)]
    quick: bool,
    /// Also measure podman (`--runtime runc`) on the same rootfs.
    #[arg(long)]
    podman: bool,
    /// Also measure the daemon: starts its own `sandpitd` (next to this
    /// binary) and drives it through the gRPC API.
    #[arg(long)]
    daemon: bool,
    /// Also measure networking (see `net.rs`): iperf3 over a veth, from a
    /// sandbox through NAT, HTTP through the egress proxy, podman's cold
    /// start with a network. Root; everything in private namespaces.
    #[arg(long)]
    net: bool,
    /// With `--daemon` (not `--quick`): idle sandboxes held at once for the
    /// density measure (0: skip).
    #[arg(long, default_value_t = 200)]
    density: usize,
    /// With `--daemon` (not `--quick`): a Python with `cwsandbox` for the
    /// client block; `.venv/bin/python` is used when it exists.
    #[arg(long)]
    python: Option<PathBuf>,
    /// Timed iterations of the Python client block.
    #[arg(long, default_value_t = 30)]
    python_iterations: usize,
    /// Write results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these sections (comma-separated; all when absent), for quick
    /// A/B comparisons of one measure: `engine` (in-process), and with
    /// `--daemon`: `cold` (create until first exec, delete), `exec`
    /// (StreamExec round trip), `files`, `cycles`, `density`, `python`;
    /// with `--net`: `net`; `snapshot` (volume snapshot and restore).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// With `--daemon`: run the daemon with networking off (`[network]
    /// enabled = false`: loopback-only sandboxes), for an A/B of what a
    /// sandbox's network costs.
    #[arg(long)]
    daemon_no_network: bool,
    /// With `--daemon`: writable layers without a size (`[limits]
    /// ephemeral_storage = "0"`: plain directories, no ext4 disk per
    /// sandbox), for an A/B of what the disk quota costs.
    #[arg(long)]
    daemon_no_disk_limit: bool,
    /// Iterations of the snapshot measures (`--quick`: 2).
    #[arg(long, default_value_t = 5)]
    snapshot_iterations: usize,
}

/// A part of the benchmark that `--only` can select.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Engine,
    Cold,
    Exec,
    Files,
    Cycles,
    Density,
    Python,
    Net,
    Snapshot,
    /// With `--daemon`: creates from a warm pool (a daemon of its own).
    Pool,
}

#[derive(Debug, Clone)]
struct Stats {
    name: String,
    samples: Vec<Duration>,
    /// Bytes moved per sample, for a throughput figure.
    bytes: Option<usize>,
}

impl Stats {
    fn new(name: &str, mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self {
            name: name.into(),
            samples,
            bytes: None,
        }
    }
    fn with_bytes(mut self, bytes: usize) -> Self {
        self.bytes = Some(bytes);
        self
    }
    /// MB/s (10^6 bytes) at the median latency.
    fn mb_per_s(&self) -> Option<f64> {
        self.bytes
            .map(|b| b as f64 / 1e6 / self.p50().as_secs_f64())
    }
    fn pct(&self, p: f64) -> Duration {
        let i = ((self.samples.len() as f64 - 1.0) * p).round() as usize;
        self.samples[i]
    }
    fn p50(&self) -> Duration {
        self.pct(0.5)
    }
    fn p99(&self) -> Duration {
        self.pct(0.99)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let args = Args::parse();
    let iterations = if args.quick { 10 } else { args.iterations };
    let spawner = match &args.spawner {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("sandpit-spawn"),
    };

    let want = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let mut results = if want(Section::Engine) {
        engine(&args, iterations, &spawner)?
    } else {
        Vec::new()
    };
    if args.podman {
        results.extend(podman(&args.image, iterations.min(50))?);
    }
    let mut figures = Vec::new();
    if args.daemon {
        let counts = if args.quick {
            daemon::Counts {
                cold: 3,
                exec: 20,
                small_files: 5,
                large_files: 2,
                cycles: vec![(1, 8), (8, 1)],
                density: 0,
                python: None,
                network: !args.daemon_no_network,
                disk_limit: !args.daemon_no_disk_limit,
                pool: 0,
            }
        } else {
            let python = match &args.python {
                Some(p) => Some((p.clone(), true)),
                None => {
                    let p = PathBuf::from(".venv/bin/python");
                    p.exists().then_some((p, false))
                }
            };
            daemon::Counts {
                cold: iterations,
                exec: iterations * 5,
                small_files: iterations,
                large_files: (iterations / 5).max(5),
                cycles: [1, 8, 32]
                    .into_iter()
                    .map(|c| (c, (iterations * 2 / c).max(2)))
                    .collect(),
                density: args.density,
                python: python.map(|(interpreter, explicit)| daemon::PythonRun {
                    interpreter,
                    iterations: args.python_iterations.max(1),
                    explicit,
                }),
                network: !args.daemon_no_network,
                disk_limit: !args.daemon_no_disk_limit,
                pool: 0,
            }
        };
        let mut counts = counts;
        if !want(Section::Cold) {
            counts.cold = 0;
        }
        if !want(Section::Exec) {
            counts.exec = 0;
        }
        if !want(Section::Files) {
            counts.small_files = 0;
            counts.large_files = 0;
        }
        if !want(Section::Cycles) {
            counts.cycles.clear();
        }
        if !want(Section::Density) {
            counts.density = 0;
        }
        if !want(Section::Python) {
            counts.python = None;
        }
        let bin_dir = std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .to_path_buf();
        let pool_python = counts.python.clone();
        let network = counts.network;
        let disk_limit = counts.disk_limit;
        let any = counts.cold + counts.exec + counts.small_files + counts.density > 0
            || !counts.cycles.is_empty()
            || counts.python.is_some();
        if any {
            let (stats, figs) = daemon::run(&bin_dir, &args.image, &args.data_dir, counts)?;
            results.extend(stats);
            figures = figs;
        }
        if want(Section::Pool) {
            // A daemon of its own: with a pool, every create of the default
            // shape above would be served from it.
            let pooled = daemon::Counts {
                cold: 0,
                exec: 0,
                small_files: 0,
                large_files: 0,
                cycles: Vec::new(),
                density: 0,
                python: pool_python,
                network,
                disk_limit,
                pool: if args.quick { 5 } else { iterations },
            };
            let (stats, figs) = daemon::run(&bin_dir, &args.image, &args.data_dir, pooled)?;
            results.extend(stats.into_iter().map(|mut s| {
                if s.name.starts_with("python") {
                    s.name = format!("warm pool: {}", s.name);
                }
                s
            }));
            figures.extend(figs.into_iter().map(|mut f| {
                f.name = format!("warm pool: {}", f.name);
                f
            }));
        }
    }
    if args.net && want(Section::Net) {
        let (stats, figs) = net::run(&args.image, args.quick)?;
        results.extend(stats);
        figures.extend(figs);
    }
    if want(Section::Snapshot) {
        let n = if args.quick {
            2
        } else {
            args.snapshot_iterations
        };
        let (stats, figs) = snapshot::run(&args.data_dir, n)?;
        results.extend(stats);
        figures.extend(figs);
    }

    println!(
        "{:<56} {:>10} {:>10} {:>6} {:>10}",
        "measure", "p50 ms", "p99 ms", "n", "MB/s p50"
    );
    for s in &results {
        let rate = s.mb_per_s().map(|r| format!("{r:.0}")).unwrap_or_default();
        println!(
            "{:<56} {:>10.3} {:>10.3} {:>6} {:>10}",
            s.name,
            ms(s.p50()),
            ms(s.p99()),
            s.samples.len(),
            rate
        );
    }
    if !figures.is_empty() {
        println!();
        println!("{:<84} {:>10} unit", "figure", "value");
        for f in &figures {
            println!("{:<84} {:>10.2} {}", f.name, f.value, f.unit);
        }
        net::print_ratios(&figures);
    }
    let find = |n: &str| results.iter().find(|s| s.name == n).map(|s| s.p50());
    if let (Some(ours), Some(theirs)) = (
        find("create until first `true` returned"),
        find("podman run --rm true"),
    ) {
        println!(
            "cold start: podman / sandpit = {:.1}x",
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }
    // The daemon's cost over the engine's, same run.
    for (what, engine, daemon) in [
        (
            "create until first `true`",
            "create until first `true` returned",
            "daemon: create until first `true` exit",
        ),
        (
            "exec `true` round trip",
            "exec `true` round trip",
            "daemon: StreamExec `true` round trip",
        ),
        (
            "create until first `true`, warm pool",
            "create until first `true` returned",
            "daemon, warm pool: create until first `true` exit",
        ),
    ] {
        if let (Some(e), Some(d)) = (find(engine), find(daemon)) {
            println!(
                "{what}: daemon / engine = {:.2}x ({:.2} / {:.2} ms p50)",
                d.as_secs_f64() / e.as_secs_f64(),
                ms(d),
                ms(e)
            );
        }
    }
    if let (Some(ours), Some(theirs)) = (find("exec `true` round trip"), find("podman exec true")) {
        println!(
            "exec: podman / sandpit = {:.1}x",
            theirs.as_secs_f64() / ours.as_secs_f64()
        );
    }
    if let Some(path) = &args.json {
        let figs = figures
            .iter()
            .map(|f| serde_json::json!({"measure": f.name, "value": f.value, "unit": f.unit}));
        let json: Vec<_> = results
            .iter()
            .map(|s| {
                let mut j = serde_json::json!({
                    "measure": s.name, "n": s.samples.len(),
                    "p50_ms": ms(s.p50()), "p99_ms": ms(s.p99()),
                });
                if let (Some(bytes), Some(rate)) = (s.bytes, s.mb_per_s()) {
                    j["bytes"] = bytes.into();
                    j["mb_per_s_p50"] = rate.into();
                }
                j
            })
            .chain(figs)
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

/// The engine measures, in process: create, first exec, exec, destroy.
fn engine(args: &Args, iterations: usize, spawner: &Path) -> Result<Vec<Stats>> {
    let store = ImageStore::open(&args.data_dir.join("store"), IdShift::default())?;
    let reference = Reference::parse("sandpit.bench/image:latest")?;
    let image = match store.get(&reference) {
        Ok(i) => i,
        Err(_) => {
            let f = std::fs::File::open(&args.image)
                .with_context(|| format!("open {}", args.image.display()))?;
            store.import_rootfs_tar(&reference, f, ImageConfig::default())?
        }
    };
    let layers = store.lower_dirs(&image);
    let rt = Runtime::new(RuntimeConfig {
        state_dir: args.data_dir.join("state"),
        agent_binary: std::fs::canonicalize(&args.agent)
            .with_context(|| format!("agent {}", args.agent.display()))?,
        spawner_binary: spawner.to_path_buf(),
        id_map: Default::default(),
        cgroup_parent: "sandpit-bench".into(),
        disk_pool: None,
        lxcfs: None,
    })?;
    rt.sweep(|_| true)?;

    let spec = |i: usize, argv: &[&str]| SandboxSpec {
        id: SandboxId::parse(&format!("bench-{i}")).expect("a valid id"),
        hostname: None,
        lower_dirs: layers.clone(),
        init: InitSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into())],
            cwd: "/".into(),
            ..Default::default()
        },
        limits: Default::default(),
        read_only_root: false,
        network_namespace: None,
        mounts: Vec::new(),
        disk_bytes: None,
    };
    let true_req = || ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };

    // Warm-up: page cache, overlay dentries.
    for i in 0..3 {
        let sb = rt.create(&spec(i, &[]))?;
        sb.agent().ping()?;
        rt.destroy(sb.id())?;
    }

    let mut create = Vec::new();
    let mut first_exec = Vec::new();
    let mut destroy = Vec::new();
    for i in 0..iterations {
        let t = Instant::now();
        let sb = rt.create(&spec(i, &[]))?;
        sb.agent().ping()?;
        create.push(t.elapsed());
        let out = sb.agent().run(true_req(), None)?;
        first_exec.push(t.elapsed());
        if out.status != ExitStatus::Code(0) {
            bail!("true exited with {:?}", out.status);
        }
        let t = Instant::now();
        rt.destroy(sb.id())?;
        destroy.push(t.elapsed());
    }

    let sb = rt.create(&spec(iterations, &[]))?;
    let agent = sb.agent();
    let mut exec = Vec::new();
    for _ in 0..iterations * 5 {
        let t = Instant::now();
        agent.run(true_req(), None)?;
        exec.push(t.elapsed());
    }
    rt.destroy(sb.id())?;

    Ok(vec![
        Stats::new("create until agent answers", create),
        Stats::new("create until first `true` returned", first_exec),
        Stats::new("exec `true` round trip", exec),
        Stats::new("destroy", destroy),
    ])
}

fn podman_cmd() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// `--ulimit`s every podman run gets (podman's defaults differ from ours).
const PODMAN_LIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Imports `rootfs` as podman's image; its name.
fn podman_import(rootfs: &Path) -> Result<&'static str> {
    let image = "localhost/sandpit-bench:latest";
    let status = podman_cmd()
        .args(["import", &rootfs.to_string_lossy(), image])
        .stdout(std::process::Stdio::null())
        .status()
        .context("run podman")?;
    if !status.success() {
        bail!("podman import failed");
    }
    Ok(image)
}

/// The same workloads through podman, on the same rootfs.
fn podman(rootfs: &Path, n: usize) -> Result<Vec<Stats>> {
    let image = podman_import(rootfs)?;
    let mut common = vec!["--network", "none"];
    common.extend(PODMAN_LIMITS);
    let mut run = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let st = podman_cmd()
            .args(["run", "--rm"])
            .args(&common)
            .args([image, "true"])
            .status()?;
        run.push(t.elapsed());
        if !st.success() {
            bail!("podman run failed");
        }
    }
    let name = "sandpit-bench-exec";
    let _ = podman_cmd()
        .args(["rm", "-f", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let st = podman_cmd()
        .args(["run", "-d", "--name", name])
        .args(&common)
        .args([image, "sleep", "1000"])
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("podman run -d failed");
    }
    let mut exec = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let st = podman_cmd().args(["exec", name, "true"]).status()?;
        exec.push(t.elapsed());
        if !st.success() {
            bail!("podman exec failed");
        }
    }
    let _ = podman_cmd()
        .args(["rm", "-f", "-t", "0", name])
        .stdout(std::process::Stdio::null())
        .status();
    Ok(vec![
        Stats::new("podman run --rm true", run),
        Stats::new("podman exec true", exec),
    ])
}
