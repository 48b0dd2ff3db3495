//! Reaching registries: Basic and Bearer auth, a private CA, credentials
//! kept from other hosts, mirrors, no plain-HTTP fallback, coalesced pulls.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use sandpit_registry::{Credentials, Progress, PullErrorKind, RegistryConfig, RegistryHost};

use crate::harness::*;

#[test]
fn basic_auth_with_htpasswd() {
    if !is_root() {
        return;
    }
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("alice".into(), "wonderland".into())),
        ..RegistryOptions::default()
    });
    let pusher = registry.pusher();
    let layer = TestLayer::new(
        &TarBuilder::new().file("secret", b"s3cr3t").finish(),
        Comp::Gzip,
    );
    pusher.image("private/img", "1", &TestImage::new(vec![layer], true));
    let reference = format!("{}/private/img:1", registry.addr);

    let env = Env::new();
    let anonymous = env.puller(insecure(&registry.addr));
    let e = expect_err(pull(&anonymous, &reference), PullErrorKind::Unauthorized);
    assert_eq!(e.message(), "unauthorized: authentication required");
    let wrong = Credentials {
        username: "alice".into(),
        password: "looking-glass".into(),
    };
    expect_err(
        anonymous.pull(&r(&reference), Some(&wrong), &quiet),
        PullErrorKind::Unauthorized,
    );
    env.assert_nothing_left();

    // Per-call credentials.
    let right = Credentials {
        username: "alice".into(),
        password: "wonderland".into(),
    };
    let image = anonymous
        .pull(&r(&reference), Some(&right), &quiet)
        .unwrap();
    assert_eq!(fs::read(env.top(&image).join("secret")).unwrap(), b"s3cr3t");

    // Configured credentials; per-call ones win over them.
    let env = Env::new();
    let configured = |password: &str| {
        with_host(
            &registry.addr,
            RegistryHost {
                insecure: true,
                username: Some("alice".into()),
                password: Some(password.into()),
                ..RegistryHost::default()
            },
        )
    };
    pull(&env.puller(configured("wonderland")), &reference).unwrap();
    let env = Env::new();
    let misconfigured = env.puller(configured("stale"));
    expect_err(
        pull(&misconfigured, &reference),
        PullErrorKind::Unauthorized,
    );
    misconfigured
        .pull(&r(&reference), Some(&right), &quiet)
        .unwrap();
    // The failed anonymous-cache does not leak into credentialed pulls, nor
    // the other way round.
    expect_err(pull(&anonymous, &reference), PullErrorKind::Unauthorized);
}

#[test]
fn private_ca_over_tls() {
    if !is_root() {
        return;
    }
    let registry = Registry::start_with(RegistryOptions {
        htpasswd: Some(("bob".into(), "builder".into())),
        tls: true,
    });
    let layer = TestLayer::new(
        &TarBuilder::new().file("tls", b"over tls").finish(),
        Comp::Zstd,
    );
    registry
        .pusher()
        .image("tls/img", "1", &TestImage::new(vec![layer], true));
    let reference = format!("{}/tls/img:1", registry.addr);
    let host = RegistryHost {
        username: Some("bob".into()),
        password: Some("builder".into()),
        ..RegistryHost::default()
    };
    let env = Env::new();
    // The system roots do not know the registry's certificate.
    let puller = env.puller(with_host(&registry.addr, host.clone()));
    let e = expect_err(pull(&puller, &reference), PullErrorKind::Unreachable);
    assert_eq!(
        e.message(),
        "registry unreachable: tls: invalid peer certificate: UnknownIssuer"
    );
    env.assert_nothing_left();
    let puller = env.puller(with_host(
        &registry.addr,
        RegistryHost {
            ca_file: registry.cert.clone(),
            ..host
        },
    ));
    let image = pull(&puller, &reference).unwrap();
    assert_eq!(fs::read(env.top(&image).join("tls")).unwrap(), b"over tls");
}

