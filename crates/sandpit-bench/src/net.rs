//! `--net`: the cost of a sandbox's network, next to a plain veth and next
//! to podman. Prints numbers; asserts nothing about speed.
//!
//! Everything runs inside a private "host" network namespace made for the
//! run (the real host's links, firewall, forwarding and conntrack are never
//! touched, and nothing can leave through its uplink), with an "upstream"
//! namespace behind a veth: host `uh0` 198.51.100.1/24, upstream `ue0`
//! 198.51.100.2/24 (TEST-NET-2, named by explicit rules: it is in the
//! private part of the always-deny set). `Network::setup` runs in the
//! private host with its own names (gateway `spbench0`, links `spb-`, table
//! `sandpit_bench`, subnet 10.213.0.0/16, IPv4 only). Test traffic goes
//! only to the upstream namespace. Namespaces are anonymous (held by fds
//! and the threads in them), so they, their links and the nftables table
//! go away with the run, pass or fail; [`Children`] kills the iperf3
//! servers on every path.
//!
//! Measures:
//! 1. `iperf3`, host -> upstream over the veth, one TCP stream, both
//!    directions (`-R`: upstream sends): the baseline. Server in the
//!    upstream namespace, client in the private host.
//! 2. The same from inside a sandbox (`Network::prepare` + `apply`, egress
//!    allowed to 198.51.100.0/24 by a CIDR rule): sandbox veth, forwarding,
//!    the sandbox's nftables chains and the masquerade. Ratio to (1)
//!    (issue target: >= 80 %).
//! 3. The egress proxy (`sandpit_egress::Proxy`, HTTP on port 80, routed by
//!    `Host`): a sandbox whose policy grants the name `bulk.test` on port 80
//!    connects to 198.51.100.2:80; the sandbox's DNAT sends it to the
//!    proxy on the gateway, which resolves `bulk.test` through a DNS server
//!    in the upstream namespace and dials the origin there. Bulk: one
//!    `GET /bytes/N` (a plain HTTP/1.1 body of N bytes, timed from the
//!    request to the end of the body; iperf3 cannot go through an HTTP
//!    proxy) through the proxy, against the same GET from the NAT sandbox
//!    of (2) straight to the origin (target >= 50 %). New connections:
//!    16 clients, each request a fresh connection (connect, `GET /`, read
//!    to the end), for a few seconds: requests per second, the p50/p99
//!    of connect + response and how many took >= 200 ms (a dropped SYN
//!    costs a 1 s retransmit and hides under the p99), direct and proxied.
//! 4. `podman run --rm` of `true` with `--network bridge` against
//!    `--network none`, p50 of N cold starts (same image as `--podman`).
//!    Podman runs in a private network namespace too, so its bridge and
//!    firewall rules land there, not on the host.
//!
//! The proxy's deny set is the firewall's (`DenySet::of_firewall`), as in
//! `sandpitd`. TCP 80 goes to the proxy's HTTP listener (`http_proxy_port`);
//! only plain HTTP is measured (TLS would add the origin's handshake, not
//! the proxy's work: both are spliced the same way).
//!
//! Reproduce: `apt-get install -y iperf3 podman runc`, then as root
//! `target/release/sandpit-bench --only net --net` (`--quick` for 1 s
//! iperf3 runs and a 100 MB body; `--json FILE` keeps the figures).
//! Without iperf3 (or podman) those rows are skipped with a message.

use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, unshare, CloneFlags};
use sandpit_egress::testing::{cidr_rule, exchange, name_rule, TestDns, TestWeb, Zone};
use sandpit_egress::UpstreamConfig;
use sandpit_egress::{DenySet, PolicyTable, Proxy, ProxyConfig, SandboxPolicy, Upstream};
use sandpit_net::policy::{DefaultEgress, Egress, EgressRule, NetworkPolicy};
use sandpit_net::{NetConfig, Network, SandboxNet, TenantSets};
use sandpit_runtime::SandboxId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::daemon::Figure;
use crate::Stats;

