//! `LocalVolumes` on real loop devices, ext4 and tmpfs.
//! Root only: `cargo test -p sandpit-volume --features privileged-tests`.
#![cfg(feature = "privileged-tests")]

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use sandpit_volume::{LocalVolumes, Medium, VolumeBackend, VolumeError, VolumeKey, VolumeRequest};

const OWNER: (u32, u32) = (1_000_000_000, 1_000_000_000);

/// A backend in a temporary root; every volume is removed at the end,
/// pass or fail.
struct Lab {
    vols: LocalVolumes,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vols = LocalVolumes::open(&dir.path().join("volumes")).unwrap();
        Self { vols, _dir: dir }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for key in self.vols.list().unwrap_or_default() {
            let _ = self.vols.remove(&key);
        }
    }
}

fn key(s: &str) -> VolumeKey {
    s.parse().unwrap()
}

fn req(size_bytes: u64, medium: Medium) -> VolumeRequest {
    VolumeRequest {
        size_bytes,
        medium,
        owner: OWNER,
        mode: 0o770,
    }
}

/// Writes 1 MiB chunks (each synced: ext4 reports ENOSPC at write or at
/// sync) into `path` until one fails; returns the bytes written and the error.
fn fill(path: &Path) -> (u64, std::io::Error) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            return (written, e);
        }
        written += chunk.len() as u64;
        assert!(written < 1 << 40, "no end to the volume");
    }
}

fn mountinfo_mentions(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = path.to_str().unwrap();
    info.lines().any(|l| l.contains(p))
}

/// Backing files of the attached loop devices that lie under `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let root = root.to_str().unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(s) = std::fs::read_to_string(&backing) {
            if s.contains(root) {
                found.push(s.trim().to_string());
            }
        }
    }
    found
}

/// Autoclear may run a moment after the unmount returns.
fn wait_no_loops_under(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !loops_under(root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "loop devices left: {:?}",
            loops_under(root)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_gone(lab: &Lab, k: &VolumeKey) {
    let dir = lab.vols.root().join(k.as_str());
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(!mountinfo_mentions(&dir), "mount of {} left", dir.display());
    wait_no_loops_under(&dir);
    assert!(lab.vols.path(k).is_none());
    assert!(matches!(
        lab.vols.usage(k),
        Err(VolumeError::NotAttached(_))
    ));
}

#[test]
fn a_disk_volume_fails_writes_past_its_size_with_enospc() {
    let lab = Lab::new();
    let k = key("disk-size");
    let size = 32 << 20;
    let root = lab.vols.provision(&k, &req(size, Medium::Disk)).unwrap();
    assert_eq!(root, lab.vols.root().join("disk-size/mnt"));
    assert_eq!(lab.vols.path(&k).as_deref(), Some(root.as_path()));
    // The root is the sandbox's, and holds nothing of mkfs's.
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid()), OWNER);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o770);
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    // Mounted nosuid,nodev, on a loop device backed by the image.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(root.to_str().unwrap()))
        .unwrap();
    assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
    assert!(line.contains(" ext4 /dev/loop"), "{line}");
    let image = lab.vols.root().join("disk-size/disk.img");
    assert_eq!(loops_under(lab.vols.root()), [image.to_str().unwrap()]);
    // Sparse: the image takes far less than its size.
    let img = std::fs::metadata(&image).unwrap();
    assert_eq!(img.len(), size);
    assert!(
        img.blocks() * 512 < size / 2,
        "{} bytes allocated",
        img.blocks() * 512
    );

    let usage = lab.vols.usage(&k).unwrap();
    assert!(
        usage.capacity_bytes <= size && usage.capacity_bytes > size * 3 / 4,
        "{usage:?}"
    );
    let (written, err) = fill(&root.join("big"));
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written <= size && written > size / 2, "{written} bytes");
    let usage = lab.vols.usage(&k).unwrap();
    assert!(usage.used_bytes > size / 2, "{usage:?}");

    lab.vols.remove(&k).unwrap();
    assert_gone(&lab, &k);
    // Idempotent.
    lab.vols.remove(&k).unwrap();
}

#[test]
fn a_memory_volume_is_a_tmpfs_of_its_size() {
    let lab = Lab::new();
    let k = key("mem-size");
    let size = 8 << 20;
    let root = lab.vols.provision(&k, &req(size, Medium::Memory)).unwrap();
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.gid()), OWNER);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o770);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(root.to_str().unwrap()))
        .unwrap();
    assert!(
        line.contains(" tmpfs ") && line.contains("nosuid") && line.contains("nodev"),
        "{line}"
    );
    assert_eq!(lab.vols.usage(&k).unwrap().capacity_bytes, size);
    let (written, err) = fill(&root.join("big"));
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(written, size);
    // The other medium under the same key is refused, not swapped in.
    let e = lab
        .vols
        .provision(&k, &req(size, Medium::Disk))
        .unwrap_err();
    assert_eq!(e.to_string(), "volume mem-size exists on memory, not disk");
    lab.vols.remove(&k).unwrap();
    assert_gone(&lab, &k);
}

