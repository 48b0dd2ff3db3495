//! Images as registries serve them: layer formats and compressions, Docker
//! and OCI manifests, multi-arch indexes, pulls by digest, images pushed
//! by `skopeo`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use sandpit_image::Digest as ImageDigest;
use sandpit_registry::{Progress, PullErrorKind};

use crate::harness::*;

#[test]
fn multi_layer_image_with_whiteouts_and_every_compression() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let base = TarBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/motd", b"welcome")
        .file("gone", b"to be deleted")
        .dir("var/cache/", 0o755)
        .file("var/cache/old", b"stale")
        .file_owned("usr/bin/tool", b"#!/bin/sh\n", 0o4755, 1000, 1000)
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("usr/bin/alias", "tool")
        .pax("SCHILY.xattr.user.origin", b"registry-test")
        .file("tagged", b"x")
        .finish();
    let upper = TarBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.motd", b"")
        .file(".wh.gone", b"")
        .dir("var/cache/", 0o755)
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"fresh")
        .finish();
    let top = TarBuilder::new().file("srv/app", b"application").finish();
    let layers = vec![
        TestLayer::new(&base, Comp::Gzip),
        TestLayer::new(&upper, Comp::Zstd),
        TestLayer::new(&top, Comp::None),
    ];
    let image = TestImage::new(layers.clone(), true);
    let manifest_digest = pusher.image("multi/layers", "1", &image);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let events = Mutex::new(Vec::new());
    let reference = format!("{}/multi/layers:1", registry.addr);
    let pulled = puller
        .pull(&r(&reference), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(
        pulled.manifest_digest.as_ref().map(ImageDigest::as_str),
        Some(manifest_digest.as_str())
    );
    assert_eq!(
        pulled.layers,
        layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(pulled.config.env, ["PATH=/usr/bin:/bin", "GREETING=hello"]);
    assert_eq!(pulled.config.entrypoint, ["/bin/sh"]);
    assert_eq!(pulled.config.cmd, ["-c", "echo hi"]);
    assert_eq!(pulled.config.working_dir, "/srv");
    assert_eq!(pulled.config.user, "1000:1000");
    assert_eq!(env.store.get(&r(&reference)).unwrap(), pulled);

    // Bottom layer: modes, shifted ownership, links, xattrs.
    let lower = env.store.layer_path(&digest(&layers[0].diff_id));
    let tool = fs::symlink_metadata(lower.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!((tool.uid(), tool.gid()), (BASE + 1000, BASE + 1000));
    let tool2 = fs::symlink_metadata(lower.join("usr/bin/tool2")).unwrap();
    assert_eq!(tool2.ino(), tool.ino());
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        fs::read_link(lower.join("usr/bin/alias")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        getxattr(&lower.join("tagged"), "user.origin").as_deref(),
        Some(&b"registry-test"[..])
    );
    let etc = fs::symlink_metadata(lower.join("etc")).unwrap();
    assert_eq!((etc.uid(), etc.gid()), (BASE, BASE));
    // Middle layer: overlayfs whiteouts and opaque dir.
    let middle = env.store.layer_path(&digest(&layers[1].diff_id));
    for whiteout in ["etc/motd", "gone"] {
        let m = fs::symlink_metadata(middle.join(whiteout)).unwrap();
        assert!(m.file_type().is_char_device(), "{whiteout}");
        assert_eq!(m.rdev(), 0);
    }
    assert_eq!(
        getxattr(&middle.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(fs::read(middle.join("var/cache/new")).unwrap(), b"fresh");
    assert_eq!(
        fs::read(env.top(&pulled).join("srv/app")).unwrap(),
        b"application"
    );

    let events = events.into_inner().unwrap();
    match &events[0] {
        Progress::Resolved {
            endpoint,
            manifest_digest: digest,
            layers: infos,
        } => {
            assert_eq!(endpoint, &format!("http://{}", registry.addr));
            assert_eq!(digest, &manifest_digest);
            assert_eq!(infos.len(), 3);
            assert_eq!(infos[1].digest, layers[1].digest());
            assert_eq!(infos[1].size, layers[1].blob.len() as u64);
        }
        other => panic!("first event {other:?}"),
    }
    for (index, layer) in layers.iter().enumerate() {
        assert!(events.contains(&Progress::LayerDone { index }), "{index}");
        let total = layer.blob.len() as u64;
        assert!(
            events.contains(&Progress::LayerBytes {
                index,
                done: total,
                total
            }),
            "{index}"
        );
    }
    assert!(env.tmp_is_empty());

    // Pulled again: every layer is cached.
    let events = Mutex::new(Vec::new());
    puller
        .pull(&r(&reference), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    let events = events.into_inner().unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::LayerCached { .. }))
            .count(),
        3
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e, Progress::LayerBytes { .. })));
}

