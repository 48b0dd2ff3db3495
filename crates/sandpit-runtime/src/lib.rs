//! The sandbox engine: turns unpacked image layers and a spec into an isolated
//! sandbox whose PID 1 is the agent, and tears it down without debris.
//!
//! - [`runtime`]: the public API ([`Runtime`], [`SandboxSpec`], [`Sandbox`]).
//! - [`spawn`]: the single-threaded `sandpit-spawn` helper that does the
//!   namespace work (the async daemon never forks).
//! - [`rootfs`]: the mount plan, over the [`syscalls::Syscalls`] trait.
//! - [`cgroup`], [`caps`], [`seccomp`]: limits and hardening.
//! - [`quantity`]: `"256Mi"` / `"500m"` parsing for limits.

pub mod caps;
pub mod cgroup;
pub mod quantity;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod spawn;
pub mod syscalls;

pub use cgroup::Limits;
pub use runtime::{
    default_agent_binary, default_spawner_binary, IdMap, Runtime, RuntimeConfig, RuntimeError,
    Sandbox, SandboxSpec, SweepReport,
};
