//! Store and unpacking tests on real files. Importing needs root (chown,
//! mknod of whiteouts, trusted xattrs): those tests print a line and pass
//! when run by another user.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sandpit_image::Digest as ImageDigest;
use sandpit_image::{Compression, IdShift, ImageConfig, ImageError, ImageStore, Reference};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

const BASE: u32 = 1_000_000_000;
const MTIME: u64 = 1_600_000_000;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("skipping: needs root");
        false
    }
}

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

fn open(dir: &Path) -> ImageStore {
    ImageStore::open(dir, IdShift::default()).unwrap()
}

/// Builds tars byte by byte, hostile paths included (the `tar` crate's
/// path setters refuse `..`).
struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: EntryType, path: &str, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        let name = path.as_bytes();
        assert!(name.len() < 100, "test paths must be short");
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    fn link_target(h: &mut Header, target: &str) {
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
    }

    fn push(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.file_owned(path, data, 0o644, 0, 0)
    }

    fn file_owned(&mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = Self::header(EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let h = Self::header(EntryType::Directory, path, mode, 0);
        self.push(h, &[])
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Symlink, path, 0o777, 0);
        Self::link_target(&mut h, target);
        self.push(h, &[])
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(EntryType::Link, path, 0o644, 0);
        Self::link_target(&mut h, target);
        self.push(h, &[])
    }

    fn fifo(&mut self, path: &str) -> &mut Self {
        let h = Self::header(EntryType::Fifo, path, 0o620, 0);
        self.push(h, &[])
    }

    fn chardev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(EntryType::Char, path, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, &[])
    }

    /// A PAX extended header describing the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            let body = 1 + key.len() + 1 + value.len() + 1;
            let mut len = body + 1;
            while body + len.to_string().len() != len {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let h = Self::header(
            EntryType::XHeader,
            "././@PaxHeader",
            0o644,
            data.len() as u64,
        );
        self.push(h, &data)
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

/// Computed here with `sha2`, not with the store's own hashing.
fn sha256(data: &[u8]) -> ImageDigest {
    ImageDigest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(data)))).unwrap()
}

fn layer_count(store: &ImageStore) -> usize {
    fs::read_dir(store.root().join("layers/sha256"))
        .unwrap()
        .count()
}

fn tmp_is_empty(store: &ImageStore) -> bool {
    fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and `buf` is valid for its length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}

/// Imports `tar` as `reference` and returns its only lower dir.
fn import(store: &ImageStore, reference_str: &str, tar: &[u8]) -> Result<PathBuf, ImageError> {
    let image = store.import_rootfs_tar(&reference(reference_str), tar, ImageConfig::default())?;
    let lower = store.lower_dirs(&image);
    assert_eq!(lower.len(), 1);
    Ok(lower[0].clone())
}

fn expect_bad_entry(result: Result<PathBuf, ImageError>, reason_part: &str) {
    match result {
        Err(ImageError::BadEntry { path, reason }) => {
            assert!(reason.contains(reason_part), "{path}: {reason}");
        }
        other => panic!("expected a refused entry ({reason_part}), got {other:?}"),
    }
}

