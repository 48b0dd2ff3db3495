//! The `escape` part of the probe: one key per known route out of a
//! container (new mounts and the cgroup v1 `release_agent`, writing the
//! agent's binary, reaching PID 1's memory or namespaces, kernel interfaces
//! that bypass or widen the syscall filter, device nodes, the kernel log and
//! kernel addresses).
//!
//! The same rules as the rest of the probe hold: every attempt is harmless if
//! it unexpectedly succeeds. Mounts are undone at once, namespaces are
//! changed in throw-away children, descriptors that come back are closed, a
//! key that gets added is invalidated, and files opened for writing are never
//! written. Outcomes are "ok" or an errno name, except `kallsyms_addresses`
//! ("hidden" or "visible").

use std::ffi::CString;
use std::io::{BufRead, Read};
use std::path::Path;

use serde_json::{Map, Value};

use super::{cpath, errno_name, in_child, open_write, outcome, ret_errno, scratch_dir};

/// `CLONE_NEWTIME`, missing from libc.
const CLONE_NEWTIME: libc::c_int = 0x80;
/// `KEY_SPEC_SESSION_KEYRING`.
const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
/// `KEYCTL_INVALIDATE`.
const KEYCTL_INVALIDATE: libc::c_long = 21;
/// `SYSLOG_ACTION_READ_ALL`.
const SYSLOG_ACTION_READ_ALL: libc::c_long = 3;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

fn io_errno(e: &std::io::Error) -> String {
    errno_name(e.raw_os_error().unwrap_or(0))
}

/// Closes a descriptor a probe got back.
fn close_fd(fd: libc::c_long) {
    if fd >= 0 {
        // SAFETY: `fd` is a descriptor the kernel just returned to us and
        // nothing else holds.
        unsafe { libc::close(fd as libc::c_int) };
    }
}

/// Mounts `fstype` with `data` on a fresh directory under `dir` in a
/// throw-away child, unmounting it at once if that worked.
fn mount_in_child(dir: &Path, name: &str, fstype: &str, data: &str) -> String {
    let target = dir.join(name);
    if let Err(e) = std::fs::create_dir(&target) {
        return io_errno(&e);
    }
    let path = cpath(&target);
    let fstype = CString::new(fstype).expect("no nul in a file system type");
    let data = CString::new(data).expect("no nul in mount options");
    let result = in_child(|| {
        // SAFETY: all pointers are NUL-terminated strings that outlive the call.
        let ret = unsafe {
            libc::mount(
                c"sandpit-probe".as_ptr(),
                path.as_ptr(),
                fstype.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if ret == 0 {
            // SAFETY: unmounts what we just mounted; the path outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        ret_errno(ret.into())
    });
    let _ = std::fs::remove_dir(&target);
    result
}

/// A new cgroup v1 hierarchy, where `release_agent` would be ours: the rdma
/// controller (rarely mounted, so free to take) or, on a kernel without it
/// (EINVAL, from parsing the options before the permission check), a named
/// hierarchy without controllers.
fn mount_cgroup_v1(dir: &Path) -> String {
    match mount_in_child(dir, "cgroup", "cgroup", "rdma") {
        e if e == errno_name(libc::EINVAL) => {
            mount_in_child(dir, "cgroup", "cgroup", "none,name=sandpit-probe")
        }
        other => other,
    }
}

/// Opens the first `release_agent` of a cgroup v1 hierarchy for writing:
/// "ok" if one could be, else the errno of the last try (ENOENT when none is
/// visible).
fn write_release_agent() -> String {
    let mut candidates = vec![std::path::PathBuf::from("/sys/fs/cgroup/release_agent")];
    if let Ok(dir) = std::fs::read_dir("/sys/fs/cgroup") {
        candidates.extend(
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("release_agent")),
        );
    }
    let mut last = errno_name(libc::ENOENT);
    for path in candidates.iter().filter(|p| p.exists()) {
        match open_write(&path.to_string_lossy()).as_str() {
            "ok" => return "ok".into(),
            other => last = other.to_string(),
        }
    }
    last
}

/// Opens for reading and reads once ("ok" even when the device has nothing
/// to give at once); the buffer holds a whole `/dev/kmsg` record.
fn open_read(path: &str) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Err(e) => io_errno(&e),
        Ok(mut f) => {
            let mut b = vec![0u8; 8192];
            match f.read(&mut b) {
                Ok(_) => "ok".into(),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => "ok".into(),
                Err(e) => io_errno(&e),
            }
        }
    }
}

