//! `archive` / `unarchive`: round trips, determinism, hostile trees.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use sandpit_snapshot::{archive, unarchive, ArchiveStats, Limits, SnapshotError};

fn pack(dir: &Path, limits: &Limits) -> Result<(Vec<u8>, ArchiveStats), SnapshotError> {
    let mut out = Vec::new();
    let stats = archive(dir, SHIFT_A, limits, &mut out)?;
    Ok((out, stats))
}

#[test]
fn round_trip_keeps_content_modes_mtimes_links_and_shifts_ids() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    sample_tree(&src, SHIFT_A);
    // An id outside the shift range (host root) is archived as nobody.
    fs::write(src.join("host-owned"), b"x").unwrap();
    chown(&src.join("host-owned"), 0, 0);
    set_mtime(&src.join("host-owned"), 1_111_111_111);
    set_mtime(&src, 1_234_567_890);

    let (bytes, stats) = pack(&src, &Limits::default()).unwrap();
    assert_eq!(stats.files, 8, "{stats:?}");
    assert_eq!(stats.dirs, 6, "{stats:?}");
    assert_eq!(stats.symlinks, 4, "{stats:?}");
    assert_eq!(stats.skipped, 0);
    assert_eq!(stats.unmapped_ids, 1);
    assert_eq!(stats.content_bytes, 6 + 300_000 + 4 + 10 + 6 + 9 + 1);
    // Ids in the archive are the container's: unshifted.
    let decoder = zstd::Decoder::new(bytes.as_slice()).unwrap();
    let mut tar = tar::Archive::new(decoder);
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        match name.as_str() {
            "hello.txt" => assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (1000, 1001)),
            "host-owned" => assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (65534, 65534)),
            _ => assert!(h.uid().unwrap() < 65536, "{name}"),
        }
    }

    let dst = tmp.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let restored = unarchive(bytes.as_slice(), &dst, SHIFT_B, &Limits::default()).unwrap();
    assert_eq!(restored.files, stats.files);
    assert_eq!(restored.dirs, stats.dirs);
    assert_eq!(restored.symlinks, stats.symlinks);
    assert_eq!(restored.content_bytes, stats.content_bytes);

    // Everything but the host-owned file matches, ids relative to each base.
    let mut want = describe(&src, SHIFT_A.base);
    let got = describe(&dst, SHIFT_B.base);
    let host_owned = want.remove("host-owned").unwrap();
    assert!(host_owned.contains(" -100000:-100000 "), "{host_owned}");
    assert_eq!(
        got["host-owned"],
        host_owned.replace(" -100000:-100000 ", " 65534:65534 ")
    );
    for (path, what) in &want {
        assert_eq!(got.get(path), Some(what), "{path}");
    }
    assert_eq!(got.len(), want.len() + 1);

    // Symlinks stay links (never followed), the hard link became a copy.
    let link = fs::symlink_metadata(dst.join("abs-link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        fs::read_link(dst.join("long-target")).unwrap(),
        Path::new(&"t".repeat(150))
    );
    let copy = fs::metadata(dst.join("a/hello-link")).unwrap();
    assert_eq!(copy.nlink(), 1);
    assert_eq!(fs::read(dst.join("a/hello-link")).unwrap(), b"hello\n");
    let setuid = fs::metadata(dst.join("a/setuid")).unwrap();
    assert_eq!(setuid.mode() & 0o7777, 0o4755);
    assert_eq!(setuid.uid(), SHIFT_B.base);

    // Back again with the other shift: the same bytes.
    let mut again = Vec::new();
    archive(&dst, SHIFT_B, &Limits::default(), &mut again).unwrap();
    assert_eq!(again, bytes, "B -> archive is the same as A -> archive");
}

#[test]
fn same_tree_same_bytes_different_tree_different_bytes() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    fs::create_dir(&one).unwrap();
    fs::create_dir(&two).unwrap();
    sample_tree(&one, SHIFT_A);
    // The same content created in another order (other inode and
    // directory order).
    for name in ["z", "m", "a", "q"] {
        fs::write(one.join(format!("x-{name}")), name).unwrap();
        set_mtime(&one.join(format!("x-{name}")), 5);
    }
    sample_tree(&two, SHIFT_A);
    for name in ["q", "a", "z", "m"] {
        fs::write(two.join(format!("x-{name}")), name).unwrap();
        set_mtime(&two.join(format!("x-{name}")), 5);
    }
    for (dir, ids) in [(&one, SHIFT_A.base), (&two, SHIFT_A.base)] {
        for name in ["z", "m", "a", "q"] {
            chown(&dir.join(format!("x-{name}")), ids, ids);
        }
        set_mtime(dir, 42);
    }
    let limits = Limits::default();
    let (a1, _) = pack(&one, &limits).unwrap();
    let (a2, _) = pack(&one, &limits).unwrap();
    let (b, _) = pack(&two, &limits).unwrap();
    assert_eq!(a1, a2, "twice the same tree");
    assert_eq!(a1, b, "the same tree built in another order");
    let names = entry_names(&a1);
    let mut sorted_top: Vec<_> = names.iter().filter(|n| !n.contains('/')).collect();
    let copy = sorted_top.clone();
    sorted_top.sort();
    assert_eq!(copy, sorted_top, "top-level names in byte order");
    assert_eq!(names[0], "./");

    // One byte, one mode bit, one mtime, one owner: each changes the bytes.
    let base = a1;
    let changes: [&dyn Fn(); 4] = [
        &|| fs::write(two.join("x-q"), "Q").unwrap(),
        &|| chmod(&two.join("x-a"), 0o600),
        &|| set_mtime(&two.join("x-m"), 6),
        &|| chown(&two.join("x-z"), SHIFT_A.base + 1, SHIFT_A.base),
    ];
    let mut seen = vec![base.clone()];
    for change in changes {
        change();
        // Writing a file changes its directory's mtime only when created.
        set_mtime(&two, 42);
        let (changed, _) = pack(&two, &limits).unwrap();
        assert!(!seen.contains(&changed), "a change must change the archive");
        seen.push(changed);
    }
}

