//! `NetworkOptions` into the engine's [`NetworkPolicy`], or the field paths
//! of what is wrong, and the policy back into the `effective_egress` the
//! status reports.

use std::net::IpAddr;

use ipnet::IpNet;
use sandpit_net::policy::{
    Cidr, DefaultEgress, Egress, EgressRule, EgressTarget, Ingress, IngressRule, IngressSource,
    NamePattern, NetworkPolicy, PortRange, Tenant,
};
use sandpit_proto::sandbox::v1 as pb;

/// A policy, or the violations (field path, what is wrong) that prevent it.
pub(crate) type Checked = Result<NetworkPolicy, Vec<(String, String)>>;

fn cidr_of(c: &pb::CidrBlock, p: &str, bad: &mut Vec<(String, String)>) -> Option<Cidr> {
    let parse = |text: &str, field: String, bad: &mut Vec<(String, String)>| -> Option<IpNet> {
        match text.trim().parse::<IpNet>() {
            Ok(n) => Some(n.trunc()),
            // A bare address is its own /32 or /128.
            Err(_) => match text.trim().parse::<IpAddr>() {
                Ok(a) => Some(IpNet::from(a)),
                Err(_) => {
                    bad.push((field, format!("{text:?} is not a CIDR like 10.0.0.0/8")));
                    None
                }
            },
        }
    };
    if c.cidr.is_empty() {
        bad.push((format!("{p}.cidr"), "required".into()));
        return None;
    }
    let net = parse(&c.cidr, format!("{p}.cidr"), bad)?;
    let mut except = Vec::new();
    for (i, e) in c.except.iter().enumerate() {
        let field = format!("{p}.except[{i}]");
        if let Some(sub) = parse(e, field.clone(), bad) {
            if !net.contains(&sub) {
                bad.push((field, format!("{sub} is not inside {net}")));
            } else {
                except.push(sub);
            }
        }
    }
    Some(Cidr { net, except })
}

fn ports_of(ports: &[pb::PortRange], p: &str, bad: &mut Vec<(String, String)>) -> Vec<PortRange> {
    let mut out = Vec::new();
    for (i, r) in ports.iter().enumerate() {
        let field = format!("{p}.ports[{i}]");
        match r.protocol.to_ascii_uppercase().as_str() {
            // Ports apply to TCP and UDP alike (and a hostname grant to
            // TCP only).
            "" | "TCP" | "UDP" => {}
            other => bad.push((
                format!("{field}.protocol"),
                format!("{other:?} is not TCP or UDP"),
            )),
        }
        let end = (r.end_port != 0).then_some(i64::from(r.end_port));
        match PortRange::new(i64::from(r.port), end) {
            Ok(range) => out.push(range),
            Err(e) => bad.push((field, e.to_string())),
        }
    }
    out
}

fn tenant_of(t: i32, field: String, bad: &mut Vec<(String, String)>) -> Option<Tenant> {
    match pb::TenantScope::try_from(t) {
        Ok(pb::TenantScope::SameUser) => Some(Tenant::SameUser),
        Ok(pb::TenantScope::SameOrg | pb::TenantScope::SandboxNetwork) => Some(Tenant::SameOrg),
        _ => {
            bad.push((field, format!("unknown tenant scope {t}")));
            None
        }
    }
}

