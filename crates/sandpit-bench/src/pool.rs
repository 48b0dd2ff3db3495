//! `--only pool` (with `--daemon`): creates served from a warm pool. A
//! daemon of its own keeps [`POOL_SIZE`] sandboxes of the default shape
//! ready (`[[pool]]`); each timed create (until its first `true` exited)
//! starts with the pool full, as a create on a quiet runner finds it, and
//! the refill between creates is not timed. `/metrics` (on a port of its
//! own) says when the pool is full again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::daemon::{connect, create, delete, exec};
use crate::Stats;

/// Sandboxes the bench's pool keeps ready.
pub(crate) const POOL_SIZE: usize = 2;

/// The daemon config's pool and metrics sections.
pub(crate) fn config(image: &str, metrics_port: u16) -> String {
    format!(
        "[[pool]]\nimage = \"{image}\"\nsize = {POOL_SIZE}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    )
}

/// A free loopback port (bound, then released for the daemon).
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `sandpit_pool_ready`, summed over pools, from the daemon's `/metrics`.
fn ready(metrics_port: u16) -> Result<usize> {
    let mut s = TcpStream::connect(("127.0.0.1", metrics_port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("sandpit_pool_ready{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize)
}

/// Waits until the pool is full (up to a minute).
pub(crate) fn wait_full(metrics_port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready(metrics_port)? < POOL_SIZE {
        if Instant::now() > deadline {
            bail!("the warm pool did not fill within a minute");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `n` creates from a full pool, each until its first `true` exited.
pub(crate) async fn measure(
    port: u16,
    metrics_port: u16,
    n: usize,
    live: &mut Vec<String>,
) -> Result<Vec<Stats>> {
    let mut c = connect(port).await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 1 {
        tokio::task::spawn_blocking(move || wait_full(metrics_port))
            .await
            .context("wait for the pool")??;
        let t = Instant::now();
        let id = create(&mut c, 10_000 + i).await?;
        live.push(id.clone());
        let code = exec(&mut c, &id, &["true"]).await?;
        // The first is a warm-up (the daemon's first claim).
        if i > 0 {
            samples.push(t.elapsed());
        }
        if code != 0 {
            bail!("true exited with {code}");
        }
        delete(&mut c, &id).await?;
        live.pop();
    }
    Ok(vec![Stats::new(
        "daemon, warm pool: create until first `true` exit",
        samples,
    )])
}
