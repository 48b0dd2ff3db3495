//! Capability hardening for the sandbox's PID 1, applied after it becomes
//! root of its user namespace and before it execs the agent.
//!
//! Every function here is a thin wrapper over one or a few raw syscalls: they
//! run in the freshly forked child of the spawner, so they take no locks and
//! report failures as a bare errno (no allocation on any path).

use nix::errno::Errno;

/// `CAP_CHOWN`.
pub(crate) const CAP_CHOWN: u32 = 0;
/// `CAP_DAC_OVERRIDE`.
pub(crate) const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_FOWNER`.
pub(crate) const CAP_FOWNER: u32 = 3;
/// `CAP_FSETID`.
pub(crate) const CAP_FSETID: u32 = 4;
/// `CAP_KILL`.
pub(crate) const CAP_KILL: u32 = 5;
/// `CAP_SETGID`.
pub(crate) const CAP_SETGID: u32 = 6;
/// `CAP_SETUID`.
pub(crate) const CAP_SETUID: u32 = 7;
/// `CAP_SETPCAP`.
pub(crate) const CAP_SETPCAP: u32 = 8;
/// `CAP_NET_BIND_SERVICE`.
pub(crate) const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_NET_RAW`.
pub(crate) const CAP_NET_RAW: u32 = 13;
/// `CAP_SYS_CHROOT`.
pub(crate) const CAP_SYS_CHROOT: u32 = 18;
/// `CAP_SYS_ADMIN` (never kept; named for the tests that check so).
#[cfg(test)]
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
/// `CAP_MKNOD`.
pub(crate) const CAP_MKNOD: u32 = 27;
/// `CAP_AUDIT_WRITE`.
pub(crate) const CAP_AUDIT_WRITE: u32 = 29;
/// `CAP_SETFCAP`.
pub(crate) const CAP_SETFCAP: u32 = 31;

/// Docker's default capability set (its `CapBnd` is `0x00000000a80425fb`):
/// what images expect root to be able to do, minus everything that reaches
/// beyond the sandbox. Every sandbox's PID 1 gets exactly these as its
/// bounding, effective and permitted sets (capability numbers, as in
/// `linux/capability.h`; see [`capability_mask`](crate::capability_mask)).
pub const DEFAULT_CAPS: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FSETID,
    CAP_FOWNER,
    CAP_MKNOD,
    CAP_NET_RAW,
    CAP_SETGID,
    CAP_SETUID,
    CAP_SETFCAP,
    CAP_SETPCAP,
    CAP_NET_BIND_SERVICE,
    CAP_SYS_CHROOT,
    CAP_KILL,
    CAP_AUDIT_WRITE,
];

/// Capability names as `linux/capability.h` spells them without `CAP_`
/// (and as Docker and Kubernetes take them), indexed by number.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability named as Docker and Kubernetes take it:
/// `NET_RAW` or `CAP_NET_RAW`, in any case.
pub fn capability_by_name(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    NAMES.iter().position(|n| *n == bare).map(|i| i as u32)
}

/// The name of capability `cap` (`NET_RAW`), if this table knows it.
pub fn capability_name(cap: u32) -> Option<&'static str> {
    NAMES.get(cap as usize).copied()
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets passed as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Why a capability operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CapsError {
    /// `/proc/sys/kernel/cap_last_cap` could not be read.
    #[error("read /proc/sys/kernel/cap_last_cap: {0}")]
    ReadLastCap(Errno),
    /// `/proc/sys/kernel/cap_last_cap` holds something unexpected.
    #[error("unexpected cap_last_cap {0:?}")]
    BadLastCap(String),
    /// A capability could not be dropped from the bounding set.
    #[error("drop capability {cap} from the bounding set: {errno}")]
    DropBounding {
        /// The capability number.
        cap: u32,
        /// What the kernel said.
        errno: Errno,
    },
    /// The ambient set could not be cleared.
    #[error("clear ambient capabilities: {0}")]
    ClearAmbient(Errno),
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("set no_new_privs: {0}")]
    NoNewPrivs(Errno),
    /// `capset` failed.
    #[error("set process capabilities: {0}")]
    Capset(Errno),
}

