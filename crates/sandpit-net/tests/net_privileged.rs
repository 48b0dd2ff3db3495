//! The network on real namespaces, veths, nftables and conntrack (root).
//! Each test runs in a private host namespace of its own (see `support`):
//! traffic goes only to namespaces the test made.

#![cfg(feature = "privileged-tests")]

mod support;

use std::time::{Duration, Instant};

use sandpit_net::policy::{
    Cidr, Egress, EgressRule, EgressTarget, Ingress, IngressRule, IngressSource, NetworkPolicy,
    PortRange, Tenant,
};
use sandpit_net::{NetConfig, Network, SandboxNet, TenantSets};
use sandpit_runtime::SandboxId;
use support::*;

fn id(s: &str) -> SandboxId {
    SandboxId::parse(s).unwrap()
}

fn config(pool: usize) -> NetConfig {
    NetConfig {
        pool_size: pool,
        ..Default::default()
    }
}

fn egress(rules: Vec<EgressRule>) -> NetworkPolicy {
    NetworkPolicy {
        egress: Egress::Allow(rules),
        ..Default::default()
    }
}

fn cidr(net: &str, ports: &[u16]) -> EgressRule {
    EgressRule {
        target: EgressTarget::Cidr(Cidr {
            net: net.parse().unwrap(),
            except: vec![],
        }),
        ports: ports.iter().map(|p| PortRange::single(*p)).collect(),
    }
}

fn any() -> NetworkPolicy {
    egress(vec![EgressRule {
        target: EgressTarget::Any,
        ports: vec![],
    }])
}

fn none() -> TenantSets {
    TenantSets::default()
}

/// Links of ours, chains, sets, map elements, conntrack entries and
/// addresses in the calling thread's namespace.
fn inventory() -> [usize; 6] {
    let links = sh("ip -o link show")
        .lines()
        .filter(|l| l.contains(" sp-"))
        .count();
    let table = sh("nft list table inet sandpit");
    let chains = table.matches("\tchain ").count();
    let sets = table.matches("\tset ").count() + table.matches("\tmap ").count();
    // Map elements name a host link.
    let elems = table.matches("\"sp-").count();
    let ct = sh("conntrack -L 2>/dev/null").lines().count();
    let addrs = sh("ip -o addr show").lines().count();
    [links, chains, sets, elems, ct, addrs]
}

#[test]
fn nat_egress_follows_cidr_and_port_rules() {
    let w = World::new();
    in_ns(&w.host, || {
        let net = Network::setup(config(0), &[]).unwrap();
        let a = net.prepare(&id("nat-a"), None).unwrap();
        // Nothing passes before a policy is applied, nor with the runner's
        // default (deny).
        assert!(tcp(&a.netns, "198.51.100.2:7").is_err());
        net.apply(&a, &NetworkPolicy::default(), &none()).unwrap();
        assert!(tcp(&a.netns, "198.51.100.2:7").is_err());
        assert!(udp(&a.netns, "198.51.100.2:7").is_err());

        net.apply(&a, &egress(vec![cidr("198.51.100.0/24", &[7])]), &none())
            .unwrap();
        let echo = tcp(&a.netns, "198.51.100.2:7").unwrap();
        assert_eq!(echo, "ping from 198.51.100.1", "masqueraded to the uplink");
        assert_eq!(udp(&a.netns, "198.51.100.2:7").unwrap(), "ping");
        assert!(
            tcp(&a.netns, "198.51.100.2:8080").is_err(),
            "port not granted"
        );
        assert!(
            tcp(&a.netns, "[2001:db8:100::2]:7").is_err(),
            "an IPv4 rule"
        );

        net.apply(&a, &any(), &none()).unwrap();
        assert!(tcp(&a.netns, "198.51.100.2:8080").is_ok());
        assert!(tcp(&a.netns, "[2001:db8:100::2]:7")
            .unwrap()
            .starts_with("ping from 2001:db8:100::1"));

        // Denied again: new connections stop at once.
        net.apply(
            &a,
            &NetworkPolicy {
                egress: Egress::Deny,
                ..Default::default()
            },
            &none(),
        )
        .unwrap();
        assert!(tcp(&a.netns, "198.51.100.2:8080").is_err());
        net.release(&a.id, &a.alloc).unwrap();
    });
}