#[test]
fn authorization_is_not_forwarded_across_hosts() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let cdn = Proxy::start(&registry.addr, ProxyOptions::default());
    let cdn_port = cdn.addr.rsplit(':').next().unwrap().to_owned();
    let front = Proxy::start(
        &registry.addr,
        ProxyOptions {
            bearer: true,
            redirect_blobs: Some(format!("http://localhost:{cdn_port}")),
            ..ProxyOptions::default()
        },
    );
    let layer = TestLayer::new(
        &TarBuilder::new().file("r", b"redirected").finish(),
        Comp::Gzip,
    );
    registry
        .pusher()
        .image("redirect/img", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    let puller = env.puller(insecure(&front.addr));
    let image = pull(&puller, &format!("{}/redirect/img:1", front.addr)).unwrap();
    assert_eq!(fs::read(env.top(&image).join("r")).unwrap(), b"redirected");
    // The registry saw the token; the other host got the blobs without it.
    assert!(front.count("/blobs/") >= 2);
    assert_eq!(front.count("[auth]"), front.count(" /v2/") - 1);
    let cdn_requests = cdn.requests();
    assert_eq!(cdn.count("/blobs/"), 2, "{cdn_requests:?}");
    assert_eq!(cdn.count("[auth]"), 0, "{cdn_requests:?}");
}

#[test]
fn anonymous_bearer_token_flow() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            bearer: true,
            ..ProxyOptions::default()
        },
    );
    let pusher = registry.pusher();
    let layers = vec![
        TestLayer::new(&TarBuilder::new().file("t1", b"1").finish(), Comp::Gzip),
        TestLayer::new(&TarBuilder::new().file("t2", b"2").finish(), Comp::Zstd),
    ];
    pusher.image("token/img", "1", &TestImage::new(layers, true));
    let env = Env::new();
    let puller = env.puller(insecure(&proxy.addr));
    let image = pull(&puller, &format!("{}/token/img:1", proxy.addr)).unwrap();
    assert_eq!(fs::read(env.top(&image).join("t2")).unwrap(), b"2");
    let queries = proxy.token_queries.lock().unwrap().clone();
    assert_eq!(
        queries,
        ["service=sandpit-test&scope=repository%3Atoken%2Fimg%3Apull"],
        "one token for the whole pull"
    );
    // Only the first request went without the token.
    let requests = proxy.requests();
    let v2: Vec<_> = requests.iter().filter(|r| r.contains(" /v2/")).collect();
    assert_eq!(v2.len(), 5, "{requests:?}");
    // The token is cached across pulls.
    pull(&puller, &format!("{}/token/img:1", proxy.addr)).unwrap();
    assert_eq!(proxy.token_queries.lock().unwrap().len(), 1);
}

#[test]
fn docker_hub_mirror() {
    if !is_root() {
        return;
    }
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/images/busybox.tar");
    let registry = Registry::start();
    if rootfs.exists() {
        skopeo_push(&rootfs, &format!("{}/library/busybox:1", registry.addr));
    } else {
        let layer = TestLayer::new(
            &TarBuilder::new().file("bin/busybox", b"bb").finish(),
            Comp::Gzip,
        );
        registry
            .pusher()
            .image("library/busybox", "1", &TestImage::new(vec![layer], false));
    }
    // The registry itself would be Docker Hub: point it at a closed port.
    let closed = format!("127.0.0.1:{}", free_port());
    let hub = |mirrors: Vec<String>| {
        with_host(
            "docker.io",
            RegistryHost {
                mirrors,
                endpoint: Some(format!("https://{closed}")),
                ..RegistryHost::default()
            },
        )
    };

    let env = Env::new();
    let puller = env.puller(hub(vec![
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://{}/", registry.addr),
    ]));
    let events = Mutex::new(Vec::new());
    let image = puller
        .pull(&r("busybox:1"), None, &|p: &Progress| {
            events.lock().unwrap().push(p.clone())
        })
        .unwrap();
    assert_eq!(image.reference, "docker.io/library/busybox:1");
    assert_eq!(env.store.get(&r("busybox:1")).unwrap(), image);
    assert!(env.top(&image).join("bin/busybox").exists());
    assert!(matches!(
        &events.lock().unwrap()[0],
        Progress::Resolved { endpoint, .. } if *endpoint == format!("http://{}", registry.addr)
    ));

    // No mirror answers and the registry is unreachable.
    let env = Env::new();
    let puller = env.puller(hub(vec![format!("http://127.0.0.1:{}", free_port())]));
    let e = expect_err(pull(&puller, "busybox:1"), PullErrorKind::Unreachable);
    assert_eq!(
        e.to_string(),
        "pull docker.io/library/busybox:1: registry unreachable: connection refused"
    );
    // A mirror without the image falls through to the registry too.
    let puller = env.puller(hub(vec![format!("http://{}", registry.addr)]));
    expect_err(pull(&puller, "busybox:2"), PullErrorKind::Unreachable);
    env.assert_nothing_left();
    // With the registry itself reachable (plain http, opted in).
    let puller = env.puller(with_host(
        "docker.io",
        RegistryHost {
            mirrors: vec![format!("http://127.0.0.1:{}", free_port())],
            insecure: true,
            endpoint: Some(format!("http://{}", registry.addr)),
            ..RegistryHost::default()
        },
    ));
    pull(&puller, "docker.io/library/busybox:1").unwrap();
}

