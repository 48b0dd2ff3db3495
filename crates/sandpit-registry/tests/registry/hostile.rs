//! What a registry or the network must not get past: tampered content,
//! missing images, malicious and foreign layers, a registry going away.

use std::fs;
use std::path::{Path, PathBuf};

use sandpit_registry::PullErrorKind;

use crate::harness::*;

#[test]
fn tampered_content_is_refused() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    // Uncompressed: a flipped bit in the tar's padding is no format error.
    let layer = TestLayer::new(&TarBuilder::new().file("t", b"t").finish(), Comp::None);
    let image = TestImage::new(vec![layer.clone()], true);
    let digest = pusher.image("tamper/img", "1", &image);
    push_multi_arch(&pusher, "tamper/multi", "1", &[("amd64", None)]);
    let through = |pattern: String| {
        Proxy::start(
            &registry.addr,
            ProxyOptions {
                tamper: Some(pattern),
                ..ProxyOptions::default()
            },
        )
    };
    let env = Env::new();

    // Manifests addressed by digest: the reference's, an index entry's.
    let proxy = through("/manifests/sha256:".into());
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img@{digest}", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(
        e.message().starts_with(&format!(
            "manifest digest mismatch: expected {digest}, got sha256:"
        )),
        "{e}"
    );
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/multi:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("manifest digest mismatch"), "{e}");
    // Every request said who it is.
    assert!(proxy.requests().iter().all(|r| r.ends_with("[sandpit]")));

    // The config blob.
    let proxy = through(format!("/blobs/{}", sha256(&image.config)));
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("config digest mismatch"), "{e}");

    // A layer blob: refused after streaming, before it is visible.
    let proxy = through(format!("/blobs/{}", layer.digest()));
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/tamper/img:1", proxy.addr)),
        PullErrorKind::Invalid,
    );
    assert!(
        e.message().starts_with(&format!(
            "layer {}: layer digest mismatch: expected {}",
            layer.digest(),
            layer.digest()
        )),
        "{e}"
    );
    env.assert_nothing_left();
}

#[test]
fn missing_tags_and_repositories_are_not_found() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    pusher.image("present/repo", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/present/repo:2", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert_eq!(
        e.to_string(),
        format!(
            "pull {}/present/repo:2: manifest unknown (not found)",
            registry.addr
        )
    );
    let e = expect_err(
        pull(&puller, &format!("{}/absent/repo:1", registry.addr)),
        PullErrorKind::NotFound,
    );
    assert!(e.message().ends_with("(not found)"), "{e}");
    env.assert_nothing_left();
}

