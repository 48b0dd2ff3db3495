//! `--json` renderings of what the listings print: one JSON document per
//! call, with field names that stay stable (documented in docs/ops/cli.md).

use sandpit_image::Image;
use sandpit_proto::sandbox::v1 as pb;
use serde_json::{json, Value};

/// A sandbox record as `ls --json` (an array of these) and `get --json`
/// (one) print it.
pub(crate) fn sandbox(sb: &pb::Sandbox) -> Value {
    let status = sb.status.clone().unwrap_or_default();
    let spec = sb.spec.clone().unwrap_or_default();
    let container = spec.containers.first().cloned().unwrap_or_default();
    let command: Vec<&str> = std::iter::once(container.command.as_str())
        .filter(|s| !s.is_empty())
        .chain(container.args.iter().map(String::as_str))
        .collect();
    json!({
        "id": sb.sandbox_id,
        "state": crate::remote::state_name(sb),
        "reason": status.state_reason,
        "exit_code": status.exit_code,
        "created_at": rfc3339(status.create_time.as_ref()),
        "started_at": rfc3339(status.start_time.as_ref()),
        "ended_at": rfc3339(status.end_time.as_ref()),
        "max_lifetime_seconds": status.effective_max_lifetime_seconds,
        "tags": spec.tags,
        "display_name": sb.display_name,
        "image": container.image,
        "command": command,
        "environment": container.environment_variables,
    })
}

/// An image of the local store, as `image ls --json` prints it.
pub(crate) fn image(image: &Image) -> Value {
    json!({
        "reference": image.reference,
        "id": image.id.as_str(),
        "layers": image.layers.len(),
        "size_bytes": image.size_bytes,
    })
}

/// Prints one JSON document and its newline.
pub(crate) fn print(value: &Value) {
    println!("{value}");
}

/// `2025-11-25T00:45:39Z`, or null for a time not set.
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Value {
    match ts {
        Some(t) if t.seconds > 0 => {
            let secs = t.seconds;
            let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
            let (y, m, d) = crate::remote::civil_from_days(days);
            Value::String(format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            ))
        }
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_renders_with_stable_names() {
        let sb = pb::Sandbox {
            sandbox_id: "sb-1".into(),
            status: Some(pb::SandboxStatus {
                state: pb::State::Completed as i32,
                exit_code: Some(3),
                create_time: Some(prost_types::Timestamp {
                    seconds: 1_764_031_539,
                    nanos: 0,
                }),
                effective_max_lifetime_seconds: 60,
                ..Default::default()
            }),
            spec: Some(pb::SandboxSpec {
                tags: vec!["t".into()],
                containers: vec![pb::Container {
                    image: "python:3.11".into(),
                    command: "sh".into(),
                    args: vec!["-c".into(), "exit 3".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = sandbox(&sb);
        assert_eq!(v["id"], "sb-1");
        assert_eq!(v["state"], "completed");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["created_at"], "2025-11-25T00:45:39Z");
        assert_eq!(v["started_at"], Value::Null);
        assert_eq!(v["tags"], json!(["t"]));
        assert_eq!(v["command"], json!(["sh", "-c", "exit 3"]));
        assert_eq!(v["max_lifetime_seconds"], 60);
    }
}
