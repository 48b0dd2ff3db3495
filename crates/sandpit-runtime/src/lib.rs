//! The sandbox engine: turns unpacked image layers and a spec into an isolated
//! sandbox whose PID 1 is the agent, and tears it down without debris.
//!
//! - [`runtime`]: the public API ([`Runtime`], [`SandboxSpec`], [`Sandbox`]),
//!   with sandboxes named by [`SandboxId`] and volumes bound in as
//!   [`BindMount`]s.
//! - [`cgroup`]: limits, statistics and teardown on cgroup v1 or v2.
//! - [`quantity`]: `"256Mi"` / `"500m"` parsing for limits.
//!
//! Private: `spawn`, the single-threaded `sandpit-spawn` helper that does the
//! namespace work (the async daemon never forks), reached only through
//! [`spawner_main`]; `rootfs`, the mount plan over the `syscalls::Syscalls`
//! trait; `caps` and `seccomp`, the hardening of every sandbox's PID 1
//! ([`DEFAULT_CAPS`] is public for tests that check it from inside);
//! `binaries` and `process`, the runtime's helpers; `chain`, errors as one
//! line where they cross a process boundary.
//!
//! No error of this crate repeats its `source()` in its message: print them
//! with their source chain (`a: b: c`).

mod binaries;
mod caps;
pub mod cgroup;
mod chain;
mod id;
pub mod layered;
mod mounts;
pub mod phases;
mod process;
pub mod quantity;
mod rootfs;
pub mod runtime;
mod seccomp;
mod spawn;
mod syscalls;

pub use caps::{capability_by_name, capability_name, DEFAULT_CAPS};
pub use cgroup::{CpuMask, Limits};
pub use id::{InvalidSandboxId, SandboxId};
pub use runtime::{
    default_agent_binary, default_spawner_binary, BindMount, Frozen, IdMap, NetworkNamespace,
    Runtime, RuntimeConfig, RuntimeError, Sandbox, SandboxSpec, SweepReport, CA_BUNDLE, EXTRA_CAS,
};

/// The bit mask of the capability numbers in `caps`, as `/proc/PID/status`
/// shows a set (`CapBnd:` and friends). Numbers of 64 and above do not exist
/// and are ignored. `capability_mask(DEFAULT_CAPS)` is what the bounding
/// set of every sandbox's PID 1 must read.
pub fn capability_mask(caps: &[u32]) -> u64 {
    caps::mask_of(caps)
}

/// Entry point of the `sandpit-spawn` helper binary: reads one spawn request
/// on stdin, creates the sandbox, prints the outcome as one JSON line on
/// stdout and returns the process exit code. Not an API: only that binary
/// (and the runtime, which starts it) know its protocol.
#[doc(hidden)]
pub fn spawner_main() -> i32 {
    spawn::spawner_main()
}
