//! Sandbox networking (issue 12): each sandbox's own network namespace
//! (pod-like: several containers may join it), a veth routed from the
//! host, addresses kept with the sandbox's record, NAT to the uplink, and
//! the policy enforced in the kernel: one nftables table, each sandbox's
//! chains and sets behind verdict maps keyed by its host link. Blocking
//! and synchronous: the daemon calls it on its blocking pool. No process
//! is started: links, addresses and routes go over rtnetlink, the
//! firewall over nf_tables netlink, conntrack over ctnetlink.
//!
//! - [`policy`]: what a sandbox may reach and be reached by (domain types
//!   shared by the API layer and every enforcer).
//! - [`Network`]: `setup` once, then per sandbox `prepare` + `apply`
//!   before the runtime creates it (it joins [`SandboxNet::netns_path`]),
//!   `release` after it is destroyed, `adopt` after a restart, `sweep`
//!   for debris. [`NetConfig`] lays the network out, [`Allocation`] is
//!   what a record keeps.
//!
//! Private: `nl` (a blocking netlink socket), `link` (rtnetlink), `netns`
//! (where namespaces are made), `rules` (a policy compiled into set
//! contents: every always-deny decision), `ruleset` (the firewall's
//! layout; its module doc draws it), `nft` (nf_tables encoding),
//! `conntrack`, `alloc`.
//!
//! No error of this crate repeats its `source()` in its message.

mod alloc;
mod config;
mod conntrack;
mod link;
mod netns;
mod network;
mod nft;
mod nl;
pub mod policy;
mod rules;
mod ruleset;

pub use alloc::{Allocation, BadAllocation};
pub use config::NetConfig;
pub use network::{Network, SandboxNet, RELEASE_PARALLELISM};
pub use nl::NlError;
pub use policy::DefaultEgress;
pub use rules::TenantSets;
use sandpit_runtime::SandboxId;

/// Errors of the sandbox network. None repeats its source.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A configuration field is not acceptable.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A netlink request (links, routes, nftables, conntrack) failed.
    #[error("{step}")]
    Netlink {
        /// The step, e.g. `create veth sp-2a`.
        step: String,
        /// What the kernel said.
        #[source]
        source: NlError,
    },
    /// A file or thread operation failed.
    #[error("{step}")]
    Io {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No free address is left in the subnet.
    #[error("no free sandbox address")]
    Exhausted,
    /// An allocation this network does not hand out (another subnet).
    #[error("{0} is not an address of the sandbox subnet")]
    Foreign(Allocation),
    /// A sandbox to adopt has no link on the host.
    #[error("sandbox {id} has no link {link}")]
    Missing {
        /// The sandbox.
        id: SandboxId,
        /// The link it should have.
        link: String,
    },
    /// The thread making a namespace died.
    #[error("network namespace thread panicked")]
    Worker,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_do_not_repeat_their_source() {
        let e = NetError::Netlink {
            step: "create veth sp-2a".into(),
            source: NlError {
                errno: libc::EEXIST,
                message: Some("device exists".into()),
            },
        };
        assert_eq!(
            sandpit_errors::chain(&e),
            "create veth sp-2a: File exists (os error 17) (device exists)"
        );
    }
}
