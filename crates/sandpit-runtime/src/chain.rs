//! Errors as one line of text, where they must become text: the spawner's
//! report to the runtime travels as a string between processes.
//!
//! No error of this crate repeats its `source()` in its own message (the
//! source chain is printed once, at the edges), so the full message is the
//! `Display` of each error in the chain joined by `": "`.

pub(crate) use sandpit_errors::chain;

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::io;
    use std::path::PathBuf;

    use nix::errno::Errno;

    use super::*;
    use crate::caps::CapsError;
    use crate::cgroup::CgroupError;
    use crate::rootfs::RootfsError;
    use crate::runtime::RuntimeError;
    use crate::seccomp::SeccompError;
    use crate::spawn::SpawnError;
    use crate::syscalls::SysError;

    fn sys_enoent() -> SysError {
        SysError {
            op: "mount",
            path: PathBuf::from("/s/x/rootfs"),
            errno: Errno::ENOENT,
        }
    }

    /// One representative of every variant that has a source, in every
    /// error type of the crate.
    fn with_sources() -> Vec<Box<dyn Error>> {
        let compile = seccompiler::SeccompCondition::new(
            9,
            seccompiler::SeccompCmpArgLen::Dword,
            seccompiler::SeccompCmpOp::Eq,
            0,
        )
        .unwrap_err();
        let bad_json = serde_json::from_str::<crate::spawn::SpawnConfig>("{").unwrap_err();
        vec![
            Box::new(RuntimeError::Io {
                step: "create state dir",
                source: io::Error::other("disk on fire"),
            }),
            Box::new(RuntimeError::Cgroup(CgroupError::InUse("/cg/sb".into()))),
            Box::new(RuntimeError::Cgroup(CgroupError::Io {
                op: "write",
                path: "/cg/sb/memory.max".into(),
                errno: Errno::EBUSY,
            })),
            Box::new(SpawnError::Host {
                step: "bind agent socket",
                source: io::Error::from_raw_os_error(libc::EADDRINUSE),
            }),
            Box::new(SpawnError::BadConfig(bad_json)),
            Box::new(SpawnError::Seccomp(SeccompError::Install(Errno::EINVAL))),
            Box::new(SpawnError::Seccomp(SeccompError::Compile(compile))),
            Box::new(SpawnError::Caps(CapsError::NoNewPrivs(Errno::EPERM))),
        ]
    }

    #[test]
    fn no_error_repeats_its_source() {
        for e in with_sources() {
            let source = e.source().expect("a variant with a source");
            let (own, theirs) = (e.to_string(), source.to_string());
            assert!(!own.contains(&theirs), "{own:?} repeats {theirs:?}");
            // The chain carries the source exactly once.
            assert_eq!(chain(&*e).matches(&theirs).count(), 1, "{}", chain(&*e));
        }
        // Transparent wrappers forward both Display and source: still once.
        let e = RootfsError::Sys(sys_enoent());
        assert!(e.source().is_none());
        assert_eq!(chain(&e), sys_enoent().to_string());
    }

    #[test]
    fn chains_read_as_before() {
        let e = RuntimeError::Io {
            step: "create state dir",
            source: io::Error::other("disk on fire"),
        };
        assert_eq!(e.to_string(), "create state dir");
        assert_eq!(chain(&e), "create state dir: disk on fire");
        let e = RuntimeError::Cgroup(CgroupError::Io {
            op: "write",
            path: "/cg/sb/memory.max".into(),
            errno: Errno::EBUSY,
        });
        assert_eq!(
            chain(&e),
            "cgroup: write /cg/sb/memory.max: EBUSY: Device or resource busy"
        );
        let e = SpawnError::Caps(CapsError::NoNewPrivs(Errno::EPERM));
        assert_eq!(
            chain(&e),
            "capabilities: set no_new_privs: EPERM: Operation not permitted"
        );
        let e = SpawnError::Host {
            step: "bind agent socket",
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
        };
        assert!(
            chain(&e).starts_with("bind agent socket: Address already in use"),
            "{}",
            chain(&e)
        );
        assert_eq!(
            chain(&SpawnError::MissingConfig),
            "invalid spawn request: missing config line"
        );
        // What a sandbox's PID 1 reports travels as a string and stays one.
        let reported = "root filesystem: mount /s/x/rootfs: ENOENT: No such file or directory";
        assert_eq!(chain(&SpawnError::Child(reported.into())), reported);
    }
}