/// Opens the first block device under `/dev` (else `/dev/vda`) for reading.
fn open_block_device() -> String {
    use std::os::unix::fs::FileTypeExt;
    let found = std::fs::read_dir("/dev").ok().and_then(|d| {
        d.filter_map(Result::ok)
            .find(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
            .map(|e| e.path().to_string_lossy().into_owned())
    });
    open_read(found.as_deref().unwrap_or("/dev/vda"))
}

/// "visible" when a line of `/proc/kallsyms` shows a non-zero address,
/// "hidden" otherwise (no lines at all included).
pub(super) fn kallsyms_visibility(lines: impl IntoIterator<Item = String>) -> &'static str {
    let visible = lines.into_iter().any(|line| {
        line.split_whitespace()
            .next()
            .and_then(|addr| u64::from_str_radix(addr, 16).ok())
            .is_some_and(|addr| addr != 0)
    });
    if visible {
        "visible"
    } else {
        "hidden"
    }
}

fn kallsyms_addresses() -> &'static str {
    match std::fs::File::open("/proc/kallsyms") {
        Err(_) => "hidden",
        Ok(f) => kallsyms_visibility(std::io::BufReader::new(f).lines().map_while(Result::ok)),
    }
}

fn mknod_dev_mem(dir: &Path) -> String {
    let node = dir.join("mem");
    let path = cpath(&node);
    // SAFETY: the path outlives the call; a /dev/mem node is removed at once.
    let ret = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) };
    // Before the removal, which would overwrite errno (with ENOENT).
    let result = outcome(ret.into(), &[]);
    let _ = std::fs::remove_file(&node);
    result
}

/// `process_vm_readv` of one byte of PID 1. The address is one of ours, so
/// the agent's layout need not be known: EFAULT (a hole in PID 1's memory)
/// comes only after the access check and counts as granted.
fn process_vm_readv_pid1() -> String {
    static TARGET: u8 = 0;
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: (&raw const TARGET).cast_mut().cast(),
        iov_len: 1,
    };
    // SAFETY: the kernel writes at most one byte into `byte`, which outlives
    // the call; `remote` is only read as an address in the other process.
    let ret = unsafe { libc::process_vm_readv(1, &local, 1, &remote, 1, 0) };
    outcome(ret as i64, &[libc::EFAULT])
}

fn io_uring_setup() -> String {
    // struct io_uring_params: 120 bytes, all zero but what the kernel fills.
    let mut params = [0u32; 30];
    // SAFETY: `params` is a zeroed io_uring_params of the kernel's size; it
    // outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    let result = outcome(fd, &[]);
    close_fd(fd);
    result
}

fn userfaultfd() -> String {
    // SAFETY: flags by value.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    let result = outcome(fd, &[]);
    close_fd(fd);
    result
}

fn add_key() -> String {
    let payload = b"x";
    // SAFETY: NUL-terminated strings and a payload of the length passed, all
    // outliving the call.
    let key = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            c"user".as_ptr(),
            c"sandpit-probe".as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_SESSION_KEYRING,
        )
    };
    let result = outcome(key, &[]);
    if key >= 0 {
        // SAFETY: integer arguments only; it invalidates the key just added.
        unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_INVALIDATE, key) };
    }
    result
}

/// `request_key` of a key that does not exist, without a callout: ENOKEY
/// comes only after the syscall was let through.
fn request_key() -> String {
    // SAFETY: NUL-terminated strings that outlive the call and a null
    // callout the kernel does not read.
    let key = unsafe {
        libc::syscall(
            libc::SYS_request_key,
            c"user".as_ptr(),
            c"sandpit-probe-absent".as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0 as libc::c_long,
        )
    };
    outcome(key, &[libc::ENOKEY])
}

