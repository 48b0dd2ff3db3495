//! Unpacking: every entry kind, shifted ownership, and hostile tars
//! (`..`, symlinks, hard links, devices, whiteouts, later entries).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use sandpit_image::{ImageConfig, ImageError};

use crate::common::*;

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