#[test]
fn any_reaches_neither_metadata_nor_the_host_nor_a_sibling_without_ingress() {
    let mut w = World::new();
    let host = w.host.try_clone().unwrap();
    in_ns(&host, || {
        let net = Network::setup(config(2), &[]).unwrap();
        w.host_tcp("198.51.100.1:9000");
        w.host_tcp("10.209.0.1:9000");
        // The resolver's stand-in on the gateway.
        w.host_udp("10.209.0.1:5353");
        let a = net.prepare(&id("any-a"), None).unwrap();
        let b = net.prepare(&id("any-b"), None).unwrap();
        let c = net.prepare(&id("any-c"), None).unwrap();
        let b_server = Server::tcp(&b.netns, format!("{}:9000", b.alloc.ipv4).parse().unwrap());
        for n in [&a, &b, &c] {
            net.apply(n, &any(), &none()).unwrap();
        }
        assert!(tcp(&a.netns, "198.51.100.2:8080").is_ok());
        assert!(
            tcp(&a.netns, "169.254.169.254:80").is_err(),
            "cloud metadata"
        );
        assert!(
            tcp(&a.netns, "198.51.100.1:9000").is_err(),
            "the host's address"
        );
        assert!(
            tcp(&a.netns, "10.209.0.1:9000").is_err(),
            "the gateway's other ports"
        );
        let sibling = format!("{}:9000", b.alloc.ipv4);
        assert!(tcp(&a.netns, &sibling).is_err(), "a sibling");
        // Even a CIDR rule naming them opens neither metadata nor the host.
        let named = egress(vec![
            cidr("169.254.0.0/16", &[]),
            cidr("198.51.100.0/24", &[]),
        ]);
        net.apply(&a, &named, &none()).unwrap();
        assert!(tcp(&a.netns, "169.254.169.254:80").is_err());
        assert!(tcp(&a.netns, "198.51.100.1:9000").is_err());
        assert!(tcp(&a.netns, "198.51.100.2:8080").is_ok());
        // DNS goes to the resolver on the gateway (its stand-in echoes),
        // but straight to a server a CIDR rule names (none listens there).
        assert_eq!(udp(&a.netns, "8.8.8.8:53").unwrap(), "ping");
        assert!(udp(&a.netns, "198.51.100.2:53").is_err());
        net.apply(&a, &any(), &none()).unwrap();
        assert_eq!(udp(&a.netns, "198.51.100.2:53").unwrap(), "ping");

        // A sibling with an ingress rule for the same user's sandboxes,
        // reached by one whose egress names them.
        let same_user = TenantSets {
            same_user: vec![a.alloc, b.alloc],
            same_org: vec![],
        };
        let open_b = NetworkPolicy {
            ingress: Ingress::Allow(vec![IngressRule {
                source: IngressSource::Tenant(Tenant::SameUser),
                ports: vec![PortRange::single(9000)],
            }]),
            ..any()
        };
        net.apply(&b, &open_b, &same_user).unwrap();
        let to_user = egress(vec![EgressRule {
            target: EgressTarget::Tenant(Tenant::SameUser),
            ports: vec![],
        }]);
        net.apply(&a, &to_user, &same_user).unwrap();
        net.apply(&c, &to_user, &none()).unwrap();
        let got = tcp(&a.netns, &sibling).unwrap();
        assert_eq!(
            got,
            format!("ping from {}", a.alloc.ipv4),
            "not masqueraded"
        );
        assert!(tcp(&c.netns, &sibling).is_err(), "not the same user");
        // The host reaches a sandbox's ports whatever its ingress says.
        net.apply(&b, &any(), &none()).unwrap();
        assert!(tcp(&w.host, &sibling).is_ok());

        // The layout, for the record.
        println!("{}", sh("nft list table inet sandpit"));
        drop(b_server);
        for n in [&a, &b, &c] {
            net.release(&n.id, &n.alloc).unwrap();
        }
    });
}

/// A process in `net`'s namespace (the sandbox's PID 1 stand-in).
fn sleeper(net: &SandboxNet) -> std::process::Child {
    in_ns(&net.netns, || {
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap()
    })
}

