//! The direct data plane (docs/scale-out.md, "ConnectSandbox"): a client
//! asks a gateway for a sandbox-scoped credential (ConnectSandbox, a CSR
//! signed by the cluster CA into a certificate valid minutes), then sends
//! exec, files and logs straight to the runner holding the sandbox, over
//! mTLS, bypassing the gateway. A client that cannot reach the runner
//! falls back to the same RPCs through the gateway.

pub mod ca;
pub mod grant;
pub mod server;

pub use ca::{ClusterCa, Issued};
pub use grant::Grant;

/// How long a ConnectSandbox credential lasts: short, so that nothing
/// needs revoking (the client asks again before it expires).
pub const CREDENTIAL_TTL: std::time::Duration = std::time::Duration::from_secs(600);
