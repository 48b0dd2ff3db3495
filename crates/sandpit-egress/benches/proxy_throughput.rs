//! Connections per second and bytes per second through the proxy, on
//! loopback (the origins and the upstream DNS of `sandpit_egress::testing`).
//! Prints a table; asserts nothing.
//!
//! `cargo bench -p sandpit-egress --features testing --bench proxy_throughput`
//! (`-- --secs 5 --concurrency 32 --megabytes 1000` to change the defaults.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandpit_egress::testing::{
    connect_from, exchange, https_get, name_rule, rules_policy, sandbox_ip, Lab, Zone, ORIGIN_IP,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    secs: u64,
    concurrency: usize,
    megabytes: u64,
}

fn args() -> Args {
    let mut a = Args {
        secs: 2,
        concurrency: 16,
        megabytes: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok()).expect("a number");
        match flag.as_str() {
            "--secs" => a.secs = value(),
            "--concurrency" => a.concurrency = value() as usize,
            "--megabytes" => a.megabytes = value(),
            _ => {} // cargo bench passes --bench
        }
    }
    a.secs = a.secs.clamp(1, 30);
    a.concurrency = a.concurrency.clamp(1, 128);
    a.megabytes = a.megabytes.clamp(1, 10_000);
    a
}

const SANDBOXES: u8 = 8;

/// Requests from `concurrency` clients for `secs`, each its own
/// connection; (count, latencies).
async fn hammer<F, Fut>(secs: u64, concurrency: usize, one: F) -> (u64, Vec<Duration>)
where
    F: Fn(IpAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<u16>> + Send,
{
    let one = Arc::new(one);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let one = Arc::clone(&one);
        let source = sandbox_ip(1 + (i as u8 % SANDBOXES));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                match one(source).await {
                    Ok(200) => lat.push(t.elapsed()),
                    Ok(status) => panic!("status {status}"),
                    Err(e) => panic!("request failed: {e}"),
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort();
    (all.len() as u64, all)
}

fn pct(lat: &[Duration], p: f64) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    let i = ((lat.len() as f64 - 1.0) * p) as usize;
    lat[i].as_secs_f64() * 1000.0
}

fn row(what: &str, count: u64, secs: u64, lat: &[Duration]) {
    println!(
        "{what:<34} {:>9.0} conn/s   p50 {:>6.2} ms   p99 {:>6.2} ms",
        count as f64 / secs as f64,
        pct(lat, 0.5),
        pct(lat, 0.99)
    );
}

/// One GET of `bytes` bytes over plain HTTP to `to` from `source`; MB/s.
async fn download(source: IpAddr, to: SocketAddr, bytes: u64) -> f64 {
    let mut s = connect_from(source, to).await.expect("connect");
    let req = format!("GET /bytes/{bytes} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request");
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert!(got >= bytes, "short body: {got}");
    got as f64 / 1e6 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let zone = Zone::new().addr("api.test", ORIGIN_IP);
    let lab = Lab::start_with(&zone, &["api.test"], |_, proxy| {
        proxy.max_connections_per_sandbox = 4096;
    })
    .await;
    for i in 1..=SANDBOXES {
        lab.sandbox(
            sandbox_ip(i),
            rules_policy("bench", vec![name_rule("api.test", &[80, 443])], &[]),
        );
    }
    println!(
        "sandpit-egress proxy on loopback: {} clients, {} s per row, {} cores",
        a.concurrency,
        a.secs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let origin = lab.http.addr();
    let (n, lat) = hammer(a.secs, a.concurrency, move |src| async move {
        Ok(exchange(connect_from(src, origin).await?, "api.test", "/")
            .await?
            .status)
    })
    .await;
    row("http, direct to the origin", n, a.secs, &lat);

    let proxy = lab.http_addr;
    let (n, lat) = hammer(a.secs, a.concurrency, move |src| async move {
        Ok(exchange(connect_from(src, proxy).await?, "api.test", "/")
            .await?
            .status)
    })
    .await;
    row("http, through the proxy", n, a.secs, &lat);

    let (tls, client) = (lab.tls_addr, lab.ca.client_config());
    let (n, lat) = hammer(a.secs, a.concurrency, move |src| {
        let client = Arc::clone(&client);
        async move { Ok(https_get(src, tls, client, "api.test", "/").await?.status) }
    })
    .await;
    row("https (full handshake), proxied", n, a.secs, &lat);

    let bytes = a.megabytes * 1_000_000;
    let direct = download(sandbox_ip(1), origin, bytes).await;
    let proxied = download(sandbox_ip(1), lab.http_addr, bytes).await;
    println!(
        "{:<34} {direct:>9.0} MB/s",
        format!("{} MB, direct", a.megabytes)
    );
    println!(
        "{:<34} {proxied:>9.0} MB/s",
        format!("{} MB, through the proxy", a.megabytes)
    );
}