#[test]
fn imports_all_entry_kinds_with_shifted_ownership() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/hostname", b"sandbox\n")
        .dir("./home/user/", 0o750)
        .file_owned("./home/user/notes", b"mine", 0o600, 1000, 1000)
        .file_owned("./usr/bin/su", b"#!/bin/true\n", 0o4755, 0, 0)
        .file_owned("./usr/bin/wall", b"wall", 0o2755, 0, 5)
        .symlink("./bin", "usr/bin")
        .symlink("./etc/localtime", "/usr/share/zoneinfo/UTC")
        .hardlink("./usr/bin/su2", "./usr/bin/su")
        .fifo("./run/initctl")
        .dir("./tmp/", 0o1777)
        .file_owned("./big-id", b"x", 0o644, 70000, 1u64 << 40)
        .pax(&[
            ("SCHILY.xattr.user.note", b"hello"),
            ("mtime", b"1600000123.5"),
        ])
        .file("./with-xattr", b"data")
        .finish();
    let image = store
        .import_rootfs_tar(
            &reference("sandpit.test/kinds:1"),
            &tar[..],
            ImageConfig::default(),
        )
        .unwrap();
    assert_eq!(image.reference, "sandpit.test/kinds:1");
    assert_eq!(image.layers, vec![sha256(&tar)]);
    assert!(image.id.as_str().starts_with("sha256:"));
    let root = store.lower_dirs(&image).remove(0);
    assert_eq!(
        root,
        dir.path()
            .join("layers/sha256")
            .join(&image.layers[0].as_str()[7..])
            .join("rootfs")
    );

    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"sandbox\n");
    assert_eq!(
        (meta("etc/hostname").uid(), meta("etc/hostname").gid()),
        (BASE, BASE)
    );
    assert_eq!(meta("etc/hostname").mode() & 0o7777, 0o644);
    assert_eq!(meta("etc/hostname").mtime(), MTIME as i64);
    assert_eq!(meta("home/user/notes").uid(), BASE + 1000);
    assert_eq!(meta("home/user/notes").gid(), BASE + 1000);
    assert_eq!(meta("home/user/notes").mode() & 0o7777, 0o600);
    assert_eq!(meta("home/user").mode() & 0o7777, 0o750);
    assert_eq!(
        meta("home/user").mtime(),
        MTIME as i64,
        "dir mtime after content"
    );
    assert_eq!(meta("usr/bin/su").mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(meta("usr/bin/wall").mode() & 0o7777, 0o2755, "setgid kept");
    assert_eq!(meta("usr/bin/wall").gid(), BASE + 5);
    // Implicit parents: shifted root, 0755.
    assert_eq!(meta("usr").mode() & 0o7777, 0o755);
    assert_eq!(meta("usr").uid(), BASE);
    assert!(meta("bin").file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(meta("bin").uid(), BASE);
    assert_eq!(
        fs::read_link(root.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    assert_eq!(meta("usr/bin/su2").ino(), meta("usr/bin/su").ino());
    assert!(meta("run/initctl").file_type().is_fifo());
    assert_eq!(meta("run/initctl").mode() & 0o7777, 0o620);
    assert_eq!(meta("tmp").mode() & 0o7777, 0o1777);
    // Ids outside the range are clamped to the range's nobody.
    assert_eq!(meta("big-id").uid(), BASE + 65534);
    assert_eq!(meta("big-id").gid(), BASE + 65534);
    assert_eq!(
        getxattr(&root.join("with-xattr"), "user.note").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(meta("with-xattr").mtime(), 1_600_000_123);
    assert_eq!(meta("with-xattr").mtime_nsec(), 500_000_000);
    // The layer root takes the `./` entry's metadata.
    assert_eq!(meta("").uid(), BASE);
    assert_eq!(meta("").mode() & 0o7777, 0o755);

    let layer = store.layer(&image.layers[0]).unwrap();
    assert_eq!(layer.diff_id, image.layers[0]);
    assert_eq!(layer.digest, None);
    assert_eq!(image.size_bytes, layer.size);
    assert_eq!(layer.size, (8 + 4 + 12 + 4 + 1 + 4) as u64);
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(root.parent().unwrap().join("layer.json")).unwrap())
            .unwrap();
    assert_eq!(json["diff_id"], image.layers[0].as_str());
    assert!(tmp_is_empty(&store));
    // Store internals are not reachable by host users.
    assert_eq!(
        fs::metadata(dir.path().join("layers"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

#[test]
fn file_capabilities_become_namespaced() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // v2 capability: effective, cap_net_raw permitted.
    let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
    cap.extend_from_slice(&(1u32 << 13).to_le_bytes());
    cap.extend_from_slice(&[0; 12]);
    let tar = TarBuilder::new()
        .pax(&[
            ("SCHILY.xattr.security.capability", &cap),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ])
        .file_owned("ping", b"\x7fELF", 0o755, 0, 0)
        .finish();
    let root = import(&store, "sandpit.test/caps", &tar).unwrap();
    let stored = getxattr(&root.join("ping"), "security.capability").expect("capability kept");
    assert_eq!(stored.len(), 24, "v3 capability");
    assert_eq!(&stored[0..4], &0x0300_0001u32.to_le_bytes());
    assert_eq!(
        &stored[20..24],
        &BASE.to_le_bytes(),
        "root of the capability is the shifted root"
    );
    assert_eq!(
        getxattr(&root.join("ping"), "trusted.overlay.redirect"),
        None
    );
}

#[test]
fn absolute_paths_land_inside_the_layer() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let marker = format!("/tmp/sandpit-image-test-{}", std::process::id());
    let tar = TarBuilder::new()
        .file("/etc/x", b"inside")
        .file(&format!("{marker}/y"), b"inside")
        .file("//./a//b", b"ab")
        .finish();
    let root = import(&store, "sandpit.test/abs", &tar).unwrap();
    assert_eq!(fs::read(root.join("etc/x")).unwrap(), b"inside");
    assert_eq!(
        fs::read(root.join(&marker[1..]).join("y")).unwrap(),
        b"inside"
    );
    assert_eq!(fs::read(root.join("a/b")).unwrap(), b"ab");
    assert!(!Path::new(&marker).exists());
}

#[test]
fn dotdot_paths_fail_the_import_and_leave_nothing() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    for path in ["../x", "./a/../../x", "a/.."] {
        let tar = TarBuilder::new()
            .file("ok", b"ok")
            .file(path, b"evil")
            .finish();
        expect_bad_entry(import(&store, "sandpit.test/dotdot", &tar), "..");
        assert!(!dir.path().join("x").exists());
        assert_eq!(layer_count(&store), 0, "{path}");
        assert!(tmp_is_empty(&store), "{path}");
        assert!(matches!(
            store.get(&reference("sandpit.test/dotdot")),
            Err(ImageError::NotFound(_))
        ));
    }
}

#[test]
fn never_writes_through_symlinks() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let outside = target.path().to_str().unwrap();

    // Absolute symlink planted, then written through.
    let tar = TarBuilder::new()
        .symlink("a", outside)
        .file("a/pwned", b"x")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/sym1", &tar), "symlink");
    // Deeper, and as a directory entry.
    let tar = TarBuilder::new()
        .symlink("a", outside)
        .dir("a/sub/", 0o755)
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/sym2", &tar), "symlink");
    // Relative symlink, even one that stays inside the layer.
    let tar = TarBuilder::new()
        .dir("etc/", 0o755)
        .symlink("link", "etc")
        .file("link/passwd", b"x")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/sym3", &tar), "symlink");
    // Escaping relative symlink.
    let tar = TarBuilder::new()
        .symlink("up", "../../../../..")
        .file("up/tmp/pwned", b"x")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/sym4", &tar), "symlink");
    // A hard link whose target goes through a symlink.
    let tar = TarBuilder::new()
        .symlink("s", "/etc")
        .hardlink("h", "s/passwd")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/sym5", &tar), "symlink");
    // An entry replacing the symlink itself is fine: the symlink goes.
    let tar = TarBuilder::new()
        .symlink("a", outside)
        .file("a", b"plain")
        .symlink("d", outside)
        .dir("d/", 0o755)
        .file("d/f", b"in d")
        .finish();
    let root = import(&store, "sandpit.test/sym6", &tar).unwrap();
    assert_eq!(fs::read(root.join("a")).unwrap(), b"plain");
    assert!(fs::symlink_metadata(root.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(root.join("d/f")).unwrap(), b"in d");

    assert_eq!(
        fs::read_dir(target.path()).unwrap().count(),
        0,
        "nothing written outside"
    );
    assert_eq!(layer_count(&store), 1);
    assert!(tmp_is_empty(&store));
}

#[test]
fn hard_links_stay_inside_the_layer() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .hardlink("passwd", "../../etc/passwd")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/hl1", &tar), "outside");
    // Absolute targets are normalised into the layer, where there is none.
    let tar = TarBuilder::new().hardlink("passwd", "/etc/passwd").finish();
    expect_bad_entry(import(&store, "sandpit.test/hl2", &tar), "missing");
    let tar = TarBuilder::new()
        .dir("d/", 0o755)
        .hardlink("h", "d")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/hl3", &tar), "directory");
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));

    // Inside, absolute form, and to a symlink (which is linked, not followed).
    let tar = TarBuilder::new()
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .hardlink("etc/passwd-", "/etc/passwd")
        .symlink("etc/shadow-link", "/etc/shadow")
        .hardlink("etc/link2", "etc/shadow-link")
        .finish();
    let root = import(&store, "sandpit.test/hl4", &tar).unwrap();
    let ino = |p: &str| fs::symlink_metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("etc/passwd-"), ino("etc/passwd"));
    assert_eq!(ino("etc/link2"), ino("etc/shadow-link"));
    assert!(fs::symlink_metadata(root.join("etc/link2"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn device_nodes_are_skipped() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .dir("dev/", 0o755)
        .chardev("dev/null", 1, 3)
        .chardev("dev/sda", 8, 0)
        .file("etc/ok", b"ok")
        .finish();
    let root = import(&store, "sandpit.test/dev", &tar).unwrap();
    assert!(root.join("dev").is_dir());
    assert_eq!(fs::read_dir(root.join("dev")).unwrap().count(), 0);
    assert_eq!(fs::read(root.join("etc/ok")).unwrap(), b"ok");
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.motd", b"")
        .file(".wh.gone", b"")
        .dir("var/cache/", 0o755)
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"n")
        .file("opq-first/.wh..wh..opq", b"")
        .dir("opq-first/", 0o700)
        .file("kept", b"same layer")
        .file(".wh.kept", b"")
        .file(".wh.later", b"")
        .file("later", b"replaces the whiteout")
        .file(".wh..wh.plnk", b"")
        .file(".wh.recreated", b"")
        .file("recreated/f", b"new dir")
        .file("plain", b"p")
        .finish();
    let root = import(&store, "sandpit.test/wh", &tar).unwrap();
    for whiteout in ["etc/motd", "gone"] {
        let m = fs::symlink_metadata(root.join(whiteout)).unwrap();
        assert!(m.file_type().is_char_device(), "{whiteout}");
        assert_eq!(m.rdev(), 0, "{whiteout}");
        assert_eq!((m.uid(), m.gid()), (BASE, BASE), "{whiteout}");
    }
    assert!(!root.join("etc/.wh.motd").exists());
    assert_eq!(
        getxattr(&root.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(root.join("var/cache/new")).unwrap(), b"n");
    assert!(!root.join("var/cache/.wh..wh..opq").exists());
    assert_eq!(
        getxattr(&root.join("opq-first"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        fs::metadata(root.join("opq-first"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    assert_eq!(getxattr(&root.join("etc"), "trusted.overlay.opaque"), None);
    assert_eq!(fs::read(root.join("kept")).unwrap(), b"same layer");
    assert_eq!(
        fs::read(root.join("later")).unwrap(),
        b"replaces the whiteout"
    );
    assert!(!root.join(".wh..wh.plnk").exists());
    assert_eq!(fs::read(root.join("recreated/f")).unwrap(), b"new dir");
    assert!(fs::symlink_metadata(root.join("recreated"))
        .unwrap()
        .is_dir());
    // A regular file is no parent.
    let tar = TarBuilder::new()
        .file("plain", b"p")
        .file("plain/x", b"x")
        .finish();
    expect_bad_entry(import(&store, "sandpit.test/wh2", &tar), "not a directory");
}

#[test]
fn later_entries_win() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .file("f", b"first")
        .file("f", b"second")
        .dir("d/", 0o755)
        .file("d/inner", b"x")
        .file("d", b"dir replaced by file")
        .file("g", b"file replaced by dir")
        .dir("g/", 0o700)
        .file("g/inner", b"y")
        .dir("keep/", 0o755)
        .file("keep/a", b"a")
        .dir("keep/", 0o711)
        .finish();
    let root = import(&store, "sandpit.test/dup", &tar).unwrap();
    assert_eq!(fs::read(root.join("f")).unwrap(), b"second");
    assert_eq!(fs::read(root.join("d")).unwrap(), b"dir replaced by file");
    assert_eq!(fs::read(root.join("g/inner")).unwrap(), b"y");
    assert_eq!(
        fs::read(root.join("keep/a")).unwrap(),
        b"a",
        "dir over dir keeps content"
    );
    assert_eq!(
        fs::metadata(root.join("keep"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o711
    );
}

#[test]
fn layers_are_shared_between_images() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .file("etc/os-release", b"ID=test\n")
        .finish();
    let a = store
        .import_rootfs_tar(
            &reference("sandpit.test/a"),
            &tar[..],
            ImageConfig::default(),
        )
        .unwrap();
    let config = ImageConfig {
        env: vec!["PATH=/usr/bin".into()],
        cmd: vec!["sh".into()],
        working_dir: "/work".into(),
        ..ImageConfig::default()
    };
    let b = store
        .import_rootfs_tar(&reference("b:v2"), &tar[..], config.clone())
        .unwrap();
    assert_eq!(a.layers, b.layers);
    assert_eq!(store.lower_dirs(&a), store.lower_dirs(&b));
    assert_eq!(layer_count(&store), 1);
    assert_ne!(a.id, b.id, "different config, different id");
    assert_eq!(b.reference, "docker.io/library/b:v2");
    assert_eq!(store.get(&reference("b:v2")).unwrap().config, config);
    let c = store
        .tag(&reference("b:v2"), &reference("sandpit.test/c"))
        .unwrap();
    assert_eq!(c.id, b.id);
    let refs: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.reference)
        .collect();
    assert_eq!(
        refs,
        [
            "docker.io/library/b:v2",
            "sandpit.test/a:latest",
            "sandpit.test/c:latest"
        ]
    );
    assert!(tmp_is_empty(&store));
}

#[test]
fn remove_collects_unreferenced_layers() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar1 = TarBuilder::new().file("one", b"1").finish();
    let tar2 = TarBuilder::new().file("two", b"2").finish();
    let one = store
        .import_rootfs_tar(
            &reference("sandpit.test/one"),
            &tar1[..],
            ImageConfig::default(),
        )
        .unwrap();
    let two = store
        .import_rootfs_tar(
            &reference("sandpit.test/two"),
            &tar2[..],
            ImageConfig::default(),
        )
        .unwrap();
    store
        .tag(
            &reference("sandpit.test/one"),
            &reference("sandpit.test/one-again"),
        )
        .unwrap();
    assert_eq!(layer_count(&store), 2);

    // Still referenced by the second tag.
    store.remove(&reference("sandpit.test/one")).unwrap();
    assert!(store.has_layer(&one.layers[0]));
    store.remove(&reference("sandpit.test/one-again")).unwrap();
    assert!(!store.has_layer(&one.layers[0]));
    assert!(!store.lower_dirs(&one)[0].exists());
    assert!(matches!(
        store.get(&reference("sandpit.test/one")),
        Err(ImageError::NotFound(_))
    ));
    assert!(matches!(
        store.remove(&reference("sandpit.test/one")),
        Err(ImageError::NotFound(_))
    ));
    assert!(store.has_layer(&two.layers[0]));

    // gc protects what the caller says is in use.
    fs::remove_file(dir.path().join("images").join(format!(
        "{}.json",
        hex::encode(Sha256::digest(two.reference.as_bytes()))
    )))
    .unwrap();
    let in_use: HashSet<ImageDigest> = [two.layers[0].clone()].into();
    assert_eq!(store.gc(&in_use).unwrap(), Vec::<String>::new());
    assert!(store.has_layer(&two.layers[0]));
    assert_eq!(store.gc(&HashSet::new()).unwrap(), two.layers);
    assert_eq!(layer_count(&store), 0);

    // A layer just imported, not yet referenced (a pull in progress), is kept.
    let info = store
        .import_layer(&tar1[..], Compression::None, None, 1 << 20)
        .unwrap();
    assert_eq!(store.gc(&HashSet::new()).unwrap(), Vec::<String>::new());
    assert!(store.has_layer(&info.diff_id));
    let image = store
        .put_image(
            &reference("sandpit.test/pulled"),
            std::slice::from_ref(&info.diff_id),
            ImageConfig::default(),
            None,
        )
        .unwrap();
    assert_eq!(image.layers, vec![info.diff_id.clone()]);
    store.remove(&reference("sandpit.test/pulled")).unwrap();
    assert!(!store.has_layer(&info.diff_id));
}

#[test]
fn gzip_layers_and_digest_checks() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new().file("hello", b"world").finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();

    let wrong = sha256(b"something else");
    match store.import_layer(&gz[..], Compression::Gzip, Some(&wrong), 1 << 20) {
        Err(ImageError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256(&gz));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));
    // Uncompressed: the digest is the diff id.
    assert!(matches!(
        store.import_layer(&tar[..], Compression::None, Some(&sha256(&gz)), 1 << 20),
        Err(ImageError::DigestMismatch { .. })
    ));
    // An invalid expected digest cannot even be spelled: parsing refuses it.
    assert!(matches!(
        ImageDigest::parse("sha256:nothex"),
        Err(ImageError::InvalidDigest { .. })
    ));
    assert_eq!(layer_count(&store), 0);

    let info = store
        .import_layer(&gz[..], Compression::Gzip, Some(&sha256(&gz)), 1 << 20)
        .unwrap();
    assert_eq!(info.diff_id, sha256(&tar));
    assert_eq!(info.digest, Some(sha256(&gz)));
    assert_eq!(*info.blob_digest(), sha256(&gz));
    assert_eq!(
        fs::read(store.layer_path(&info.diff_id).join("hello")).unwrap(),
        b"world"
    );
    // Same content uncompressed: the stored layer is reused.
    let again = store
        .import_layer(&tar[..], Compression::None, Some(&sha256(&tar)), 1 << 20)
        .unwrap();
    assert_eq!(again.diff_id, info.diff_id);
    let again = store
        .import_layer(&tar[..], Compression::None, None, 1 << 20)
        .unwrap();
    assert_eq!(again.diff_id, info.diff_id);
    assert_eq!(layer_count(&store), 1);
    assert!(tmp_is_empty(&store));

    // Not gzip at all.
    assert!(matches!(
        store.import_layer(&tar[..], Compression::Gzip, None, 1 << 20),
        Err(ImageError::Archive(_))
    ));
    assert!(tmp_is_empty(&store));
    assert!(matches!(
        store.put_image(
            &reference("x"),
            &[sha256(b"absent")],
            ImageConfig::default(),
            None
        ),
        Err(ImageError::LayerNotFound(_))
    ));
}

#[test]
fn size_cap_fails_and_leaves_nothing() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .file("small", b"ok")
        .file("big", &vec![7u8; 200_000])
        .finish();
    let limit = 100_000;
    assert!(matches!(
        store.import_layer(&tar[..], Compression::None, None, limit),
        Err(ImageError::TooLarge { limit: 100_000 })
    ));
    // A gzip bomb: tiny blob, large tar.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < limit as usize);
    assert!(matches!(
        store.import_layer(&gz[..], Compression::Gzip, None, limit),
        Err(ImageError::TooLarge { .. })
    ));
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));
    store
        .import_layer(&tar[..], Compression::None, None, 1 << 20)
        .unwrap();
}

#[test]
fn truncated_tar_fails_and_leaves_nothing() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .file("a", &[1u8; 5000])
        .file("b", b"b")
        .finish();
    let cut = &tar[..1024];
    assert!(store
        .import_layer(cut, Compression::None, None, 1 << 20)
        .is_err());
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));
}