#[test]
fn connections_survive_the_daemon_and_a_restart_adopts_without_a_gap() {
    let w = World::new();
    in_ns(&w.host.try_clone().unwrap(), || {
        let net = Network::setup(config(1), &[]).unwrap();
        let a = net.prepare(&id("kill-a"), None).unwrap();
        net.apply(&a, &egress(vec![cidr("198.51.100.2/32", &[8080])]), &none())
            .unwrap();
        let mut conn = connect(&a.netns, "198.51.100.2:8080");
        assert!(round_trip(&mut conn).is_ok());
        let mut init = sleeper(&a);
        let (alloc, pid) = (a.alloc, init.id() as i32);
        // kill -9 of the daemon: nothing released, its fds closed.
        drop(net);
        drop(a);
        assert!(round_trip(&mut conn).is_ok(), "established flow cut");
        assert!(tcp(&w.host, "198.51.100.2:7").is_ok(), "(the host itself)");
        let sandbox_ns = in_ns(&w.host, || {
            std::fs::File::open(format!("/proc/{pid}/ns/net")).map(std::os::fd::OwnedFd::from)
        })
        .unwrap();
        assert!(tcp(&sandbox_ns, "198.51.100.2:7").is_err(), "policy gone");
        assert!(tcp(&sandbox_ns, "198.51.100.2:8080").is_ok());

        let net = Network::setup(config(1), &[alloc]).unwrap();
        assert!(round_trip(&mut conn).is_ok(), "cut by setup");
        let a = net.adopt(&id("kill-a"), alloc, pid).unwrap();
        assert_eq!(net.sweep(|i| i.as_str() == "kill-a").unwrap(), 0);
        assert!(round_trip(&mut conn).is_ok(), "cut by adoption");
        assert!(
            tcp(&a.netns, "198.51.100.2:7").is_err(),
            "policy gone after restart"
        );
        assert!(net.connections(&alloc).unwrap() > 0);
        net.release(&a.id, &a.alloc).unwrap();
        assert_eq!(
            net.connections(&alloc).unwrap(),
            0,
            "conntrack entries left"
        );
        assert!(round_trip(&mut conn).is_err(), "released, still connected");
        init.kill().unwrap();
        init.wait().unwrap();
    });
}

#[test]
fn sweep_removes_what_nobody_keeps() {
    let w = World::new();
    in_ns(&w.host.try_clone().unwrap(), || {
        let net = Network::setup(config(0), &[]).unwrap();
        // The base ruleset, no sandbox yet.
        let before = inventory();
        let mut kept = vec![];
        for name in ["gone-a", "kept-b", "gone-c"] {
            let n = net.prepare(&id(name), None).unwrap();
            net.apply(&n, &any(), &none()).unwrap();
            let _ = udp(&n.netns, "198.51.100.2:7");
            kept.push((n.alloc, sleeper(&n)));
        }
        drop(net); // a crash
                   // One sandbox's link vanished on its own (its namespace died).
        sh("ip link del sp-4");
        let net = Network::setup(config(0), &[kept[1].0]).unwrap();
        let swept = net.sweep(|i| i.as_str() == "kept-b").unwrap();
        assert_eq!(swept, 2, "gone-a by its link, gone-c by its chains");
        let links = sh("ip -o link show");
        assert!(
            !links.contains(" sp-2@") && links.contains(" sp-3@") && !links.contains(" sp-4@"),
            "{links}"
        );
        let chains = sh("nft list table inet sandpit");
        assert!(
            chains.contains("eg_3") && !chains.contains("eg_2") && !chains.contains("eg_4"),
            "{chains}"
        );
        assert_eq!(net.sweep(|i| i.as_str() == "kept-b").unwrap(), 0);
        net.release(&id("kept-b"), &kept[1].0).unwrap();
        for (_, mut p) in kept {
            p.kill().unwrap();
            p.wait().unwrap();
        }
        let after = inventory();
        assert_eq!(
            after[..5],
            before[..5],
            "links, chains, sets, map elements, conntrack"
        );
    });
}

fn p(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
}

