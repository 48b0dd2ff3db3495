//! The sandbox's seccomp filter: allow by default, and answer a Docker-like
//! deny list of kernel-wide or namespace-creating syscalls with `EPERM`.
//!
//! The program is compiled by `seccompiler` in the spawner before it forks
//! ([`default_filter`]) and installed by the sandbox's PID 1 right before it
//! execs the agent ([`install`], one raw syscall, no allocation).
//!
//! `seccompiler` gives one action to every rule, so the few answers that
//! differ live in a hand-written prefix that runs first:
//! - a foreign architecture is killed (x86_64: the i386 `int 0x80` ABI, whose
//!   syscall numbers differ and would slip past every rule);
//! - x86_64 only: any x32 syscall (number with bit 30 set, same audit arch) is
//!   refused with `EPERM`, since the rules below match 64-bit numbers only;
//! - `clone3` returns `ENOSYS`: its flags sit in memory, out of the filter's
//!   reach, and `ENOSYS` makes libc fall back to `clone`, whose flags the
//!   rules can inspect.

use std::collections::BTreeMap;

use nix::errno::Errno;
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Why building or installing the filter failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SeccompError {
    /// The filter has no rules for this CPU architecture.
    #[error("unsupported architecture {0}")]
    UnsupportedArch(&'static str),
    /// `seccompiler` rejected the rules.
    #[error("compile filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The program is empty or longer than the kernel accepts.
    #[error("filter of {0} instructions cannot be installed")]
    BadLength(usize),
    /// The kernel refused the filter.
    #[error("install filter: {0}")]
    Install(Errno),
}

// Classic BPF opcodes (linux/bpf_common.h) and `struct seccomp_data` offsets.
/// `BPF_LD | BPF_W | BPF_ABS` (the first two are zero).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// `__X32_SYSCALL_BIT`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `open_tree_attr` (Linux 6.15; same number on every architecture, and not
/// yet in `libc`): another way to clone a mount tree.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// `CLONE_NEWTIME`: only meaningful for `unshare` and `clone3` (for `clone`
/// that bit is part of the exit signal, where it is invalid anyway).
const CLONE_NEWTIME: u64 = 0x80;

/// Every flag that creates a namespace.
const CLONE_NEW_FLAGS: [u64; 8] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
    CLONE_NEWTIME,
];

/// Personalities that stay allowed (as in Docker's profile): the default
/// (`PER_LINUX`), `PER_LINUX32`, `UNAME26`, both, and the query value.
const ALLOWED_PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Syscalls refused outright: mounts, kernel modules, kexec, bpf, the kernel
/// keyring, cross-process memory access, namespace entry and creation,
/// host-wide settings (clock, swap, hostname, accounting, quotas), raw I/O
/// ports, file handles (which bypass path checks), userfaultfd and perf.
fn denied_syscalls() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        SYS_OPEN_TREE_ATTR,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_setns,
        // All of unshare: sandboxed code never needs a new namespace.
        libc::SYS_unshare,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_settimeofday,
        libc::SYS_adjtimex,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_lookup_dcookie,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_nfsservctl,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
        libc::SYS_fanotify_init,
        // io_uring's operations bypass this filter (they are not system
        // calls) and its kernel code has been a steady source of privilege
        // escalations: refused, as Docker's default profile and Google's
        // production kernels do.
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    // Only x86_64 has these; `vm86`/`vm86old` exist for i386 only, whose ABI
    // the architecture check kills.
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_uselib,
        libc::SYS__sysctl,
        174, // create_module (removed in 2.6, listed by Docker; not in libc)
        177, // get_kernel_syms
        178, // query_module
    ]);
    v
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    // Dword: clone's flags and personality's persona are 32-bit in the kernel
    // (clone takes lower_32_bits(flags)), so the upper half is irrelevant.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Compile)
}

fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|nr| (nr, vec![]))
        .collect();

    // clone: refused when any namespace flag is set. Rules of one syscall
    // are OR-ed, so one masked-equality rule per flag.
    let clone = CLONE_NEW_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?])
                .map_err(SeccompError::Compile)
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone);

    // personality: refused unless the argument is one of the allowed values
    // (conditions of one rule are AND-ed).
    let not_allowed = ALLOWED_PERSONALITIES
        .iter()
        .map(|&p| cond(0, SeccompCmpOp::Ne, p))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(not_allowed).map_err(SeccompError::Compile)?],
    );
    Ok(rules)
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

fn ret_errno(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

/// The hand-written prefix (see the module docs). Its jumps stay inside it;
/// its fall-through is the first instruction of `seccompiler`'s program,
/// which loads what it needs itself.
fn prefix() -> Vec<sock_filter> {
    let mut p = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        // Equal: skip the kill.
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD_W_ABS, DATA_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        // Not x32: skip the return.
        jump(BPF_JMP_JSET_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, ret_errno(libc::EPERM)),
    ]);
    p.extend([
        // Not clone3: skip the return.
        jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, ret_errno(libc::ENOSYS)),
    ]);
    p
}