#[test]
fn docker_schema2_and_shared_layers() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(&registry.addr, ProxyOptions::default());
    let pusher = registry.pusher();
    let shared = TestLayer::new(&TarBuilder::new().file("shared", b"s").finish(), Comp::Gzip);
    let a = TestLayer::new(&TarBuilder::new().file("a", b"a").finish(), Comp::Gzip);
    let b = TestLayer::new(&TarBuilder::new().file("b", b"b").finish(), Comp::None);
    pusher.image(
        "docker/a",
        "1",
        &TestImage::new(vec![shared.clone(), a], false),
    );
    pusher.image(
        "docker/b",
        "1",
        &TestImage::new(vec![shared.clone(), b.clone()], false),
    );

    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let image_a = pull(&puller, &format!("{}/docker/a:1", proxy.addr)).unwrap();
    assert_eq!(env.layer_count(), 2);
    let image_b = pull(&puller, &format!("{}/docker/b:1", proxy.addr)).unwrap();
    assert_eq!(env.layer_count(), 3);
    assert_eq!(image_a.layers[0], image_b.layers[0]);
    assert_eq!(
        fs::read(
            env.store
                .layer_path(&digest(&shared.diff_id))
                .join("shared")
        )
        .unwrap(),
        b"s"
    );
    assert_eq!(fs::read(env.top(&image_b).join("b")).unwrap(), b"b");
    // The shared layer was downloaded once.
    assert_eq!(proxy.count(&format!("/blobs/{}", shared.digest())), 1);
    assert_eq!(proxy.count(&format!("/blobs/{}", b.digest())), 1);
    assert_eq!(env.store.list().unwrap().len(), 2);
}

#[test]
fn skopeo_pushed_busybox() {
    if !is_root() {
        return;
    }
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/busybox.tar");
    if !rootfs.exists() {
        eprintln!(
            "skipping: {} missing (scripts/build-test-images.sh)",
            rootfs.display()
        );
        return;
    }
    let registry = Registry::start();
    skopeo_push(&rootfs, &format!("{}/tools/busybox:1", registry.addr));
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let image = pull(&puller, &format!("{}/tools/busybox:1", registry.addr)).unwrap();
    assert_eq!(image.layers.len(), 1);
    let root = env.top(&image);
    let busybox = fs::symlink_metadata(root.join("bin/busybox")).unwrap();
    assert!(busybox.is_file());
    assert_eq!(busybox.uid(), BASE);
    assert!(fs::read(root.join("etc/passwd"))
        .unwrap()
        .starts_with(b"root:"));
}

#[test]
fn multi_arch_index_picks_the_host_platform() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layers = push_multi_arch(
        &pusher,
        "multi/arch",
        "1",
        &[("arm64", Some("v8")), ("amd64", None), ("s390x", None)],
    );
    push_multi_arch(
        &pusher,
        "multi/arch",
        "noamd64",
        &[("arm64", Some("v8")), ("s390x", None)],
    );
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let image = pull(&puller, &format!("{}/multi/arch:1", registry.addr)).unwrap();
    assert_eq!(image.layers, [layers[1].diff_id.clone()]);
    assert_eq!(fs::read(env.top(&image).join("arch")).unwrap(), b"amd64");
    // The image records the index digest: what the tag names.
    let index_digest = image.manifest_digest.clone().unwrap();
    let by_digest = pull(
        &puller,
        &format!("{}/multi/arch@{index_digest}", registry.addr),
    )
    .unwrap();
    assert_eq!(by_digest.id, image.id);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/multi/arch:noamd64", registry.addr)),
        PullErrorKind::NoMatchingPlatform,
    );
    assert_eq!(
        e.message(),
        "no manifest for linux/amd64 (available: linux/arm64/v8, linux/s390x)"
    );
    env.assert_nothing_left();
    // A single-arch image for another platform.
    let e = expect_err(
        pull(&puller, &format!("{}/multi/arch:1-arm64", registry.addr)),
        PullErrorKind::NoMatchingPlatform,
    );
    assert_eq!(e.message(), "image is for linux/arm64, not linux/amd64");
}

#[test]
fn pull_by_digest_and_wrong_digests() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layer = TestLayer::new(&TarBuilder::new().file("d", b"digest").finish(), Comp::Gzip);
    let image = TestImage::new(vec![layer], true);
    let digest = pusher.image("by/digest", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let reference = format!("{}/by/digest@{digest}", registry.addr);
    let pulled = pull(&puller, &reference).unwrap();
    assert_eq!(pulled.reference, reference);
    assert_eq!(
        pulled.manifest_digest.as_ref().map(ImageDigest::as_str),
        Some(digest.as_str())
    );
    // Tag and digest: the digest decides.
    let both = pull(
        &puller,
        &format!("{}/by/digest:other@{digest}", registry.addr),
    )
    .unwrap();
    assert_eq!(both.id, pulled.id);

    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let wrong = sha256(b"no such manifest");
    let e = expect_err(
        pull(&puller, &format!("{}/by/digest@{wrong}", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert_eq!(
        e.to_string(),
        format!(
            "pull {}/by/digest@{wrong}: manifest unknown (not found)",
            registry.addr
        )
    );
    env.assert_nothing_left();
}

/// How long pulling the Python rootfs takes; `cargo test --features
/// registry-tests -- --ignored --nocapture python311`.
#[test]
#[ignore = "timing: pushes and pulls a 188 MB image"]
fn python311_timing() {
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/python311.tar");
    let registry = Registry::start();
    let started = Instant::now();
    skopeo_push(&rootfs, &format!("{}/library/python:3.11", registry.addr));
    eprintln!("skopeo push: {:?}", started.elapsed());
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let started = Instant::now();
    let image = pull(&puller, &format!("{}/library/python:3.11", registry.addr)).unwrap();
    eprintln!(
        "pull: {:?} ({} bytes unpacked)",
        started.elapsed(),
        image.size_bytes
    );
}