#[test]
fn reopen_keeps_images_and_refuses_another_shift() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let imported = if is_root() {
        let tar = TarBuilder::new().file("f", b"f").finish();
        Some(
            store
                .import_rootfs_tar(
                    &reference("sandpit.test/keep"),
                    &tar[..],
                    ImageConfig::default(),
                )
                .unwrap(),
        )
    } else {
        None
    };
    drop(store);
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("store.json")).unwrap()).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["uid_base"], BASE);
    assert_eq!(json["uid_count"], 65536);

    let store = open(dir.path());
    if let Some(image) = imported {
        assert_eq!(store.get(&reference("sandpit.test/keep")).unwrap(), image);
        assert_eq!(store.list().unwrap(), vec![image]);
    }
    let other = IdShift {
        base: 2_000_000_000,
        count: 65536,
    };
    match ImageStore::open(dir.path(), other) {
        Err(e @ ImageError::ShiftMismatch { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("1000000000+65536") && msg.contains("2000000000+65536"),
                "{msg}"
            );
        }
        other => panic!("expected a shift mismatch, got {other:?}"),
    }
    assert!(matches!(
        ImageStore::open(
            dir.path(),
            IdShift {
                base: 0,
                count: 65536
            }
        ),
        Err(ImageError::InvalidShift { .. })
    ));
    assert!(matches!(
        store.get(&reference("absent")),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn open_clears_staging_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    fs::create_dir_all(dir.path().join("tmp/layer-dead/rootfs/x")).unwrap();
    fs::write(dir.path().join("tmp/image-dead"), b"{").unwrap();
    let store = open(dir.path());
    assert!(tmp_is_empty(&store));
}

#[test]
fn concurrent_imports_of_one_reference() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut b = TarBuilder::new();
    for i in 0..50 {
        b.file(&format!("d{}/f{i}", i % 5), &vec![i as u8; 10_000]);
    }
    let tar = b.finish();
    let images: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    store
                        .import_rootfs_tar(
                            &reference("sandpit.test/race"),
                            &tar[..],
                            ImageConfig::default(),
                        )
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(images
        .windows(2)
        .all(|w| w[0].layers == w[1].layers && w[0].id == w[1].id));
    assert_eq!(layer_count(&store), 1);
    assert!(tmp_is_empty(&store));
    assert_eq!(store.list().unwrap().len(), 1);
}

