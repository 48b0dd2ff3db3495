//! Prometheus metrics of `sandpitd`, served on their own listener
//! ([`http`], `[metrics]` in the config, see `docs/ops/metrics.md`).
//!
//! Counters and histograms live in the `prometheus` crate's DEFAULT
//! registry, so any module (ours or another's) that registers metrics there
//! is scraped without code here. They are atomics: the hot paths (a create,
//! an exec, an error) pay an increment, never a lock or a read of the
//! kernel. Figures that are state rather than events (sandboxes by state,
//! each sandbox's CPU, memory and network) are read at scrape time
//! ([`sandboxes`]) into families of that scrape only, so a sandbox that is
//! gone leaves no series behind.

pub mod grpc;
pub mod http;
pub mod sandboxes;

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec,
};

/// Buckets of latencies from milliseconds (an exec's start) to minutes (a
/// create behind a large pull).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

fn latency(name: &str, help: &str) -> Histogram {
    register_histogram!(name, help, LATENCY_BUCKETS.to_vec()).expect("registered once")
}

/// CreateSandbox calls that reserved a sandbox, by what the call answered.
pub static CREATES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sandpit_sandbox_creates_total",
        "CreateSandbox calls that made a sandbox (retries of a request id excluded), by outcome: \
         the state answered (running, creating, pending, failed, terminated) or refused",
        &["outcome"]
    )
    .expect("registered once")
});

/// From the create call to RUNNING (pulls and startup probes included).
pub static CREATE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    latency(
        "sandpit_sandbox_create_duration_seconds",
        "Time from CreateSandbox to RUNNING, image pull and startup probe included",
    )
});

/// Execs by outcome.
pub static EXECS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sandpit_execs_total",
        "Exec and StreamExec calls that reached a sandbox, by outcome (started, failed)",
        &["outcome"]
    )
    .expect("registered once")
});

/// From the exec call to the command started in the sandbox.
pub static EXEC_START_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    latency(
        "sandpit_exec_start_duration_seconds",
        "Time from an exec call to its command running in the sandbox",
    )
});

/// From the exec call to its end.
pub static EXEC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    latency(
        "sandpit_exec_duration_seconds",
        "Time from an exec call to its end (the command's exit, a timeout or a cancel)",
    )
});

/// Image pulls by outcome.
pub static PULLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sandpit_image_pulls_total",
        "Image pulls for sandboxes, by outcome (ok, failed)",
        &["outcome"]
    )
    .expect("registered once")
});

/// Duration of pulls.
pub static PULL_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "sandpit_image_pull_duration_seconds",
        "Duration of image pulls for sandboxes, by outcome",
        &["outcome"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("registered once")
});

/// Compressed layer bytes fetched from registries.
pub static PULLED_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sandpit_image_pulled_bytes_total",
        "Compressed layer bytes fetched from registries and stored"
    )
    .expect("registered once")
});

/// gRPC errors answered, by method, code and ErrorInfo reason.
pub static API_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sandpit_api_errors_total",
        "gRPC calls answered with an error, by method, status code and ErrorInfo reason",
        &["method", "code", "reason"]
    )
    .expect("registered once")
});

/// Creates that fit a warm pool, by pool and whether one was ready.
pub static POOL_CLAIMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sandpit_pool_claims_total",
        "Creates that fit a warm pool, by pool (its image) and outcome: hit (a pooled sandbox was taken) or miss (the pool was empty: created cold)",
        &["pool", "outcome"]
    )
    .expect("registered once")
});

/// Registers every metric of this module, the process collector and the
/// build info, so that a scrape shows them (at zero) before anything
/// happened. Idempotent.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for outcome in ["running", "failed", "refused"] {
            CREATES.with_label_values(&[outcome]);
        }
        LazyLock::force(&CREATE_SECONDS);
        for outcome in ["started", "failed"] {
            EXECS.with_label_values(&[outcome]);
        }
        LazyLock::force(&EXEC_START_SECONDS);
        LazyLock::force(&EXEC_SECONDS);
        for outcome in ["ok", "failed"] {
            PULLS.with_label_values(&[outcome]);
            PULL_SECONDS.with_label_values(&[outcome]);
        }
        LazyLock::force(&PULLED_BYTES);
        LazyLock::force(&API_ERRORS);
        LazyLock::force(&POOL_CLAIMS);
        let info = register_int_gauge_vec!(
            "sandpit_build_info",
            "Always 1; the daemon's version",
            &["version"]
        )
        .expect("registered once");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(e) = prometheus::register(Box::new(process)) {
                tracing::debug!(error = %e, "process metrics");
            }
        }
    });
}

/// What a create call answered: the state, or `refused`.
pub fn create_answered(outcome: &str) {
    CREATES.with_label_values(&[outcome]).inc();
}

/// A sandbox reached RUNNING `elapsed` after its create call.
pub fn create_started(elapsed: Duration) {
    CREATE_SECONDS.observe(elapsed.as_secs_f64());
}

/// A create fitted pool `pool`; `hit`: a pooled sandbox was taken.
pub fn pool_claim(pool: &str, hit: bool) {
    POOL_CLAIMS
        .with_label_values(&[pool, if hit { "hit" } else { "miss" }])
        .inc();
}

/// A pull ended.
pub fn pull_done(ok: bool, elapsed: Duration) {
    let outcome = if ok { "ok" } else { "failed" };
    PULLS.with_label_values(&[outcome]).inc();
    PULL_SECONDS
        .with_label_values(&[outcome])
        .observe(elapsed.as_secs_f64());
}

/// Times one exec: [`ExecTimer::started`] when its command runs; the total
/// and the outcome are recorded when the timer is dropped, however the exec
/// ended.
#[derive(Debug)]
pub struct ExecTimer {
    begun: Instant,
    started: bool,
}

impl ExecTimer {
    /// An exec call arrived.
    pub fn begin() -> Self {
        Self {
            begun: Instant::now(),
            started: false,
        }
    }

    /// Its command runs in the sandbox.
    pub fn started(&mut self) {
        self.started = true;
        EXEC_START_SECONDS.observe(self.begun.elapsed().as_secs_f64());
    }
}

impl Drop for ExecTimer {
    fn drop(&mut self) {
        if self.started {
            EXECS.with_label_values(&["started"]).inc();
            EXEC_SECONDS.observe(self.begun.elapsed().as_secs_f64());
        } else {
            EXECS.with_label_values(&["failed"]).inc();
        }
    }
}

#[cfg(test)]
mod tests;
