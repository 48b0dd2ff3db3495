//! `LocalBlobStore` with `snapshot_dir` / `restore_dir`: round trip,
//! tamper, dedup, delete/list.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use sandpit_image::Digest;
use sandpit_snapshot::{
    archive, restore_dir, snapshot_dir, BlobRef, BlobStore, Limits, LocalBlobStore, SnapshotError,
};

fn store(root: &Path) -> LocalBlobStore {
    LocalBlobStore::open(&root.join("blobs")).unwrap()
}

fn is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn snapshot_and_restore_round_trip() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    sample_tree(&src, SHIFT_A);
    let store = store(tmp.path());
    assert_eq!(store.location(), "local");
    let limits = Limits::default();
    let (blob, stats) = snapshot_dir(&src, SHIFT_A, &limits, &store, &store.staging_dir()).unwrap();
    assert_eq!(stats.files, 7);
    assert!(
        is_empty(&store.staging_dir()),
        "the staged file was consumed"
    );
    let path = store.blob_path(&blob.digest);
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), blob.size);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(Digest::sha256_of(&fs::read(&path).unwrap()), blob.digest);
    assert!(store.exists(&blob.digest).unwrap());

    let dst = tmp.path().join("dst");
    fs::create_dir(&dst).unwrap();
    let restored = restore_dir(&store, &blob, &dst, SHIFT_B, &limits).unwrap();
    assert_eq!(restored.files, stats.files);
    assert_eq!(describe(&src, SHIFT_A.base), describe(&dst, SHIFT_B.base));

    // A second restore into the now full directory is refused up front.
    assert!(matches!(
        restore_dir(&store, &blob, &dst, SHIFT_B, &limits),
        Err(SnapshotError::NotEmpty { .. })
    ));
}

#[test]
fn a_tampered_blob_is_refused_and_leaves_the_directory_empty() {
    if skip_unless_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    sample_tree(&src, SHIFT_A);
    let store = store(tmp.path());
    let limits = Limits::default();
    let (blob, _) = snapshot_dir(&src, SHIFT_A, &limits, &store, &store.staging_dir()).unwrap();
    let path = store.blob_path(&blob.digest);
    let original = fs::read(&path).unwrap();

    // One flipped byte, at several places (header area, content, end).
    for at in [20, original.len() / 2, original.len() - 3] {
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let dst = tmp.path().join(format!("dst-{at}"));
        fs::create_dir(&dst).unwrap();
        match restore_dir(&store, &blob, &dst, SHIFT_B, &limits) {
            Err(SnapshotError::DigestMismatch { digest, .. }) => assert_eq!(digest, blob.digest),
            other => panic!("byte {at}: {other:?}"),
        }
        assert!(is_empty(&dst), "byte {at}: the directory was emptied");
    }

    // A valid archive of another tree under this blob's name: it unpacks
    // completely before the digest is known, then everything is removed.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::create_dir(other.join("dir")).unwrap();
    fs::write(other.join("dir/evil"), b"planted").unwrap();
    let mut forged = Vec::new();
    archive(&other, SHIFT_A, &limits, &mut forged).unwrap();
    fs::write(&path, &forged).unwrap();
    for size in [blob.size, forged.len() as u64] {
        let dst = tmp.path().join(format!("dst-forged-{size}"));
        fs::create_dir(&dst).unwrap();
        let claimed = BlobRef {
            digest: blob.digest.clone(),
            size,
        };
        assert!(matches!(
            restore_dir(&store, &claimed, &dst, SHIFT_B, &limits),
            Err(SnapshotError::DigestMismatch { .. })
        ));
        assert!(is_empty(&dst));
    }

    // Reading the blob directly fails at EOF too.
    let mut reader = store.open(&blob).unwrap();
    let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
    assert!(matches!(
        SnapshotError::from_io_ref(&err),
        Some(SnapshotError::DigestMismatch { .. })
    ));

    // Restored, the blob restores again.
    fs::write(&path, &original).unwrap();
    let dst = tmp.path().join("dst-ok");
    fs::create_dir(&dst).unwrap();
    restore_dir(&store, &blob, &dst, SHIFT_B, &limits).unwrap();
}

#[test]
fn dedup_delete_and_list() {
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    for (dir, content) in [(&one, "1"), (&two, "2")] {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("f"), content).unwrap();
        set_mtime(&dir.join("f"), 7);
        set_mtime(dir, 7);
    }
    let store = store(tmp.path());
    // Ids as they are on this host: out of range, archived as nobody.
    let shift = SHIFT_A;
    let limits = Limits::default();
    let staging = store.staging_dir();
    let (a, _) = snapshot_dir(&one, shift, &limits, &store, &staging).unwrap();
    let blob_path = store.blob_path(&a.digest);
    let first = fs::metadata(&blob_path).unwrap();
    let (again, _) = snapshot_dir(&one, shift, &limits, &store, &staging).unwrap();
    assert_eq!(again, a, "the same tree is the same blob");
    let second = fs::metadata(&blob_path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(first.ino(), second.ino(), "kept, not replaced");
    assert!(is_empty(&staging), "the duplicate staged file was dropped");
    let (b, _) = snapshot_dir(&two, shift, &limits, &store, &staging).unwrap();
    assert_ne!(a.digest, b.digest);

    let mut want = vec![a.digest.clone(), b.digest.clone()];
    want.sort();
    // A stray file in the blob directory is no blob.
    fs::write(blob_path.with_file_name("junk"), b"").unwrap();
    assert_eq!(store.list().unwrap(), want);

    store.delete(&a.digest).unwrap();
    store.delete(&a.digest).unwrap();
    assert!(!store.exists(&a.digest).unwrap());
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&b.digest));
    assert!(matches!(
        store.open(&a),
        Err(SnapshotError::NotFound { .. })
    ));

    // Leftovers in staging are cleared when the store is opened again.
    fs::write(staging.join("leftover"), b"x").unwrap();
    let reopened = LocalBlobStore::open(&tmp.path().join("blobs")).unwrap();
    assert!(is_empty(&reopened.staging_dir()));
    assert_eq!(reopened.list().unwrap(), [b.digest]);
}

#[test]
fn a_failed_snapshot_leaves_no_staged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), vec![1; 100]).unwrap();
    let store = store(tmp.path());
    let limits = Limits {
        max_content_bytes: 10,
        ..Limits::default()
    };
    assert!(matches!(
        snapshot_dir(&src, SHIFT_A, &limits, &store, &store.staging_dir()),
        Err(SnapshotError::TooLarge { limit: 10 })
    ));
    assert!(is_empty(&store.staging_dir()));
    assert!(store.list().unwrap().is_empty());
}
