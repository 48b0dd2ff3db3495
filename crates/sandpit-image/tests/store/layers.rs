//! Importing layer blobs: compressions, digest and diff id checks, size
//! caps, truncation, concurrent imports.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use sandpit_image::Digest as ImageDigest;
use sandpit_image::{Compression, ImageConfig, ImageError};

use crate::common::*;

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
