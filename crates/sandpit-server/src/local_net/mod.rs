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
//!
//! - `host`: what the daemon keeps on the host (the records, the share
//!   token key, the layout lock);
//! - `serve`: the resolver, the proxy and the public frontends, and the
//!   publishing of services.

mod host;
mod release;
mod serve;

use host::{hmac_sha256, load_token_key, lock_layout, read_all, read_one, write_atomic};
use release::{Pending, Releaser};

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sandpit_egress::{PolicyTable, SandboxPolicy};
use sandpit_ingress::{RouteTable, TcpPorts, TcpPortsConfig};
use sandpit_net::policy::{Egress, EgressTarget, Ingress, IngressSource, NetworkPolicy};
use sandpit_net::{Allocation, NetError, Network, SandboxNet, TenantSets};
use sandpit_runtime::NetworkNamespace;
use serde::{Deserialize, Serialize};

use crate::engine::{EngineError, LaunchNetwork, NetworkStatus, ServiceSpec};
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

/// `(rx_bytes, tx_bytes)` of host link `name`, from sysfs (blocking; the
/// figures of whichever network namespace the daemon is in, the host's).
pub fn link_counters(name: &str) -> (Option<u64>, Option<u64>) {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return (None, None);
    }
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    (read("rx_bytes"), read("tx_bytes"))
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
    /// Releases the networks of destroyed sandboxes (see `release`).
    releaser: Releaser,
    routes: Arc<RouteTable>,
    tcp: Option<TcpPorts>,
    token_key: [u8; 32],
    /// Held while this daemon owns the layout (see [`lock_layout`]).
    _layout: nix::fcntl::Flock<std::fs::File>,
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
            releaser: Releaser::default(),
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

    /// The host end of sandbox `id`'s veth, while it is attached.
    pub fn host_link(&self, id: &SandboxId) -> Option<String> {
        self.attached().get(id).map(|a| a.net.host_link.clone())
    }

    /// The share token of sandbox `id` (see `Engine::share_token`).
    pub fn share_token(&self, id: &SandboxId) -> String {
        hex::encode(hmac_sha256(&self.token_key, id.as_str().as_bytes()))
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
        let mut phases = sandpit_runtime::phases::Phases::start("network attach");
        let net = self
            .network
            .prepare(id, None)
            .map_err(net_err("prepare the sandbox network"))?;
        phases.mark("prepare");
        let result = (|| {
            let mut attached = self.attached();
            let tenants = Self::tenants(&attached, &launch.owner);
            self.network
                .apply(&net, &launch.policy, &tenants)
                .map_err(net_err("apply the network policy"))?;
            phases.mark("apply");
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
            phases.mark("persist");
            self.serve(&net, &launch.policy);
            phases.mark("serve");
            let host_ports = self.publish(id, &net.alloc, &launch.services)?;
            phases.mark("publish");
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
            phases.mark("tenants");
            Ok(())
        })();
        phases.log(id);
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

    /// Gives attached sandbox `id` (a warm pool's, attached before it had
    /// one) its owner: remembered on disk, and the policies of sandboxes
    /// that admit their owner's other sandboxes put in force again.
    pub fn set_owner(&self, id: &SandboxId, owner: &str) {
        let mut attached = self.attached();
        let Some(a) = attached.get_mut(id) else {
            return;
        };
        if a.owner == owner {
            return;
        }
        a.owner = owner.to_owned();
        let persisted = Persisted {
            alloc: a.net.alloc,
            policy: a.policy.clone(),
            owner: a.owner.clone(),
            services: Vec::new(),
        };
        if let Err(e) = write_atomic(
            &self.file(id),
            &serde_json::to_vec(&persisted).expect("serializable"),
        ) {
            tracing::warn!(sandbox_id = %id, error = %e, "remember the network's owner");
        }
        self.refresh_tenants(&attached);
    }

    /// Starts the thread that releases the networks of destroyed
    /// sandboxes; without it, [`detach`](Self::detach) releases in place.
    pub fn start_releaser(self: &Arc<Self>) -> std::io::Result<()> {
        Releaser::start(self)
    }

    /// Waits (up to `timeout`) for the releases under way; whether all
    /// are done. A clean shutdown leaves nothing of the sandbox networks.
    pub fn settle(&self, timeout: std::time::Duration) -> bool {
        self.releaser.settle(timeout)
    }

    /// A clean stop: releases in place what is still queued and removes the
    /// prepared namespaces, now rather than when the last handle goes.
    pub fn close(&self) {
        for p in self.releaser.take_all() {
            self.release(p);
        }
        self.network.close_pool();
    }

    /// Takes `id`'s network out of use and releases everything of it (in
    /// the background once [`start_releaser`](Self::start_releaser) ran).
    /// Call it only once no process of the sandbox is left. Idempotent.
    pub fn detach(&self, id: &SandboxId) {
        let _once = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
        if self.releaser.is_pending(id) && !self.attached().contains_key(id) {
            return;
        }
        let alloc = self
            .attached()
            .get(id)
            .map(|a| a.net.alloc)
            .or_else(|| read_one(&self.file(id)).map(|p| p.alloc));
        let Some(alloc) = alloc else { return };
        let pending = self.retire(id, &alloc);
        // Queued (pending) before `releasing` goes: a sweep waiting for it
        // must find it pending, not release it a second time.
        if let Some(p) = self.releaser.push(pending) {
            self.release(p);
        }
    }

    /// Releases `id`'s network in place (callers hold `releasing` and know
    /// it is still `id`'s).
    fn forget(&self, id: &SandboxId, alloc: &Allocation) {
        let pending = self.retire(id, alloc);
        self.release(pending);
    }

    /// What makes `id`'s network unusable at once: its address out of the
    /// resolver's, proxy's and routes' tables and of the tenants' sets.
    fn retire(&self, id: &SandboxId, alloc: &Allocation) -> Pending {
        self.unpublish(id);
        self.unserve(alloc);
        let held = {
            let mut attached = self.attached();
            let held = attached.remove(id);
            self.refresh_tenants(&attached);
            held
        };
        Pending {
            id: id.clone(),
            alloc: *alloc,
            held,
        }
    }

    /// Releases what `retire` left: link, rules, flows, addresses, file.
    /// Without `releasing`: `p` is the releaser's (a sweep skips what is
    /// pending, a second detach finds it pending), and releases of other
    /// sandboxes run beside it.
    fn release(&self, p: Pending) {
        let mut phases = sandpit_runtime::phases::Phases::start("network release");
        // Its namespace stays open (`held`) until its link is deleted: the
        // last handle on a namespace going starts the kernel's teardown of
        // it, which deletes the veth pair too, under the lock (RTNL) our
        // delete would then wait for.
        let released = self.network.release(&p.id, &p.alloc);
        drop(p.held);
        phases.mark("release");
        match released {
            // The file goes only once nothing of the network is left: a
            // failed release is retried by the next sweep with it. Not when
            // it names another allocation: the same id attached again (a
            // pooled sandbox's claim failed and it was created afresh).
            Ok(()) => {
                // Under `attached`, which `attach` holds while it writes it.
                let _attached = self.attached();
                if read_one(&self.file(&p.id)).is_some_and(|f| f.alloc == p.alloc) {
                    let _ = std::fs::remove_file(self.file(&p.id));
                }
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %p.id, error = %sandpit_errors::chain(&e), "release the sandbox network")
            }
        }
        phases.mark("file");
        phases.log(&p.id);
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
            if keep(&id) || self.attached().contains_key(&id) || self.releaser.is_pending(&id) {
                continue;
            }
            let _once = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            // Again under the lock: a delete may have queued or released it.
            if self.releaser.is_pending(&id) {
                continue;
            }
            if let Some(p) = read_one(&self.file(&id)) {
                self.forget(&id, &p.alloc);
                cleaned += 1;
            }
        }
        let attached: Vec<SandboxId> = self.attached().keys().cloned().collect();
        cleaned += self
            .network
            .sweep(|id| keep(id) || attached.contains(id) || self.releaser.is_pending(id))
            .map_err(net_err("sweep the sandbox network"))?;
        Ok(cleaned)
    }
}

impl Drop for LocalNetwork {
    fn drop(&mut self) {
        // Whatever the thread did not get to, and the pool's namespaces.
        self.close();
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

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_net::policy::{EgressRule, IngressRule, Tenant};

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
}
