//! `unarchive` of crafted archives: nothing lands outside the directory,
//! nothing is written through a symlink, limits hold.

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;

use common::*;
use sandpit_snapshot::{unarchive, Limits, SnapshotError};
use tar::{EntryType, Header};

enum E<'a> {
    Dir(&'a [u8]),
    File(&'a [u8], &'a [u8]),
    /// A file whose header claims `size` bytes of zeros.
    Big(&'a [u8], u64),
    Symlink(&'a [u8], &'a [u8]),
    HardLink(&'a [u8], &'a [u8]),
    Fifo(&'a [u8]),
}

/// A zstd tar of `entries`, names written raw (no validation by `tar`).
fn craft(entries: &[E<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_ustar();
        let (kind, name, link, size): (_, &[u8], Option<&[u8]>, u64) = match e {
            E::Dir(n) => (EntryType::Directory, n, None, 0),
            E::File(n, d) => (EntryType::Regular, n, None, d.len() as u64),
            E::Big(n, s) => (EntryType::Regular, n, None, *s),
            E::Symlink(n, t) => (EntryType::Symlink, n, Some(t), 0),
            E::HardLink(n, t) => (EntryType::Link, n, Some(t), 0),
            E::Fifo(n) => (EntryType::Fifo, n, None, 0),
        };
        h.set_entry_type(kind);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h.set_cksum();
        match e {
            E::File(_, d) => tar.append(&h, *d).unwrap(),
            E::Big(_, s) => tar.append(&h, std::io::repeat(0).take(*s)).unwrap(),
            _ => tar.append(&h, std::io::empty()).unwrap(),
        }
    }
    zstd::encode_all(tar.into_inner().unwrap().as_slice(), 1).unwrap()
}

/// Unpacks `archive` into a fresh `<tmp>/box/dst` and checks that nothing
/// appeared next to it.
fn refused(archive: &[u8], limits: &Limits) -> SnapshotError {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("box");
    let dst = outer.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let err = unarchive(archive, &dst, SHIFT_B, limits).unwrap_err();
    let outside: Vec<_> = fs::read_dir(&outer)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["dst"], "nothing next to the directory");
    assert_eq!(
        fs::read_dir(&target).unwrap().count(),
        0,
        "nothing through a link"
    );
    assert!(!Path::new("/x").exists() && !Path::new("/abs-sandpit-test").exists());
    err
}

fn bad_reason(e: SnapshotError) -> &'static str {
    match e {
        SnapshotError::BadEntry { reason, .. } => reason,
        other => panic!("not a bad entry: {other:?}"),
    }
}

#[test]
fn refuses_dotdot_absolute_and_odd_names() {
    if skip_unless_root() {
        return;
    }
    let l = Limits::default();
    for (name, want) in [
        (&b"../x"[..], ".."),
        (b"a/../../x", ".."),
        (b"/abs-sandpit-test", "absolute"),
        (b"a//b", "empty"),
    ] {
        let reason = bad_reason(refused(&craft(&[E::Dir(b"a/"), E::File(name, b"pwn")]), &l));
        assert!(reason.contains(want), "{name:?}: {reason}");
    }
}

#[test]
fn refuses_writing_through_a_symlink() {
    if skip_unless_root() {
        return;
    }
    let l = Limits::default();
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let t = target.to_str().unwrap().as_bytes();
    // A symlink to a directory outside, then a file through it.
    let err = refused(&craft(&[E::Symlink(b"l", t), E::File(b"l/x", b"pwn")]), &l);
    assert_eq!(bad_reason(err), "path goes through a symlink");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    // A symlink, then a file of the same name (would open through it).
    let err = refused(
        &craft(&[E::Symlink(b"l", b"../target/f"), E::File(b"l", b"pwn")]),
        &l,
    );
    assert_eq!(bad_reason(err), "duplicate entry");
    // A symlink inside the tree, then a directory entry through it.
    let err = refused(
        &craft(&[E::Dir(b"d/"), E::Symlink(b"l", b"d"), E::Dir(b"l/e/")]),
        &l,
    );
    assert_eq!(bad_reason(err), "path goes through a symlink");
    // A file, then a child of it.
    let err = refused(&craft(&[E::File(b"f", b""), E::File(b"f/x", b"")]), &l);
    assert_eq!(bad_reason(err), "parent is not a directory");
    // A child whose parent never came.
    let err = refused(&craft(&[E::File(b"nope/x", b"")]), &l);
    assert_eq!(bad_reason(err), "parent directory missing");
}

#[test]
fn refuses_links_out_of_the_tree_and_special_files() {
    if skip_unless_root() {
        return;
    }
    let l = Limits::default();
    for archive in [
        craft(&[E::HardLink(b"passwd", b"/etc/passwd")]),
        craft(&[E::HardLink(b"up", b"../x")]),
        craft(&[E::File(b"f", b"x"), E::HardLink(b"g", b"f")]),
    ] {
        assert_eq!(bad_reason(refused(&archive, &l)), "hard link");
    }
    assert_eq!(
        bad_reason(refused(&craft(&[E::Fifo(b"p")]), &l)),
        "unsupported entry type"
    );
    assert_eq!(
        bad_reason(refused(&craft(&[E::File(b"./", b"")]), &l)),
        "the root must be a directory"
    );
}

#[test]
fn refuses_content_entries_and_depth_over_the_limits() {
    if skip_unless_root() {
        return;
    }
    let limits = Limits {
        max_content_bytes: 1000,
        max_entries: 5,
        max_depth: 2,
    };
    // One file over the limit: refused before a byte is written.
    assert!(matches!(
        refused(&craft(&[E::Big(b"big", 1 << 24)]), &limits),
        SnapshotError::TooLarge { limit: 1000 }
    ));
    // Several files that add up past it.
    assert!(matches!(
        refused(&craft(&[E::Big(b"a", 600), E::Big(b"b", 600)]), &limits),
        SnapshotError::TooLarge { limit: 1000 }
    ));
    assert!(matches!(
        refused(
            &craft(&[
                E::File(b"1", b""),
                E::File(b"2", b""),
                E::File(b"3", b""),
                E::File(b"4", b""),
                E::File(b"5", b""),
                E::File(b"6", b"")
            ]),
            &limits
        ),
        SnapshotError::TooManyEntries { limit: 5 }
    ));
    assert!(matches!(
        refused(
            &craft(&[E::Dir(b"a/"), E::Dir(b"a/b/"), E::Dir(b"a/b/c/")]),
            &limits
        ),
        SnapshotError::TooDeep { limit: 2 }
    ));
    // At the limits: fine.
    let tmp = tempfile::tempdir().unwrap();
    let ok = craft(&[
        E::Dir(b"a/"),
        E::Dir(b"a/b/"),
        E::File(b"a/b/f", &[7; 1000]),
    ]);
    let stats = unarchive(ok.as_slice(), tmp.path(), SHIFT_B, &limits).unwrap();
    assert_eq!((stats.dirs, stats.files, stats.content_bytes), (2, 1, 1000));
    assert_eq!(fs::read(tmp.path().join("a/b/f")).unwrap(), [7; 1000]);
}

#[test]
fn refuses_a_non_empty_directory() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("x"), b"").unwrap();
    let archive = craft(&[E::File(b"y", b"")]);
    assert!(matches!(
        unarchive(archive.as_slice(), tmp.path(), SHIFT_B, &Limits::default()),
        Err(SnapshotError::NotEmpty { .. })
    ));
    assert!(!tmp.path().join("y").exists());
}
