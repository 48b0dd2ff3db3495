//! The resolver: what each kind of sandbox may resolve, and its bounds.

use std::net::IpAddr;
use std::time::Duration;

use sandpit_egress::testing::{
    answer_ips, cidr_rule, name_rule, open_policy, query_tcp, query_udp, rules_policy, sandbox_ip,
    Lab, RecordType, ResponseCode, ORIGIN_IP,
};
use sandpit_egress::DnsDenial;

use crate::{lab, zone, CERT_NAMES};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_resolves_and_a_miss_is_nxdomain() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(1),
        rules_policy("sb1", vec![name_rule("api.test", &[])], &[]),
    );
    let a = query_udp(sandbox_ip(1), lab.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert_eq!(answer_ips(&a), vec![ORIGIN_IP]);
    // Case does not matter; the question is echoed as asked.
    let upper = query_udp(sandbox_ip(1), lab.dns_addr, "API.Test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&upper), vec![ORIGIN_IP]);
    let aaaa = query_udp(sandbox_ip(1), lab.dns_addr, "api.test", RecordType::AAAA)
        .await
        .unwrap();
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    for miss in ["other.test", "x.api.test", "example.com"] {
        let r = query_udp(sandbox_ip(1), lab.dns_addr, miss, RecordType::A)
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{miss}");
        assert!(r.answers.is_empty());
    }
    assert_eq!(sb.usage().dns_answered(), 3);
    assert_eq!(sb.usage().dns_denied(DnsDenial::NotGranted), 3);
    // Over TCP too.
    let tcp = query_tcp(sandbox_ip(1), lab.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&tcp), vec![ORIGIN_IP]);
    let tcp_miss = query_tcp(sandbox_ip(1), lab.dns_addr, "other.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(tcp_miss.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(sb.usage().dns_denied(DnsDenial::NotGranted), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_cnames_and_upstream_nxdomain() {
    let lab = lab().await;
    let rules = vec![name_rule("*.files.test", &[]), name_rule("alias.test", &[])];
    let sb = lab.sandbox(sandbox_ip(2), rules_policy("sb2", rules, &[]));
    for name in ["a.files.test", "deep.a.files.test"] {
        let r = query_udp(sandbox_ip(2), lab.dns_addr, name, RecordType::A)
            .await
            .unwrap();
        assert_eq!(answer_ips(&r), vec![ORIGIN_IP], "{name}");
    }
    let apex = query_udp(sandbox_ip(2), lab.dns_addr, "files.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(apex.metadata.response_code, ResponseCode::NXDomain);
    // The granted alias is answered with its chain.
    let alias = query_udp(sandbox_ip(2), lab.dns_addr, "alias.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&alias), vec![ORIGIN_IP]);
    assert!(alias
        .answers
        .iter()
        .any(|r| r.record_type() == RecordType::CNAME));
    // A granted name the upstream does not know: its NXDOMAIN, not a denial.
    let nx = query_udp(
        sandbox_ip(2),
        lab.dns_addr,
        "nope.files.test",
        RecordType::A,
    )
    .await
    .unwrap();
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(sb.usage().dns_denied(DnsDenial::NotGranted), 1);
    assert_eq!(sb.usage().dns_answered(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carve_outs_win_for_grants_and_open_egress() {
    let lab = lab().await;
    let carve = &["*.internal.test"];
    let granted = lab.sandbox(
        sandbox_ip(3),
        rules_policy("sb3", vec![name_rule("*.test", &[])], carve),
    );
    let open = lab.sandbox(sandbox_ip(4), open_policy("sb4", carve));
    for (source, sb) in [(sandbox_ip(3), &granted), (sandbox_ip(4), &open)] {
        let r = query_udp(source, lab.dns_addr, "db.internal.test", RecordType::A)
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let ok = query_udp(source, lab.dns_addr, "api.test", RecordType::A)
            .await
            .unwrap();
        assert_eq!(answer_ips(&ok), vec![ORIGIN_IP]);
        assert_eq!(sb.usage().dns_denied(DnsDenial::CarvedOut), 1);
    }
    // Open egress forwards any type; a grant only address types.
    let txt = query_udp(sandbox_ip(4), lab.dns_addr, "api.test", RecordType::TXT)
        .await
        .unwrap();
    assert_eq!(txt.metadata.response_code, ResponseCode::NoError);
    assert_eq!(open.usage().dns_denied(DnsDenial::QueryType), 0);
    let https = query_udp(sandbox_ip(3), lab.dns_addr, "api.test", RecordType::HTTPS)
        .await
        .unwrap();
    assert_eq!(https.metadata.response_code, ResponseCode::NoError);
    assert!(https.answers.is_empty());
    assert_eq!(granted.usage().dns_denied(DnsDenial::QueryType), 1);
    let any = query_udp(sandbox_ip(4), lab.dns_addr, "api.test", RecordType::ANY)
        .await
        .unwrap();
    assert_eq!(any.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_addresses_are_stripped_from_answers() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(5),
        rules_policy("sb5", vec![name_rule("*.test", &[])], &[]),
    );
    for name in ["rebind-lo.test", "rebind-ten.test", "metadata.test"] {
        let r = query_udp(sandbox_ip(5), lab.dns_addr, name, RecordType::A)
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
    }
    let mapped = query_udp(sandbox_ip(5), lab.dns_addr, "mapped.test", RecordType::AAAA)
        .await
        .unwrap();
    assert_eq!(mapped.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(sb.usage().dns_denied(DnsDenial::PrivateAnswer), 4);
    let mixed = query_udp(sandbox_ip(5), lab.dns_addr, "mixed.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&mixed), vec![ORIGIN_IP]);
    // A CIDR rule naming the private range lets its addresses through
    // (the hard part, loopback and link-local, never).
    let rules = vec![name_rule("*.test", &[]), cidr_rule("10.0.0.0/8", &[5432])];
    lab.sandbox(sandbox_ip(6), rules_policy("sb6", rules, &[]));
    let ten = query_udp(
        sandbox_ip(6),
        lab.dns_addr,
        "rebind-ten.test",
        RecordType::A,
    )
    .await
    .unwrap();
    assert_eq!(answer_ips(&ten), vec![ip("10.0.0.1")]);
    let md = query_udp(sandbox_ip(6), lab.dns_addr, "metadata.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(md.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_and_cidr_only_sandboxes_resolve_nothing_by_default() {
    let lab = lab().await;
    let deny = lab.sandbox(sandbox_ip(7), rules_policy("sb7", vec![], &[]));
    let cidr = lab.sandbox(
        sandbox_ip(8),
        rules_policy("sb8", vec![cidr_rule("203.0.113.0/24", &[])], &[]),
    );
    for (source, sb) in [(sandbox_ip(7), &deny), (sandbox_ip(8), &cidr)] {
        let r = query_udp(source, lab.dns_addr, "api.test", RecordType::A)
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(sb.usage().dns_denied(DnsDenial::NotGranted), 1);
    }
    let all = Lab::start_with(&zone(), CERT_NAMES, |dns, _| {
        dns.resolve_all_with_cidr_rules = true
    })
    .await;
    all.sandbox(
        sandbox_ip(8),
        rules_policy("sb8", vec![cidr_rule("203.0.113.0/24", &[])], &[]),
    );
    all.sandbox(sandbox_ip(7), rules_policy("sb7", vec![], &[]));
    let r = query_udp(sandbox_ip(8), all.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&r), vec![ORIGIN_IP]);
    let r = query_udp(sandbox_ip(7), all.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sources_get_nothing() {
    let lab = lab().await;
    let err = query_udp(sandbox_ip(200), lab.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(
        query_tcp(sandbox_ip(200), lab.dns_addr, "api.test", RecordType::A)
            .await
            .is_err()
    );
    assert_eq!(lab.dns_counters.unknown_sources(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sandbox_has_a_query_rate() {
    let lab = Lab::start_with(&zone(), CERT_NAMES, |dns, _| {
        dns.rate_per_sec = 2;
        dns.burst = 5;
    })
    .await;
    let flood = lab.sandbox(
        sandbox_ip(9),
        rules_policy("sb9", vec![name_rule("api.test", &[])], &[]),
    );
    let calm = lab.sandbox(
        sandbox_ip(10),
        rules_policy("sb10", vec![name_rule("api.test", &[])], &[]),
    );
    let socket = tokio::net::UdpSocket::bind((sandbox_ip(9), 0))
        .await
        .unwrap();
    let query = {
        let mut m = sandpit_egress::testing::Message::query();
        let mut name = hickory_proto_name("api.test");
        name.set_fqdn(true);
        m.add_query(hickory_proto::op::Query::query(name, RecordType::A));
        m.to_vec().unwrap()
    };
    for _ in 0..50 {
        socket.send_to(&query, lab.dns_addr).await.unwrap();
    }
    let mut answers = 0;
    let mut buf = [0u8; 1500];
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
    {
        answers += 1;
    }
    assert!((5..=7).contains(&answers), "{answers} answers");
    assert!(flood.usage().dns_denied(DnsDenial::RateLimited) >= 43);
    // Another sandbox is not affected.
    let r = query_udp(sandbox_ip(10), lab.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&r), vec![ORIGIN_IP]);
    assert_eq!(calm.usage().dns_denied_total(), 0);
}

fn hickory_proto_name(n: &str) -> hickory_proto::rr::Name {
    hickory_proto::rr::Name::from_ascii(n).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_queries_are_dropped() {
    let lab = lab().await;
    let sb = lab.sandbox(
        sandbox_ip(11),
        rules_policy("sb11", vec![name_rule("api.test", &[])], &[]),
    );
    let socket = tokio::net::UdpSocket::bind((sandbox_ip(11), 0))
        .await
        .unwrap();
    socket.send_to(&[0u8; 4000], lab.dns_addr).await.unwrap();
    socket
        .send_to(b"\x12\x34garbage", lab.dns_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 1500];
    let got = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await;
    assert!(got.is_err(), "no answer to garbage");
    assert_eq!(sb.usage().dns_denied(DnsDenial::Malformed), 2);
    // TCP: a length over the bound closes the connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = sandpit_egress::testing::connect_from(sandbox_ip(11), lab.dns_addr)
        .await
        .unwrap();
    tcp.write_all(&60000u16.to_be_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed: {n:?}");
    assert_eq!(sb.usage().dns_denied(DnsDenial::Malformed), 3);
    // And the resolver still answers.
    let r = query_udp(sandbox_ip(11), lab.dns_addr, "api.test", RecordType::A)
        .await
        .unwrap();
    assert_eq!(answer_ips(&r), vec![ORIGIN_IP]);
}
