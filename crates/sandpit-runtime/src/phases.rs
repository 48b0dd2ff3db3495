//! Where an operation's time goes: its steps timed in order and logged as
//! one debug line (`RUST_LOG=sandpit=debug`), e.g.
//! `phases op="create" disk=412 cgroup=96 spawn=3150 total_us=4102`.
//! Cheap enough to leave in the hot paths: a clock read per step, and
//! nothing formatted unless debug logging is on.

use std::fmt::Write as _;
use std::time::Instant;

/// The steps of one operation, each with the microseconds it took.
#[derive(Debug)]
pub struct Phases {
    op: &'static str,
    start: Instant,
    last: Instant,
    steps: Vec<(&'static str, u64)>,
}

impl Phases {
    /// Starts timing operation `op`.
    pub fn start(op: &'static str) -> Self {
        let now = Instant::now();
        Self {
            op,
            start: now,
            last: now,
            steps: Vec::with_capacity(8),
        }
    }

    /// Ends step `name` (begun where the previous one ended).
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let us = now.duration_since(self.last).as_micros() as u64;
        self.last = now;
        self.steps.push((name, us));
    }

    /// The steps so far, in order.
    pub fn steps(&self) -> &[(&'static str, u64)] {
        &self.steps
    }

    /// Logs the steps (at debug level) for sandbox `id`.
    pub fn log(&self, id: &dyn std::fmt::Display) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let mut line = String::new();
        for (name, us) in &self.steps {
            let _ = write!(line, "{name}={us} ");
        }
        tracing::debug!(
            sandbox_id = %id,
            op = self.op,
            total_us = self.start.elapsed().as_micros() as u64,
            "phases {}",
            line.trim_end()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_kept_in_order_and_each_covers_its_own_time() {
        let mut p = Phases::start("test");
        std::thread::sleep(std::time::Duration::from_millis(3));
        p.mark("slow");
        p.mark("quick");
        let steps = p.steps();
        assert_eq!(
            steps.iter().map(|s| s.0).collect::<Vec<_>>(),
            ["slow", "quick"]
        );
        assert!(steps[0].1 >= 3000, "{steps:?}");
        assert!(steps[1].1 < steps[0].1, "{steps:?}");
    }
}
