//! The registry's and placement's values, free of SQL.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::Error;

/// A runner's name: what `runner_ids` pins and `list_runners` reports.
/// Lowercase letters, digits and `-`, 1-63 characters (a DNS label, as a
/// Kubernetes node or pod name it is often taken from).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunnerId(String);

impl RunnerId {
    pub fn new(id: impl Into<String>) -> Result<Self, Error> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !id.starts_with('-')
            && !id.ends_with('-');
        if ok {
            Ok(Self(id))
        } else {
            Err(Error::InvalidRunnerId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunnerId({})", self.0)
    }
}

/// CPU, memory and a count of sandboxes: what a runner allocates, what its
/// sandboxes request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub sandboxes: u32,
}

impl Capacity {
    /// `self + need` stays within `limit` on every axis.
    pub fn fits(&self, need: &Capacity, limit: &Capacity) -> bool {
        self.cpu_millis.saturating_add(need.cpu_millis) <= limit.cpu_millis
            && self.memory_bytes.saturating_add(need.memory_bytes) <= limit.memory_bytes
            && self.sandboxes.saturating_add(need.sandboxes) <= limit.sandboxes
    }
}

/// A runner's labels, and a placement's selector (every pair must match).
pub type Labels = BTreeMap<String, String>;

/// What a runner says of itself when it (re-)registers and heartbeats.
#[derive(Clone, Debug)]
pub struct Registration {
    pub id: RunnerId,
    /// Where gateways reach it (`host:port`).
    pub endpoint: String,
    pub labels: Labels,
    pub allocatable: Capacity,
    /// Its direct data-plane endpoint, if it offers one.
    pub direct: Option<DirectEndpoint>,
}

/// Where clients reach a runner's data plane directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectEndpoint {
    /// `https://host:port`.
    pub uri: String,
    /// The certificate it serves there (PEM): what clients trust.
    pub cert_pem: String,
}

/// A runner as the registry holds it.
#[derive(Clone, Debug)]
pub struct RunnerStatus {
    pub id: RunnerId,
    pub endpoint: String,
    pub labels: Labels,
    pub allocatable: Capacity,
    pub requested: Capacity,
    pub incarnation: i64,
    /// Since its last heartbeat, on the database's clock.
    pub heartbeat_age: Duration,
    /// Its heartbeat is within the lease: placement may pick it and
    /// gateways route to it.
    pub live: bool,
    /// Its direct data-plane endpoint, if it offers one.
    pub direct: Option<DirectEndpoint>,
}

/// A create to be placed.
#[derive(Clone, Debug)]
pub struct PlacementRequest {
    pub sandbox_id: String,
    pub principal: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// The client's `runner_ids`: only these may take it (any, if empty).
    pub pins: Vec<RunnerId>,
    /// Labels the runner must carry.
    pub selector: Labels,
}

impl PlacementRequest {
    pub(crate) fn need(&self) -> Capacity {
        Capacity {
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            sandboxes: 1,
        }
    }
}

/// Where a create went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub sandbox_id: String,
    pub runner: RunnerId,
    pub endpoint: String,
}

/// A sandbox's state as the shared store records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxState {
    /// Its capacity is taken; the runner is creating it.
    Placed,
    Running,
    Failed,
    Terminated,
}

impl SandboxState {
    pub(crate) fn as_sql(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Terminated => "terminated",
        }
    }

    pub(crate) fn from_sql(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "placed" => Self::Placed,
            "running" => Self::Running,
            "failed" => Self::Failed,
            "terminated" => Self::Terminated,
            other => return Err(Error::Corrupt(format!("sandbox state {other:?}"))),
        })
    }

    /// It still holds its runner's capacity.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Placed | Self::Running)
    }
}

/// One sandbox's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: String,
    pub principal: String,
    pub runner: RunnerId,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub state: SandboxState,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_ids_are_dns_labels() {
        for ok in ["r1", "runner-a", "a", &"x".repeat(63)] {
            assert!(RunnerId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"x".repeat(64)] {
            assert!(RunnerId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fitting_is_checked_on_every_axis() {
        let limit = Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            sandboxes: 2,
        };
        let used = Capacity {
            cpu_millis: 500,
            memory_bytes: 1 << 29,
            sandboxes: 1,
        };
        let need = |c, m, s| Capacity {
            cpu_millis: c,
            memory_bytes: m,
            sandboxes: s,
        };
        assert!(used.fits(&need(500, 1 << 29, 1), &limit));
        assert!(!used.fits(&need(501, 0, 0), &limit));
        assert!(!used.fits(&need(0, (1 << 29) + 1, 0), &limit));
        assert!(!used.fits(&need(0, 0, 2), &limit));
        assert!(!used.fits(&need(u64::MAX, 0, 0), &limit));
    }
}