const HOST_IP: &str = "198.51.100.1";
const UP_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const UP_NET: &str = "198.51.100.0/24";
const IPERF_PORT: &str = "5201";
const NAME: &str = "bulk.test";
const CONCURRENCY: usize = 16;

/// How long and how often, by mode.
struct Plan {
    iperf_secs: u32,
    iperf_runs: usize,
    body_bytes: u64,
    downloads: usize,
    conn_secs: f64,
    podman_runs: usize,
}

fn fig(name: &str, value: f64, unit: &'static str) -> Figure {
    Figure {
        name: name.into(),
        value,
        unit,
    }
}

/// A fresh network namespace, made on a short-lived thread so that no
/// thread of ours stays in it.
fn new_netns() -> Result<OwnedFd> {
    std::thread::spawn(|| -> Result<OwnedFd> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Runs `f` on a thread inside `ns`. Processes it spawns, threads it
/// starts and sockets it opens are in `ns` too (a child starts in its
/// parent thread's namespaces): no `pre_exec` is needed.
fn in_ns<T: Send>(ns: &OwnedFd, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns, CloneFlags::CLONE_NEWNET).context("setns")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in a namespace panicked"))?
    })
}

/// A shell command in the calling thread's namespace.
fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A tokio runtime whose every thread (workers and blocking pool, whoever
/// starts them) is in `ns`, so every socket its tasks open is there.
fn runtime_in(ns: &OwnedFd, workers: usize) -> Result<Runtime> {
    let fd = Arc::new(ns.try_clone()?);
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = setns(&*fd, CloneFlags::CLONE_NEWNET) {
                // A thread in the wrong namespace would send test traffic
                // where it must not go.
                eprintln!("setns in a runtime thread: {e}");
                std::process::abort();
            }
        })
        .build()?)
}

/// Runs `fut` as a task of `rt` (on its threads, in its namespace: never
/// `block_on` a future that opens sockets, its first poll would run on the
/// calling thread, in the real host's namespace).
fn drive<T: Send + 'static>(
    rt: &Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    rt.block_on(rt.spawn(fut))
        .context("a benchmark task panicked")
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Child processes killed and reaped on drop, success or error.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The private host, its upstream, and the sandbox network in the host.
struct World {
    host: OwnedFd,
    up: OwnedFd,
}

impl World {
    fn new() -> Result<World> {
        let host = new_netns()?;
        let up = new_netns()?;
        let up_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&up)
        );
        in_ns(&host, || {
            sh(&format!(
                "ip link set lo up && ip link add uh0 type veth peer name ue0 && \
                 ip link set ue0 netns {up_path} && ip addr add {HOST_IP}/24 dev uh0 && \
                 ip link set uh0 up"
            ))
        })?;
        in_ns(&up, || {
            sh(&format!(
                "ip link set lo up && ip addr add {UP_IP}/24 dev ue0 && ip link set ue0 up && \
                 ip route add default via {HOST_IP}"
            ))
        })?;
        Ok(World { host, up })
    }
}

fn net_config() -> NetConfig {
    NetConfig {
        gateway_link: "spbench0".into(),
        link_prefix: "spb-".into(),
        subnet_v4: "10.213.0.0/16".parse().expect("valid"),
        subnet_v6: None,
        table: "sandpit_bench".into(),
        pool_size: 0,
        ..Default::default()
    }
}

