//! Loop devices through their ioctls (no `losetup`): attach an image file to
//! a free device with `LO_FLAGS_AUTOCLEAR`, and find the device an image is
//! already attached to.
//!
//! With autoclear the device frees itself on its last close: when the
//! descriptor we hold goes without a mount having taken the device (a failed
//! mount, a crash), or on the last unmount of the file system on it. No
//! device is ever left behind to detach by hand.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// How often a free device is asked for when others keep taking it first.
const GET_FREE_ATTEMPTS: usize = 64;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel's layout: a mismatch would make every ioctl read garbage.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        // SAFETY: plain integers and byte arrays: all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    }
}

/// An attached loop device, held open: dropping it before a mount takes the
/// device detaches it (autoclear).
#[derive(Debug)]
pub(crate) struct LoopDevice {
    /// `/dev/loopN`.
    pub(crate) path: PathBuf,
    _fd: File,
}

fn ioctl_ptr<T>(fd: &File, request: libc::c_ulong, arg: *mut T) -> std::io::Result<libc::c_int> {
    // SAFETY: every caller passes a request whose argument is a pointer to
    // a live, correctly laid out `T` (checked sizes above) or nothing.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn ioctl_int(
    fd: &File,
    request: libc::c_ulong,
    arg: libc::c_ulong,
) -> std::io::Result<libc::c_int> {
    // SAFETY: the argument is passed by value (a descriptor or nothing); the
    // kernel reads no memory of ours.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_device(path: &Path, write: bool) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Attaches `image` (opened read-write) to a free loop device.
pub(crate) fn attach(image: &File, image_path: &Path) -> std::io::Result<LoopDevice> {
    let ctl = open_device(Path::new("/dev/loop-control"), true)?;
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = LO_FLAGS_AUTOCLEAR;
    // For whoever reads the device's status; the kernel keeps the real file.
    let name = image_path.as_os_str().as_encoded_bytes();
    let n = name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);

    let mut last_busy = None;
    for _ in 0..GET_FREE_ATTEMPTS {
        let n = ioctl_int(&ctl, LOOP_CTL_GET_FREE, 0)?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = open_device(&path, true)?;
        // Another attacher may take the device between GET_FREE and here:
        // EBUSY, ask again.
        match configure(&dev, image, info) {
            Ok(()) => return Ok(LoopDevice { path, _fd: dev }),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_busy = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_busy.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)))
}

fn configure(dev: &File, image: &File, info: LoopInfo64) -> std::io::Result<()> {
    let mut config = LoopConfig {
        fd: image.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    match ioctl_ptr(dev, LOOP_CONFIGURE, &mut config) {
        Ok(_) => return Ok(()),
        // Before Linux 5.8 the ioctl is unknown; set the file, then the flags.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {}
        Err(e) => return Err(e),
    }
    ioctl_int(dev, LOOP_SET_FD, image.as_raw_fd() as libc::c_ulong)?;
    let mut info = info;
    if let Err(e) = ioctl_ptr(dev, LOOP_SET_STATUS64, &mut info) {
        // Without autoclear the device would stay bound: undo by hand.
        let _ = ioctl_int(dev, LOOP_CLR_FD, 0);
        return Err(e);
    }
    Ok(())
}

/// The loop device `image` is attached to, if any (a file system on it may
/// still be mounted in another mount namespace: mounting that device again
/// shares its file system, where a second device would corrupt it).
pub(crate) fn find_attached(image: &std::fs::Metadata) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") || !entry.path().join("loop").is_dir() {
            continue;
        }
        let path = PathBuf::from(format!("/dev/{name}"));
        let Ok(dev) = open_device(&path, false) else {
            continue;
        };
        let mut info = LoopInfo64::zeroed();
        if ioctl_ptr(&dev, LOOP_GET_STATUS64, &mut info).is_ok()
            && info.lo_device == image.dev()
            && info.lo_inode == image.ino()
        {
            return Some(path);
        }
    }
    None
}
