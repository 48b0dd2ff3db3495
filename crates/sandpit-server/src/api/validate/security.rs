//! `security_context`: what a sandbox's processes run as, and what they may
//! do. Untrusted code runs inside, so only settings that keep a sandbox
//! inside its isolation are accepted: a non-root user, fewer capabilities
//! (or some of the default set back), a read-only root, the default
//! seccomp filter, no privilege escalation. Anything that would give more
//! is INVALID_ARGUMENT naming the field and why it is not offered.

use sandpit_proto::sandbox::v1 as pb;
use sandpit_runtime::{capability_by_name, capability_mask, capability_name, IdMap, DEFAULT_CAPS};

use super::Rejection;
use crate::model::Security;

/// Where mounted files may go when the root is read-only.
const WRITABLE_UNDER_READ_ONLY_ROOT: &str = "/tmp";

/// The default set's names, for messages (`AUDIT_WRITE, CHOWN, ...`).
fn default_names() -> String {
    let mut names: Vec<&str> = DEFAULT_CAPS
        .iter()
        .filter_map(|&c| capability_name(c))
        .collect();
    names.sort_unstable();
    names.join(", ")
}

/// Checks a uid or gid against the ids the sandbox's user namespace maps.
fn check_id(rej: &mut Rejection, field: String, kind: &str, id: u32) {
    let count = IdMap::default().count;
    if id >= count {
        rej.invalid(
            field,
            format!(
                "{kind} {id} is outside the sandbox's user namespace (0-{})",
                count - 1
            ),
        );
    }
}

/// The capabilities to keep, as Docker computes them (`ALL` in the drops
/// empties the default set first; otherwise the additions join it and the
/// drops leave it); `None` when that is the default set.
fn check_capabilities(rej: &mut Rejection, sc: &pb::SecurityContext, p: &str) -> Option<u64> {
    let default = capability_mask(DEFAULT_CAPS);
    let mut drop_all = false;
    let mut drop = 0u64;
    for (i, name) in sc.capabilities_drop.iter().enumerate() {
        let field = format!("{p}.capabilities_drop[{i}]");
        if name.eq_ignore_ascii_case("ALL") {
            drop_all = true;
        } else {
            match capability_by_name(name) {
                Some(cap) => drop |= 1 << cap,
                None => rej.invalid(field, format!("unknown capability {name:?}")),
            }
        }
    }
    let mut add = 0u64;
    for (i, name) in sc.capabilities_add.iter().enumerate() {
        let field = format!("{p}.capabilities_add[{i}]");
        let cap = if name.eq_ignore_ascii_case("ALL") {
            None
        } else {
            match capability_by_name(name) {
                Some(cap) => Some(cap),
                None => {
                    rej.invalid(field, format!("unknown capability {name:?}"));
                    continue;
                }
            }
        };
        match cap {
            Some(cap) if default & (1 << cap) != 0 => add |= 1 << cap,
            _ => rej.invalid(
                field,
                format!(
                    "{name} is not offered: only capabilities of the default set may be \
                     added ({})",
                    default_names()
                ),
            ),
        }
    }
    let keep = if drop_all {
        add
    } else {
        (default | add) & !drop
    };
    (keep != default).then_some(keep)
}

/// Validates `security_context` (and, for a read-only root, where the
/// container's mounted files go). `p` is the container's field path.
pub(super) fn check(rej: &mut Rejection, c: &pb::Container, container: &str) -> Security {
    let Some(sc) = &c.security_context else {
        return Security::default();
    };
    let p = format!("{container}.security_context");
    if let Some(uid) = sc.run_as_user {
        check_id(rej, format!("{p}.run_as_user"), "uid", uid);
    }
    if let Some(gid) = sc.run_as_group {
        check_id(rej, format!("{p}.run_as_group"), "gid", gid);
    }
    if sc.privileged == Some(true) {
        rej.invalid(
            format!("{p}.privileged"),
            "privileged sandboxes are not offered: untrusted code never gets the host's \
             devices or capabilities beyond the default set",
        );
    }
    if sc.allow_privilege_escalation == Some(true) {
        rej.invalid(
            format!("{p}.allow_privilege_escalation"),
            "privilege escalation is not offered: no_new_privs is always set, so setuid \
             programs and file capabilities grant nothing",
        );
    }
    match sc.seccomp_profile.as_str() {
        "" | "RuntimeDefault" | "runtime/default" => {}
        "Unconfined" | "unconfined" => rej.invalid(
            format!("{p}.seccomp_profile"),
            "Unconfined is not offered: every sandbox runs under the default seccomp filter",
        ),
        other => rej.invalid(
            format!("{p}.seccomp_profile"),
            format!("unknown seccomp profile {other:?}; only RuntimeDefault is offered"),
        ),
    }
    let read_only_root = sc.read_only_root_filesystem == Some(true);
    if read_only_root {
        // The agent writes mounted files into the root before the main
        // command starts, and a read-only root is read-only from the start.
        let dir = WRITABLE_UNDER_READ_ONLY_ROOT;
        for (i, f) in c.files.iter().enumerate() {
            if !f.path.starts_with(&format!("{dir}/")) {
                rej.invalid(
                    format!("{container}.files[{i}].path"),
                    format!(
                        "the root file system is read-only (read_only_root_filesystem): \
                         mounted files must be under {dir}/"
                    ),
                );
            }
        }
    }
    Security {
        run_as_user: sc.run_as_user,
        run_as_group: sc.run_as_group,
        capabilities: check_capabilities(rej, sc, &p),
        read_only_root,
    }
}

#[cfg(test)]
#[path = "security_tests.rs"]
mod tests;
