//! The proxy: real TLS handshakes and HTTP requests through it, routed by
//! name, refused by policy and by where names resolve.

use sandpit_egress::testing::{
    cidr_rule, forbidden_dials, name_rule, open_policy, rules_policy, sandbox_ip,
};
use sandpit_egress::ProxyRefusal;

use crate::lab;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_grant_carries_https_end_to_end() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(1),
        rules_policy("sb1", vec![name_rule("api.test", &[])], &[]),
    );
    let reply = lab
        .https_get(sandbox_ip(1), "api.test", "/hello")
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.text(),
        "https sni=api.test host=api.test path=/hello\n"
    );
    let big = lab
        .https_get(sandbox_ip(1), "api.test", "/bytes/1000000")
        .await
        .unwrap();
    assert_eq!(big.body.len(), 1_000_000);
    assert_eq!(sb.usage().proxy_allowed(), 2);
    assert_eq!(sb.usage().proxy_refused_total(), 0);
    assert!(sb.usage().bytes_in() > 1_000_000);
    assert!(sb.usage().bytes_out() > 500);
    assert_eq!(lab.https.accepted(), 2);
    assert!(forbidden_dials().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_refused_before_any_dial() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(2),
        rules_policy("sb2", vec![name_rule("api.test", &[])], &[]),
    );
    let err = lab
        .https_get(sandbox_ip(2), "other.test", "/")
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("access"), "{err}");
    // A name the sandbox may not know about at all is refused the same way.
    assert!(lab
        .https_get(sandbox_ip(2), "example.com", "/")
        .await
        .is_err());
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::NotGranted), 2);
    assert_eq!(sb.usage().proxy_allowed(), 0);
    assert_eq!(lab.https.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_grants_match_subdomains_only() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(3),
        rules_policy("sb3", vec![name_rule("*.files.test", &[])], &[]),
    );
    for name in ["a.files.test", "deep.a.files.test"] {
        let reply = lab.https_get(sandbox_ip(3), name, "/").await.unwrap();
        assert_eq!(
            reply.text(),
            format!("https sni={name} host={name} path=/\n")
        );
    }
    assert!(lab
        .https_get(sandbox_ip(3), "files.test", "/")
        .await
        .is_err());
    assert_eq!(sb.usage().proxy_allowed(), 2);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::NotGranted), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carve_outs_win_over_grants_and_open_egress() {
    let lab = lab().await;
    let carve = &["*.internal.test"];
    let granted = lab.sandbox(
        sandbox_ip(4),
        rules_policy("sb4", vec![name_rule("*.test", &[])], carve),
    );
    let open = lab.sandbox(sandbox_ip(5), open_policy("sb5", carve));
    for (source, sb) in [(sandbox_ip(4), &granted), (sandbox_ip(5), &open)] {
        assert!(lab
            .https_get(source, "db.internal.test", "/")
            .await
            .is_err());
        assert_eq!(sb.usage().proxy_refused(ProxyRefusal::CarvedOut), 1);
        assert_eq!(
            lab.https_get(source, "api.test", "/").await.unwrap().status,
            200
        );
    }
    assert_eq!(lab.https.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_into_the_deny_set_are_refused() {
    let lab = lab().await;
    let grant_all = vec![name_rule("*.test", &[80, 443])];
    let sb = lab.sandbox(sandbox_ip(6), rules_policy("sb6", grant_all, &[]));
    let open = lab.sandbox(sandbox_ip(7), open_policy("sb7", &[]));
    let rebinding = [
        "rebind-lo.test",
        "rebind-ten.test",
        "metadata.test",
        "mixed.test",
        "mapped.test",
    ];
    for name in rebinding {
        assert!(
            lab.https_get(sandbox_ip(6), name, "/").await.is_err(),
            "{name}"
        );
        assert!(
            lab.https_get(sandbox_ip(7), name, "/").await.is_err(),
            "{name}"
        );
        let http = lab.http_get(sandbox_ip(6), name, "/").await.unwrap();
        assert_eq!(http.status, 403, "{name}");
        assert_eq!(
            http.text(),
            format!("sandpit egress refused: private_address: {name}\n")
        );
    }
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::PrivateAddress), 10);
    assert_eq!(open.usage().proxy_refused(ProxyRefusal::PrivateAddress), 5);
    assert_eq!(lab.https.accepted() + lab.http.accepted(), 0);
    assert!(forbidden_dials().is_empty(), "{:?}", forbidden_dials());
    // A CIDR rule for the range does not open the hard part (loopback,
    // link-local) to names.
    let rules = vec![name_rule("*.test", &[]), cidr_rule("0.0.0.0/0", &[443])];
    let cidr = lab.sandbox(sandbox_ip(8), rules_policy("sb8", rules, &[]));
    assert!(lab
        .https_get(sandbox_ip(8), "metadata.test", "/")
        .await
        .is_err());
    assert!(lab
        .https_get(sandbox_ip(8), "rebind-lo.test", "/")
        .await
        .is_err());
    assert_eq!(cidr.usage().proxy_refused(ProxyRefusal::PrivateAddress), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_is_routed_by_host_and_needs_port_80_in_the_grant() {
    let lab = lab().await;
    let rules = vec![name_rule("files.test", &[80]), name_rule("api.test", &[])];
    let sb = lab.sandbox(sandbox_ip(9), rules_policy("sb9", rules, &[]));
    let reply = lab
        .http_get(sandbox_ip(9), "files.test", "/f")
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "http sni=- host=files.test path=/f\n");
    let port = lab
        .http_get(sandbox_ip(9), "files.test:80", "/p")
        .await
        .unwrap();
    assert_eq!(port.text(), "http sni=- host=files.test:80 path=/p\n");
    // api.test is granted for HTTPS only.
    let no = lab.http_get(sandbox_ip(9), "api.test", "/").await.unwrap();
    assert_eq!(no.status, 403);
    assert_eq!(no.text(), "sandpit egress refused: not_granted: api.test\n");
    assert_eq!(
        lab.https_get(sandbox_ip(9), "api.test", "/")
            .await
            .unwrap()
            .status,
        200
    );
    // files.test is granted on 80 only: not over TLS.
    assert!(lab
        .https_get(sandbox_ip(9), "files.test", "/")
        .await
        .is_err());
    let literal = lab
        .http_get(sandbox_ip(9), "127.77.0.1", "/")
        .await
        .unwrap();
    assert_eq!(literal.status, 400);
    assert_eq!(sb.usage().proxy_allowed(), 3);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::NotGranted), 2);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::BadName), 1);
    assert_eq!(lab.http.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_sources() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(10),
        rules_policy("sb10", vec![name_rule("*.test", &[80])], &[]),
    );
    let reply = lab
        .http_get(sandbox_ip(10), "missing.test", "/")
        .await
        .unwrap();
    assert_eq!(reply.status, 502);
    assert_eq!(sb.usage().proxy_refused(ProxyRefusal::ResolveFailed), 1);
    // A source no sandbox has is closed without a word.
    assert!(lab
        .http_get(sandbox_ip(201), "api.test", "/")
        .await
        .is_err());
    assert!(lab
        .https_get(sandbox_ip(201), "api.test", "/")
        .await
        .is_err());
    assert_eq!(lab.proxy_counters.unknown_sources(), 2);
}
