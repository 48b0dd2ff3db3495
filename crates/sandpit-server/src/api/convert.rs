//! Domain records to gRPC messages.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use sandpit_proto::sandbox::v1 as pb;

use crate::model::{Resources, SandboxRecord, State};

/// The runtime class reported for every sandbox.
pub const RUNTIME_CLASS: &str = "sandpit";

/// A proto timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let (seconds, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            let d = e.duration();
            let mut s = -(d.as_secs() as i64);
            let mut n = -(d.subsec_nanos() as i32);
            if n < 0 {
                s -= 1;
                n += 1_000_000_000;
            }
            (s, n)
        }
    };
    prost_types::Timestamp { seconds, nanos }
}

/// The proto state.
pub fn state(s: State) -> pb::State {
    match s {
        State::Pending => pb::State::Pending,
        State::Creating => pb::State::Creating,
        State::Running => pb::State::Running,
        State::Completed => pb::State::Completed,
        State::Failed => pb::State::Failed,
        State::Terminating => pb::State::Terminating,
        State::Terminated => pb::State::Terminated,
    }
}

/// `500m` / `2` for CPU, `256Mi` / `1Gi` / bytes for memory.
pub fn quantities(r: &Resources) -> pb::Resources {
    pb::Resources {
        cpu: r.cpu_millis.map(cpu_quantity).unwrap_or_default(),
        memory: r.memory_bytes.map(memory_quantity).unwrap_or_default(),
        gpu: None,
    }
}

fn cpu_quantity(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

fn memory_quantity(bytes: u64) -> String {
    for (suffix, unit) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// The Sandbox message for a record.
pub fn sandbox(r: &SandboxRecord, runner_id: &str) -> pb::Sandbox {
    let spec = pb::SandboxSpec::decode(r.spec_echo.as_slice()).ok();
    let limits = quantities(&r.resources.limits);
    let requests = quantities(&r.resources.requests);
    let has_limits = r.resources.limits != Resources::default();
    let container_name = spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "main".into());
    let status = pb::SandboxStatus {
        state: state(r.state).into(),
        state_reason: r.state_reason.clone(),
        create_time: Some(timestamp(r.create_time)),
        start_time: r.start_time.map(timestamp),
        end_time: r.end_time.map(timestamp),
        exit_code: r.exit_code,
        effective_resources: has_limits.then(|| limits.clone()),
        effective_max_lifetime_seconds: r.max_lifetime_seconds.min(i32::MAX as u32) as i32,
        container_statuses: vec![pb::ContainerStatus {
            name: container_name,
            state: state(r.state).into(),
            exit_code: r.exit_code.unwrap_or_default(),
            restart_count: 0,
        }],
        runner_id: runner_id.to_owned(),
        // Both sides as in force: requests (the share under contention)
        // may differ from limits (the cap).
        effective_resource_requirements: (!r.resources.is_empty()).then_some(
            pb::ResourceRequirements {
                requests: Some(requests),
                limits: Some(limits),
            },
        ),
        effective_runtime_class: RUNTIME_CLASS.into(),
        // Sandboxes have a loopback interface only.
        effective_dns_egress: pb::DnsEgressMode::Deny.into(),
        ..Default::default()
    };
    pb::Sandbox {
        sandbox_id: r.id.to_string(),
        spec,
        status: Some(status),
        display_name: r.display_name.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn quantities_are_kubernetes_style() {
        assert_eq!(cpu_quantity(500), "500m");
        assert_eq!(cpu_quantity(2000), "2");
        assert_eq!(memory_quantity(256 << 20), "256Mi");
        assert_eq!(memory_quantity(1 << 30), "1Gi");
        assert_eq!(memory_quantity(1_000_000), "1000000");
        assert_eq!(memory_quantity(1536 << 20), "1536Mi");
    }

    #[test]
    fn timestamps_are_normalised() {
        let t = UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(
            timestamp(t),
            prost_types::Timestamp {
                seconds: 1,
                nanos: 500_000_000
            }
        );
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(
            timestamp(t),
            prost_types::Timestamp {
                seconds: -2,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn requests_and_limits_are_reported_apart() {
        use crate::model::{Principal, ResourceSpec, SandboxId};
        let r = SandboxRecord {
            id: SandboxId::parse("0123456789ab").unwrap(),
            principal: Principal("p".into()),
            request_id: None,
            state: State::Running,
            state_reason: String::new(),
            create_time: UNIX_EPOCH,
            start_time: None,
            end_time: None,
            exit_code: None,
            image: "i".into(),
            tags: vec![],
            annotations: Default::default(),
            display_name: String::new(),
            resources: ResourceSpec {
                requests: Resources {
                    cpu_millis: Some(250),
                    memory_bytes: Some(128 << 20),
                },
                limits: Resources {
                    cpu_millis: Some(2000),
                    memory_bytes: Some(1 << 30),
                },
            },
            max_lifetime_seconds: 60,
            spec_echo: vec![],
        };
        let status = sandbox(&r, "r").status.unwrap();
        let rr = status.effective_resource_requirements.unwrap();
        assert_eq!(rr.requests.unwrap().cpu, "250m");
        let limits = rr.limits.unwrap();
        assert_eq!((limits.cpu.as_str(), limits.memory.as_str()), ("2", "1Gi"));
        assert_eq!(status.effective_resources.unwrap().memory, "1Gi");
        let none = SandboxRecord {
            resources: ResourceSpec::default(),
            ..r
        };
        let status = sandbox(&none, "r").status.unwrap();
        assert!(status.effective_resource_requirements.is_none());
        assert!(status.effective_resources.is_none());
    }

    #[test]
    fn states_are_never_unspecified() {
        for s in State::ALL {
            assert_ne!(state(s), pb::State::Unspecified);
        }
    }
}
