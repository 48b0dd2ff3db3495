//! The size of a sandbox's writable layer (its root file system's writes,
//! `/tmp` included): Kubernetes' `ephemeral-storage`, which the protocol's
//! `Resources` lacks, given as the annotation [`EPHEMERAL_STORAGE_ANNOTATION`]
//! (`"512Mi"`, `"20Gi"`; annotations pass unchanged through every client),
//! else the runner's default. Writes past it fail with `ENOSPC` inside.

use std::collections::BTreeMap;

use sandpit_runtime::quantity::parse_memory;

use super::Rejection;

/// The annotation that sizes the writable layer.
pub const EPHEMERAL_STORAGE_ANNOTATION: &str = "sandpit.dev/ephemeral-storage";

/// The smallest writable layer: ext4's own blocks leave next to nothing
/// below this.
pub const MIN_DISK_BYTES: u64 = 16 << 20;

/// What a runner grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPolicy {
    /// The size of a sandbox that asks for none; `None`: unbounded (the
    /// upper dir is a plain directory of the data dir).
    pub default_bytes: Option<u64>,
    /// The largest size granted.
    pub max_bytes: u64,
}

impl Default for DiskPolicy {
    fn default() -> Self {
        Self {
            default_bytes: None,
            max_bytes: 1 << 40,
        }
    }
}

/// The writable layer's size for `annotations` under `policy`.
pub(super) fn check(
    rej: &mut Rejection,
    annotations: &BTreeMap<String, String>,
    policy: &DiskPolicy,
) -> Option<u64> {
    let Some(value) = annotations.get(EPHEMERAL_STORAGE_ANNOTATION) else {
        return policy.default_bytes;
    };
    let field = format!("sandbox.spec.annotations[{EPHEMERAL_STORAGE_ANNOTATION:?}]");
    match parse_memory(value) {
        Err(e) => rej.invalid(field, e.to_string()),
        Ok(n) if n < MIN_DISK_BYTES => rej.invalid(
            field,
            format!(
                "{n} bytes is less than the {} MiB minimum",
                MIN_DISK_BYTES >> 20
            ),
        ),
        Ok(n) if n > policy.max_bytes => rej.invalid(
            field,
            format!(
                "{n} bytes is more than this runner's limit of {} bytes",
                policy.max_bytes
            ),
        ),
        Ok(n) => return Some(n),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(value: Option<&str>, policy: DiskPolicy) -> (Option<u64>, Vec<String>) {
        let mut rej = Rejection::default();
        let mut a = BTreeMap::new();
        if let Some(v) = value {
            a.insert(EPHEMERAL_STORAGE_ANNOTATION.to_string(), v.to_string());
        }
        let out = check(&mut rej, &a, &policy);
        let fields = rej.invalid.iter().map(|v| v.field.clone()).collect();
        (out, fields)
    }

    #[test]
    fn the_annotation_wins_over_the_default_within_bounds() {
        let p = DiskPolicy {
            default_bytes: Some(10 << 30),
            max_bytes: 100 << 30,
        };
        assert_eq!(run(None, p), (Some(10 << 30), vec![]));
        assert_eq!(run(Some("512Mi"), p), (Some(512 << 20), vec![]));
        assert_eq!(run(None, DiskPolicy::default()), (None, vec![]));
        let field = "sandbox.spec.annotations[\"sandpit.dev/ephemeral-storage\"]";
        for bad in ["lots", "1Mi", "200Gi", "-1"] {
            assert_eq!(run(Some(bad), p), (None, vec![field.to_string()]), "{bad}");
        }
    }
}
