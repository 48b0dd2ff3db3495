//! Placement cost as the registry grows: 1, 10 and 100 registered runners,
//! each heartbeating at a quarter of the lease (as runners do), against a
//! real PostgreSQL on loopback (tests/support). Prints the latency of one
//! create's placement (sequential) and the placements per second of 16 at
//! once. Numbers only, no assertions.
//!
//!     cargo bench -p sandpit-cluster --bench placement [-- --quick]

// The tests' server harness; its crash helper is theirs alone.
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use sandpit_cluster::{
    Capacity, Labels, PlacementRequest, Registration, RunnerId, Store, StoreConfig,
};

fn registration(i: usize) -> Registration {
    Registration {
        id: RunnerId::new(format!("runner-{i:03}")).unwrap(),
        endpoint: format!("10.0.{}.{}:50052", i / 250, i % 250),
        labels: [("zone".to_string(), format!("z{}", i % 3))].into(),
        allocatable: Capacity {
            cpu_millis: 1 << 40,
            memory_bytes: 1 << 60,
            sandboxes: i32::MAX as u32,
        },
        direct: None,
    }
}

fn create(n: usize) -> PlacementRequest {
    PlacementRequest {
        sandbox_id: format!("sb-{n}"),
        principal: "bench".into(),
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        pins: vec![],
        selector: Labels::new(),
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (sequential, concurrent) = if quick { (100, 200) } else { (1000, 2000) };
    let Some(pg) = support::Pg::start() else {
        return;
    };
    let config = StoreConfig {
        max_connections: 32,
        ..StoreConfig::default()
    };
    let heartbeat = config.lease / 4;
    let store = Store::connect(&pg.url(), config).await.unwrap();
    let mut next = 0usize;
    println!(
        "placement through one store, PostgreSQL {} on loopback; {sequential} sequential, \
         {concurrent} at 16 concurrent",
        pg.url()
    );
    println!(
        "{:>8}  {:>9}  {:>9}  {:>14}",
        "runners", "p50 ms", "p90 ms", "placements/s"
    );
    let (admin, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    for runners in [1usize, 10, 100] {
        // Each count from the same start: empty tables, no dead row
        // versions left by the last count's updates.
        for sql in [
            "TRUNCATE sandboxes, runners",
            "VACUUM ANALYZE sandboxes, runners",
        ] {
            admin.batch_execute(sql).await.unwrap();
        }
        let mut beaters = Vec::new();
        for i in 0..runners {
            let reg = registration(i);
            let adoption = store.register(&reg).await.unwrap();
            let s = store.clone();
            beaters.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(heartbeat);
                loop {
                    tick.tick().await;
                    s.heartbeat(&reg.id, adoption.incarnation, reg.allocatable)
                        .await
                        .unwrap();
                }
            }));
        }
        let mut lat = Vec::with_capacity(sequential);
        for _ in 0..sequential {
            next += 1;
            let t = Instant::now();
            store.place(&create(next)).await.unwrap();
            lat.push(t.elapsed());
        }
        lat.sort();
        let t = Instant::now();
        let tasks: Vec<_> = (0..16)
            .map(|w| {
                let s = store.clone();
                let base = next + w * concurrent;
                tokio::spawn(async move {
                    for k in 0..concurrent / 16 {
                        s.place(&create(base + k)).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        next += 16 * concurrent;
        let rate = (concurrent / 16 * 16) as f64 / t.elapsed().as_secs_f64();
        println!(
            "{runners:>8}  {:>9.3}  {:>9.3}  {rate:>14.0}",
            pct(&lat, 0.5),
            pct(&lat, 0.9)
        );
        for b in beaters {
            b.abort();
        }
    }
}
