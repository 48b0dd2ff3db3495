//! The sandbox engine: turns an unpacked image and a spec into an isolated
//! sandbox whose PID 1 is the agent, and tears it down without debris.

pub mod caps;
pub mod cgroup;
pub mod seccomp;
