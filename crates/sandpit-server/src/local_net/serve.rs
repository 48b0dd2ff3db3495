//! Serving sandboxes' networks from the daemon: the resolver and the
//! egress proxy (name rules), the public frontends, and the publishing of
//! each sandbox's services into them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sandpit_egress::{DenySet, DnsConfig, DnsServer, Proxy, ProxyConfig, Upstream, UpstreamConfig};
use sandpit_ingress::{Auth, HttpFrontend, Route, RouteKind, TlsPassthrough};
use sandpit_net::Allocation;

use crate::engine::{EngineError, Exposure, ServiceSpec};
use crate::model::SandboxId;

use super::LocalNetwork;

impl LocalNetwork {
    /// Publishes `id`'s services; returns the host ports of its raw TCP
    /// ones. Runs on the blocking pool, inside the runtime (listeners are
    /// its tasks).
    pub(super) fn publish(
        &self,
        id: &SandboxId,
        alloc: &Allocation,
        services: &[ServiceSpec],
    ) -> Result<Vec<(u16, u16)>, EngineError> {
        let mut host_ports = Vec::new();
        for s in services {
            let backend = SocketAddr::new(IpAddr::V4(alloc.ipv4), s.port);
            let route = |kind, auth, timeout: Option<u32>| Route {
                backend,
                auth,
                request_timeout: timeout.map(|t| Duration::from_secs(t.into())),
                kind,
            };
            let routed = match s.exposure {
                Exposure::Private => continue,
                Exposure::PublicTcp => {
                    let tcp = self.tcp.as_ref().ok_or_else(|| {
                        EngineError::Start("raw TCP ports are not published here".into())
                    })?;
                    let port = tcp
                        .publish(id.as_str(), s.port, backend)
                        .map_err(|e| EngineError::runtime("publish a TCP port", e))?;
                    host_ports.push((s.port, port));
                    continue;
                }
                Exposure::PublicHttp {
                    share_token,
                    timeout_seconds,
                } => {
                    let auth = if share_token {
                        Auth::ShareToken(self.share_token(id))
                    } else {
                        Auth::Open
                    };
                    route(RouteKind::Http, auth, Some(timeout_seconds))
                }
                Exposure::PublicTls => route(RouteKind::TlsPassthrough, Auth::Open, None),
            };
            self.routes
                .insert(id.as_str(), s.port, routed)
                .map_err(|e| EngineError::runtime("publish a service", e))?;
        }
        Ok(host_ports)
    }

    pub(super) fn unpublish(&self, id: &SandboxId) {
        self.routes.remove_sandbox(id.as_str());
        if let (Some(tcp), Ok(rt)) = (&self.tcp, tokio::runtime::Handle::try_current()) {
            rt.block_on(tcp.release_sandbox(id.as_str()));
        }
    }

    /// Binds the resolver and the proxy on the gateway and serves them
    /// until the returned task is aborted. Without upstream resolvers no
    /// name resolves (and the proxy dials nothing).
    pub async fn serve_egress(
        self: &Arc<Self>,
    ) -> Result<tokio::task::JoinHandle<()>, EngineError> {
        let c = &self.settings.net;
        let gws: Vec<IpAddr> = std::iter::once(IpAddr::V4(c.gateway_v4()))
            .chain(c.gateway_v6().map(IpAddr::V6))
            .collect();
        let (never, private) = self.network.deny_ranges();
        let deny = DenySet::of_firewall(never, private);
        if self.settings.upstream_dns.is_empty() {
            tracing::warn!("no upstream DNS server: sandboxes resolve no name");
            let tasks = self.serve_ingress().await?;
            return Ok(tokio::spawn(async move {
                let _guard = AbortAll(tasks);
                std::future::pending::<()>().await
            }));
        }
        let upstream = Upstream::new(&UpstreamConfig {
            servers: self.settings.upstream_dns.clone(),
            ..Default::default()
        })
        .map_err(|e| EngineError::runtime("configure upstream DNS", e))?;
        let dns = DnsServer::bind(
            DnsConfig {
                listen: gws
                    .iter()
                    .map(|&ip| SocketAddr::new(ip, c.dns_port))
                    .collect(),
                resolve_all_with_cidr_rules: self.settings.resolve_all_with_cidr_rules,
                deny: deny.clone(),
                ..Default::default()
            },
            upstream.clone(),
            self.table.clone(),
        )
        .await
        .map_err(|e| EngineError::runtime("start the sandbox resolver", e))?;
        let proxy = Proxy::bind(
            ProxyConfig {
                tls_listen: gws
                    .iter()
                    .map(|&ip| SocketAddr::new(ip, c.proxy_port))
                    .collect(),
                http_listen: gws
                    .iter()
                    .map(|&ip| SocketAddr::new(ip, c.http_proxy_port))
                    .collect(),
                deny,
                ..Default::default()
            },
            upstream,
            self.table.clone(),
        )
        .await
        .map_err(|e| EngineError::runtime("start the egress proxy", e))?;
        let mut tasks = vec![tokio::spawn(async move {
            let (a, b) = tokio::join!(dns.run(), proxy.run());
            for r in [a, b] {
                if let Err(e) = r {
                    tracing::error!(error = %e, "egress service stopped");
                }
            }
        })];
        tasks.extend(self.serve_ingress().await?);
        Ok(tokio::spawn(async move {
            // Aborting this task drops the handles; abort them too.
            let _guard = AbortAll(tasks);
            std::future::pending::<()>().await
        }))
    }

    /// Binds the HTTP and TLS frontends of PUBLIC services.
    async fn serve_ingress(&self) -> Result<Vec<tokio::task::JoinHandle<()>>, EngineError> {
        let p = &self.settings.public;
        let mut tasks = Vec::new();
        if let Some(addr) = p.http {
            let http = HttpFrontend::bind(addr, &p.domain, Arc::clone(&self.routes))
                .await
                .map_err(|e| {
                    EngineError::runtime("start the public HTTP frontend (public_http_listen)", e)
                })?;
            tasks.push(tokio::spawn(http.run()));
        }
        if let Some(addr) = p.tls {
            let tls = TlsPassthrough::bind(addr, &p.domain, Arc::clone(&self.routes))
                .await
                .map_err(|e| {
                    EngineError::runtime("start the public TLS frontend (public_tls_listen)", e)
                })?;
            tasks.push(tokio::spawn(tls.run()));
        }
        Ok(tasks)
    }
}

/// Aborts tasks when dropped.
struct AbortAll(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