/// Checks `NetworkOptions` at `p` (e.g. `sandbox.spec.network`).
pub(crate) fn check(net: &pb::NetworkOptions, p: &str) -> Checked {
    let mut bad = Vec::new();
    let mut egress = Vec::new();
    if net.deny_egress == Some(true) && !net.egress.is_empty() {
        bad.push((
            format!("{p}.deny_egress"),
            "cannot be combined with egress rules".into(),
        ));
    }
    for (i, r) in net.egress.iter().enumerate() {
        let rp = format!("{p}.egress[{i}]");
        use pb::egress_rule::Destination as D;
        if !r.https_hostname_except.is_empty() {
            bad.push((
                format!("{rp}.https_hostname_except"),
                "carve-outs are the runner's policy, not a sandbox's grant".into(),
            ));
        }
        let ports = ports_of(&r.ports, &rp, &mut bad);
        let target = match &r.destination {
            None => {
                bad.push((rp.clone(), "one destination is required".into()));
                continue;
            }
            Some(D::Cidr(c)) => match cidr_of(c, &format!("{rp}.cidr"), &mut bad) {
                Some(c) => EgressTarget::Cidr(c),
                None => continue,
            },
            Some(D::HttpsHostname(name)) => {
                if !(ports.is_empty() || ports == [PortRange::single(443)]) {
                    bad.push((
                        format!("{rp}.ports"),
                        "a hostname grants HTTPS (TCP 443) only".into(),
                    ));
                }
                match NamePattern::parse(name) {
                    Ok(n) => EgressTarget::Name(n),
                    Err(e) => {
                        bad.push((format!("{rp}.https_hostname"), e.to_string()));
                        continue;
                    }
                }
            }
            Some(D::Tenant(t)) => match tenant_of(*t, format!("{rp}.tenant"), &mut bad) {
                Some(t) => EgressTarget::Tenant(t),
                None => continue,
            },
            Some(D::Any(true)) => EgressTarget::Any,
            Some(D::Any(false)) => {
                bad.push((format!("{rp}.any"), "must be true when set".into()));
                continue;
            }
            Some(D::Selector(_)) => {
                bad.push((
                    format!("{rp}.selector"),
                    "label selectors select cluster workloads; this runner has none".into(),
                ));
                continue;
            }
        };
        egress.push(EgressRule { target, ports });
    }
    let mut ingress = Vec::new();
    for (i, r) in net.ingress.iter().enumerate() {
        let rp = format!("{p}.ingress[{i}]");
        use pb::ingress_rule::Source as S;
        let ports = ports_of(&r.ports, &rp, &mut bad);
        let source = match &r.source {
            None => {
                bad.push((rp.clone(), "one source is required".into()));
                continue;
            }
            Some(S::Cidr(c)) => match cidr_of(c, &format!("{rp}.cidr"), &mut bad) {
                Some(c) => IngressSource::Cidr(c),
                None => continue,
            },
            Some(S::Tenant(t)) => match tenant_of(*t, format!("{rp}.tenant"), &mut bad) {
                Some(t) => IngressSource::Tenant(t),
                None => continue,
            },
            Some(S::Any(true)) => IngressSource::Any,
            Some(S::Any(false)) => {
                bad.push((format!("{rp}.any"), "must be true when set".into()));
                continue;
            }
        };
        ingress.push(IngressRule { source, ports });
    }
    if net.deny_ingress == Some(true) && !net.ingress.is_empty() {
        bad.push((
            format!("{p}.deny_ingress"),
            "cannot be combined with ingress rules".into(),
        ));
    }
    if !bad.is_empty() {
        return Err(bad);
    }
    Ok(NetworkPolicy {
        egress: match (net.deny_egress, egress.is_empty()) {
            (Some(true), _) => Egress::Deny,
            (_, true) => Egress::RunnerDefault,
            (_, false) => Egress::Allow(egress),
        },
        ingress: if ingress.is_empty() {
            Ingress::Deny
        } else {
            Ingress::Allow(ingress)
        },
    })
}

fn proto_ports(ports: &[PortRange]) -> Vec<pb::PortRange> {
    ports
        .iter()
        .map(|r| pb::PortRange {
            protocol: String::new(),
            port: i32::from(r.first()),
            end_port: if r.first() == r.last() {
                0
            } else {
                i32::from(r.last())
            },
        })
        .collect()
}

fn proto_cidr(c: &Cidr) -> pb::CidrBlock {
    pb::CidrBlock {
        cidr: c.net.to_string(),
        except: c.except.iter().map(IpNet::to_string).collect(),
    }
}

/// The egress in force, as the status reports it: the rules, with the
/// runner's default resolved (`any` for the internet; nothing for deny).
pub(crate) fn effective_egress(
    policy: &NetworkPolicy,
    default: DefaultEgress,
) -> Vec<pb::EgressRule> {
    use pb::egress_rule::Destination as D;
    let Some(rules) = policy.effective_egress(default) else {
        return vec![pb::EgressRule {
            destination: Some(D::Any(true)),
            ..Default::default()
        }];
    };
    rules
        .iter()
        .map(|r| pb::EgressRule {
            destination: Some(match &r.target {
                EgressTarget::Cidr(c) => D::Cidr(proto_cidr(c)),
                EgressTarget::Name(n) => D::HttpsHostname(n.to_string()),
                EgressTarget::Any => D::Any(true),
                EgressTarget::Tenant(Tenant::SameUser) => {
                    D::Tenant(pb::TenantScope::SameUser as i32)
                }
                EgressTarget::Tenant(Tenant::SameOrg) => D::Tenant(pb::TenantScope::SameOrg as i32),
            }),
            ports: proto_ports(&r.ports),
            https_hostname_except: vec![],
        })
        .collect()
}

/// The ingress in force, as the status reports it.
pub(crate) fn effective_ingress(policy: &NetworkPolicy) -> Vec<pb::IngressRule> {
    use pb::ingress_rule::Source as S;
    let Ingress::Allow(rules) = &policy.ingress else {
        return Vec::new();
    };
    rules
        .iter()
        .map(|r| pb::IngressRule {
            source: Some(match &r.source {
                IngressSource::Cidr(c) => S::Cidr(proto_cidr(c)),
                IngressSource::Any => S::Any(true),
                IngressSource::Tenant(Tenant::SameUser) => {
                    S::Tenant(pb::TenantScope::SameUser as i32)
                }
                IngressSource::Tenant(Tenant::SameOrg) => {
                    S::Tenant(pb::TenantScope::SameOrg as i32)
                }
            }),
            ports: proto_ports(&r.ports),
        })
        .collect()
}

