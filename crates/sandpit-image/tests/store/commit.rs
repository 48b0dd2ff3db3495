//! Committing an overlay upper dir into a layer: what is copied, the diff
//! id against a tar built here, dedup, image records. Root only (chown,
//! whiteouts, trusted xattrs).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use sandpit_image::{ImageConfig, ImageError};
use tar::{EntryType, Header};

use crate::common::*;

fn lsetxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr {name} on {}", path.display());
}

fn set_mtime(path: &Path) {
    let t = nix::sys::time::TimeSpec::new(MTIME as i64, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn own(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
}

fn file(path: &Path, data: &[u8], mode: u32, id: u32) {
    fs::write(path, data).unwrap();
    own(path, id);
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    set_mtime(path);
}

/// An upper dir as a sandbox leaves it (ids shifted): files, a setuid
/// binary with a second hard link, an opaque directory, a whiteout of a
/// lower file, hostile symlinks, a FIFO.
fn sandbox_upper(dir: &Path) -> std::path::PathBuf {
    let upper = dir.join("upper");
    fs::create_dir(&upper).unwrap();
    file(&upper.join("a.txt"), b"hello", 0o644, BASE);
    fs::create_dir(upper.join("bin")).unwrap();
    file(&upper.join("bin/tool"), b"#!x", 0o4755, BASE);
    fs::hard_link(upper.join("bin/tool"), upper.join("bin/tool2")).unwrap();
    fs::create_dir(upper.join("etc")).unwrap();
    lsetxattr(&upper.join("etc"), "trusted.overlay.opaque", b"y");
    file(&upper.join("etc/conf"), b"x=1", 0o600, BASE + 1000);
    lsetxattr(&upper.join("etc/conf"), "user.note", b"hi");
    // Overlay metadata of a copied-up file: never carried into a layer.
    lsetxattr(&upper.join("etc/conf"), "trusted.overlay.origin", b"junk");
    nix::unistd::mkfifo(
        &upper.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &upper.join("gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    own(&upper.join("gone"), BASE);
    std::os::unix::fs::symlink("/etc/shadow", upper.join("host")).unwrap();
    std::os::unix::fs::symlink("../../../..", upper.join("up")).unwrap();
    for p in ["host", "up"] {
        own(&upper.join(p), BASE);
        set_mtime(&upper.join(p));
    }
    for d in ["bin", "etc"] {
        own(&upper.join(d), BASE);
        fs::set_permissions(upper.join(d), fs::Permissions::from_mode(0o755)).unwrap();
        set_mtime(&upper.join(d));
    }
    upper
}

/// The OCI layer tar of [`sandbox_upper`], written out by hand.
fn expected_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind, mode, id, size| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(id);
        h.set_gid(id);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    };
    let marker = || {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0);
        h.set_mtime(0);
        h.set_size(0);
        h
    };
    let empty: &[u8] = &[];
    b.append_data(
        &mut header(EntryType::Regular, 0o644, 0, 5),
        "a.txt",
        &b"hello"[..],
    )
    .unwrap();
    b.append_data(&mut header(EntryType::Directory, 0o755, 0, 0), "bin", empty)
        .unwrap();
    b.append_data(
        &mut header(EntryType::Regular, 0o4755, 0, 3),
        "bin/tool",
        &b"#!x"[..],
    )
    .unwrap();
    b.append_link(
        &mut header(EntryType::Link, 0o4755, 0, 0),
        "bin/tool2",
        "bin/tool",
    )
    .unwrap();
    b.append_data(&mut header(EntryType::Directory, 0o755, 0, 0), "etc", empty)
        .unwrap();
    b.append_data(&mut marker(), "etc/.wh..wh..opq", empty)
        .unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"hi"[..])])
        .unwrap();
    b.append_data(
        &mut header(EntryType::Regular, 0o600, 1000, 3),
        "etc/conf",
        &b"x=1"[..],
    )
    .unwrap();
    b.append_data(&mut marker(), ".wh.gone", empty).unwrap();
    b.append_link(
        &mut header(EntryType::Symlink, 0o777, 0, 0),
        "host",
        "/etc/shadow",
    )
    .unwrap();
    b.append_link(
        &mut header(EntryType::Symlink, 0o777, 0, 0),
        "up",
        "../../../..",
    )
    .unwrap();
    b.into_inner().unwrap()
}

