//! Which runners may take a create, best first: pure, so the policy is
//! unit-tested without a database. The store then takes capacity on the
//! first of them whose row still has room (`Store::place`).

use crate::model::{Capacity, PlacementRequest, RunnerStatus};

/// Why no runner is a candidate, for the client's capacity error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoFit {
    /// No runner is live (or none of the pinned ones is).
    NoLiveRunner,
    /// Live runners exist, none carries the selector's labels.
    NoLabelMatch,
    /// Runners match, none has room for the request.
    Full,
}

/// Indices into `runners` of those that may take `req`, best first: spread,
/// so the runner whose fullest axis (CPU, memory or sandbox count, as a
/// share of what it allocates) stays lowest after the create comes first.
/// Ties go to the runner with fewer sandboxes, then to the smaller id, so
/// that the order is the same on every gateway.
pub fn rank(runners: &[RunnerStatus], req: &PlacementRequest) -> Result<Vec<usize>, NoFit> {
    let need = req.need();
    let live: Vec<usize> = (0..runners.len())
        .filter(|&i| runners[i].live)
        .filter(|&i| req.pins.is_empty() || req.pins.contains(&runners[i].id))
        .collect();
    if live.is_empty() {
        return Err(NoFit::NoLiveRunner);
    }
    let labelled: Vec<usize> = live
        .into_iter()
        .filter(|&i| {
            req.selector
                .iter()
                .all(|(k, v)| runners[i].labels.get(k) == Some(v))
        })
        .collect();
    if labelled.is_empty() {
        return Err(NoFit::NoLabelMatch);
    }
    let mut fitting: Vec<(f64, usize)> = labelled
        .into_iter()
        .filter(|&i| runners[i].requested.fits(&need, &runners[i].allocatable))
        .map(|i| {
            (
                fullest_after(&runners[i].requested, &need, &runners[i].allocatable),
                i,
            )
        })
        .collect();
    if fitting.is_empty() {
        return Err(NoFit::Full);
    }
    fitting.sort_by(|(a, i), (b, j)| {
        a.total_cmp(b)
            .then(
                runners[*i]
                    .requested
                    .sandboxes
                    .cmp(&runners[*j].requested.sandboxes),
            )
            .then(runners[*i].id.cmp(&runners[*j].id))
    });
    Ok(fitting.into_iter().map(|(_, i)| i).collect())
}

/// The largest share of `limit` that `used + need` takes on any axis.
fn fullest_after(used: &Capacity, need: &Capacity, limit: &Capacity) -> f64 {
    let share = |u: u64, n: u64, l: u64| {
        if l == 0 {
            0.0
        } else {
            u.saturating_add(n) as f64 / l as f64
        }
    };
    share(used.cpu_millis, need.cpu_millis, limit.cpu_millis)
        .max(share(
            used.memory_bytes,
            need.memory_bytes,
            limit.memory_bytes,
        ))
        .max(share(
            u64::from(used.sandboxes),
            u64::from(need.sandboxes),
            u64::from(limit.sandboxes),
        ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Labels, RunnerId};

    fn runner(id: &str, cpu_used: u64, live: bool, labels: &[(&str, &str)]) -> RunnerStatus {
        RunnerStatus {
            id: RunnerId::new(id).unwrap(),
            endpoint: format!("{id}:1"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            allocatable: Capacity {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                sandboxes: 10,
            },
            requested: Capacity {
                cpu_millis: cpu_used,
                memory_bytes: 0,
                sandboxes: (cpu_used / 1000) as u32,
            },
            incarnation: 1,
            heartbeat_age: Duration::ZERO,
            live,
            direct: None,
        }
    }

    fn req(cpu: u64, pins: &[&str], selector: &[(&str, &str)]) -> PlacementRequest {
        PlacementRequest {
            sandbox_id: "s".into(),
            principal: "p".into(),
            cpu_millis: cpu,
            memory_bytes: 1 << 20,
            pins: pins.iter().map(|p| RunnerId::new(*p).unwrap()).collect(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>(),
        }
    }

    #[test]
    fn the_emptiest_runner_comes_first() {
        let rs = [
            runner("a", 3000, true, &[]),
            runner("b", 1000, true, &[]),
            runner("c", 2000, true, &[]),
        ];
        assert_eq!(rank(&rs, &req(500, &[], &[])), Ok(vec![1, 2, 0]));
    }

    #[test]
    fn ties_are_broken_the_same_way_everywhere() {
        let rs = [runner("b", 0, true, &[]), runner("a", 0, true, &[])];
        assert_eq!(rank(&rs, &req(500, &[], &[])), Ok(vec![1, 0]));
    }

    #[test]
    fn dead_and_full_runners_are_left_out() {
        let rs = [
            runner("a", 0, false, &[]),
            runner("b", 3600, true, &[]),
            runner("c", 1000, true, &[]),
        ];
        assert_eq!(rank(&rs, &req(500, &[], &[])), Ok(vec![2]));
        assert_eq!(rank(&rs, &req(3000, &[], &[])), Ok(vec![2]));
        assert_eq!(rank(&rs, &req(3100, &[], &[])), Err(NoFit::Full));
    }

    #[test]
    fn pins_restrict_and_a_dead_pin_is_no_live_runner() {
        let rs = [runner("a", 0, false, &[]), runner("b", 3000, true, &[])];
        assert_eq!(rank(&rs, &req(500, &["b"], &[])), Ok(vec![1]));
        assert_eq!(rank(&rs, &req(500, &["a"], &[])), Err(NoFit::NoLiveRunner));
        assert_eq!(rank(&rs, &req(500, &["zz"], &[])), Err(NoFit::NoLiveRunner));
    }

    #[test]
    fn selectors_need_every_label() {
        let rs = [
            runner("a", 0, true, &[("gpu", "h200")]),
            runner("b", 0, true, &[("gpu", "h200"), ("zone", "z1")]),
        ];
        assert_eq!(rank(&rs, &req(1, &[], &[("zone", "z1")])), Ok(vec![1]));
        assert_eq!(rank(&rs, &req(1, &[], &[("gpu", "h200")])), Ok(vec![0, 1]));
        assert_eq!(
            rank(&rs, &req(1, &[], &[("gpu", "a100")])),
            Err(NoFit::NoLabelMatch)
        );
    }

    #[test]
    fn the_fullest_axis_decides() {
        // a: 25% CPU but 90% of its sandbox slots; b: 50% CPU, 10% slots.
        let mut a = runner("a", 1000, true, &[]);
        a.requested.sandboxes = 9;
        let mut b = runner("b", 2000, true, &[]);
        b.requested.sandboxes = 1;
        assert_eq!(rank(&[a, b], &req(100, &[], &[])), Ok(vec![1, 0]));
    }
}
