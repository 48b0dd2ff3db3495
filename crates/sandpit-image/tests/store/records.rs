//! Image records, tags, removal and gc, reopening, and the on-disk format
//! of existing stores.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use sandpit_image::Digest as ImageDigest;
use sandpit_image::{Compression, IdShift, ImageConfig, ImageError, ImageStore};
use sha2::{Digest, Sha256};

use crate::common::*;

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