#[test]
fn symlinks_are_never_followed_and_loops_are_harmless() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    std::os::unix::fs::symlink("/etc", src.join("etc")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("passwd")).unwrap();
    std::os::unix::fs::symlink("loop-b", src.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", src.join("loop-b")).unwrap();
    std::os::unix::fs::symlink("self", src.join("self")).unwrap();
    std::os::unix::fs::symlink(".", src.join("dot")).unwrap();
    let (bytes, stats) = pack(&src, &Limits::default()).unwrap();
    assert_eq!(stats.symlinks, 6);
    assert_eq!(stats.files, 0);
    assert_eq!(stats.dirs, 1);
    assert_eq!(stats.content_bytes, 0);
    assert_eq!(
        entry_names(&bytes),
        ["./", "dot", "etc", "loop-a", "loop-b", "passwd", "self"]
    );

    // The root itself must not be a symlink either.
    let link = tmp.path().join("root-link");
    std::os::unix::fs::symlink(&src, &link).unwrap();
    match pack(&link, &Limits::default()) {
        Err(SnapshotError::Io { op: "open", .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn bounded_depth_entries_and_content() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut deep = src.clone();
    for i in 0..6 {
        deep.push(format!("d{i}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f"), b"0123456789").unwrap();
    let limits = |depth, entries, bytes| Limits {
        max_depth: depth,
        max_entries: entries,
        max_content_bytes: bytes,
    };
    // Six directories below the root, a file in the deepest: 8 entries.
    let (_, stats) = pack(&src, &limits(6, 8, 10)).unwrap();
    assert_eq!((stats.dirs, stats.files), (7, 1));
    assert!(matches!(
        pack(&src, &limits(5, 100, 100)),
        Err(SnapshotError::TooDeep { limit: 5 })
    ));
    assert!(matches!(
        pack(&src, &limits(6, 7, 100)),
        Err(SnapshotError::TooManyEntries { limit: 7 })
    ));
    assert!(matches!(
        pack(&src, &limits(6, 8, 9)),
        Err(SnapshotError::TooLarge { limit: 9 })
    ));

    // Far deeper than the limit (past PATH_MAX): refused, not a stack
    // overflow, and the walk needs no long paths.
    let hostile = tmp.path().join("hostile");
    fs::create_dir(&hostile).unwrap();
    let dir = fs::File::open(&hostile).unwrap();
    let mut fd: std::os::fd::OwnedFd = dir.into();
    for _ in 0..300 {
        let name = "x".repeat(200);
        nix::sys::stat::mkdirat(
            &fd,
            name.as_str(),
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        )
        .unwrap();
        fd = nix::fcntl::openat(
            &fd,
            name.as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
    }
    assert!(matches!(
        pack(&hostile, &Limits::default()),
        Err(SnapshotError::TooDeep { limit: 128 })
    ));
    // Whatever the limit says, the recursive walk stops at 256 levels,
    // inside a 2 MiB stack (tokio's blocking pool threads).
    let unbounded = Limits {
        max_depth: u32::MAX,
        ..Limits::default()
    };
    let walk = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn({
            let hostile = hostile.clone();
            move || pack(&hostile, &unbounded).map(|_| ())
        })
        .unwrap();
    assert!(matches!(
        walk.join().unwrap(),
        Err(SnapshotError::TooDeep { limit: 256 })
    ));
    // remove_dir_all works by directory fds too.
    fs::remove_dir_all(&hostile).unwrap();
    assert!(!hostile.exists());
}

#[test]
fn fifos_and_sockets_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    fs::write(src.join("file"), b"f").unwrap();
    // A writer-less fifo would block an open without O_NONBLOCK: this must
    // return.
    let (bytes, stats) = pack(&src, &Limits::default()).unwrap();
    assert_eq!(stats.skipped, 2);
    assert_eq!(stats.files, 1);
    assert_eq!(entry_names(&bytes), ["./", "file"]);
}
