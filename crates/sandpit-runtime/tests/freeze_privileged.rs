//! `Runtime::freeze` on real cgroups: a frozen sandbox does not run.
//! Root only: `cargo test -p sandpit-runtime --features privileged-tests --test freeze_privileged`.
#![cfg(feature = "privileged-tests")]

use std::path::Path;
use std::time::{Duration, Instant};

use sandpit_runtime::{RuntimeError, SandboxId};

mod common;
use common::*;

/// The counter's last value, as the sandbox last wrote it into its upper
/// layer (renamed into place, so never half-written).
fn counter(upper: &Path) -> Option<u64> {
    std::fs::read_to_string(upper.join("tmp/count"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn wait_advancing(upper: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(v) = counter(upper) {
            break v;
        }
        assert!(Instant::now() < deadline, "the counter never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    loop {
        let now = counter(upper).unwrap();
        if now > first {
            return now;
        }
        assert!(Instant::now() < deadline, "the counter does not advance");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const COUNTER: &str =
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; done";

#[test]
fn a_frozen_sandbox_does_not_run_until_thawed() {
    let rt = runtime();
    let sb = start(rt, spec("freeze", busybox(), &["sh", "-c", COUNTER]));
    let upper = rt.upper_dir(sb.id());
    assert!(upper.is_dir(), "{}", upper.display());
    wait_advancing(&upper);

    let frozen = rt.freeze(sb.id()).unwrap();
    assert_eq!(frozen.id(), sb.id());
    let at_freeze = counter(&upper).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&upper), Some(at_freeze), "advanced while frozen");

    frozen.thaw().unwrap();
    assert!(wait_advancing(&upper) > at_freeze);

    // Dropping the guard thaws too (an early return while copying).
    {
        let _frozen = rt.freeze(sb.id()).unwrap();
        let held = counter(&upper).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(counter(&upper), Some(held));
    }
    wait_advancing(&upper);
    // And the agent answers again.
    assert_eq!(sh(&sb.agent(), "echo ok").0, "ok\n");
}

#[test]
fn freezing_an_unknown_sandbox_is_not_found() {
    let id = SandboxId::parse("freeze-never-created").unwrap();
    assert!(matches!(
        runtime().freeze(&id),
        Err(RuntimeError::NotFound(got)) if got == id
    ));
}