#[test]
fn provisioning_again_is_idempotent_and_keeps_contents() {
    let lab = Lab::new();
    for (name, medium) in [("again-disk", Medium::Disk), ("again-mem", Medium::Memory)] {
        let k = key(name);
        let root = lab.vols.provision(&k, &req(16 << 20, medium)).unwrap();
        std::fs::write(root.join("kept"), "data").unwrap();
        let again = lab.vols.provision(&k, &req(16 << 20, medium)).unwrap();
        assert_eq!(again, root);
        assert_eq!(std::fs::read_to_string(root.join("kept")).unwrap(), "data");
        // Still one mount, not a second one stacked on the first.
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let n = info
            .lines()
            .filter(|l| l.contains(root.to_str().unwrap()))
            .count();
        assert_eq!(n, 1, "{name}: {info}");
    }
    assert_eq!(loops_under(lab.vols.root()).len(), 1);
}

#[test]
fn an_unmounted_disk_volume_is_reattached_with_its_contents() {
    let lab = Lab::new();
    let k = key("reattach");
    let root = lab
        .vols
        .provision(&k, &req(16 << 20, Medium::Disk))
        .unwrap();
    std::fs::write(root.join("kept"), "survives").unwrap();
    // What a reboot leaves: the image, nothing mounted, no loop device.
    nix::mount::umount2(&root, nix::mount::MntFlags::empty()).unwrap();
    wait_no_loops_under(lab.vols.root());
    assert!(lab.vols.path(&k).is_none());
    assert!(matches!(
        lab.vols.usage(&k),
        Err(VolumeError::NotAttached(_))
    ));

    let again = lab
        .vols
        .provision(&k, &req(16 << 20, Medium::Disk))
        .unwrap();
    assert_eq!(again, root);
    assert_eq!(
        std::fs::read_to_string(root.join("kept")).unwrap(),
        "survives"
    );
    assert_eq!(loops_under(lab.vols.root()).len(), 1);

    // A memory volume's contents went with its tmpfs: it comes back empty.
    let m = key("reattach-mem");
    let root = lab
        .vols
        .provision(&m, &req(1 << 20, Medium::Memory))
        .unwrap();
    std::fs::write(root.join("gone"), "x").unwrap();
    nix::mount::umount2(&root, nix::mount::MntFlags::empty()).unwrap();
    let again = lab
        .vols
        .provision(&m, &req(1 << 20, Medium::Memory))
        .unwrap();
    assert_eq!(std::fs::read_dir(&again).unwrap().count(), 0);
    let e = lab.vols.provision(&m, &req(1 << 20, Medium::Disk));
    assert!(
        matches!(e, Err(VolumeError::MediumMismatch { .. })),
        "{e:?}"
    );
}

#[test]
fn a_busy_volume_is_removed_and_its_device_goes_with_the_last_user() {
    let lab = Lab::new();
    let k = key("busy");
    let root = lab.vols.provision(&k, &req(8 << 20, Medium::Disk)).unwrap();
    let open = std::fs::File::create(root.join("held")).unwrap();
    lab.vols.remove(&k).unwrap();
    let dir = lab.vols.root().join("busy");
    assert!(!dir.exists());
    assert!(!mountinfo_mentions(&dir));
    // Detached lazily: the open file keeps the file system (and device).
    drop(open);
    wait_no_loops_under(&dir);
}

#[test]
fn list_names_the_volumes_and_nothing_else() {
    let lab = Lab::new();
    let a = key("a-vol");
    let b = key("B.vol");
    lab.vols
        .provision(&b, &req(1 << 20, Medium::Memory))
        .unwrap();
    lab.vols.provision(&a, &req(2 << 20, Medium::Disk)).unwrap();
    std::fs::create_dir(lab.vols.root().join(".hidden")).unwrap();
    std::fs::write(lab.vols.root().join("a-file"), "").unwrap();
    assert_eq!(lab.vols.list().unwrap(), [b.clone(), a.clone()]);
    lab.vols.remove(&a).unwrap();
    assert_eq!(lab.vols.list().unwrap(), [b]);
    std::fs::remove_dir(lab.vols.root().join(".hidden")).unwrap();
}

#[test]
fn refused_requests_create_nothing() {
    let lab = Lab::new();
    let k = key("refused");
    for size in [0, (16 << 40) + 1] {
        let e = lab
            .vols
            .provision(&k, &req(size, Medium::Disk))
            .unwrap_err();
        assert!(matches!(e, VolumeError::InvalidRequest(_)), "{e}");
    }
    assert!(lab.vols.list().unwrap().is_empty());
}

/// Provisioning times (printed: `--nocapture`), with a generous bound.
#[test]
fn provisioning_1_and_10_gib_is_quick() {
    let lab = Lab::new();
    for (name, size) in [("one-gib", 1u64 << 30), ("ten-gib", 10 << 30)] {
        let k = key(name);
        let t = Instant::now();
        lab.vols.provision(&k, &req(size, Medium::Disk)).unwrap();
        let took = t.elapsed();
        let t = Instant::now();
        lab.vols.remove(&k).unwrap();
        eprintln!("provision {name}: {took:?}, remove: {:?}", t.elapsed());
        assert!(took < Duration::from_secs(30), "{name}: {took:?}");
    }
}
