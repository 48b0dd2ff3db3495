//! The local engine's sandbox network: `sandpit-net` (namespaces, links,
//! the kernel firewall) and `sandpit-egress` (the resolver and the proxy)
//! put together for the sandboxes of this daemon.
//!
//! Every sandbox's addresses and policy are written to
//! `<data-dir>/network/<id>.json` before its sandbox is created, and removed
//! after its network is released: a restarted daemon reserves the
//! addresses again ([`LocalNetwork::setup`]), re-adopts the namespace of
//! each running sandbox and serves its policy to the resolver and the
//! proxy again ([`LocalNetwork::adopt`]); the kernel's rules were never
//! touched in between, so nothing a sandbox had open is cut.
//!
//! Blocking, like `sandpit-net`: called on tokio's blocking pool.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sandpit_egress::{
    DenySet, DnsConfig, DnsServer, PolicyTable, Proxy, ProxyConfig, SandboxPolicy, Upstream,
    UpstreamConfig,
};
use sandpit_ingress::{
    Auth, HttpFrontend, Route, RouteKind, RouteTable, TcpPorts, TcpPortsConfig, TlsPassthrough,
};
use sandpit_net::policy::{Egress, EgressTarget, Ingress, IngressSource, NetworkPolicy};
use sandpit_net::{Allocation, NetError, Network, SandboxNet, TenantSets};
use sandpit_runtime::NetworkNamespace;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineError, Exposure, LaunchNetwork, NetworkStatus, ServiceSpec};
use crate::model::SandboxId;
use crate::netconfig::NetworkSettings;

/// What is kept of one sandbox's network across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    alloc: Allocation,
    policy: NetworkPolicy,
    owner: String,
    #[serde(default)]
    services: Vec<ServiceSpec>,
}

#[derive(Debug)]
struct Attached {
    net: SandboxNet,
    policy: NetworkPolicy,
    owner: String,
    /// `(sandbox port, host port)` of its raw TCP services.
    host_ports: Vec<(u16, u16)>,
}

/// Whether a policy names other sandboxes (and must be applied again when
/// they come and go).
fn names_tenants(p: &NetworkPolicy) -> bool {
    let eg = match &p.egress {
        Egress::Allow(r) => r
            .iter()
            .any(|r| matches!(r.target, EgressTarget::Tenant(_))),
        _ => false,
    };
    let ing = match &p.ingress {
        Ingress::Allow(r) => r
            .iter()
            .any(|r| matches!(r.source, IngressSource::Tenant(_))),
        Ingress::Deny => false,
    };
    eg || ing
}

fn net_err(op: &'static str) -> impl FnOnce(NetError) -> EngineError {
    move |e| EngineError::runtime(op, e)
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |e| EngineError::runtime(op, e)
}

/// This daemon's sandbox network.
#[derive(Debug)]
pub struct LocalNetwork {
    network: Network,
    settings: NetworkSettings,
    dir: PathBuf,
    table: Arc<PolicyTable>,
    attached: Mutex<HashMap<SandboxId, Attached>>,
    /// Held across "is it still ours? release it, forget it": a delete and
    /// a sweep may both release a sandbox, and only the first may (by the
    /// second, its offset may be another sandbox's).
    releasing: Mutex<()>,
    routes: Arc<RouteTable>,
    tcp: Option<TcpPorts>,
    token_key: [u8; 32],
    /// Held while this daemon owns the layout (see [`lock_layout`]).
    _layout: nix::fcntl::Flock<std::fs::File>,
}

/// Where host-wide locks of network layouts live.
const LOCK_DIR: &str = "/run/sandpit";

