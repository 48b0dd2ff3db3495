//! The families read at scrape time: sandboxes by state (from the
//! manager's table) and each RUNNING sandbox's CPU, memory, tasks and
//! network (from the engine, i.e. its cgroup and host link), and the warm
//! pools' sizes, levels and memory. Built into a
//! registry of that scrape only: a sandbox that stopped has no series in
//! the next scrape, so labels never pile up.

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, IntCounterVec, IntGaugeVec, Opts};

use crate::engine::{Engine, EngineError};
use crate::manager::Manager;

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

fn counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &["sandbox_id"]).expect("a valid metric")
}

/// The per-scrape families.
pub async fn families<E: Engine>(manager: &Manager<E>) -> Vec<MetricFamily> {
    let states = gauge(
        "sandpit_sandboxes",
        "Sandboxes known to the daemon (terminal ones until retention drops them), by state",
        &["state"],
    );
    for (state, n) in manager.state_counts() {
        states.with_label_values(&[state.as_str()]).set(n as i64);
    }
    let cpu = CounterVec::new(
        Opts::new(
            "sandpit_sandbox_cpu_seconds_total",
            "CPU time used by a running sandbox's processes",
        ),
        &["sandbox_id"],
    )
    .expect("a valid metric");
    let memory = gauge(
        "sandpit_sandbox_memory_bytes",
        "Memory charged to a running sandbox's cgroup (page cache included)",
        &["sandbox_id"],
    );
    let limit = gauge(
        "sandpit_sandbox_memory_limit_bytes",
        "Memory limit of a running sandbox (absent when unlimited)",
        &["sandbox_id"],
    );
    let peak = gauge(
        "sandpit_sandbox_memory_peak_bytes",
        "Most memory charged to a running sandbox so far (where the kernel keeps it)",
        &["sandbox_id"],
    );
    let pids = gauge(
        "sandpit_sandbox_pids",
        "Tasks (processes and threads) in a running sandbox",
        &["sandbox_id"],
    );
    let rx = counter(
        "sandpit_sandbox_network_receive_bytes_total",
        "Bytes a running sandbox received on its network (absent without one)",
    );
    let tx = counter(
        "sandpit_sandbox_network_transmit_bytes_total",
        "Bytes a running sandbox sent on its network (absent without one)",
    );
    for record in manager.running_records() {
        let stats = match manager.engine().stats(&record.id).await {
            Ok(s) => s,
            // Ended since the table was read.
            Err(EngineError::Unknown(_)) => continue,
            Err(e) => {
                tracing::debug!(sandbox_id = %record.id, error = %crate::chain(&e), "sandbox stats");
                continue;
            }
        };
        let id = [record.id.as_str()];
        cpu.with_label_values(&id)
            .inc_by(stats.cpu_usage_ns as f64 / 1e9);
        memory.with_label_values(&id).set(clamp(stats.memory_bytes));
        if let Some(l) = stats.memory_limit_bytes {
            limit.with_label_values(&id).set(clamp(l));
        }
        if let Some(p) = stats.memory_peak_bytes {
            peak.with_label_values(&id).set(clamp(p));
        }
        pids.with_label_values(&id).set(clamp(stats.pids));
        if let Some(b) = stats.net_rx_bytes {
            rx.with_label_values(&id).inc_by(b);
        }
        if let Some(b) = stats.net_tx_bytes {
            tx.with_label_values(&id).inc_by(b);
        }
    }
    let pool_size = gauge(
        "sandpit_pool_size",
        "Sandboxes a warm pool keeps ready, by pool (its image)",
        &["pool"],
    );
    let pool_ready = gauge(
        "sandpit_pool_ready",
        "Idle sandboxes ready in a warm pool now",
        &["pool"],
    );
    let pool_memory = gauge(
        "sandpit_pool_memory_bytes",
        "Memory charged to a warm pool's idle sandboxes (what holding them costs)",
        &["pool"],
    );
    for pool in manager.pool_status() {
        let name = [pool.name.as_str()];
        pool_size.with_label_values(&name).set(pool.size as i64);
        pool_ready
            .with_label_values(&name)
            .set(pool.ready.len() as i64);
        let mut bytes = 0u64;
        for id in &pool.ready {
            if let Ok(s) = manager.engine().stats(id).await {
                bytes = bytes.saturating_add(s.memory_bytes);
            }
        }
        pool_memory.with_label_values(&name).set(clamp(bytes));
    }
    let mut out = states.collect();
    for c in [&pool_size, &pool_ready, &pool_memory] {
        out.extend(c.collect());
    }
    for c in [&memory, &limit, &peak, &pids] {
        out.extend(c.collect());
    }
    out.extend(cpu.collect());
    out.extend(rx.collect());
    out.extend(tx.collect());
    // A family without series would print only its HELP and TYPE lines.
    out.retain(|f| !f.get_metric().is_empty());
    out
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