/// Runs every network measure; podman's with `rootfs` as its image.
pub(crate) fn run(rootfs: &Path, quick: bool) -> Result<(Vec<Stats>, Vec<Figure>)> {
    let plan = if quick {
        Plan {
            iperf_secs: 1,
            iperf_runs: 1,
            body_bytes: 100_000_000,
            downloads: 1,
            conn_secs: 1.0,
            podman_runs: 3,
        }
    } else {
        Plan {
            iperf_secs: 5,
            iperf_runs: 3,
            body_bytes: 1_000_000_000,
            downloads: 3,
            conn_secs: 3.0,
            podman_runs: 20,
        }
    };
    let mut stats = Vec::new();
    let mut figs = Vec::new();
    let world = World::new()?;
    let net = in_ns(&world.host, || Ok(Network::setup(net_config(), &[])?))?;
    let id = |s: &str| SandboxId::parse(s).context("sandbox id");
    let nat = in_ns(&world.host, || Ok(net.prepare(&id("netbench-nat")?, None)?))?;
    let proxied = in_ns(&world.host, || {
        Ok(net.prepare(&id("netbench-proxy")?, None)?)
    })?;
    let allow = |rule: EgressRule| NetworkPolicy {
        egress: Egress::Allow(vec![rule]),
        ..Default::default()
    };
    // A CIDR rule: straight through the masquerade. A name rule only: the
    // sandbox's TCP 80 is DNATed to the proxy (and nothing else passes).
    let nat_policy = allow(cidr_rule(UP_NET, &[]));
    let proxy_policy = allow(name_rule(NAME, &[80]));
    in_ns(&world.host, || {
        net.apply(&nat, &nat_policy, &TenantSets::default())?;
        net.apply(&proxied, &proxy_policy, &TenantSets::default())?;
        Ok(())
    })?;

    let result = (|| {
        if which("iperf3") {
            iperf(&world, &nat, &plan, &mut figs)?;
        } else {
            eprintln!("net: iperf3 not installed, skipping the TCP throughput rows");
        }
        proxy(
            &world,
            &net,
            &nat,
            &proxied,
            &proxy_policy,
            &plan,
            &mut stats,
            &mut figs,
        )
    })();
    // Tidy even though the namespaces take it all with them.
    let released = in_ns(&world.host, || {
        net.release(&nat.id, &nat.alloc)?;
        net.release(&proxied.id, &proxied.alloc)?;
        Ok(())
    });
    result?;
    released?;
    drop(net);

    if which("podman") && rootfs.exists() {
        podman(rootfs, plan.podman_runs, &mut stats, &mut figs)?;
    } else {
        eprintln!(
            "net: podman or the image {} missing, skipping podman's network cold start",
            rootfs.display()
        );
    }
    Ok((stats, figs))
}

