//! `spec.services` into the engine's [`ServiceSpec`]s, and back into the
//! `ServiceStatus`es the client reads (`service_urls`, `service_addresses`,
//! `service_endpoints`).
//!
//! Mapping (the client's model, `_types.py`):
//! - PRIVATE (or no visibility and no endpoint): reached at the sandbox's
//!   own address from the host and from sandboxes its ingress admits; the
//!   status's `url` is `tcp://<address>:<port>`.
//! - PUBLIC without an endpoint: a raw TCP port on the host
//!   (`tcp://<host>:<host-port>`).
//! - PUBLIC with an HTTPS endpoint: `<port>-<id>.<domain>` on the daemon's
//!   HTTP frontend (`OPEN`, or `SHARE_TOKEN`: the `X-Sandbox-Share-Token`
//!   header). TLS is the operator's to terminate in front of it: the URL is
//!   the frontend's, `http://` unless it listens on 443.
//! - PUBLIC with a TLS_PASSTHROUGH endpoint: the same host name as SNI on
//!   the daemon's TLS frontend; `address` is `<host name>:<port>`.

use std::collections::HashSet;

use sandpit_proto::sandbox::v1 as pb;

use crate::engine::{Exposure, NetworkStatus, PublicOffer, ServiceSpec};

/// The timeout an HTTPS endpoint gets when it names none (the client's).
pub(crate) const DEFAULT_TIMEOUT_SECONDS: u32 = 15;
/// The timeouts accepted besides 0 (the client's documented range).
pub(crate) const TIMEOUT_SECONDS: std::ops::RangeInclusive<i32> = 15..=900;

/// What is wrong with one field: invalid, or valid but not offered here.
pub(crate) enum Problem {
    Invalid(String, String),
    Unsupported(String, String),
}

/// Checks `services` (at `sandbox.spec.services`) against what `offer`
/// publishes.
pub(crate) fn check(
    services: &[pb::Service],
    offer: &PublicOffer,
) -> Result<Vec<ServiceSpec>, Vec<Problem>> {
    const P: &str = "sandbox.spec.services";
    let mut bad = Vec::new();
    let mut out = Vec::new();
    let mut ports = HashSet::new();
    for (i, s) in services.iter().enumerate() {
        let p = format!("{P}[{i}]");
        let invalid = |bad: &mut Vec<Problem>, f: &str, why: &str| {
            bad.push(Problem::Invalid(format!("{p}{f}"), why.into()))
        };
        let unsupported = |bad: &mut Vec<Problem>, f: &str, why: &str| {
            bad.push(Problem::Unsupported(format!("{p}{f}"), why.into()))
        };
        if !(1..=65535).contains(&s.port) {
            invalid(&mut bad, ".port", "must be 1 to 65535");
            continue;
        }
        let port = s.port as u16;
        if !ports.insert(port) {
            invalid(&mut bad, ".port", "another service has this port");
        }
        match pb::ServiceProtocol::try_from(s.protocol) {
            Ok(pb::ServiceProtocol::Unspecified | pb::ServiceProtocol::Tcp) => {}
            Ok(_) => unsupported(&mut bad, ".protocol", "only TCP services are published"),
            Err(_) => invalid(&mut bad, ".protocol", "unknown protocol"),
        }
        let visibility = pb::Visibility::try_from(s.visibility);
        let public = match visibility {
            Ok(pb::Visibility::Public) => true,
            Ok(pb::Visibility::Private) => false,
            Ok(pb::Visibility::Unspecified) => s.endpoint.is_some(),
            Ok(pb::Visibility::Custom) => {
                unsupported(
                    &mut bad,
                    ".visibility",
                    "CUSTOM visibility needs a fleet; this runner offers PUBLIC and PRIVATE",
                );
                continue;
            }
            Err(_) => {
                invalid(&mut bad, ".visibility", "unknown visibility");
                continue;
            }
        };
        let exposure = match (&s.endpoint, public) {
            (Some(_), false) => {
                invalid(&mut bad, ".endpoint", "endpoints are for PUBLIC services");
                continue;
            }
            (None, false) => Exposure::Private,
            (None, true) => {
                if offer.tcp_host.is_none() {
                    unsupported(
                        &mut bad,
                        "",
                        "raw TCP ports are not published on this runner",
                    );
                }
                Exposure::PublicTcp
            }
            (Some(e), true) => {
                let share_token = match pb::EndpointAuth::try_from(e.auth) {
                    Ok(pb::EndpointAuth::Unspecified | pb::EndpointAuth::Open) => false,
                    Ok(pb::EndpointAuth::ShareToken) => true,
                    Err(_) => {
                        invalid(&mut bad, ".endpoint.auth", "unknown endpoint auth");
                        continue;
                    }
                };
                let t = e.request_timeout_seconds;
                if t != 0 && !TIMEOUT_SECONDS.contains(&t) {
                    invalid(
                        &mut bad,
                        ".endpoint.request_timeout_seconds",
                        "must be 0 (the default, 15) or 15 to 900",
                    );
                }
                match pb::EndpointKind::try_from(e.kind) {
                    Ok(pb::EndpointKind::Https) => {
                        if offer.http_port.is_none() {
                            unsupported(
                                &mut bad,
                                ".endpoint.kind",
                                "HTTPS endpoints are not published on this runner",
                            );
                        }
                        Exposure::PublicHttp {
                            share_token,
                            timeout_seconds: match t {
                                0 => DEFAULT_TIMEOUT_SECONDS,
                                t => {
                                    t.clamp(*TIMEOUT_SECONDS.start(), *TIMEOUT_SECONDS.end()) as u32
                                }
                            },
                        }
                    }
                    Ok(pb::EndpointKind::TlsPassthrough) => {
                        if share_token {
                            invalid(
                                &mut bad,
                                ".endpoint.auth",
                                "a share token cannot be checked without terminating TLS",
                            );
                        }
                        if offer.tls_port.is_none() {
                            unsupported(
                                &mut bad,
                                ".endpoint.kind",
                                "TLS passthrough endpoints are not published on this runner",
                            );
                        }
                        Exposure::PublicTls
                    }
                    Ok(pb::EndpointKind::Unspecified) => {
                        invalid(&mut bad, ".endpoint.kind", "required");
                        continue;
                    }
                    Err(_) => {
                        invalid(&mut bad, ".endpoint.kind", "unknown endpoint kind");
                        continue;
                    }
                }
            }
        };
        out.push(ServiceSpec {
            port,
            name: s.name.clone(),
            exposure,
        });
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(bad)
    }
}