/// `cargo test -p sandpit-image -- --ignored --nocapture`: imports the real
/// rootfs tarballs of `scripts/build-test-images.sh` when present.
#[test]
#[ignore]
fn import_real_rootfs_tarballs() {
    if !is_root() {
        return;
    }
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images");
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for name in ["busybox.tar", "python311.tar"] {
        let path = images.join(name);
        let Ok(file) = fs::File::open(&path) else {
            eprintln!("{}: absent, skipped", path.display());
            continue;
        };
        let len = file.metadata().unwrap().len();
        let started = Instant::now();
        let image = store
            .import_rootfs_tar(
                &reference(&format!("sandpit.test/{}", name.replace('.', "-"))),
                file,
                ImageConfig::default(),
            )
            .unwrap();
        let elapsed = started.elapsed();
        eprintln!(
            "{name}: {} MB tar, {} MB content imported in {:.2?}",
            len / 1_000_000,
            image.size_bytes / 1_000_000,
            elapsed
        );
        let root = store.lower_dirs(&image).remove(0);
        assert!(fs::symlink_metadata(root.join("bin")).is_ok());
        assert_eq!(fs::symlink_metadata(root.join("etc")).unwrap().uid(), BASE);
    }
}

fn zstd_compress(data: &[u8], level: i32) -> Vec<u8> {
    zstd::stream::encode_all(data, level).unwrap()
}