/// The bit mask of `caps` (as in `CapBnd:` of `/proc/PID/status`).
/// Numbers of 64 and above do not exist and are ignored.
pub(crate) fn mask_of(caps: &[u32]) -> u64 {
    caps.iter()
        .filter(|&&c| c < 64)
        .fold(0, |mask, &c| mask | (1u64 << c))
}

/// The highest capability number this kernel knows.
///
/// Read in the spawner before it forks, so the child need not open files.
pub(crate) fn last_cap() -> Result<u32, CapsError> {
    let text = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(|e| {
        CapsError::ReadLastCap(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    })?;
    match text.trim().parse::<u32>() {
        // The bounding set is a 64-bit mask: anything larger is nonsense.
        Ok(n) if n < 64 => Ok(n),
        _ => Err(CapsError::BadLastCap(text)),
    }
}

/// Drops every capability in `0..=last_cap` that is not in `keep` from the
/// bounding set, so no later exec (even of a file with capabilities) can
/// gain one. Needs `CAP_SETPCAP` in the current user namespace.
pub(crate) fn restrict_bounding_set(keep: &[u32], last_cap: u32) -> Result<(), CapsError> {
    for cap in 0..=last_cap {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes an integer argument and touches no memory.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                libc::c_ulong::from(cap),
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if rc != 0 {
            return Err(CapsError::DropBounding {
                cap,
                errno: Errno::last(),
            });
        }
    }
    Ok(())
}

/// Empties the ambient set: nothing is handed across exec implicitly.
pub(crate) fn clear_ambient() -> Result<(), CapsError> {
    // SAFETY: PR_CAP_AMBIENT takes integer arguments and touches no memory.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(CapsError::ClearAmbient(Errno::last()));
    }
    Ok(())
}