#[test]
fn malicious_layers() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let pusher = registry.pusher();
    let push = |name: &str, layers: Vec<TestLayer>| {
        pusher.image(name, "1", &TestImage::new(layers, true));
        format!("{}/{name}:1", registry.addr)
    };
    let dotdot = push(
        "evil/dotdot",
        vec![TestLayer::new(
            &TarBuilder::new()
                .file("ok", b"ok")
                .file("../../escape", b"x")
                .finish(),
            Comp::Gzip,
        )],
    );
    let through_symlink = push(
        "evil/symlink",
        vec![TestLayer::new(
            &TarBuilder::new()
                .symlink("etc", "/")
                .file("etc/escape", b"x")
                .finish(),
            Comp::Gzip,
        )],
    );
    let across_layers = push(
        "evil/across",
        vec![
            TestLayer::new(
                &TarBuilder::new().symlink("up", "../../../..").finish(),
                Comp::Gzip,
            ),
            TestLayer::new(
                &TarBuilder::new().file("up/escape", b"x").finish(),
                Comp::Gzip,
            ),
        ],
    );
    let absolute = push(
        "evil/absolute",
        vec![TestLayer::new(
            &TarBuilder::new()
                .file("/abs/file", b"inside")
                .chardev("dev/mem")
                .finish(),
            Comp::None,
        )],
    );
    let bomb = {
        let tar = TarBuilder::new()
            .file("zeros", &vec![0u8; 4 << 20])
            .finish();
        push("evil/bomb", vec![TestLayer::new(&tar, Comp::Gzip)])
    };

    let env = Env::new();
    let mut config = insecure(&registry.addr);
    config.max_layer_bytes = 1 << 20;
    let puller = env.puller(config);
    let outside = env.store.root().parent().unwrap().to_owned();

    let e = expect_err(pull(&puller, &dotdot), PullErrorKind::Invalid);
    assert!(e.message().contains("tar entry \"../../escape\""), "{e}");
    let e = expect_err(pull(&puller, &through_symlink), PullErrorKind::Invalid);
    assert!(
        e.message()
            .contains("tar entry \"etc/escape\": path goes through a symlink"),
        "{e}"
    );
    let e = expect_err(pull(&puller, &bomb), PullErrorKind::TooLarge);
    assert_eq!(e.message(), "layer larger than 1048576 bytes");
    env.assert_nothing_left();

    // Each layer is unpacked on its own: `up/` is a plain directory of the
    // second layer, and overlayfs shows it over the symlink.
    let image = pull(&puller, &across_layers).unwrap();
    let top = env.top(&image);
    assert!(fs::symlink_metadata(top.join("up")).unwrap().is_dir());
    assert_eq!(fs::read(top.join("up/escape")).unwrap(), b"x");
    let image = pull(&puller, &absolute).unwrap();
    let top = env.top(&image);
    assert_eq!(fs::read(top.join("abs/file")).unwrap(), b"inside");
    assert!(!top.join("dev/mem").exists());
    assert!(!Path::new("/abs/file").exists());
    for path in [
        outside.join("escape"),
        outside.parent().unwrap().join("escape"),
        PathBuf::from("/escape"),
        PathBuf::from("/etc/escape"),
    ] {
        assert!(!path.exists(), "{}", path.display());
    }
    assert!(env.tmp_is_empty());
}

#[test]
fn foreign_and_unknown_layers_are_refused() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    let mut image = TestImage::new(vec![layer], false);
    image.media_types = Some(vec![
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip".into(),
    ]);
    registry.pusher().image("odd/foreign", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&registry.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/odd/foreign:1", registry.addr)),
        PullErrorKind::Invalid,
    );
    assert!(e.message().starts_with("foreign layer"), "{e}");
    let layer = TestLayer::new(&TarBuilder::new().file("g", b"g").finish(), Comp::Gzip);
    let mut image = TestImage::new(vec![layer], true);
    image.media_types = Some(vec!["application/vnd.oci.image.layer.v1.tar+bzip2".into()]);
    registry.pusher().image("odd/bzip2", "1", &image);
    let e = expect_err(
        pull(&puller, &format!("{}/odd/bzip2:1", registry.addr)),
        PullErrorKind::Invalid,
    );
    assert_eq!(
        e.message(),
        "unsupported layer media type \"application/vnd.oci.image.layer.v1.tar+bzip2\""
    );
    env.assert_nothing_left();
}

#[test]
fn registry_going_away_mid_blob() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            cut_blobs_after: Some(256 << 10),
            ..ProxyOptions::default()
        },
    );
    // Incompressible content: the blob is as large as the file.
    let mut noise = vec![0u8; 2 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let layer = TestLayer::new(
        &TarBuilder::new().file("noise", &noise).finish(),
        Comp::Gzip,
    );
    let image = TestImage::new(vec![layer], true);
    // The config blob is small: only the layer is cut.
    registry.pusher().image("cut/img", "1", &image);
    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let e = expect_err(
        pull(&puller, &format!("{}/cut/img:1", proxy.addr)),
        PullErrorKind::Unreachable,
    );
    assert_eq!(e.message(), "registry unreachable: connection closed early");
    env.assert_nothing_left();

    // The registry killed outright mid-pull (between manifest and blobs is
    // racy; a dead registry from the start is the deterministic variant).
    let addr = registry.addr.clone();
    drop(registry);
    let e = expect_err(
        pull(&puller, &format!("{}/cut/img:1", proxy.addr)),
        PullErrorKind::Unreachable,
    );
    assert!(e.message().starts_with("registry unreachable: "), "{e}");
    let direct = env.puller(insecure(&addr));
    let e = expect_err(
        pull(&direct, &format!("{addr}/cut/img:1")),
        PullErrorKind::Unreachable,
    );
    assert_eq!(e.message(), "registry unreachable: connection refused");
    env.assert_nothing_left();
}
