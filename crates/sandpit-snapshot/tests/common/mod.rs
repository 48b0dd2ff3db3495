//! Helpers shared by the snapshot tests: building trees with chosen
//! owners, modes and mtimes, and describing a tree for comparison.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sandpit_image::IdShift;

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Returns true (and says why) when the test cannot run: unarchiving
/// chowns, which needs root.
pub fn skip_unless_root() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root (restores chown to shifted ids)");
        return true;
    }
    false
}

pub const SHIFT_A: IdShift = IdShift {
    base: 100_000,
    count: 65536,
};
pub const SHIFT_B: IdShift = IdShift {
    base: 300_000,
    count: 65536,
};

/// Reproducible bytes: xorshift64*, `n` of them.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

pub fn set_mtime(path: &Path, secs: i64) {
    let t = TimeSpec::new(secs, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

pub fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// What a tree holds, per relative path ("" for the root): kind, mode,
/// owner, mtime and content or target. Ids are given relative to `base`.
pub fn describe(root: &Path, base: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, base, &mut out);
    out
}

fn walk(root: &Path, path: &Path, base: u32, out: &mut BTreeMap<String, String>) {
    let meta = fs::symlink_metadata(path).unwrap();
    let rel = path
        .strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let id = |i: u32| i64::from(i) - i64::from(base);
    let head = format!(
        "{:o} {}:{} {}",
        meta.mode(),
        id(meta.uid()),
        id(meta.gid()),
        meta.mtime()
    );
    let ft = meta.file_type();
    let what = if ft.is_symlink() {
        format!(
            "link {head} -> {}",
            fs::read_link(path).unwrap().to_string_lossy()
        )
    } else if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for child in names {
            walk(root, &child, base, out);
        }
        format!("dir {head}")
    } else if ft.is_file() {
        let data = fs::read(path).unwrap();
        format!(
            "file {head} {} {}",
            data.len(),
            sandpit_image::Digest::sha256_of(&data)
        )
    } else {
        format!("other {head}")
    };
    out.insert(rel, what);
}

/// A tree with files, modes, owners (shifted by `shift`), mtimes,
/// symlinks, long names, an empty directory and a hard link.
pub fn sample_tree(root: &Path, shift: IdShift) {
    let host = |id: u32| shift.base + id;
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir(root.join("empty")).unwrap();
    fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    fs::write(root.join("a/data.bin"), noise(1, 300_000)).unwrap();
    fs::write(root.join("a/b/c/deep.txt"), b"deep").unwrap();
    fs::write(root.join("a/setuid"), b"#!/bin/sh\n").unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    fs::hard_link(root.join("hello.txt"), root.join("a/hello-link")).unwrap();
    let long_dir = root.join("l".repeat(90));
    fs::create_dir(&long_dir).unwrap();
    fs::write(long_dir.join("n".repeat(120)), b"long name").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("a/rel-link")).unwrap();
    std::os::unix::fs::symlink("t".repeat(150), root.join("long-target")).unwrap();
    std::os::unix::fs::symlink("dangling/nowhere", root.join("dangling")).unwrap();

    chmod(&root.join("hello.txt"), 0o640);
    chmod(&root.join("a/setuid"), 0o4755);
    chmod(&root.join("a/b"), 0o710);
    chmod(&root.join("empty"), 0o1777);
    for (path, uid, gid) in [
        ("", 0, 0),
        ("hello.txt", 1000, 1001),
        ("a", 1000, 1000),
        ("a/data.bin", 0, 0),
        ("a/setuid", 0, 50),
        ("a/b", 2, 3),
        ("a/b/c", 2, 3),
        ("a/b/c/deep.txt", 65000, 65001),
        ("abs-link", 1000, 1000),
        ("a/rel-link", 7, 8),
        ("long-target", 0, 0),
        ("dangling", 0, 0),
        ("empty", 0, 0),
        ("zero", 0, 0),
    ] {
        chown(&root.join(path), host(uid), host(gid));
    }
    chown(&long_dir, host(0), host(0));
    chown(&long_dir.join("n".repeat(120)), host(5), host(5));
    // chown cleared setuid.
    chmod(&root.join("a/setuid"), 0o4755);
    // Children first: setting a file's mtime leaves its directory's alone,
    // creating one does not.
    for (i, path) in [
        "a/b/c/deep.txt",
        "a/data.bin",
        "a/setuid",
        "hello.txt",
        "zero",
        "abs-link",
        "a/rel-link",
        "long-target",
        "dangling",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&root.join(path), 1_600_000_000 + i as i64);
    }
    set_mtime(&long_dir.join("n".repeat(120)), 1_500_000_000);
    for (i, path) in ["a/b/c", "a/b", "a", "empty"].iter().enumerate() {
        set_mtime(&root.join(path), 1_700_000_000 + i as i64);
    }
    set_mtime(&long_dir, 1_650_000_000);
    set_mtime(root, 1_234_567_890);
}

/// The entry names of a snapshot archive, in order.
pub fn entry_names(archive: &[u8]) -> Vec<String> {
    let decoder = zstd::Decoder::new(archive).unwrap();
    let mut tar = tar::Archive::new(decoder);
    tar.entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect()
}
