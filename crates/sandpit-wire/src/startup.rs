//! What the host asks about *how* a sandbox's processes run (their user and
//! capabilities) and *when* the sandbox counts as started (its startup
//! probe). Both travel in [`crate::InitSpec`]: the agent keeps them for as
//! long as the sandbox lives, so a restarted daemon needs nothing persisted
//! to keep the same behaviour.

/// Who the main command and every exec run as, as requested: the agent
/// resolves names and the primary group against the sandbox's own
/// `/etc/passwd` and `/etc/group` (the image's), inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunAs {
    /// A uid (`"1000"`) or a user name (`"app"`); empty: root (uid 0).
    pub user: String,
    /// A gid or a group name; empty: the user's primary group from
    /// `/etc/passwd`, or the uid when the user has no entry there.
    pub group: String,
}

impl RunAs {
    /// Root (uid 0, gid 0), what a sandbox runs as unless told otherwise.
    pub fn is_root_default(&self) -> bool {
        self.user.is_empty() && self.group.is_empty()
    }
}

/// One check of a startup probe. Every kind runs inside the sandbox: an
/// exec as the sandbox's user, connections from its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// Succeeds when the command exits 0 within the timeout.
    Exec(Vec<String>),
    /// Succeeds when a TCP connection to the port on loopback opens.
    Tcp {
        /// The port.
        port: u16,
    },
    /// Succeeds when `GET path` on the port on loopback answers a status
    /// from 200 to 399.
    Http {
        /// The port.
        port: u16,
        /// The request path, starting with `/`.
        path: String,
    },
}

/// A startup probe, with Kubernetes' timing: after `initial_delay_ms` the
/// check runs every `period_ms`, each bounded by `timeout_ms`; it passes at
/// its first success and fails after `failure_threshold` consecutive
/// failures (or when the main process ends first). Milliseconds on the
/// wire, whole seconds in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// What to check.
    pub check: ProbeCheck,
    /// Before the first check.
    pub initial_delay_ms: u32,
    /// Between the starts of two checks.
    pub period_ms: u32,
    /// Longest one check may take.
    pub timeout_ms: u32,
    /// Failed checks in a row that fail the probe (at least 1).
    pub failure_threshold: u32,
}

/// How a sandbox's start ended, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupState {
    /// The probe passed (or there is none).
    Ready,
    /// The probe failed: why, with the last check's output (bounded by
    /// [`MAX_PROBE_OUTPUT`]).
    Failed(String),
}

/// The most bytes of a check's output a failure reports.
pub const MAX_PROBE_OUTPUT: usize = 4096;