/// Builds the sandbox's filter. Call before forking: it allocates.
pub(crate) fn default_filter() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules()?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target_arch()?,
    )
    .map_err(SeccompError::Compile)?;
    let compiled: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;
    let mut program = prefix();
    program.extend(compiled);
    // BPF_MAXINSNS: the kernel refuses longer classic programs.
    if program.len() > 4096 {
        return Err(SeccompError::BadLength(program.len()));
    }
    Ok(program)
}

// The kernel reads `seccompiler::sock_filter` as `struct sock_filter`.
const _: () = assert!(
    std::mem::size_of::<sock_filter>() == std::mem::size_of::<libc::sock_filter>()
        && std::mem::align_of::<sock_filter>() == std::mem::align_of::<libc::sock_filter>()
);

/// Installs `filter` on the calling thread (no `TSYNC`: the sandbox's PID 1
/// is single-threaded) and every process it later starts.
///
/// Needs `no_new_privs` (or `CAP_SYS_ADMIN`). Allocation-free: it runs in the
/// forked child just before exec.
pub(crate) fn install(filter: &BpfProgram) -> Result<(), SeccompError> {
    let len = match u16::try_from(filter.len()) {
        Ok(n) if n > 0 => n,
        _ => return Err(SeccompError::BadLength(filter.len())),
    };
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads through this pointer; the layouts match (see
        // the assertion above).
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel
    // copies the program and keeps no reference to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            0 as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Install(Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions the filter uses, to
    /// check the program's answers for any arch, number and arguments
    /// without installing it.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &prog[pc];
            pc += 1;
            match ins.code {
                0x20 => {
                    let k = ins.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                0x54 => acc &= ins.k,
                0x05 => pc += ins.k as usize,
                0x06 => return ins.k,
                code => {
                    let taken = match code {
                        0x15 => acc == ins.k,
                        0x25 => acc > ins.k,
                        0x35 => acc >= ins.k,
                        0x45 => acc & ins.k != 0,
                        _ => panic!("unexpected opcode {code:#x} at {}", pc - 1),
                    };
                    pc += usize::from(if taken { ins.jt } else { ins.jf });
                }
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    fn answer(nr: i64, args: [u64; 6]) -> u32 {
        run(&default_filter().unwrap(), AUDIT_ARCH, nr as u32, args)
    }

    #[test]
    fn filter_builds_and_starts_with_the_prefix() {
        let prog = default_filter().unwrap();
        let p = prefix();
        assert_eq!(prog[..p.len()], p[..]);
        assert!(prog.len() > p.len() + denied_syscalls().len());
    }

    #[test]
    fn denied_syscalls_get_eperm_and_others_pass() {
        for nr in denied_syscalls() {
            assert_eq!(answer(nr, [0; 6]), ret_errno(libc::EPERM), "syscall {nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_getpid,
            libc::SYS_execve,
            libc::SYS_chroot,
            libc::SYS_kcmp,
            libc::SYS_ptrace,
        ] {
            assert_eq!(answer(nr, [0; 6]), ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn clone_is_refused_only_with_namespace_flags() {
        let sigchld = libc::SIGCHLD as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        for ok in [
            sigchld,
            thread,
            libc::CLONE_VFORK as u64 | libc::CLONE_VM as u64 | sigchld,
        ] {
            assert_eq!(
                answer(libc::SYS_clone, [ok, 0, 0, 0, 0, 0]),
                ALLOW,
                "{ok:#x}"
            );
        }
        for flag in CLONE_NEW_FLAGS {
            for extra in [0, sigchld, thread] {
                assert_eq!(
                    answer(libc::SYS_clone, [flag | extra, 0, 0, 0, 0, 0]),
                    ret_errno(libc::EPERM),
                    "{:#x}",
                    flag | extra
                );
            }
        }
        assert_eq!(answer(libc::SYS_clone3, [0; 6]), ret_errno(libc::ENOSYS));
    }

    #[test]
    fn personality_allows_only_the_harmless_values() {
        for p in ALLOWED_PERSONALITIES {
            assert_eq!(
                answer(libc::SYS_personality, [p, 0, 0, 0, 0, 0]),
                ALLOW,
                "{p:#x}"
            );
        }
        // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, PER_BSD.
        for p in [0x0040_0000, 0x0400_0000, 0x6] {
            assert_eq!(
                answer(libc::SYS_personality, [p, 0, 0, 0, 0, 0]),
                ret_errno(libc::EPERM),
                "{p:#x}"
            );
        }
    }

    #[test]
    fn foreign_architectures_are_killed() {
        let prog = default_filter().unwrap();
        // AUDIT_ARCH_I386 / AUDIT_ARCH_ARM.
        for arch in [3 | 0x4000_0000, 40 | 0x4000_0000] {
            assert_eq!(
                run(&prog, arch, libc::SYS_getpid as u32, [0; 6]),
                libc::SECCOMP_RET_KILL_PROCESS
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_are_refused() {
        let prog = default_filter().unwrap();
        for nr in [libc::SYS_getpid, libc::SYS_mount, libc::SYS_read] {
            assert_eq!(
                run(&prog, AUDIT_ARCH, X32_SYSCALL_BIT | nr as u32, [0; 6]),
                ret_errno(libc::EPERM)
            );
        }
    }

    #[test]
    fn install_rejects_an_empty_program() {
        assert!(matches!(install(&vec![]), Err(SeccompError::BadLength(0))));
    }

    /// One probe made by the child: the raw return value and errno.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    struct Probe {
        ret: libc::c_long,
        errno: i32,
    }

    const PROBES: [&str; 12] = [
        "getpid",
        "mount",
        "umount2",
        "unshare(CLONE_NEWUSER)",
        "clone(CLONE_NEWUSER)",
        "keyctl",
        "x32 mount",
        "clone3",
        "setns",
        "personality(PER_BSD)",
        "personality(query)",
        "bpf",
    ];

    /// Runs in the forked child of a multi-threaded process: raw syscalls only.
    fn probe_in_child(filter: &BpfProgram, out: libc::c_int) -> ! {
        // SAFETY: every call below is a raw syscall (async-signal-safe) on
        // constant arguments or NUL-terminated literals; a clone that
        // unexpectedly succeeds leaves its child to _exit at once.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || install(filter).is_err() {
                libc::_exit(2);
            }
            let target = c"/nonexistent/sandpit-seccomp-test".as_ptr();
            let tmpfs = c"tmpfs".as_ptr();
            let mut results = [Probe::default(); PROBES.len()];
            let x32_mount = (0x4000_0000 | libc::SYS_mount) as libc::c_long;
            let mut i = 0;
            let mut record = |ret: libc::c_long| {
                results[i] = Probe {
                    ret,
                    errno: *libc::__errno_location(),
                };
                i += 1;
            };
            record(libc::syscall(libc::SYS_getpid));
            record(libc::syscall(libc::SYS_mount, tmpfs, target, tmpfs, 0, 0));
            record(libc::syscall(libc::SYS_umount2, target, 0));
            record(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER));
            let r = libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            );
            if r == 0 {
                libc::_exit(0);
            }
            record(r);
            record(libc::syscall(libc::SYS_keyctl, 0, -3, 0));
            record(libc::syscall(x32_mount, tmpfs, target, tmpfs, 0, 0));
            record(libc::syscall(libc::SYS_clone3, 0, 0));
            record(libc::syscall(libc::SYS_setns, -1, 0));
            record(libc::syscall(libc::SYS_personality, 6));
            record(libc::syscall(libc::SYS_personality, 0xffff_ffffu32));
            record(libc::syscall(libc::SYS_bpf, 0, 0, 0));
            let bytes = std::mem::size_of_val(&results);
            let n = libc::write(out, results.as_ptr().cast(), bytes);
            libc::_exit(if n == bytes as isize { 0 } else { 3 })
        }
    }

    #[test]
    fn installed_filter_refuses_what_it_should() {
        let filter = default_filter().unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the local array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child makes raw syscalls only (see probe_in_child) and
        // ends with _exit, so the harness's other threads and locks do not
        // matter.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            probe_in_child(&filter, fds[1]);
        }
        // SAFETY: closes our copy of the write end; fds[1] is not used again.
        unsafe { libc::close(fds[1]) };
        let mut results = [Probe::default(); PROBES.len()];
        let bytes = std::mem::size_of_val(&results);
        // SAFETY: reads at most `bytes` into the local array of plain data.
        let n = unsafe { libc::read(fds[0], results.as_mut_ptr().cast(), bytes) };
        // SAFETY: closes the read end, owned here.
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        // SAFETY: waits for our child; status is a local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
        assert_eq!(n, bytes as isize);
        let by_name = |name: &str| results[PROBES.iter().position(|p| *p == name).unwrap()];
        assert!(by_name("getpid").ret > 0, "{:?}", by_name("getpid"));
        let mut denied = vec![
            "mount",
            "umount2",
            "unshare(CLONE_NEWUSER)",
            "clone(CLONE_NEWUSER)",
            "keyctl",
            "setns",
            "personality(PER_BSD)",
            "bpf",
        ];
        if cfg!(target_arch = "x86_64") {
            denied.push("x32 mount");
        }
        for denied in denied {
            let p = by_name(denied);
            assert_eq!((p.ret, p.errno), (-1, libc::EPERM), "{denied}");
        }
        let p = by_name("clone3");
        assert_eq!((p.ret, p.errno), (-1, libc::ENOSYS), "clone3");
        // The query returns the current persona (PER_LINUX).
        assert_eq!(by_name("personality(query)").ret, 0);
    }
}
