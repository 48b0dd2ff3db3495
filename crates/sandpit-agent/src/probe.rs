//! `sandpit-agent probe`: describes the sandbox from the inside as one JSON
//! object on stdout, for the engine's isolation tests.
//!
//! Every attempt is harmless if it unexpectedly succeeds: it either changes
//! nothing (setting the hostname or the clock to its current value), is undone
//! at once (a mount, a device node), runs in a throw-away child (unshare,
//! chroot, ptrace), or passes arguments the kernel rejects only *after* its
//! permission check (reboot with a wrong magic, kexec for a bogus
//! architecture, an empty module). For the latter, that later error means the
//! privilege was granted and is reported as "ok". Anything else is reported
//! by errno name, e.g. "EPERM".
//!
//! `attempts` holds the privileged operations; `escape` (see [`escape`])
//! holds one key per known route out of a container.

use std::ffi::CString;
use std::process::ExitCode;

use serde_json::{json, Map, Value};

mod escape;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errno_name(e: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(e))
}

/// "ok" for success or for an errno that only comes after the permission check.
fn outcome(ret: i64, granted: &[i32]) -> String {
    if ret >= 0 {
        return "ok".into();
    }
    let e = errno();
    if granted.contains(&e) {
        "ok".into()
    } else {
        errno_name(e)
    }
}

/// Runs `f` in a forked child (so the probe itself is unaffected); `f` returns
/// 0 for success or an errno.
fn in_child(f: impl FnOnce() -> i32) -> String {
    // SAFETY: the probe is single-threaded, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("fork: {}", errno_name(errno()));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: _exit ends the child without running the parent's destructors.
        unsafe { libc::_exit(code.clamp(0, 255)) }
    }
    let mut status = 0;
    // SAFETY: waits for our own child, writing into `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        match libc::WEXITSTATUS(status) {
            0 => "ok".into(),
            e => errno_name(e),
        }
    }
}

fn ret_errno(ret: i64) -> i32 {
    if ret >= 0 {
        0
    } else {
        errno()
    }
}

fn scratch_dir() -> Option<std::path::PathBuf> {
    for base in ["/tmp", "/dev/shm", "/run", "/"] {
        let dir = std::path::Path::new(base).join(format!(".sandpit-probe-{}", std::process::id()));
        if std::fs::create_dir(&dir).is_ok() {
            return Some(dir);
        }
    }
    None
}

fn cpath(p: &std::path::Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no nul in a path we built")
}

fn mount_tmpfs(dir: &std::path::Path) -> String {
    let target = cpath(dir);
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c"sandpit-probe".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=4k".as_ptr().cast(),
        )
    };
    if ret == 0 {
        // SAFETY: unmounts what we just mounted; the path outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    outcome(ret.into(), &[])
}

fn mknod_char(dir: &std::path::Path) -> String {
    let node = dir.join("null");
    let path = cpath(&node);
    // SAFETY: the path outlives the call; a /dev/null node is removed at once.
    let ret = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    // Before the removal, which would overwrite errno (with ENOENT).
    let result = outcome(ret.into(), &[]);
    let _ = std::fs::remove_file(&node);
    result
}

fn open_kcore_read() -> String {
    use std::io::Read;
    match std::fs::File::open("/proc/kcore") {
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
        Ok(mut f) => {
            let mut b = [0u8; 1];
            match f.read(&mut b) {
                Ok(1) => "ok".into(),
                Ok(_) => "empty".into(),
                Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
            }
        }
    }
}

/// Opens for writing without writing a byte.
fn open_write(path: &str) -> String {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn write_sys() -> String {
    let knob = "/sys/kernel/mm/transparent_hugepage/enabled";
    if std::path::Path::new(knob).exists() {
        return open_write(knob);
    }
    let file = "/sys/fs/cgroup/.sandpit-probe";
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(file);
            "ok".into()
        }
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

fn sethostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } < 0 {
        return errno_name(errno());
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    // Setting the same name changes nothing even if it is allowed.
    // SAFETY: `buf` holds `len` valid bytes.
    let ret = unsafe { libc::sethostname(buf.as_ptr().cast(), len) };
    outcome(ret.into(), &[])
}

fn clock_settime() -> String {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `now` outlives both calls.
    let ret = unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut now);
        libc::clock_settime(libc::CLOCK_REALTIME, &now)
    };
    outcome(ret.into(), &[])
}

fn syscall_outcome(ret: libc::c_long, granted: &[i32]) -> String {
    outcome(ret, granted)
}