/// `http://<host>` with the port unless it is the scheme's default.
fn url(scheme: &str, host: &str, port: u16) -> String {
    match (scheme, port) {
        ("http", 80) | ("https", 443) => format!("{scheme}://{host}"),
        _ => format!("{scheme}://{host}:{port}"),
    }
}

/// The `ServiceStatus`es of sandbox `id`: from its spec's services, where
/// they are published, and its network while it runs (`None` afterwards:
/// no address is reported for a sandbox that has none).
pub(crate) fn report(
    id: &str,
    services: &[pb::Service],
    offer: &PublicOffer,
    live: Option<&NetworkStatus>,
) -> Vec<pb::ServiceStatus> {
    let Ok(specs) = check(services, offer) else {
        return Vec::new();
    };
    specs
        .iter()
        .map(|s| {
            let host = sandpit_ingress::service_host(&offer.domain, id, s.port);
            let mut st = pb::ServiceStatus {
                port: i32::from(s.port),
                name: s.name.clone(),
                protocol: pb::ServiceProtocol::Tcp.into(),
                visibility: match s.exposure {
                    Exposure::Private => pb::Visibility::Private,
                    _ => pb::Visibility::Public,
                }
                .into(),
                ..Default::default()
            };
            match s.exposure {
                Exposure::Private => {
                    if let Some(n) = live {
                        st.url = format!("tcp://{}:{}", n.alloc.ipv4, s.port);
                    }
                }
                Exposure::PublicTcp => {
                    let host_port = live.and_then(|n| {
                        n.host_ports
                            .iter()
                            .find(|(p, _)| *p == s.port)
                            .map(|(_, h)| *h)
                    });
                    if let (Some(ip), Some(hp)) = (offer.tcp_host, host_port) {
                        st.url = format!("tcp://{}", std::net::SocketAddr::new(ip, hp));
                    }
                }
                Exposure::PublicHttp {
                    share_token,
                    timeout_seconds,
                } => {
                    let u = match (offer.http_port, live) {
                        (Some(p), Some(_)) => url("http", &host, p),
                        _ => String::new(),
                    };
                    st.endpoint = Some(pb::EndpointStatus {
                        kind: pb::EndpointKind::Https.into(),
                        auth: if share_token {
                            pb::EndpointAuth::ShareToken
                        } else {
                            pb::EndpointAuth::Open
                        }
                        .into(),
                        url: u,
                        request_timeout_seconds: timeout_seconds as i32,
                        address: String::new(),
                    });
                }
                Exposure::PublicTls => {
                    st.endpoint = Some(pb::EndpointStatus {
                        kind: pb::EndpointKind::TlsPassthrough.into(),
                        auth: pb::EndpointAuth::Open.into(),
                        url: String::new(),
                        request_timeout_seconds: 0,
                        address: match (offer.tls_port, live) {
                            (Some(p), Some(_)) => format!("{host}:{p}"),
                            _ => String::new(),
                        },
                    });
                }
            }
            st
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> PublicOffer {
        PublicOffer {
            domain: "sandpit.localhost".into(),
            http_port: Some(8780),
            tls_port: Some(8743),
            tcp_host: Some("127.0.0.1".parse().unwrap()),
        }
    }

    fn svc(
        port: i32,
        visibility: pb::Visibility,
        endpoint: Option<(pb::EndpointKind, pb::EndpointAuth)>,
    ) -> pb::Service {
        pb::Service {
            port,
            name: format!("s{port}"),
            protocol: 0,
            visibility: visibility.into(),
            endpoint: endpoint.map(|(k, a)| pb::EndpointSpec {
                kind: k.into(),
                auth: a.into(),
                request_timeout_seconds: 0,
            }),
        }
    }

    #[test]
    fn services_map_to_exposures_and_statuses() {
        use pb::{EndpointAuth as A, EndpointKind as K, Visibility as V};
        let services = [
            svc(8000, V::Private, None),
            svc(9000, V::Public, None),
            svc(8080, V::Public, Some((K::Https, A::ShareToken))),
            svc(8443, V::Unspecified, Some((K::TlsPassthrough, A::Open))),
        ];
        let specs = check(&services, &offer()).ok().unwrap();
        assert_eq!(specs[0].exposure, Exposure::Private);
        assert_eq!(specs[1].exposure, Exposure::PublicTcp);
        assert_eq!(
            specs[2].exposure,
            Exposure::PublicHttp {
                share_token: true,
                timeout_seconds: 15
            }
        );
        assert_eq!(specs[3].exposure, Exposure::PublicTls);
        let live = NetworkStatus {
            alloc: "10.209.0.5".parse().unwrap(),
            host_ports: vec![(9000, 30001)],
        };
        let st = report("abc", &services, &offer(), Some(&live));
        assert_eq!(st[0].url, "tcp://10.209.0.5:8000");
        assert_eq!(st[0].visibility, V::Private as i32);
        assert_eq!(st[1].url, "tcp://127.0.0.1:30001");
        let e = st[2].endpoint.as_ref().unwrap();
        assert_eq!(e.url, "http://8080-abc.sandpit.localhost:8780");
        assert_eq!(
            (e.auth, e.request_timeout_seconds),
            (A::ShareToken as i32, 15)
        );
        assert_eq!(
            st[3].endpoint.as_ref().unwrap().address,
            "8443-abc.sandpit.localhost:8743"
        );
        // Once it stopped, no address is reported.
        let gone = report("abc", &services, &offer(), None);
        assert!(gone[0].url.is_empty() && gone[2].endpoint.as_ref().unwrap().url.is_empty());
    }

    #[test]
    fn bad_services_name_their_fields() {
        use pb::{EndpointAuth as A, EndpointKind as K, Visibility as V};
        let services = [
            svc(0, V::Public, None),
            svc(80, V::Private, Some((K::Https, A::Open))),
            svc(443, V::Public, Some((K::TlsPassthrough, A::ShareToken))),
            svc(443, V::Custom, None),
        ];
        let fields: Vec<String> = check(&services, &offer())
            .err()
            .unwrap()
            .into_iter()
            .map(|p| match p {
                Problem::Invalid(f, _) => format!("invalid {f}"),
                Problem::Unsupported(f, _) => format!("unsupported {f}"),
            })
            .collect();
        assert_eq!(
            fields,
            [
                "invalid sandbox.spec.services[0].port",
                "invalid sandbox.spec.services[1].endpoint",
                "invalid sandbox.spec.services[2].endpoint.auth",
                "invalid sandbox.spec.services[3].port",
                "unsupported sandbox.spec.services[3].visibility",
            ]
        );
        // A frontend the operator turned off.
        let off = PublicOffer {
            http_port: None,
            ..offer()
        };
        let https = [svc(80, V::Public, Some((K::Https, A::Open)))];
        assert!(
            matches!(&check(&https, &off).err().unwrap()[0], Problem::Unsupported(f, _) if f.ends_with(".endpoint.kind"))
        );
    }
}