#[test]
fn plain_http_is_never_a_fallback() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let layer = TestLayer::new(&TarBuilder::new().file("f", b"f").finish(), Comp::Gzip);
    registry
        .pusher()
        .image("plain/img", "1", &TestImage::new(vec![layer], true));
    let env = Env::new();
    // Configured, but not insecure; and not configured at all.
    for config in [
        with_host(&registry.addr, RegistryHost::default()),
        RegistryConfig::default(),
    ] {
        let puller = env.puller(config);
        let e = expect_err(
            pull(&puller, &format!("{}/plain/img:1", registry.addr)),
            PullErrorKind::Unreachable,
        );
        assert_eq!(
            e.message(),
            "registry unreachable: tls: received corrupt message of type InvalidContentType \
             (is it a plain http server?)"
        );
    }
    env.assert_nothing_left();
    // The registry never saw a plain request for the image.
    let log = registry.log();
    assert!(log.contains("method=PUT"), "the push is logged");
    assert!(!log.contains("method=GET"), "{log}");
}

#[test]
fn concurrent_pulls_are_coalesced() {
    if !is_root() {
        return;
    }
    let registry = Registry::start();
    let proxy = Proxy::start(
        &registry.addr,
        ProxyOptions {
            delay: Some(Duration::from_millis(300)),
            ..ProxyOptions::default()
        },
    );
    let layers = vec![
        TestLayer::new(&TarBuilder::new().file("c1", b"1").finish(), Comp::Gzip),
        TestLayer::new(&TarBuilder::new().file("c2", b"2").finish(), Comp::Gzip),
    ];
    registry
        .pusher()
        .image("coalesce/img", "1", &TestImage::new(layers, true));
    let env = Env::new();
    let puller = Arc::new(env.puller(insecure(&proxy.addr)));
    let reference = r(&format!("{}/coalesce/img:1", proxy.addr));
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let waiting = Arc::new(Mutex::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (puller, barrier, reference, waiting) = (
                puller.clone(),
                barrier.clone(),
                reference.clone(),
                waiting.clone(),
            );
            thread::spawn(move || {
                barrier.wait();
                puller.pull(&reference, None, &|p: &Progress| {
                    if *p == Progress::Waiting {
                        *waiting.lock().unwrap() += 1;
                    }
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let first = results[0].as_ref().unwrap();
    for result in &results {
        assert_eq!(result.as_ref().unwrap(), first);
    }
    assert_eq!(*waiting.lock().unwrap(), threads - 1);
    assert_eq!(proxy.count("/manifests/"), 1, "{:?}", proxy.requests());
    // Config and two layers.
    assert_eq!(proxy.count("/blobs/"), 3, "{:?}", proxy.requests());

    // Failures are shared the same way.
    let missing = r(&format!("{}/coalesce/img:absent", proxy.addr));
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (puller, barrier, missing) = (puller.clone(), barrier.clone(), missing.clone());
            thread::spawn(move || {
                barrier.wait();
                puller.pull(&missing, None, &quiet)
            })
        })
        .collect();
    let errors: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err())
        .collect();
    assert!(errors.iter().all(|e| *e == errors[0]));
    assert_eq!(errors[0].kind(), PullErrorKind::NotFound);
    assert_eq!(proxy.count("/manifests/absent"), 1);

    // `pull_if_missing` (a sandbox start) takes the stored image without a
    // request, even right after a pull retired; `pull` always asks.
    let before = proxy.requests().len();
    let stored = puller.pull_if_missing(&reference, None, &quiet).unwrap();
    assert_eq!(&stored, first);
    assert_eq!(proxy.requests().len(), before, "{:?}", proxy.requests());
    pull(&puller, &reference.to_string()).unwrap();
    assert_eq!(proxy.count("/manifests/"), 3, "{:?}", proxy.requests());
    // A missing image is pulled.
    let other = r(&format!("{}/coalesce/img:absent", proxy.addr));
    expect_err(
        puller.pull_if_missing(&other, None, &quiet),
        PullErrorKind::NotFound,
    );
}