fn attempts() -> Map<String, Value> {
    let mut a = Map::new();
    let mut put = |k: &str, v: String| {
        a.insert(k.to_string(), Value::String(v));
    };
    let dir = scratch_dir();
    match &dir {
        Some(d) => {
            put("mount_tmpfs", mount_tmpfs(d));
            put("mknod_char", mknod_char(d));
        }
        None => {
            put("mount_tmpfs", "no scratch dir".into());
            put("mknod_char", "no scratch dir".into());
        }
    }
    if let Some(d) = &dir {
        let _ = std::fs::remove_dir(d);
    }
    for (key, flag) in [
        ("unshare_user", libc::CLONE_NEWUSER),
        ("unshare_net", libc::CLONE_NEWNET),
        ("unshare_mount", libc::CLONE_NEWNS),
    ] {
        // SAFETY: unshare takes flags by value; it runs in a throw-away child.
        put(
            key,
            in_child(|| ret_errno(unsafe { libc::unshare(flag) }.into())),
        );
    }
    let empty = [0u8; 8];
    // An empty image: ENOEXEC comes only after the CAP_SYS_MODULE check.
    // SAFETY: the kernel reads 0 bytes of `empty` and one NUL-terminated string.
    let ret = unsafe { libc::syscall(libc::SYS_init_module, empty.as_ptr(), 0usize, c"".as_ptr()) };
    put("init_module", syscall_outcome(ret, &[libc::ENOEXEC]));
    // A bogus architecture: EINVAL comes only after the CAP_SYS_BOOT check.
    // SAFETY: no segments, so the kernel reads no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_load,
            0usize,
            0usize,
            std::ptr::null::<u8>(),
            libc::KEXEC_ARCH_MASK as u32 as usize,
        )
    };
    put("kexec_load", syscall_outcome(ret, &[libc::EINVAL]));
    // A one-entry array map: the smallest real bpf object, closed at once.
    let mut attr = [0u64; 16];
    attr[0] = 2 | (4 << 32); // map_type = BPF_MAP_TYPE_ARRAY, key_size = 4
    attr[1] = 4 | (1 << 32); // value_size = 4, max_entries = 1
                             // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0usize, attr.as_mut_ptr(), 128usize) };
    if fd >= 0 {
        // SAFETY: `fd` is the map descriptor just returned to us.
        unsafe { libc::close(fd as i32) };
    }
    put("bpf", syscall_outcome(fd, &[]));
    // KEYCTL_GET_KEYRING_ID of the session keyring, without creating it.
    // SAFETY: integer arguments only.
    let ret = unsafe { libc::syscall(libc::SYS_keyctl, 0usize, -3isize, 0usize) };
    put("keyctl", syscall_outcome(ret, &[libc::ENOKEY]));
    put("sethostname", sethostname());
    // A wrong second magic: EINVAL comes only after the CAP_SYS_BOOT check.
    // SAFETY: integer arguments and a null pointer the kernel does not read.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1 as isize,
            0isize,
            libc::LINUX_REBOOT_CMD_CAD_OFF as isize,
            std::ptr::null::<u8>(),
        )
    };
    put("reboot", syscall_outcome(ret, &[libc::EINVAL]));
    // /dev/null is no swap area: EINVAL comes only after the CAP_SYS_ADMIN check.
    // SAFETY: a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::swapon(c"/dev/null".as_ptr(), 0) };
    put("swapon", outcome(ret.into(), &[libc::EINVAL]));
    put("clock_settime", clock_settime());
    put("open_kcore_read", open_kcore_read());
    put("write_proc_sysrq", open_write("/proc/sysrq-trigger"));
    put("write_sys", write_sys());
    // SAFETY: a NUL-terminated path; it runs in a throw-away child.
    put(
        "chroot",
        in_child(|| ret_errno(unsafe { libc::chroot(c"/".as_ptr()) }.into())),
    );
    // An empty handle: EINVAL comes only after the permission check.
    let handle = [0u32; 4];
    // SAFETY: the kernel reads the 8-byte header of `handle`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            libc::AT_FDCWD as isize,
            handle.as_ptr(),
            libc::O_RDONLY as isize,
        )
    };
    put("open_by_handle_at", syscall_outcome(ret, &[libc::EINVAL]));
    // PTRACE_SEIZE does not stop the tracee; the child's exit detaches it.
    put(
        "ptrace_attach_pid1",
        in_child(|| {
            // SAFETY: integer arguments; it runs in a throw-away child.
            let ret = unsafe {
                libc::ptrace(
                    libc::PTRACE_SEIZE,
                    1 as libc::pid_t,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            ret_errno(ret)
        }),
    );
    a
}

fn status_field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

fn report() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let number = |key: &str| -> Value {
        status_field(&status, key)
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Value::Null, Value::from)
    };
    let pids_visible = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.as_encoded_bytes();
                    !name.is_empty() && name.iter().all(u8::is_ascii_digit)
                })
                .count()
        })
        .unwrap_or(0);
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    json!({
        // SAFETY: getuid and getpid cannot fail.
        "uid": unsafe { libc::getuid() },
        // SAFETY: as above.
        "pid": unsafe { libc::getpid() },
        "uid_map": std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default().trim(),
        "hostname": hostname,
        "pids_visible": pids_visible,
        "no_new_privs": number("NoNewPrivs"),
        "seccomp": number("Seccomp"),
        "cap_bnd": status_field(&status, "CapBnd").unwrap_or_default(),
        "cap_eff": status_field(&status, "CapEff").unwrap_or_default(),
        "attempts": attempts(),
        "escape": escape::escapes(),
    })
}

/// Prints the report; always exits 0 when it could print it.
pub(crate) fn run() -> ExitCode {
    println!("{}", report());
    ExitCode::SUCCESS
}
