//! The accounting's metrics, in the `prometheus` crate's default registry
//! (which the daemon's `/metrics` serves): one count per outcome, and
//! histograms of CPU time and peak memory of the commands that reported
//! them.

use std::sync::OnceLock;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};

use super::CommandRecord;

/// The accounting's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// `sandpit_commands_total{outcome}`.
    pub commands: IntCounterVec,
    /// `sandpit_command_cpu_seconds` (user + system).
    pub cpu_seconds: Histogram,
    /// `sandpit_command_peak_memory_bytes`.
    pub peak_memory_bytes: Histogram,
}

fn build() -> Metrics {
    let commands = IntCounterVec::new(
        Opts::new(
            "sandpit_commands_total",
            "Commands (execs and main processes) ended, by outcome.",
        ),
        &["outcome"],
    )
    .expect("valid metric");
    let cpu_seconds = Histogram::with_opts(
        HistogramOpts::new(
            "sandpit_command_cpu_seconds",
            "CPU time (user + system) of ended commands, in seconds.",
        )
        .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0]),
    )
    .expect("valid metric");
    let peak_memory_bytes = Histogram::with_opts(
        HistogramOpts::new(
            "sandpit_command_peak_memory_bytes",
            "Peak resident memory of one process of ended commands, in bytes.",
        )
        .buckets(prometheus::exponential_buckets(1_048_576.0, 4.0, 8).expect("valid buckets")),
    )
    .expect("valid metric");
    let registry = prometheus::default_registry();
    for c in [
        Box::new(commands.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(cpu_seconds.clone()),
        Box::new(peak_memory_bytes.clone()),
    ] {
        // Only one registration per process; a second would be a bug here.
        if let Err(e) = registry.register(c) {
            tracing::warn!(error = %e, "register accounting metrics");
        }
    }
    // Every outcome shows from the start, at 0.
    for name in super::Outcome::NAMES {
        commands.with_label_values(&[name]);
    }
    Metrics {
        commands,
        cpu_seconds,
        peak_memory_bytes,
    }
}

/// The metrics, registered in the default registry on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(build)
}

/// Counts an ended command.
pub fn observe(r: &CommandRecord) {
    let m = metrics();
    m.commands.with_label_values(&[r.outcome.name()]).inc();
    if let Some(u) = r.usage {
        m.cpu_seconds.observe(u.cpu_seconds());
        m.peak_memory_bytes.observe(u.max_rss_bytes as f64);
    }
}
