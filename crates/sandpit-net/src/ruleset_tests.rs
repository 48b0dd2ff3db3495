use super::*;
use crate::nft::show_rule;
use crate::policy::{Cidr, Egress, EgressRule, EgressTarget, NamePattern, NetworkPolicy};
use crate::rules::{compile, deny_sets, TenantSets};
use crate::DefaultEgress;

/// The rules of `chain` in `ops`, rendered.
fn rules_of(ops: &[Op], chain: &str) -> Vec<String> {
    ops.iter()
        .filter_map(|op| match op {
            Op::AddRule(c, e) if c == chain => Some(show_rule(e)),
            _ => None,
        })
        .collect()
}

#[test]
fn base_chains_are_replaced_not_duplicated_and_maps_are_kept() {
    let config = NetConfig::default();
    let ops = base(&config, &[], &[]);
    for chain in [
        "forward",
        "from_sb",
        "to_sb",
        "input",
        "sb_input",
        "prerouting",
    ] {
        let flush = ops.iter().position(|o| *o == Op::FlushChain(chain.into()));
        let first = ops
            .iter()
            .position(|o| matches!(o, Op::AddRule(c, _) if c == chain));
        assert!(flush.unwrap() < first.unwrap(), "{chain}");
    }
    for map in ["egress", "ingress", "nat"] {
        assert!(
            !ops.contains(&Op::FlushSet(map.into())),
            "{map} is never flushed"
        );
    }
    let forward = rules_of(&ops, "forward");
    assert_eq!(
        forward,
        [
            "ct:state>8 8&=06000000 8!=00000000 accept",
            "meta:IifName>8 8==\"sp-\" jump from_sb",
            "meta:OifName>8 8==\"sp-\" jump to_sb",
        ]
    );
    let from = rules_of(&ops, "from_sb");
    assert!(
        from[1].contains("nh[16:4]>8 8@never4 counter drop"),
        "{from:?}"
    );
    assert_eq!(from[3], "meta:IifName>8 vmap:8@egress");
    // The resolver and the proxy on the gateway; nothing else of the host.
    let input = rules_of(&ops, "sb_input");
    assert!(input
        .iter()
        .any(|r| r.contains("nh[16:4]>8 8==0ad10001") && r.contains("th[2:2]>8 8==14e9 accept")));
    assert_eq!(input.last().unwrap(), "counter drop");
    let nat = rules_of(&ops, "postrouting");
    assert_eq!(
        nat[0],
        "meta:NfProto>8 8==02 nh[12:4]>8 8&=ffff0000 8==0ad10000 meta:OifName>8 8!=\"sp-\" masquerade"
    );
    let no_nat = base(
        &NetConfig {
            nat: false,
            subnet_v6: None,
            ..Default::default()
        },
        &[],
        &[],
    );
    assert!(rules_of(&no_nat, "postrouting").is_empty());
    assert_eq!(rules_of(&no_nat, "prerouting").len(), 2, "no IPv6 DNS rule");
}

#[test]
fn a_sandbox_is_one_batch_of_its_own_objects() {
    let config = NetConfig::default();
    let slot = Slot::new(&config, 0x2a);
    let deny = deny_sets(&[config.subnet_v4.into()], &[], &[]);
    let policy = NetworkPolicy {
        egress: Egress::Allow(vec![
            EgressRule {
                target: EgressTarget::Cidr(Cidr {
                    net: "198.51.100.0/24".parse().unwrap(),
                    except: vec![],
                }),
                ports: vec![crate::policy::PortRange::single(7)],
            },
            EgressRule {
                target: EgressTarget::Name(NamePattern::parse("pypi.org").unwrap()),
                ports: vec![],
            },
        ]),
        ..Default::default()
    };
    let c = compile(
        &policy,
        DefaultEgress::Deny,
        &TenantSets::default(),
        &deny,
        true,
    );
    let ops = sandbox(&config, &slot, &c);
    // Every name is the slot's.
    for op in &ops {
        let name = match op {
            Op::AddSet(s) => &s.name,
            Op::FlushSet(n) | Op::AddChain(n, _) | Op::FlushChain(n) | Op::AddRule(n, _) => n,
            Op::AddElems(n, _) if ["egress", "ingress", "nat"].contains(&n.as_str()) => continue,
            Op::AddElems(n, _) => n,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(sandbox_object(name), Some(0x2a), "{name}");
    }
    let boxes = ops.iter().find_map(|o| match o {
        Op::AddElems(n, e) if n == "eg4p_2a" => Some(e.clone()),
        _ => None,
    });
    assert_eq!(
        boxes.unwrap(),
        [Elem::Range(
            vec![198, 51, 100, 0, 0, 7, 0, 0],
            vec![198, 51, 100, 255, 0, 7, 0, 0]
        )]
    );
    let eg = rules_of(&ops, "eg_2a");
    assert_eq!(eg[0], "meta:NfProto>8 8==02 nh[16:4]>8 8@eg4a_2a return");
    assert_eq!(
        eg[1],
        "meta:NfProto>8 8==02 meta:L4Proto>8 8@tcpudp nh[16:4]>8 th[2:2]>9 8@eg4p_2a return"
    );
    assert_eq!(eg.last().unwrap(), "counter drop");
    let nat = rules_of(&ops, "nat_2a");
    // TLS to the proxy's TLS port, HTTP to its HTTP port.
    assert!(
        nat.iter()
            .any(|r| r.contains("th[2:2]>8 8==01bb")
                && r.ends_with("8:=0ad10001 9:=0c38 dnat:2(8,9)")),
        "{nat:?}"
    );
    assert!(
        nat.iter()
            .any(|r| r.contains("th[2:2]>8 8==0050")
                && r.ends_with("8:=0ad10001 9:=0c39 dnat:2(8,9)")),
        "{nat:?}"
    );
    assert!(ops.contains(&Op::AddElems(
        "egress".into(),
        vec![Elem::Map(ifname("sp-2a"), Verdict::Goto("eg_2a".into()))]
    )));
    // Removal adds each object before deleting it: never a missing one.
    let rm = remove_sandbox(&slot);
    for (i, op) in rm.iter().enumerate() {
        if let Op::DelSet(n) | Op::DelChain(n) = op {
            assert!(
                rm[..i]
                    .iter()
                    .any(|o| matches!(o, Op::AddSet(s) if &s.name == n)
                        || *o == Op::AddChain(n.clone(), None)),
                "{n}"
            );
        }
    }
    assert_eq!(sandbox_object("forward"), None);
    assert_eq!(sandbox_object("never4"), None);
}