#[test]
fn zstd_layers_round_trip() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new()
        .dir("etc/", 0o755)
        .file_owned("etc/conf", b"zstd content", 0o640, 0, 42)
        .symlink("link", "etc/conf")
        .finish();
    let zst = zstd_compress(&tar, 3);
    let info = store
        .import_layer(&zst[..], Compression::Zstd, Some(&sha256(&zst)), 1 << 20)
        .unwrap();
    assert_eq!(info.diff_id, sha256(&tar));
    assert_eq!(info.digest, Some(sha256(&zst)));
    let root = store.layer_path(&info.diff_id);
    assert_eq!(fs::read(root.join("etc/conf")).unwrap(), b"zstd content");
    let m = fs::symlink_metadata(root.join("etc/conf")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (BASE, BASE + 42, 0o640)
    );
    assert_eq!(
        fs::read_link(root.join("link")).unwrap(),
        Path::new("etc/conf")
    );
    // Two concatenated frames are one stream, as with multi-member gzip.
    let (a, b) = tar.split_at(700);
    let mut two = zstd_compress(a, 1);
    two.extend_from_slice(&zstd_compress(b, 1));
    let again = store
        .import_layer(&two[..], Compression::Zstd, None, 1 << 20)
        .unwrap();
    assert_eq!(again.diff_id, info.diff_id);
    assert_eq!(layer_count(&store), 1);
    // Not zstd at all.
    assert!(matches!(
        store.import_layer(&tar[..], Compression::Zstd, None, 1 << 20),
        Err(ImageError::Archive(_))
    ));
    assert_eq!(layer_count(&store), 1);
    assert!(tmp_is_empty(&store));
}