/// A software CPU clock of this process, user space only (what
/// `perf_event_paranoid` 2 allows anyone).
fn perf_event_open() -> String {
    // struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes) used of 128.
    let mut attr = [0u64; 16];
    attr[0] = 1 | (64 << 32); // type = PERF_TYPE_SOFTWARE, size = 64
    attr[1] = 0; // config = PERF_COUNT_SW_CPU_CLOCK
    attr[5] = (1 << 5) | (1 << 6); // exclude_kernel, exclude_hv
                                   // SAFETY: `attr` is a zero-padded perf_event_attr of at least the size
                                   // it declares; it outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_mut_ptr(),
            0 as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    let result = outcome(fd, &[]);
    close_fd(fd);
    result
}

fn klogctl_read_all() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_syslog,
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr(),
            buf.len() as libc::c_int,
        )
    };
    outcome(ret, &[])
}

/// `setns` into PID 1's namespace `ns` in a throw-away child; an open that
/// fails reports its own errno.
fn setns_pid1(ns: &str) -> String {
    let path = format!("/proc/1/ns/{ns}");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => return io_errno(&e),
    };
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` stays open (owned by `file`) until the child has exited.
    in_child(|| ret_errno(unsafe { libc::setns(fd, 0) }.into()))
}

/// Every route, by key.
pub(super) fn escapes() -> Map<String, Value> {
    let mut a = Map::new();
    let mut put = |k: &str, v: String| {
        a.insert(k.to_string(), Value::String(v));
    };
    match scratch_dir() {
        Some(d) => {
            put("mount_proc", mount_in_child(&d, "proc", "proc", ""));
            put(
                "mount_tmpfs",
                mount_in_child(&d, "tmpfs", "tmpfs", "size=4k"),
            );
            put(
                "mount_cgroup2",
                mount_in_child(&d, "cgroup2", "cgroup2", ""),
            );
            put("mount_cgroup_v1", mount_cgroup_v1(&d));
            put("mknod_dev_mem", mknod_dev_mem(&d));
            let _ = std::fs::remove_dir(&d);
        }
        None => {
            for k in [
                "mount_proc",
                "mount_tmpfs",
                "mount_cgroup2",
                "mount_cgroup_v1",
                "mknod_dev_mem",
            ] {
                put(k, "no scratch dir".into());
            }
        }
    }
    put("write_cgroup_release_agent", write_release_agent());
    put("open_write_proc1_exe", open_write("/proc/1/exe"));
    put("open_write_self_exe", open_write("/proc/self/exe"));
    put("process_vm_readv_pid1", process_vm_readv_pid1());
    put("io_uring_setup", io_uring_setup());
    put("userfaultfd", userfaultfd());
    put("add_key", add_key());
    put("request_key", request_key());
    put("perf_event_open", perf_event_open());
    for (ns, flag) in [
        ("user", libc::CLONE_NEWUSER),
        ("mount", libc::CLONE_NEWNS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("time", CLONE_NEWTIME),
    ] {
        // SAFETY: unshare takes flags by value; it runs in a throw-away child.
        let result = in_child(|| ret_errno(unsafe { libc::unshare(flag) }.into()));
        put(&format!("unshare_{ns}"), result);
    }
    for ns in ["mnt", "net", "pid", "ipc", "uts", "cgroup", "user", "time"] {
        put(&format!("setns_pid1_{ns}"), setns_pid1(ns));
    }
    put("open_dev_mem", open_read("/dev/mem"));
    put("open_block_device", open_block_device());
    put("klogctl_read_all", klogctl_read_all());
    put("read_dev_kmsg", open_read("/dev/kmsg"));
    put("kallsyms_addresses", kallsyms_addresses().into());
    a
}

#[cfg(test)]
mod tests {
    use super::kallsyms_visibility;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn kallsyms_with_zeroed_addresses_is_hidden() {
        let text = "0000000000000000 T _stext\n0000000000000000 t do_one_initcall\n";
        assert_eq!(kallsyms_visibility(lines(text)), "hidden");
    }

    #[test]
    fn kallsyms_with_one_real_address_is_visible() {
        let text = "0000000000000000 T _stext\nffffffff81000000 T startup_64\n";
        assert_eq!(kallsyms_visibility(lines(text)), "visible");
    }

    #[test]
    fn empty_or_unparsable_kallsyms_is_hidden() {
        assert_eq!(kallsyms_visibility(Vec::new()), "hidden");
        assert_eq!(kallsyms_visibility(lines("garbage T x\n\n")), "hidden");
    }
}