/// One iperf3 client run from `ns`; received Gbit/s.
fn iperf_once(ns: &OwnedFd, secs: u32, reverse: bool) -> Result<f64> {
    let out = in_ns(ns, || {
        let mut c = Command::new("iperf3");
        c.args(["-c", &UP_IP.to_string(), "-p", IPERF_PORT])
            .args(["-t", &secs.to_string(), "-J"]);
        if reverse {
            c.arg("-R");
        }
        Ok(c.output()?)
    })?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = json.get("error") {
        bail!("iperf3: {e}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures (1) and (2).
fn iperf(world: &World, nat: &SandboxNet, plan: &Plan, figs: &mut Vec<Figure>) -> Result<()> {
    let mut servers = Children::default();
    let server = in_ns(&world.up, || {
        Ok(Command::new("iperf3")
            .args(["-s", "-B", &UP_IP.to_string(), "-p", IPERF_PORT])
            .stdout(Stdio::null())
            .spawn()?)
    })?;
    servers.0.push(server);
    wait_listening(&world.up, 5201)?;
    for (reverse, dir) in [(false, "send"), (true, "receive (-R)")] {
        let mut host = Vec::new();
        let mut sandbox = Vec::new();
        for _ in 0..plan.iperf_runs {
            // Interleaved, so drift over the run hits both alike.
            host.push(iperf_once(&world.host, plan.iperf_secs, reverse)?);
            sandbox.push(iperf_once(&nat.netns, plan.iperf_secs, reverse)?);
        }
        let (h, s) = (median(host), median(sandbox));
        for (what, value, unit) in [
            ("host -> upstream, veth (baseline)", h, "Gbit/s"),
            ("sandbox -> upstream, NAT", s, "Gbit/s"),
            ("NAT / baseline (target >= 80)", s / h * 100.0, "%"),
        ] {
            figs.push(fig(&format!("iperf3 {dir}: {what}"), value, unit));
        }
    }
    Ok(())
}

/// Waits until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &OwnedFd, port: u16) -> Result<()> {
    let needle = format!(":{port:04X}");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let listening = in_ns(ns, || {
            // thread-self: /proc/net follows the main thread's namespace.
            let mut s = String::new();
            std::fs::File::open("/proc/thread-self/net/tcp")?.read_to_string(&mut s)?;
            Ok(s.lines().any(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                // local_address, then st (0A: LISTEN).
                f.len() > 3 && f[1].ends_with(&needle) && f[3] == "0A"
            }))
        })?;
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after 5 s")
}

/// One `GET /bytes/n` to the origin (from the runtime's namespace); MB/s.
async fn download(n: u64) -> std::io::Result<f64> {
    let mut s = tokio::net::TcpStream::connect(SocketAddr::new(IpAddr::V4(UP_IP), 80)).await?;
    s.set_nodelay(true)?;
    let t = Instant::now();
    let req = format!("GET /bytes/{n} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    if got < n {
        return Err(std::io::Error::other(format!("short body: {got} of {n}")));
    }
    Ok(got as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// `CONCURRENCY` clients, one fresh connection per request, for `secs`:
/// the latencies of connect + `GET /` until the end of the reply.
async fn hammer(secs: f64) -> std::io::Result<Vec<Duration>> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let origin = SocketAddr::new(IpAddr::V4(UP_IP), 80);
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let s = tokio::net::TcpStream::connect(origin).await?;
                s.set_nodelay(true)?;
                let reply = exchange(s, NAME, "/").await?;
                if reply.status != 200 {
                    return Err(std::io::Error::other(format!("status {}", reply.status)));
                }
                lat.push(t.elapsed());
            }
            Ok::<_, std::io::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(std::io::Error::other)??);
    }
    Ok(all)
}