#[test]
fn zstd_bomb_hits_the_cap() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new().file("bomb", &vec![0u8; 8 << 20]).finish();
    let zst = zstd_compress(&tar, 19);
    let limit = 1 << 20;
    assert!(zst.len() < 4096, "{}", zst.len());
    assert!(matches!(
        store.import_layer(&zst[..], Compression::Zstd, Some(&sha256(&zst)), limit),
        Err(ImageError::TooLarge { limit: 1_048_576 })
    ));
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));
}

#[test]
fn diff_id_is_checked_before_the_layer_is_visible() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tar = TarBuilder::new().file("f", b"content").finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let wrong = sha256(b"another tar");
    match store.import_layer_verified(
        &gz[..],
        Compression::Gzip,
        Some(&sha256(&gz)),
        Some(&wrong),
        1 << 20,
    ) {
        Err(ImageError::DiffIdMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256(&tar));
        }
        other => panic!("expected a diff id mismatch, got {other:?}"),
    }
    assert_eq!(layer_count(&store), 0);
    assert!(!store.has_layer(&sha256(&tar)));
    assert!(tmp_is_empty(&store));
    assert!(matches!(
        ImageDigest::parse("sha256:zz"),
        Err(ImageError::InvalidDigest { .. })
    ));

    let info = store
        .import_layer_verified(
            &gz[..],
            Compression::Gzip,
            Some(&sha256(&gz)),
            Some(&sha256(&tar)),
            1 << 20,
        )
        .unwrap();
    assert_eq!(info.diff_id, sha256(&tar));
    // Uncompressed and already stored: the shortcut checks the diff id too.
    assert!(matches!(
        store.import_layer_verified(
            &tar[..],
            Compression::None,
            Some(&sha256(&tar)),
            Some(&wrong),
            1 << 20
        ),
        Err(ImageError::DiffIdMismatch { .. })
    ));
    assert_eq!(layer_count(&store), 1);
}

