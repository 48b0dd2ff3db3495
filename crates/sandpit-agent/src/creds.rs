//! The credentials of the processes the agent starts: the sandbox's user
//! (`run_as_user`/`run_as_group`) and its capability set, applied in the
//! spawned child between `clone` and `execve`.
//!
//! The agent itself keeps root of its user namespace and its own (Docker's
//! default) capabilities: it needs `CAP_SETUID`/`CAP_SETGID`/`CAP_SETPCAP`
//! to start every process as the user with the reduced set, and
//! `CAP_CHOWN`/`CAP_DAC_OVERRIDE` to write files on the host's behalf. Only
//! what it starts is reduced; a reduced process cannot regain anything from
//! the agent (ptrace needs the tracee's permitted set to be a subset of the
//! tracer's, or another uid's `CAP_SYS_PTRACE`).
//!
//! Everything is prepared here, before the clone: the child only makes raw
//! system calls on this memory (see `spawn`).

use crate::user::Identity;

/// What a spawned child changes about itself before `execve`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Creds {
    /// `(uid, gid, supplementary groups)` to switch to; `None`: the agent's own.
    switch: Option<(u32, u32, Vec<libc::gid_t>)>,
    /// Capabilities to drop from the child's bounding set (bit N = cap N):
    /// those the agent's set holds that the sandbox must not.
    drop: u64,
}

/// What failed in the child, for the spawner's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failed {
    /// Dropping a capability from the bounding set.
    Caps,
    /// `setgroups`, `setresgid` or `setresuid`.
    User,
}

impl Creds {
    /// The agent's own credentials: nothing changes in the child.
    #[cfg(test)]
    pub(crate) fn unchanged() -> Self {
        Self::default()
    }

    /// Credentials for `who` (`None`: the agent's own user) keeping only the
    /// capabilities of `keep` (`None`: the agent's own set).
    pub(crate) fn new(who: Option<&Identity>, keep: Option<u64>) -> Self {
        let drop = keep.map_or(0, |keep| bounding_set() & !keep);
        Self {
            switch: who.map(|w| (w.uid, w.gid, w.groups.clone())),
            drop,
        }
    }

    /// The owner of files created for the host, when not the agent's.
    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.switch.as_ref().map(|(u, g, _)| (*u, *g))
    }

    /// Applies the credentials to the calling thread.
    ///
    /// # Safety
    /// Only for the child of `spawn`'s `clone(CLONE_VM | CLONE_VFORK)`: it
    /// makes raw system calls only (no libc wrapper that takes a lock or,
    /// like glibc's `setresuid`, signals every thread of the process to
    /// change theirs too: in a child that shares the agent's memory that
    /// would reach the agent's own threads), on memory the parent keeps
    /// alive until the child execs or exits.
    pub(crate) unsafe fn apply(&self) -> Result<(), Failed> {
        // SAFETY: prctl and the raw id syscalls take integers, or a pointer
        // and length of the prepared group list, which outlives the call.
        unsafe {
            // While still root: dropping from the bounding set needs
            // CAP_SETPCAP, which a switch to another uid clears.
            for cap in 0..64u32 {
                if self.drop & (1u64 << cap) != 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) != 0
                {
                    return Err(Failed::Caps);
                }
            }
            if let Some((uid, gid, groups)) = &self.switch {
                // Groups first: after setresuid, CAP_SETGID is gone. A
                // switch away from uid 0 clears the effective and permitted
                // sets too (no SECBIT_KEEP_CAPS), and execve of a non-root
                // program under no_new_privs grants none back.
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                    || libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0
                    || libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0
                {
                    return Err(Failed::User);
                }
            }
        }
        Ok(())
    }

    /// What the child was switching to, for messages.
    pub(crate) fn describe_user(&self) -> String {
        match &self.switch {
            Some((u, g, _)) => format!("uid {u} gid {g}"),
            None => "the agent's user".into(),
        }
    }
}

/// The calling thread's bounding set, as a mask.
fn bounding_set() -> u64 {
    (0..64u32)
        // SAFETY: PR_CAPBSET_READ takes an integer and only returns a value;
        // it fails (EINVAL) for numbers beyond the kernel's last capability.
        .filter(|&cap| unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0) } == 1)
        .fold(0, |mask, cap| mask | (1u64 << cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_held_capabilities_are_dropped() {
        let held = bounding_set();
        assert_ne!(held, 0, "a test process holds some bounding capabilities");
        // Keeping everything, or more than is held, drops nothing.
        assert_eq!(Creds::new(None, Some(u64::MAX)).drop, 0);
        assert_eq!(Creds::new(None, None), Creds::unchanged());
        let c = Creds::new(None, Some(0));
        assert_eq!(c.drop, held);
        assert_eq!(c.owner(), None);
        let who = Identity {
            uid: 7,
            gid: 8,
            groups: vec![9],
            home: None,
        };
        let c = Creds::new(Some(&who), None);
        assert_eq!(c.owner(), Some((7, 8)));
        assert_eq!(c.describe_user(), "uid 7 gid 8");
    }
}
