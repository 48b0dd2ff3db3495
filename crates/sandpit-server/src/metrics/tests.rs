use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::SystemClock;
use crate::db::Db;
use crate::engine::SandboxStats;
use crate::fake::FakeEngine;
use crate::logs::NullSink;
use crate::manager::{Manager, ManagerConfig};
use crate::model::{NewSandbox, Principal, State};

const IMAGE: &str = "docker.io/library/python:3.11";

/// The value of the one series `name{labels}` in `text`; `None` if absent.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn manager(engine: &FakeEngine) -> Manager<FakeEngine> {
    engine.add_image(IMAGE, &[], &["python3"]);
    Manager::start(
        ManagerConfig::default(),
        engine.clone(),
        Db::in_memory().unwrap(),
        Arc::new(SystemClock),
        Arc::new(NullSink),
    )
    .await
    .unwrap()
}

fn sleeper() -> NewSandbox {
    NewSandbox {
        image: IMAGE.into(),
        command: Some("sleep".into()),
        args: vec!["infinity".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_scrape_shows_states_and_each_running_sandbox_until_it_stops() {
    init();
    let engine = FakeEngine::new();
    let m = manager(&engine).await;
    let (alice, bob) = (Principal("alice".into()), Principal("bob".into()));
    let a = m.create(&alice, sleeper()).await.unwrap();
    let b = m.create(&bob, sleeper()).await.unwrap();
    assert_eq!((a.state, b.state), (State::Running, State::Running));
    engine.set_stats(
        &a.id,
        SandboxStats {
            cpu_usage_ns: 2_500_000_000,
            memory_bytes: 64 << 20,
            memory_limit_bytes: Some(1 << 30),
            memory_peak_bytes: Some(80 << 20),
            pids: 3,
            net_rx_bytes: Some(100),
            net_tx_bytes: Some(200),
        },
    );
    let text = http::render(&m).await;
    assert_eq!(
        value(&text, "sandpit_sandboxes{state=\"running\"}"),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "sandpit_sandboxes{state=\"failed\"}"),
        Some(0.0)
    );
    let of = |name: &str, id: &crate::model::SandboxId| format!("{name}{{sandbox_id=\"{id}\"}}");
    assert_eq!(
        value(&text, &of("sandpit_sandbox_cpu_seconds_total", &a.id)),
        Some(2.5)
    );
    assert_eq!(
        value(&text, &of("sandpit_sandbox_memory_limit_bytes", &a.id)),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(value(&text, &of("sandpit_sandbox_pids", &a.id)), Some(3.0));
    assert_eq!(
        value(
            &text,
            &of("sandpit_sandbox_network_transmit_bytes_total", &a.id)
        ),
        Some(200.0)
    );
    // The fake's default for b: no network, so no network series.
    assert!(value(&text, &of("sandpit_sandbox_memory_bytes", &b.id)).is_some());
    assert!(value(
        &text,
        &of("sandpit_sandbox_network_receive_bytes_total", &b.id)
    )
    .is_none());
    assert!(text.contains("# TYPE sandpit_sandbox_cpu_seconds_total counter"));
    assert!(text.contains("# TYPE sandpit_sandbox_memory_bytes gauge"));

    m.delete(&alice, &a.id, Duration::from_secs(1), false)
        .await
        .unwrap();
    let text = http::render(&m).await;
    assert!(!text.contains(a.id.as_str()), "{text}");
    assert!(text.contains(b.id.as_str()));
    assert_eq!(
        value(&text, "sandpit_sandboxes{state=\"running\"}"),
        Some(1.0)
    );
}

#[test]
fn exec_timers_count_outcomes_and_fill_buckets() {
    init();
    let started = || EXECS.with_label_values(&["started"]).get();
    let failed = || EXECS.with_label_values(&["failed"]).get();
    let (s0, f0, n0) = (started(), failed(), EXEC_SECONDS.get_sample_count());
    let mut t = ExecTimer::begin();
    t.started();
    drop(t);
    drop(ExecTimer::begin());
    assert_eq!(started() - s0, 1);
    assert_eq!(failed() - f0, 1);
    assert_eq!(EXEC_SECONDS.get_sample_count() - n0, 1);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&prometheus::gather())
        .unwrap();
    // Cumulative buckets up to +Inf, which equals the count.
    let inf = value(&text, "sandpit_exec_duration_seconds_bucket{le=\"+Inf\"}").unwrap();
    let count = value(&text, "sandpit_exec_duration_seconds_count").unwrap();
    assert_eq!(inf, count);
    assert!(value(&text, "sandpit_exec_duration_seconds_bucket{le=\"0.001\"}").is_some());
    assert!(value(&text, "sandpit_exec_duration_seconds_bucket{le=\"300\"}").is_some());
    assert!(text.contains("sandpit_build_info{version="));
}

#[test]
fn errors_are_counted_by_method_code_and_reason() {
    init();
    let status = crate::api::errors::sandbox_not_found("sb-x");
    let mut headers = axum::http::HeaderMap::new();
    status.add_header(&mut headers).unwrap();
    let method = grpc::method_label("/coreweave.sandbox.v1.SandboxService/GetSandbox");
    assert_eq!(method, "SandboxService/GetSandbox");
    let labels = [method.as_str(), "NotFound", "CWSANDBOX_SANDBOX_NOT_FOUND"];
    let before = API_ERRORS.with_label_values(&labels).get();
    assert!(grpc::count_status(&method, &headers));
    assert_eq!(API_ERRORS.with_label_values(&labels).get() - before, 1);
    // No status: nothing counted, and the caller watches the trailers.
    assert!(!grpc::count_status(&method, &axum::http::HeaderMap::new()));
    // A path the caller made up does not become a label.
    assert_eq!(grpc::method_label("/x.Y/Z"), "unknown");
    assert_eq!(
        grpc::method_label("/sandpit.v1.Operations/SandboxStats"),
        "Operations/SandboxStats"
    );
}