/// A store written before digests were typed: the JSON files as they are on
/// disk. Written by hand (no import), so this runs as any user.
fn write_legacy_store(root: &Path, reference: &str, layer_hex: &str) -> serde_json::Value {
    drop(open(root));
    let layer_dir = root.join("layers/sha256").join(layer_hex);
    fs::create_dir_all(layer_dir.join("rootfs")).unwrap();
    fs::write(
        layer_dir.join("layer.json"),
        format!(
            "{{\n  \"diff_id\": \"sha256:{layer_hex}\",\n  \"digest\": \"{}\",\n  \"size\": 5\n}}",
            sha256(b"blob")
        ),
    )
    .unwrap();
    let record = serde_json::json!({
        "reference": reference,
        "id": sha256(b"content").as_str(),
        "layers": [format!("sha256:{layer_hex}")],
        "config": {
            "env": ["PATH=/bin"],
            "entrypoint": [],
            "cmd": ["sh"],
            "working_dir": "",
            "user": ""
        },
        "size_bytes": 5,
        "created": 1_700_000_000u64,
        "manifest_digest": sha256(b"manifest").as_str()
    });
    fs::write(record_path(root, reference), record.to_string()).unwrap();
    record
}

fn record_path(root: &Path, reference: &str) -> PathBuf {
    root.join("images").join(format!(
        "{}.json",
        hex::encode(Sha256::digest(reference.as_bytes()))
    ))
}