/// Sets `no_new_privs`: setuid bits and file capabilities grant nothing from
/// now on, and seccomp filters may be installed without `CAP_SYS_ADMIN`.
pub(crate) fn set_no_new_privs() -> Result<(), CapsError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments and touches no memory.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(CapsError::NoNewPrivs(Errno::last()));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the calling thread's effective and permitted sets to `keep` and
/// empties the inheritable set.
///
/// The bounding set alone already decides what the agent (uid 0 of its user
/// namespace) gets at exec; this also bounds the window before exec and any
/// exec of a non-root program. It can only shrink the sets, so calling it
/// after [`restrict_bounding_set`] (which needs `CAP_SETPCAP`) is the safe
/// order, though `CAP_SETPCAP` is in [`DEFAULT_CAPS`] anyway.
pub(crate) fn restrict_process_caps(keep: &[u32]) -> Result<(), CapsError> {
    let mask = mask_of(keep);
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |shift: u32| CapData {
        effective: (mask >> shift) as u32,
        permitted: (mask >> shift) as u32,
        inheritable: 0,
    };
    let data = [word(0), word(32)];
    // SAFETY: capset reads one header and, for version 3, two data structs;
    // both live on this stack frame for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc != 0 {
        return Err(CapsError::Capset(Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_set_matches_dockers_bounding_mask() {
        assert_eq!(mask_of(DEFAULT_CAPS), 0x0000_0000_a804_25fb);
        assert_eq!(DEFAULT_CAPS.len(), 14);
        assert!(!DEFAULT_CAPS.contains(&CAP_SYS_ADMIN));
    }

    #[test]
    fn names_match_the_kernel_numbers() {
        for (cap, name) in [
            (CAP_CHOWN, "CHOWN"),
            (CAP_NET_RAW, "NET_RAW"),
            (CAP_SYS_ADMIN, "SYS_ADMIN"),
            (CAP_MKNOD, "MKNOD"),
            (CAP_AUDIT_WRITE, "AUDIT_WRITE"),
            (CAP_SETFCAP, "SETFCAP"),
            (40, "CHECKPOINT_RESTORE"),
        ] {
            assert_eq!(capability_name(cap), Some(name));
            assert_eq!(capability_by_name(name), Some(cap));
        }
        assert_eq!(capability_by_name("cap_net_raw"), Some(CAP_NET_RAW));
        assert_eq!(capability_by_name("CAP_SYS_ADMIN"), Some(CAP_SYS_ADMIN));
        for bad in ["", "CAP_", "NET RAW", "ALL", "CAP_CAP_CHOWN"] {
            assert_eq!(capability_by_name(bad), None, "{bad:?}");
        }
        assert_eq!(capability_name(41), None);
        // Every name of the default set is known.
        assert!(DEFAULT_CAPS.iter().all(|&c| capability_name(c).is_some()));
    }

    #[test]
    fn mask_ignores_impossible_numbers() {
        assert_eq!(mask_of(&[]), 0);
        assert_eq!(mask_of(&[0, 63, 64, 200]), 1 | (1 << 63));
    }

    #[test]
    fn last_cap_is_sane() {
        let n = last_cap().unwrap();
        // CAP_AUDIT_READ (37) has existed since Linux 3.16.
        assert!((37..64).contains(&n), "cap_last_cap = {n}");
    }

    /// Runs `f` in a forked child and returns its exit code: these calls
    /// change the calling process for good.
    fn in_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls (prctl, capset, _exit),
        // which are async-signal-safe, so the test harness's other threads
        // and their locks do not matter.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = f();
            // SAFETY: _exit skips the parent's atexit handlers and destructors.
            unsafe { libc::_exit(code) }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; status is a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn status_field(name: &str) -> u64 {
        // Test-only helper, used in the parent.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    }

    #[test]
    fn no_new_privs_and_ambient_work_unprivileged() {
        let code = in_child(|| {
            if set_no_new_privs().is_err() || clear_ambient().is_err() {
                return 1;
            }
            // SAFETY: PR_GET_NO_NEW_PRIVS only returns a value.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            if nnp == 1 {
                0
            } else {
                2
            }
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn dropping_capabilities_takes_effect_when_privileged() {
        // Needs CAP_SETPCAP; skipped (but not failed) for an unprivileged run.
        if status_field("CapEff:") & (1 << CAP_SETPCAP) == 0 {
            eprintln!("skipped: no CAP_SETPCAP");
            return;
        }
        let last = last_cap().unwrap();
        let code = in_child(|| {
            let last = match last_cap_raw() {
                Some(n) => n,
                None => return 10,
            };
            if restrict_bounding_set(DEFAULT_CAPS, last).is_err() {
                return 1;
            }
            if restrict_process_caps(DEFAULT_CAPS).is_err() {
                return 2;
            }
            // SAFETY: PR_CAPBSET_READ only returns a value.
            let admin = unsafe {
                libc::prctl(
                    libc::PR_CAPBSET_READ,
                    CAP_SYS_ADMIN as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            // SAFETY: as above.
            let chown =
                unsafe { libc::prctl(libc::PR_CAPBSET_READ, CAP_CHOWN as libc::c_ulong, 0, 0, 0) };
            if admin != 0 || chown != 1 {
                return 3;
            }
            // Effective set check through capget.
            let mut header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            // SAFETY: capget writes two CapData into the local array.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_capget,
                    &mut header as *mut CapHeader,
                    data.as_mut_ptr(),
                )
            };
            if rc != 0 {
                return 4;
            }
            let eff = u64::from(data[0].effective) | (u64::from(data[1].effective) << 32);
            let inh = u64::from(data[0].inheritable) | (u64::from(data[1].inheritable) << 32);
            if eff != mask_of(DEFAULT_CAPS) || inh != 0 {
                return 5;
            }
            0
        });
        assert!(last >= 37);
        assert_eq!(code, 0);
    }

    /// `last_cap` without allocation, for the forked child: the kernel's
    /// value is stable, so the parent's reading would do too, but a `fn`
    /// pointer cannot capture it.
    fn last_cap_raw() -> Option<u32> {
        let mut buf = [0u8; 8];
        // SAFETY: open/read/close on a NUL-terminated path and a local buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/sys/kernel/cap_last_cap".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return None;
            }
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            if n <= 0 {
                return None;
            }
        }
        let mut value = 0u32;
        for &b in buf.iter().take_while(|b| b.is_ascii_digit()) {
            value = value * 10 + u32::from(b - b'0');
        }
        Some(value)
    }
}
