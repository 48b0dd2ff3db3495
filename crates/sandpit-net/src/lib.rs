//! Sandbox networking (issue 12): each sandbox's own network namespace on a
//! Sandpit bridge, addresses, NAT, the firewall (nftables, per-sandbox sets),
//! the DNS resolver and the egress proxy for host-name rules.
//!
//! - [`policy`]: what a sandbox may reach and be reached by (domain types
//!   shared by the API layer and every enforcer).

pub mod policy;