#[test]
fn existing_stores_keep_loading_with_the_same_format() {
    let dir = tempfile::tempdir().unwrap();
    let layer_hex = "ab".repeat(32);
    let record = write_legacy_store(dir.path(), "sandpit.test/legacy:1", &layer_hex);
    let store = open(dir.path());
    let image = store.get(&reference("sandpit.test/legacy:1")).unwrap();
    let diff_id = ImageDigest::from_sha256_hex(&layer_hex).unwrap();
    assert_eq!(image.layers, std::slice::from_ref(&diff_id));
    assert_eq!(image.id, sha256(b"content"));
    assert_eq!(image.manifest_digest, Some(sha256(b"manifest")));
    assert_eq!(image.config.cmd, ["sh"]);
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&image));
    // Serialising gives back the same JSON: the format did not change.
    assert_eq!(serde_json::to_value(&image).unwrap(), record);
    assert!(store.has_layer(&diff_id));
    let layer = store.layer(&diff_id).unwrap();
    assert_eq!(layer.diff_id, diff_id);
    assert_eq!(layer.digest, Some(sha256(b"blob")));
    assert_eq!(layer.size, 5);
    assert_eq!(
        store.layer_path(&diff_id),
        dir.path()
            .join("layers/sha256")
            .join(&layer_hex)
            .join("rootfs")
    );
    // Leases are plain strings on disk too.
    store
        .lease("sandbox-1", std::slice::from_ref(&diff_id))
        .unwrap();
    let lease: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.path().join("leases/sandbox-1.json")).unwrap())
            .unwrap();
    assert_eq!(
        lease,
        serde_json::json!({ "layers": [format!("sha256:{layer_hex}")] })
    );
    // Referenced and leased: kept.
    assert_eq!(
        store.gc(&HashSet::new()).unwrap(),
        Vec::<ImageDigest>::new()
    );
    assert!(store.has_layer(&diff_id));
    // A directory under layers/ that is no digest is not a layer: left alone.
    fs::create_dir(dir.path().join("layers/sha256/not-a-digest")).unwrap();
    store.release("sandbox-1").unwrap();
    store.remove(&reference("sandpit.test/legacy:1")).unwrap();
    assert!(!store.has_layer(&diff_id));
    assert!(dir.path().join("layers/sha256/not-a-digest").is_dir());
}

#[test]
fn corrupt_digests_in_store_files_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let layer_hex = "cd".repeat(32);
    let mut record = write_legacy_store(dir.path(), "sandpit.test/bad:1", &layer_hex);
    write_legacy_store(dir.path(), "sandpit.test/good:1", &layer_hex);
    let store = open(dir.path());
    for bad in ["sha256:nothex", "../../../../etc", &layer_hex, ""] {
        record["layers"] = serde_json::json!([bad]);
        fs::write(
            record_path(dir.path(), "sandpit.test/bad:1"),
            record.to_string(),
        )
        .unwrap();
        match store.get(&reference("sandpit.test/bad:1")) {
            Err(e @ ImageError::Corrupt { .. }) => {
                let source = std::error::Error::source(&e).unwrap().to_string();
                assert!(source.contains("invalid digest"), "{bad:?}: {source}");
            }
            other => panic!("{bad:?}: expected a corrupt record, got {other:?}"),
        }
        // Listing skips it; gc collects nothing rather than guess.
        let refs: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|i| i.reference)
            .collect();
        assert_eq!(refs, ["sandpit.test/good:1"]);
        assert!(matches!(
            store.gc(&HashSet::new()),
            Err(ImageError::Corrupt { .. })
        ));
    }
    fs::remove_file(record_path(dir.path(), "sandpit.test/bad:1")).unwrap();
    assert_eq!(
        store.gc(&HashSet::new()).unwrap(),
        Vec::<ImageDigest>::new()
    );

    // A corrupt layer.json, and a corrupt lease.
    let layer_json = dir
        .path()
        .join("layers/sha256")
        .join(&layer_hex)
        .join("layer.json");
    fs::write(&layer_json, br#"{"diff_id": "sha256:XYZ", "size": 1}"#).unwrap();
    let diff_id = ImageDigest::from_sha256_hex(&layer_hex).unwrap();
    assert!(matches!(
        store.layer(&diff_id),
        Err(ImageError::Corrupt { .. })
    ));
    fs::create_dir_all(dir.path().join("leases")).unwrap();
    fs::write(
        dir.path().join("leases/sandbox-x.json"),
        br#"{"layers": ["sha256:short"]}"#,
    )
    .unwrap();
    assert!(matches!(
        store.gc(&HashSet::new()),
        Err(ImageError::Corrupt { .. })
    ));
}
