use super::*;
use crate::policy::{Cidr, EgressRule, IngressRule, NamePattern};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    Cidr {
        net: s.parse().unwrap(),
        except: vec![],
    }
}

fn deny() -> DenySets {
    deny_sets(
        &[
            "10.209.0.0/16".parse().unwrap(),
            "fd5a::/64".parse().unwrap(),
        ],
        &[ip("198.51.100.1"), ip("2001:db8::1")],
        &["203.0.113.0/24".parse().unwrap()],
    )
}

fn egress(rules: Vec<EgressRule>) -> NetworkPolicy {
    NetworkPolicy {
        egress: Egress::Allow(rules),
        ..Default::default()
    }
}

fn rule(target: EgressTarget, ports: &[(i64, i64)]) -> EgressRule {
    EgressRule {
        target,
        ports: ports
            .iter()
            .map(|(a, b)| PortRange::new(*a, Some(*b)).unwrap())
            .collect(),
    }
}

fn allowed(c: &Compiled, addr: &str, port: Option<u16>) -> bool {
    let a = ip(addr);
    let g = &c.egress;
    let (all, boxes) = match a {
        IpAddr::V4(_) => (&g.all4, &g.ports4),
        IpAddr::V6(_) => (&g.all6, &g.ports6),
    };
    covers(all, a)
        || port.is_some_and(|p| {
            boxes
                .iter()
                .any(|(s, r)| r.contains(p) && covers(std::slice::from_ref(s), a))
        })
}

#[test]
fn span_arithmetic() {
    let s = |lo, hi| Span { lo, hi };
    assert_eq!(
        normalize(vec![s(5, 9), s(1, 3), s(4, 4), s(20, 30), s(25, 40)]),
        [s(1, 9), s(20, 40)]
    );
    assert_eq!(
        subtract(&[s(0, 100)], &[s(0, 9), s(50, 60), s(90, 200)]),
        [s(10, 49), s(61, 89)]
    );
    assert_eq!(subtract(&[s(5, 6)], &[s(0, 10)]), []);
    assert_eq!(subtract(&[s(0, u128::MAX)], &[]), [s(0, u128::MAX)]);
}