/// An exclusive lock on the host for `table`'s layout. Two daemons on one
/// layout would replace each other's base rules and sweep each other's
/// sandboxes' links: the second one is refused at start, whatever its data
/// dir.
fn lock_layout(table: &str) -> Result<nix::fcntl::Flock<std::fs::File>, EngineError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .map_err(io_err("create /run/sandpit"))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(Path::new(LOCK_DIR).join(format!("network-{table}.lock")))
        .map_err(io_err("open the network lock"))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            EngineError::runtime(
                "lock the network layout",
                format!(
                    "another sandpitd uses the layout of table {table:?}: give this one its own \
                     [network] table, gateway_link, link_prefix, subnets and ports, or enabled = false"
                ),
            )
        } else {
            EngineError::runtime("lock the network layout", std::io::Error::from(e))
        }
    })
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`.
fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// The key share tokens derive from, made once (0600) and kept: tokens
/// handed out stay valid across restarts.
fn load_token_key(path: &Path) -> std::io::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&b);
            Ok(k)
        }
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is not a 32-byte key",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = [0u8; 32];
            getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
            write_atomic(path, &k)?;
            Ok(k)
        }
        Err(e) => Err(e),
    }
}

impl LocalNetwork {
    /// Sets the host side up (see [`Network::setup`]), with the addresses
    /// of every sandbox `dir` remembers reserved.
    pub fn setup(settings: NetworkSettings, dir: &Path) -> Result<Self, EngineError> {
        let layout = lock_layout(&settings.net.table)?;
        std::fs::create_dir_all(dir).map_err(io_err("create the network dir"))?;
        let in_use: Vec<Allocation> = read_all(dir).into_iter().map(|(_, p)| p.alloc).collect();
        let network = Network::setup(settings.net.clone(), &in_use)
            .map_err(net_err("set up the sandbox network"))?;
        let token_key = load_token_key(&dir.join("share-token.key"))
            .map_err(io_err("load the share token key"))?;
        let tcp = settings
            .public
            .tcp_ports
            .clone()
            .map(|ports| TcpPorts::new(TcpPortsConfig::new(settings.public.tcp_bind, ports)));
        Ok(Self {
            network,
            settings,
            dir: dir.to_owned(),
            table: Arc::new(PolicyTable::new()),
            attached: Mutex::new(HashMap::new()),
            releasing: Mutex::new(()),
            routes: Arc::new(RouteTable::new()),
            tcp,
            token_key,
            _layout: layout,
        })
    }

    fn attached(&self) -> MutexGuard<'_, HashMap<SandboxId, Attached>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, id: &SandboxId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The settings in force.
    pub fn settings(&self) -> &NetworkSettings {
        &self.settings
    }

    /// The sandbox's network, while it has one.
    pub fn status(&self, id: &SandboxId) -> Option<NetworkStatus> {
        self.attached().get(id).map(|a| NetworkStatus {
            alloc: a.net.alloc,
            host_ports: a.host_ports.clone(),
        })
    }

    /// The share token of sandbox `id` (see `Engine::share_token`).
    pub fn share_token(&self, id: &SandboxId) -> String {
        hex::encode(hmac_sha256(&self.token_key, id.as_str().as_bytes()))
    }

    /// Publishes `id`'s services; returns the host ports of its raw TCP
    /// ones. Runs on the blocking pool, inside the runtime (listeners are
    /// its tasks).
    fn publish(
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

    fn unpublish(&self, id: &SandboxId) {
        self.routes.remove_sandbox(id.as_str());
        if let (Some(tcp), Ok(rt)) = (&self.tcp, tokio::runtime::Handle::try_current()) {
            rt.block_on(tcp.release_sandbox(id.as_str()));
        }
    }

    fn tenants(attached: &HashMap<SandboxId, Attached>, owner: &str) -> TenantSets {
        TenantSets {
            same_user: attached
                .values()
                .filter(|a| a.owner == owner)
                .map(|a| a.net.alloc)
                .collect(),
            // One organization per runner: every sandbox of it.
            same_org: attached.values().map(|a| a.net.alloc).collect(),
        }
    }

    /// Puts the policy of every sandbox that names other sandboxes in force
    /// again (one came or went).
    fn refresh_tenants(&self, attached: &HashMap<SandboxId, Attached>) {
        for a in attached.values().filter(|a| names_tenants(&a.policy)) {
            let tenants = Self::tenants(attached, &a.owner);
            if let Err(e) = self.network.apply(&a.net, &a.policy, &tenants) {
                tracing::warn!(sandbox_id = %a.net.id, error = %sandpit_errors::chain(&e), "re-apply a tenant policy");
            }
        }
    }

    fn serve(&self, net: &SandboxNet, policy: &NetworkPolicy) {
        let served = Arc::new(SandboxPolicy::new(
            net.id.as_str(),
            policy,
            self.settings.net.default_egress,
            self.settings.dns_name_except.clone(),
        ));
        let addrs =
            std::iter::once(IpAddr::V4(net.alloc.ipv4)).chain(net.alloc.ipv6.map(IpAddr::V6));
        for addr in addrs {
            self.table.insert(addr, Arc::clone(&served));
        }
    }

    fn unserve(&self, alloc: &Allocation) {
        self.table.remove(IpAddr::V4(alloc.ipv4));
        if let Some(v6) = alloc.ipv6 {
            self.table.remove(IpAddr::V6(v6));
        }
    }

    /// A network for sandbox `id`, its policy in force before any of its
    /// processes runs, remembered on disk; what the runtime joins.
    pub fn attach(
        &self,
        id: &SandboxId,
        launch: &LaunchNetwork,
    ) -> Result<NetworkNamespace, EngineError> {
        let net = self
            .network
            .prepare(id, None)
            .map_err(net_err("prepare the sandbox network"))?;
        let result = (|| {
            let mut attached = self.attached();
            let tenants = Self::tenants(&attached, &launch.owner);
            self.network
                .apply(&net, &launch.policy, &tenants)
                .map_err(net_err("apply the network policy"))?;
            let persisted = Persisted {
                alloc: net.alloc,
                policy: launch.policy.clone(),
                owner: launch.owner.clone(),
                services: launch.services.clone(),
            };
            write_atomic(
                &self.file(id),
                &serde_json::to_vec(&persisted).expect("serializable"),
            )
            .map_err(io_err("remember the sandbox network"))?;
            self.serve(&net, &launch.policy);
            let host_ports = self.publish(id, &net.alloc, &launch.services)?;
            attached.insert(
                id.clone(),
                Attached {
                    net: net.clone(),
                    policy: launch.policy.clone(),
                    owner: launch.owner.clone(),
                    host_ports,
                },
            );
            self.refresh_tenants(&attached);
            Ok(())
        })();
        if let Err(e) = result {
            let _once = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            self.forget(id, &net.alloc);
            return Err(e);
        }
        Ok(NetworkNamespace {
            path: net.netns_path(),
            resolv_conf: self.resolv_conf().into_bytes(),
            hosts: hosts_file(id, &net.alloc).into_bytes(),
            ca_certificates: self.settings.ca_certificates.clone(),
        })
    }

    fn resolv_conf(&self) -> String {
        // The gateway: the firewall sends port 53 there to the resolver,
        // whatever address a sandbox asks.
        let mut s = format!("nameserver {}\n", self.settings.net.gateway_v4());
        s.push_str("options ndots:0 timeout:2 attempts:2\n");
        s
    }

    /// Releases everything of `id`'s network. Idempotent.
    pub fn detach(&self, id: &SandboxId) {
        let _once = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
        let alloc = self
            .attached()
            .get(id)
            .map(|a| a.net.alloc)
            .or_else(|| read_one(&self.file(id)).map(|p| p.alloc));
        if let Some(alloc) = alloc {
            self.forget(id, &alloc);
        }
    }

    /// Releases `id`'s network (callers hold `releasing` and know it is
    /// still `id`'s).
    fn forget(&self, id: &SandboxId, alloc: &Allocation) {
        self.unpublish(id);
        self.unserve(alloc);
        {
            let mut attached = self.attached();
            attached.remove(id);
            self.refresh_tenants(&attached);
        }
        match self.network.release(id, alloc) {
            // The file goes only once nothing of the network is left: a
            // failed release is retried by the next sweep with it.
            Ok(()) => {
                let _ = std::fs::remove_file(self.file(id));
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %sandpit_errors::chain(&e), "release the sandbox network")
            }
        }
    }

    /// Takes a running sandbox's network back after a restart.
    pub fn adopt(&self, id: &SandboxId, init_pid: i32) -> Result<(), EngineError> {
        let Some(p) = read_one(&self.file(id)) else {
            // Started without a network (networking was off then).
            return Ok(());
        };
        let net = self
            .network
            .adopt(id, p.alloc, init_pid)
            .map_err(net_err("adopt the sandbox network"))?;
        self.serve(&net, &p.policy);
        // Raw TCP services get new host ports (the old listeners went with
        // the old daemon); host-name routes are the same.
        let host_ports = self.publish(id, &p.alloc, &p.services).unwrap_or_else(|e| {
            tracing::warn!(sandbox_id = %id, error = %sandpit_errors::chain(&e), "publish services again");
            Vec::new()
        });
        let mut attached = self.attached();
        attached.insert(
            id.clone(),
            Attached {
                net,
                policy: p.policy,
                owner: p.owner,
                host_ports,
            },
        );
        self.refresh_tenants(&attached);
        Ok(())
    }

    /// Removes the networks of sandboxes `keep` rejects: remembered ones
    /// and whatever the kernel holds. Returns how many it cleaned.
    pub fn sweep(&self, keep: impl Fn(&SandboxId) -> bool) -> Result<usize, EngineError> {
        let mut cleaned = 0;
        for (id, _) in read_all(&self.dir) {
            if keep(&id) || self.attached().contains_key(&id) {
                continue;
            }
            let _once = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            // Read again under the lock: a delete may have released it.
            if let Some(p) = read_one(&self.file(&id)) {
                self.forget(&id, &p.alloc);
                cleaned += 1;
            }
        }
        let attached: Vec<SandboxId> = self.attached().keys().cloned().collect();
        cleaned += self
            .network
            .sweep(|id| keep(id) || attached.contains(id))
            .map_err(net_err("sweep the sandbox network"))?;
        Ok(cleaned)
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

/// `/etc/hosts` of a sandbox: loopback and its own name.
fn hosts_file(id: &SandboxId, alloc: &Allocation) -> String {
    let mut s = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{id}\n",
        alloc.ipv4
    );
    if let Some(v6) = alloc.ipv6 {
        s.push_str(&format!("{v6}\t{id}\n"));
    }
    s
}

fn read_one(path: &Path) -> Option<Persisted> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable sandbox network record");
            None
        }
    }
}

fn read_all(dir: &Path) -> Vec<(SandboxId, Persisted)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let id = SandboxId::parse(name.strip_suffix(".json")?).ok()?;
            Some((id.clone(), read_one(&dir.join(&name))?))
        })
        .collect()
}

/// Writes `path` whole or not at all (a crash of the daemon leaves the old
/// file or the new one). Not fsynced, on purpose: the page cache outlives a
/// killed daemon, and a crash of the host that loses it also ends every
/// sandbox the file speaks of (the sweep then removes what is left). An
/// fsync here cost milliseconds on every create.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_net::policy::{EgressRule, IngressRule, Tenant};

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 has no 32-byte-key case; this is HMAC-SHA256 of "abc"
        // under 32 bytes of 0x0b, checked with `openssl dgst -sha256 -mac
        // HMAC -macopt hexkey:0b..0b`.
        let key = [0x0bu8; 32];
        assert_eq!(
            hex::encode(hmac_sha256(&key, b"abc")),
            "cc2b6e43b092526c09f6b2db76c7dc2867ebfdf7d1b170f2d8f73a3894792e12"
        );
        assert_ne!(hmac_sha256(&key, b"abd"), hmac_sha256(&key, b"abc"));
    }

    #[test]
    fn tenant_policies_are_recognised() {
        let mut p = NetworkPolicy::default();
        assert!(!names_tenants(&p));
        p.egress = Egress::Allow(vec![EgressRule {
            target: EgressTarget::Any,
            ports: vec![],
        }]);
        assert!(!names_tenants(&p));
        p.ingress = Ingress::Allow(vec![IngressRule {
            source: IngressSource::Tenant(Tenant::SameUser),
            ports: vec![],
        }]);
        assert!(names_tenants(&p));
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = Persisted {
            alloc: "10.209.0.5,fd5a:9d17:4e3c::5".parse().unwrap(),
            policy: NetworkPolicy::default(),
            owner: "alice".into(),
            services: vec![],
        };
        write_atomic(
            &dir.path().join("sb-1.json"),
            &serde_json::to_vec(&p).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("sb-2.json"), b"{not json").unwrap();
        std::fs::write(dir.path().join("Not An Id.json"), b"{}").unwrap();
        let all = read_all(dir.path());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0.as_str(), "sb-1");
        assert_eq!(all[0].1.alloc, p.alloc);
        let hosts = hosts_file(&all[0].0, &p.alloc);
        assert!(hosts.contains("10.209.0.5\tsb-1\n") && hosts.contains("fd5a:9d17:4e3c::5\tsb-1"));
    }
}