/// Measure (3): the origin and its DNS in the upstream, the proxy in the
/// host, clients in the two sandboxes.
#[allow(clippy::too_many_arguments)]
fn proxy(
    world: &World,
    net: &Network,
    nat: &SandboxNet,
    proxied: &SandboxNet,
    policy: &NetworkPolicy,
    plan: &Plan,
    stats: &mut Vec<Stats>,
    figs: &mut Vec<Figure>,
) -> Result<()> {
    let up_rt = runtime_in(&world.up, 1)?;
    let (web, dns) = drive(&up_rt, async {
        let web = TestWeb::http(SocketAddr::new(IpAddr::V4(UP_IP), 80)).await?;
        let dns = TestDns::start(
            IpAddr::V4(UP_IP),
            &Zone::new().addr(NAME, IpAddr::V4(UP_IP)),
        )
        .await?;
        Ok::<_, std::io::Error>((web, dns))
    })??;

    let gateway = net.config().gateway_v4();
    // As many workers as cores, like the daemon's runtime.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let host_rt = runtime_in(&world.host, cores)?;
    let policies = Arc::new(PolicyTable::new());
    policies.insert(
        IpAddr::V4(proxied.alloc.ipv4),
        Arc::new(SandboxPolicy::new(
            "netbench-proxy",
            policy,
            DefaultEgress::Deny,
            vec![],
        )),
    );
    let config = ProxyConfig {
        http_listen: vec![SocketAddr::new(
            IpAddr::V4(gateway),
            net.config().http_proxy_port,
        )],
        max_connections_per_sandbox: 4096,
        deny: {
            let (never, private) = net.deny_ranges();
            DenySet::of_firewall(never, private)
        },
        ..Default::default()
    };
    let upstream = Upstream::new(&UpstreamConfig {
        servers: vec![dns.addr()],
        timeout: Duration::from_secs(1),
        attempts: 1,
        ..Default::default()
    })?;
    let source: Arc<dyn sandpit_egress::PolicySource> = policies.clone();
    let server = drive(&host_rt, Proxy::bind(config, upstream, source))??;
    let task = host_rt.spawn(async move {
        let _ = server.run().await;
    });

    let direct_rt = runtime_in(&nat.netns, 2)?;
    let proxy_rt = runtime_in(&proxied.netns, 2)?;
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    // Warm-up: the proxy's DNS cache, the first connections.
    drive(&proxy_rt, download(1_000_000))??;
    for _ in 0..plan.downloads {
        direct.push(drive(&direct_rt, download(plan.body_bytes))??);
        through.push(drive(&proxy_rt, download(plan.body_bytes))??);
    }
    let mb = plan.body_bytes / 1_000_000;
    let (d, p) = (median(direct), median(through));
    for (what, value, unit) in [
        ("sandbox -> origin, NAT", d, "MB/s"),
        ("sandbox -> origin, proxy", p, "MB/s"),
        ("proxy / NAT (target >= 50)", p / d * 100.0, "%"),
    ] {
        figs.push(fig(&format!("http GET {mb} MB: {what}"), value, unit));
    }

    for (rt, how) in [(&direct_rt, "NAT"), (&proxy_rt, "proxy")] {
        let lat = drive(rt, hammer(plan.conn_secs))??;
        if lat.is_empty() {
            bail!("no request completed through {how}");
        }
        figs.push(fig(
            &format!("http new connections/s, {CONCURRENCY} clients, {how}"),
            lat.len() as f64 / plan.conn_secs,
            "conn/s",
        ));
        // The p99 hides them: a dropped SYN costs a 1 s retransmit.
        let slow = lat.iter().filter(|d| d.as_millis() >= 200).count();
        figs.push(fig(
            &format!("http requests >= 200 ms (of {}), {how}", lat.len()),
            slow as f64,
            "requests",
        ));
        stats.push(Stats::new(
            &format!("http connect + GET /, {CONCURRENCY} clients, {how}"),
            lat,
        ));
    }
    task.abort();
    drop((web, dns));
    // Runtimes shut down here: their threads leave the namespaces.
    drop((direct_rt, proxy_rt, host_rt, up_rt));
    Ok(())
}

/// Measure (4): podman cold start with and without a network, in a
/// private network namespace.
fn podman(rootfs: &Path, n: usize, stats: &mut Vec<Stats>, figs: &mut Vec<Figure>) -> Result<()> {
    let image = crate::podman_import(rootfs)?;
    let ns = new_netns()?;
    let mut p50 = Vec::new();
    for network in ["none", "bridge"] {
        let samples = in_ns(&ns, || {
            sh("ip link set lo up")?;
            let mut v = Vec::new();
            // One warm-up run: podman's first bridge run creates it.
            for i in 0..=n {
                let t = Instant::now();
                let st = crate::podman_cmd()
                    .args(["run", "--rm", "--network", network])
                    .args(crate::PODMAN_LIMITS)
                    .args([image, "true"])
                    .status()?;
                if !st.success() {
                    bail!("podman run --network {network} failed");
                }
                if i > 0 {
                    v.push(t.elapsed());
                }
            }
            Ok(v)
        })?;
        let s = Stats::new(
            &format!("podman run --rm --network {network} true"),
            samples,
        );
        p50.push(s.p50());
        stats.push(s);
    }
    figs.push(fig(
        "podman cold start: network bridge - none (p50)",
        (p50[1].as_secs_f64() - p50[0].as_secs_f64()) * 1e3,
        "ms",
    ));
    Ok(())
}

/// The ratios (the figures in %), after the figure table.
pub(crate) fn print_ratios(figs: &[Figure]) {
    let pct: Vec<_> = figs.iter().filter(|f| f.unit == "%").collect();
    if !pct.is_empty() {
        println!("network ratios:");
        for f in pct {
            println!("  {:<60} {:>6.1} %", f.name, f.value);
        }
    }
}