#[test]
fn the_runner_default_decides_without_rules() {
    let p = NetworkPolicy::default();
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert_eq!(c.egress, Grants::default());
    let c = compile(
        &p,
        DefaultEgress::Internet,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert!(allowed(&c, "198.51.100.2", None) && allowed(&c, "2001:db8::2", None));
    for shut in [
        "169.254.169.254",
        "198.51.100.1",
        "10.209.0.7",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "203.0.113.9",
        "fe80::1",
        "fd5a::7",
        "fd00::1",
        "2001:db8::1",
    ] {
        assert!(!allowed(&c, shut, Some(443)), "{shut}");
    }
    let denied = NetworkPolicy {
        egress: Egress::Deny,
        ..Default::default()
    };
    let c = compile(
        &denied,
        DefaultEgress::Internet,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert_eq!(c.egress, Grants::default());
}

#[test]
fn a_cidr_opens_private_ranges_it_lies_inside_but_never_link_local_or_the_host() {
    let p = egress(vec![
        rule(EgressTarget::Cidr(cidr("10.1.0.0/16")), &[]),
        rule(EgressTarget::Cidr(cidr("169.254.0.0/16")), &[]),
        rule(EgressTarget::Cidr(cidr("198.51.100.0/24")), &[]),
        rule(EgressTarget::Cidr(cidr("0.0.0.0/0")), &[(443, 443)]),
    ]);
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert!(allowed(&c, "10.1.200.3", None));
    assert!(
        !allowed(&c, "10.2.0.1", Some(443)),
        "0/0 names no private range"
    );
    assert!(allowed(&c, "8.8.8.8", Some(443)) && !allowed(&c, "8.8.8.8", Some(80)));
    assert!(!allowed(&c, "169.254.169.254", None));
    assert!(allowed(&c, "198.51.100.2", None) && !allowed(&c, "198.51.100.1", None));
    // 10/8 leaves the sandbox subnet inside it shut; naming it opens it.
    let p = egress(vec![rule(EgressTarget::Cidr(cidr("10.0.0.0/8")), &[])]);
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert!(allowed(&c, "10.3.0.1", None) && !allowed(&c, "10.209.0.9", None));
    let p = egress(vec![rule(EgressTarget::Cidr(cidr("10.209.0.9/32")), &[])]);
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert!(allowed(&c, "10.209.0.9", None));
}

#[test]
fn exceptions_ports_and_dns() {
    let p = egress(vec![
        rule(
            EgressTarget::Cidr(Cidr {
                net: "198.18.0.0/15".parse().unwrap(),
                except: vec!["198.18.5.0/24".parse().unwrap()],
            }),
            &[(80, 80), (8000, 8100)],
        ),
        rule(
            EgressTarget::Cidr(cidr("198.18.0.0/16")),
            &[(8050, 9000), (53, 53)],
        ),
        rule(EgressTarget::Cidr(cidr("9.9.9.9/32")), &[]),
    ]);
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        false,
    );
    assert!(allowed(&c, "198.19.1.1", Some(8000)));
    assert!(!allowed(&c, "198.19.1.1", Some(8101)));
    assert!(allowed(&c, "198.18.1.1", Some(8101)), "the second rule");
    assert!(!allowed(&c, "198.18.5.1", Some(80)), "excepted");
    assert!(
        allowed(&c, "198.18.5.1", Some(8060)),
        "not excepted by rule 2"
    );
    assert!(!allowed(&c, "198.18.1.1", None), "no ports: no ICMP");
    // Boxes never overlap.
    let b = &c.egress.ports4;
    for (i, x) in b.iter().enumerate() {
        for y in &b[i + 1..] {
            let addr = x.0.lo <= y.0.hi && y.0.lo <= x.0.hi;
            let port = x.1.first() <= y.1.last() && y.1.first() <= x.1.last();
            assert!(!(addr && port), "{x:?} overlaps {y:?}");
        }
    }
    // DNS straight to what a CIDR rule covering 53 names; nowhere else.
    assert!(covers(&c.dns4, ip("9.9.9.9")) && covers(&c.dns4, ip("198.18.3.3")));
    assert!(!covers(&c.dns4, ip("198.19.3.3")));
    assert!(
        c.egress.all6.is_empty() && c.dns6.is_empty(),
        "no IPv6 network"
    );
}

#[test]
fn names_go_through_the_proxy_and_tenants_open_siblings() {
    let tenants = TenantSets {
        same_user: vec!["10.209.0.7,fd5a::7".parse().unwrap()],
        same_org: vec!["10.209.0.8".parse().unwrap()],
    };
    let p = NetworkPolicy {
        egress: Egress::Allow(vec![
            rule(
                EgressTarget::Name(NamePattern::parse("pypi.org").unwrap()),
                &[],
            ),
            rule(EgressTarget::Tenant(Tenant::SameUser), &[(8080, 8080)]),
        ]),
        ingress: Ingress::Allow(vec![
            IngressRule {
                source: IngressSource::Tenant(Tenant::SameOrg),
                ports: vec![PortRange::single(22)],
            },
            IngressRule {
                source: IngressSource::Cidr(cidr("198.51.100.0/24")),
                ports: vec![],
            },
        ]),
    };
    let c = compile(&p, DefaultEgress::Internet, &tenants, &deny(), true);
    assert!(c.proxy);
    assert!(allowed(&c, "10.209.0.7", Some(8080)) && allowed(&c, "fd5a::7", Some(8080)));
    assert!(!allowed(&c, "10.209.0.8", Some(8080)) && !allowed(&c, "8.8.8.8", Some(443)));
    let i = &c.ingress;
    assert!(covers(&i.all4, ip("198.51.100.1")));
    assert_eq!(i.ports4.len(), 1);
    assert!(covers(&[i.ports4[0].0], ip("10.209.0.8")) && i.ports4[0].1.contains(22));
    let closed = compile(
        &NetworkPolicy::default(),
        DefaultEgress::Internet,
        &tenants,
        &deny(),
        true,
    );
    assert_eq!(
        closed.ingress,
        Grants::default(),
        "ingress is shut by default"
    );
}

#[test]
fn any_with_ports_keeps_its_ports_and_other_rules() {
    let p = egress(vec![
        rule(EgressTarget::Any, &[(443, 443)]),
        rule(EgressTarget::Cidr(cidr("10.1.0.0/16")), &[]),
    ]);
    let c = compile(
        &p,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny(),
        true,
    );
    assert!(allowed(&c, "8.8.8.8", Some(443)) && !allowed(&c, "8.8.8.8", Some(22)));
    assert!(allowed(&c, "10.1.0.1", Some(22)));
    assert!(!allowed(&c, "10.2.0.1", Some(443)));
}