#[test]
fn two_hundred_cycles_leave_nothing_and_latency_is_printed() {
    let w = World::new();
    in_ns(&w.host.try_clone().unwrap(), || {
        for pool in [0, 4] {
            let net = Network::setup(config(pool), &[]).unwrap();
            // Warm: the pool full, the base ruleset counted.
            std::thread::sleep(Duration::from_millis(200));
            let before = inventory();
            let (mut ready, mut total) = (vec![], vec![]);
            for i in 0..200 {
                if pool > 0 {
                    // Give the pool time to refill, as arrivals would.
                    let t = Instant::now();
                    while net.pooled() < pool && t.elapsed() < Duration::from_millis(100) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let t = Instant::now();
                let n = net.prepare(&id(&format!("cycle-{i}")), None).unwrap();
                net.apply(&n, &any(), &none()).unwrap();
                ready.push(t.elapsed());
                if i % 10 == 0 {
                    assert_eq!(
                        udp(&n.netns, "198.51.100.2:7")
                            .unwrap_or_else(|e| panic!("pool {pool} cycle {i}: {e}")),
                        "ping"
                    );
                }
                let r = Instant::now();
                net.release(&n.id, &n.alloc).unwrap();
                total.push(t.elapsed() - (r - t - ready[ready.len() - 1]).min(Duration::ZERO));
                drop(n);
            }
            let after = inventory();
            assert_eq!(
                before, after,
                "links, chains, sets, map elements, conntrack, addresses"
            );
            println!(
                "pool {pool}: prepare+apply p50 {:.2} ms p90 {:.2} ms; prepare+apply+release p50 {:.2} ms p90 {:.2} ms",
                p(&mut ready, 0.5),
                p(&mut ready, 0.9),
                p(&mut total, 0.5),
                p(&mut total, 0.9)
            );
            drop(net);
        }
    });
}

#[test]
fn a_second_release_leaves_the_slot_that_went_back_to_the_pool() {
    let w = World::new();
    in_ns(&w.host.try_clone().unwrap(), || {
        // 13 offsets (2-14), handed out next-fit: the freed one comes round.
        let small = NetConfig {
            subnet_v4: "10.209.0.0/28".parse().unwrap(),
            ..config(1)
        };
        let net = Network::setup(small, &[]).unwrap();
        let wait_pool = || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while net.pooled() != 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the pool never refilled"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_pool();
        let a = net.prepare(&id("twice-a"), None).unwrap();
        net.apply(&a, &any(), &none()).unwrap();
        let (alloc, link) = (a.alloc, a.host_link.clone());
        drop(a);
        net.release(&id("twice-a"), &alloc).unwrap();
        // Cycle other sandboxes until the filler comes round to A's offset:
        // A's link name exists again only as the pooled namespace's.
        let pooled_a = || sh("ip -o link show").contains(&format!(" {link}@"));
        for i in 0..30 {
            wait_pool();
            if pooled_a() {
                break;
            }
            let t = net.prepare(&id(&format!("cycle-{i}")), None).unwrap();
            net.release(&t.id, &t.alloc).unwrap();
        }
        wait_pool();
        assert!(pooled_a(), "A's slot never came back to the pool");
        // A late release of A (a retry, a sweep racing a delete) must not
        // take the pooled namespace's link, nor free its offset.
        net.release(&id("twice-a"), &alloc).unwrap();
        let links = sh("ip -o link show");
        assert!(
            links.contains(&format!(" {link}@")),
            "pooled link taken: {links}"
        );
        let b = net.prepare(&id("twice-b"), None).unwrap();
        assert_eq!(
            b.host_link, link,
            "the pooled namespace is handed out intact"
        );
        net.release(&b.id, &b.alloc).unwrap();
    });
}

#[test]
fn closing_the_pool_removes_its_namespaces_while_the_network_is_still_held() {
    let w = World::new();
    in_ns(&w.host.try_clone().unwrap(), || {
        let net = Network::setup(config(3), &[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while net.pooled() != 3 {
            assert!(Instant::now() < deadline, "the pool never filled");
            std::thread::sleep(Duration::from_millis(10));
        }
        let ours = || {
            sh("ip -o link show")
                .lines()
                .filter(|l| l.contains(" sp-"))
                .count()
        };
        assert_eq!(ours(), 3);
        // A daemon's clean stop: its links go now, not when the last handle
        // to the network does (that may be after the process exits).
        net.close_pool();
        assert_eq!(ours(), 0, "{}", sh("ip -o link show"));
        assert_eq!(net.pooled(), 0);
        // Nothing refills it, and closing again is harmless.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ours(), 0);
        net.close_pool();
        drop(net);
        assert_eq!(ours(), 0);
    });
}