#[test]
fn commit_copies_the_upper_dir_and_hashes_its_oci_tar() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let upper = sandbox_upper(dir.path());
    let committed = store.commit_layer(&upper).unwrap();
    let tar = expected_tar();
    assert_eq!(committed.layer.diff_id, sha256(&tar));
    assert_eq!(committed.layer.size, 11);
    assert_eq!(committed.entries, 9, "the FIFO is left out");
    assert_eq!(committed.skipped, 1);
    assert!(!committed.deduplicated);
    assert!(tmp_is_empty(&store));

    let root = store.layer_path(&committed.layer.diff_id);
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(fs::read(root.join("a.txt")).unwrap(), b"hello");
    assert_eq!(
        (meta("a.txt").uid(), meta("a.txt").mode() & 0o7777),
        (BASE, 0o644)
    );
    assert_eq!(meta("a.txt").mtime(), MTIME as i64);
    assert_eq!(meta("bin/tool").mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(
        meta("bin/tool").ino(),
        meta("bin/tool2").ino(),
        "hard link kept"
    );
    assert_eq!(meta("etc/conf").uid(), BASE + 1000);
    assert_eq!(
        meta("etc").mtime(),
        MTIME as i64,
        "directory mtime set last"
    );
    assert_eq!(
        getxattr(&root.join("etc"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        getxattr(&root.join("etc/conf"), "user.note").as_deref(),
        Some(&b"hi"[..])
    );
    assert_eq!(
        getxattr(&root.join("etc/conf"), "trusted.overlay.origin"),
        None
    );
    let gone = meta("gone");
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "whiteout kept"
    );
    // Symlinks are copied as links, never followed.
    assert!(meta("host").file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("host")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(
        fs::read_link(root.join("up")).unwrap(),
        Path::new("../../../..")
    );
    assert!(fs::symlink_metadata(root.join("fifo")).is_err());

    // The tar is a layer the unpacker takes, to the same diff id.
    let other = open(&dir.path().join("other"));
    let imported = other
        .import_layer(&tar[..], sandpit_image::Compression::None, None, 1 << 20)
        .unwrap();
    assert_eq!(imported.diff_id, committed.layer.diff_id);
}

#[test]
fn the_same_upper_twice_is_one_layer() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let upper = sandbox_upper(dir.path());
    let first = store.commit_layer(&upper).unwrap();
    let second = store.commit_layer(&upper).unwrap();
    assert_eq!(first.layer, second.layer);
    assert!(second.deduplicated);
    assert_eq!(layer_count(&store), 1);
    assert!(tmp_is_empty(&store));
    // A change makes another layer.
    fs::write(upper.join("a.txt"), b"changed").unwrap();
    let third = store.commit_layer(&upper).unwrap();
    assert_ne!(third.layer.diff_id, first.layer.diff_id);
    assert_eq!(layer_count(&store), 2);
}

#[test]
fn commit_makes_an_image_on_its_base_that_gc_keeps() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let base_tar = TarBuilder::new()
        .file("keep.txt", b"k")
        .file("del.txt", b"d")
        .finish();
    let config = ImageConfig {
        cmd: vec!["sh".into()],
        ..Default::default()
    };
    let base = store
        .import_rootfs_tar(&reference("base:1"), &base_tar[..], config.clone())
        .unwrap();
    let upper = dir.path().join("upper");
    fs::create_dir(&upper).unwrap();
    file(&upper.join("new.txt"), b"n", 0o644, BASE);
    nix::sys::stat::mknod(
        &upper.join("del.txt"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let (image, committed) = store.commit(&base, &upper, &reference("child:1")).unwrap();
    assert_eq!(
        image.layers,
        vec![base.layers[0].clone(), committed.layer.diff_id.clone()]
    );
    assert_eq!(image.config, config);
    assert_eq!(image.reference, "docker.io/library/child:1");
    assert_eq!(store.get(&reference("child:1")).unwrap(), image);
    assert_eq!(
        store.lower_dirs(&image)[0],
        store.layer_path(&committed.layer.diff_id)
    );
    assert!(store.gc(&Default::default()).unwrap().is_empty());
    // Without the record the committed layer goes like any other.
    store.remove(&reference("child:1")).unwrap();
    assert!(!store.has_layer(&committed.layer.diff_id));
    assert!(store.has_layer(&base.layers[0]));
}

#[test]
fn overlay_redirects_are_refused_and_leave_nothing() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let upper = dir.path().join("upper");
    fs::create_dir_all(upper.join("moved")).unwrap();
    lsetxattr(&upper.join("moved"), "trusted.overlay.redirect", b"/orig");
    match store.commit_layer(&upper) {
        Err(ImageError::BadEntry { path, .. }) => assert_eq!(path, "moved"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(layer_count(&store), 0);
    assert!(tmp_is_empty(&store));
}