/// Fills the network part of a status from the options the sandbox was
/// created with (checked then, so they check again) and the runner's
/// default.
pub(crate) fn report(
    status: &mut pb::SandboxStatus,
    net: Option<&pb::NetworkOptions>,
    default: DefaultEgress,
) {
    let none = pb::NetworkOptions::default();
    let Ok(policy) = check(net.unwrap_or(&none), "network") else {
        return;
    };
    status.effective_egress = effective_egress(&policy, default);
    status.effective_ingress = effective_ingress(&policy);
    status.effective_dns_egress = pb::DnsEgressMode::Allow.into();
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::egress_rule::Destination as D;

    fn rule(d: D, ports: &[(i32, i32)]) -> pb::EgressRule {
        pb::EgressRule {
            destination: Some(d),
            ports: ports
                .iter()
                .map(|&(port, end_port)| pb::PortRange {
                    protocol: String::new(),
                    port,
                    end_port,
                })
                .collect(),
            https_hostname_except: vec![],
        }
    }

    fn fields(e: Vec<(String, String)>) -> Vec<String> {
        e.into_iter().map(|(f, _)| f).collect()
    }

    #[test]
    fn rules_become_the_policy() {
        let net = pb::NetworkOptions {
            egress: vec![
                rule(D::HttpsHostname("*.PyPI.org".into()), &[]),
                rule(
                    D::Cidr(pb::CidrBlock {
                        cidr: "198.51.100.0/24".into(),
                        except: vec!["198.51.100.128/25".into()],
                    }),
                    &[(80, 0), (8000, 8100)],
                ),
            ],
            ..Default::default()
        };
        let p = check(&net, "n").unwrap();
        let Egress::Allow(rules) = &p.egress else {
            panic!("{p:?}")
        };
        assert_eq!(rules.len(), 2);
        assert_eq!(p.name_grants().next().unwrap().to_string(), "*.pypi.org");
        let shown = effective_egress(&p, DefaultEgress::Deny);
        assert_eq!(
            shown[0].destination,
            Some(D::HttpsHostname("*.pypi.org".into()))
        );
        assert_eq!(shown[1].ports[1].end_port, 8100);
        // No rules: the runner's default, as the status shows it.
        let none = check(&pb::NetworkOptions::default(), "n").unwrap();
        assert_eq!(none.egress, Egress::RunnerDefault);
        assert!(effective_egress(&none, DefaultEgress::Deny).is_empty());
        assert_eq!(
            effective_egress(&none, DefaultEgress::Internet)[0].destination,
            Some(D::Any(true))
        );
    }

    #[test]
    fn the_status_reports_what_is_in_force() {
        let mut status = pb::SandboxStatus::default();
        let net = pb::NetworkOptions {
            egress: vec![rule(D::HttpsHostname("api.test".into()), &[])],
            ingress: vec![pb::IngressRule {
                source: Some(pb::ingress_rule::Source::Tenant(
                    pb::TenantScope::SameUser as i32,
                )),
                ports: vec![pb::PortRange {
                    protocol: String::new(),
                    port: 8000,
                    end_port: 0,
                }],
            }],
            ..Default::default()
        };
        report(&mut status, Some(&net), DefaultEgress::Deny);
        assert_eq!(
            status.effective_egress[0].destination,
            Some(D::HttpsHostname("api.test".into()))
        );
        assert_eq!(status.effective_ingress[0].ports[0].port, 8000);
        assert_eq!(status.effective_dns_egress, pb::DnsEgressMode::Allow as i32);
        // No options: the runner's default.
        let mut status = pb::SandboxStatus::default();
        report(&mut status, None, DefaultEgress::Internet);
        assert_eq!(status.effective_egress[0].destination, Some(D::Any(true)));
        assert!(status.effective_ingress.is_empty());
    }

    #[test]
    fn bad_rules_name_their_fields() {
        let net = pb::NetworkOptions {
            deny_egress: Some(true),
            egress: vec![
                rule(
                    D::Cidr(pb::CidrBlock {
                        cidr: "10.0.0.0/33".into(),
                        except: vec![],
                    }),
                    &[],
                ),
                rule(D::HttpsHostname("a.*.b".into()), &[]),
                rule(D::HttpsHostname("api.test".into()), &[(80, 0)]),
                rule(D::Any(true), &[(0, 0)]),
                rule(D::Any(true), &[(1, 70000)]),
                rule(
                    D::Cidr(pb::CidrBlock {
                        cidr: "10.0.0.0/8".into(),
                        except: vec!["11.0.0.0/8".into()],
                    }),
                    &[],
                ),
            ],
            ..Default::default()
        };
        assert_eq!(
            fields(check(&net, "n").unwrap_err()),
            [
                "n.deny_egress",
                "n.egress[0].cidr.cidr",
                "n.egress[1].https_hostname",
                "n.egress[2].ports",
                "n.egress[3].ports[0]",
                "n.egress[4].ports[0]",
                "n.egress[5].cidr.except[0]",
            ]
        );
    }
}
