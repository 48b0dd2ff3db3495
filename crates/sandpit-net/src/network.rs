//! [`Network`]: the host side (gateway link, forwarding, the nftables
//! table, the pool of prepared namespaces) and each sandbox's namespace,
//! link and firewall state.

use std::collections::HashSet;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use ipnet::IpNet;
use sandpit_runtime::SandboxId;

use crate::alloc::{Allocation, Allocator, Slot};
use crate::config::NetConfig;
use crate::conntrack::Conntrack;
use crate::netns::{self, Made};
use crate::nft::{Kernel, Nft, Op};
use crate::nl::{self, NlError, Socket};
use crate::policy::NetworkPolicy;
use crate::rules::{self, DenySets, Family, TenantSets};
use crate::{link, ruleset, NetError};

/// One sandbox's network, as [`Network::prepare`] or [`Network::adopt`]
/// hand it out.
#[derive(Debug, Clone)]
pub struct SandboxNet {
    /// The sandbox.
    pub id: SandboxId,
    /// Keeps the namespace alive while the daemon holds it, whether or not
    /// any process is in it (containers join it, pod-like).
    pub netns: Arc<OwnedFd>,
    /// Its addresses: store them with the record.
    pub alloc: Allocation,
    /// The host end of its veth (`sp-<n>`).
    pub host_link: String,
}

impl SandboxNet {
    /// A path to the namespace that another process (the spawner) can open
    /// while this handle lives: `/proc/<pid>/fd/<n>`, what
    /// `SandboxSpec::network_namespace` takes.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.netns.as_raw_fd()
        ))
    }
}

fn nl_err(step: impl Into<String>) -> impl FnOnce(NlError) -> NetError {
    let step = step.into();
    move |source| NetError::Netlink { step, source }
}

fn io_err(step: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    move |source| NetError::Io { step, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many releases ([`Network::release`]) are worth running at once: each
/// waits out its link's delete on a netlink socket of its own.
pub const RELEASE_PARALLELISM: usize = 4;

#[derive(Debug)]
struct Inner {
    config: NetConfig,
    /// The host's namespace (where setup ran): every host link, route and
    /// rule lives there.
    host_ns: OwnedFd,
    rt: Mutex<Socket>,
    /// Link deletes only, one socket per concurrent release: a delete
    /// waits for the kernel to drop every reference to the device (RCU
    /// grace periods: 20-60 ms on a small VM, with next to no CPU), which a
    /// create's request on `rt` must not queue behind, and which releases
    /// on sockets of their own wait out side by side.
    rt_delete: Vec<Mutex<Socket>>,
    nft: Kernel,
    ct: Conntrack,
    alloc: Mutex<Allocator>,
    deny: Mutex<DenySets>,
    pool: Mutex<Vec<Made>>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The sandbox network of this host. Blocking; `Sync`, for the daemon's
/// blocking pool.
#[derive(Debug)]
pub struct Network {
    inner: Arc<Inner>,
    /// The pool's filler, taken (and joined) by the first `close_pool`.
    filler: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    /// Makes the namespace of offset `n` on a thread of its own.
    fn make(&self, n: u32, alloc: Allocation, alias: Option<&str>) -> Result<Made, NetError> {
        let slot = Slot::new(&self.config, n);
        std::thread::scope(|s| {
            s.spawn(|| {
                // The new thread starts where the caller is; make sure
                // that is the host's namespace.
                netns::enter(&self.host_ns).map_err(io_err("enter the host network namespace"))?;
                netns::make(&self.config, &self.host_ns, slot, alloc, alias)
            })
            .join()
            .unwrap_or(Err(NetError::Worker))
        })
    }

    fn addrs(alloc: &Allocation) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(alloc.ipv4))
            .chain(alloc.ipv6.map(IpAddr::V6))
            .collect()
    }

    /// Removes everything of offset `n` (its link only if `link` says so).
    fn remove_slot(&self, n: u32, link_index: Option<u32>) -> Result<(), NetError> {
        let slot = Slot::new(&self.config, n);
        let mut phases = sandpit_runtime::phases::Phases::start("network release");
        if let Some(i) = link_index {
            let sock = self
                .rt_delete
                .iter()
                .find_map(|m| m.try_lock().ok())
                .unwrap_or_else(|| lock(&self.rt_delete[n as usize % self.rt_delete.len()]));
            link::delete(&sock, i).map_err(nl_err(format!("delete {}", slot.link)))?;
        }
        phases.mark("link");
        self.nft
            .commit(&self.config.table, &ruleset::remove_sandbox(&slot))
            .map_err(nl_err(format!("remove the rules of {}", slot.link)))?;
        phases.mark("nft");
        let alloc = lock(&self.alloc).at(n);
        self.ct
            .flush(&Self::addrs(&alloc))
            .map_err(nl_err(format!("flush the connections of {}", slot.link)))?;
        phases.mark("conntrack");
        phases.log(&slot.link);
        Ok(())
    }

    /// Keeps the pool full until told to stop.
    fn fill(&self) {
        loop {
            {
                let pool = lock(&self.pool);
                let pool = self
                    .wake
                    .wait_while(pool, |p| {
                        !self.stop.load(Ordering::Relaxed) && p.len() >= self.config.pool_size
                    })
                    .unwrap_or_else(|e| e.into_inner());
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                drop(pool);
            }
            let n = match lock(&self.alloc).take() {
                Ok(n) => n,
                Err(_) => return,
            };
            let alloc = lock(&self.alloc).at(n);
            let mut phases = sandpit_runtime::phases::Phases::start("netns pool fill");
            let made = self.make(n, alloc, None);
            phases.mark("make");
            phases.log(&n);
            match made {
                Ok(made) => lock(&self.pool).push(made),
                Err(e) => {
                    lock(&self.alloc).free(n);
                    tracing::warn!(error = %sandpit_errors::chain(&e), "could not prepare a network namespace");
                    // Often passing (a link of a killed daemon's namespace
                    // the kernel has not reaped yet): try again later,
                    // unless told to stop meanwhile.
                    let pool = lock(&self.pool);
                    let _ = self.wake.wait_timeout_while(
                        pool,
                        std::time::Duration::from_secs(1),
                        |_| !self.stop.load(Ordering::Relaxed),
                    );
                }
            }
        }
    }
}

impl Network {
    /// Sets up the host side, idempotently: IP forwarding, the gateway
    /// link and its addresses, the nftables table with its base chains
    /// (their rules replaced in one transaction, nothing of any sandbox
    /// touched: a restarted daemon adopts what exists without a gap), and
    /// the allocator, with `in_use` (the allocations of the records it
    /// keeps) taken. Runs in the calling thread's network namespace, which
    /// is the host's from then on. Starts filling the pool.
    pub fn setup(config: NetConfig, in_use: &[Allocation]) -> Result<Network, NetError> {
        config.validate()?;
        let host_ns = netns::current().map_err(io_err("open the host network namespace"))?;
        let rt = Socket::open(nl::ROUTE).map_err(io_err("open netlink socket"))?;
        let rt_delete = (0..RELEASE_PARALLELISM)
            .map(|_| Socket::open(nl::ROUTE).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("open netlink socket"))?;
        let nft = Kernel::open().map_err(io_err("open netlink socket"))?;
        let ct = Conntrack::open().map_err(io_err("open netlink socket"))?;
        let mut keys = vec!["/proc/sys/net/ipv4/ip_forward"];
        if config.subnet_v6.is_some() {
            keys.push("/proc/sys/net/ipv6/conf/all/forwarding");
        }
        for key in keys {
            std::fs::write(key, "1").map_err(io_err("enable forwarding"))?;
        }
        link::create_holder(&rt, &config.gateway_link)
            .map_err(nl_err(format!("create {}", config.gateway_link)))?;
        let gw = link::index(&rt, &config.gateway_link)
            .map_err(nl_err(format!("find {}", config.gateway_link)))?
            .unwrap_or(0);
        let mut msgs = vec![link::address(
            gw,
            IpAddr::V4(config.gateway_v4()),
            config.subnet_v4.prefix_len(),
        )];
        if let (Some(g6), Some(n6)) = (config.gateway_v6(), config.subnet_v6) {
            msgs.push(link::address(gw, IpAddr::V6(g6), n6.prefix_len()));
        }
        link::add(&rt, msgs).map_err(nl_err(format!("address {}", config.gateway_link)))?;

        let mut alloc = Allocator::new(&config);
        for a in in_use {
            if let Err(e) = alloc.reserve(a) {
                tracing::warn!(error = %e, "an allocation of another subnet is ignored");
            }
        }
        let inner = Inner {
            host_ns,
            rt: Mutex::new(rt),
            rt_delete,
            nft,
            ct,
            alloc: Mutex::new(alloc),
            deny: Mutex::new(DenySets::default()),
            pool: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            config,
        };
        let net = Network {
            inner: Arc::new(inner),
            filler: Mutex::new(None),
        };
        net.refresh_host_addresses_with(true)?;
        if net.inner.config.pool_size > 0 {
            let inner = Arc::clone(&net.inner);
            *lock(&net.filler) = Some(
                std::thread::Builder::new()
                    .name("sandpit-netns".into())
                    .spawn(move || inner.fill())
                    .map_err(io_err("start the namespace pool"))?,
            );
        }
        Ok(net)
    }

    /// The configuration in force.
    pub fn config(&self) -> &NetConfig {
        &self.inner.config
    }

    /// Reads the host's addresses again (they change: DHCP, a new uplink)
    /// and replaces the never-reachable sets with them, in one transaction.
    /// Policies compiled before keep their own copy until applied again.
    pub fn refresh_host_addresses(&self) -> Result<(), NetError> {
        self.refresh_host_addresses_with(false)
    }

    fn refresh_host_addresses_with(&self, base: bool) -> Result<(), NetError> {
        let inner = &self.inner;
        let c = &inner.config;
        let host = link::addresses(&lock(&inner.rt)).map_err(nl_err("list host addresses"))?;
        let mut subnets: Vec<IpNet> = vec![c.subnet_v4.into()];
        subnets.extend(c.subnet_v6.map(IpNet::from));
        let deny = rules::deny_sets(&subnets, &host, &c.extra_deny);
        let never = |f: Family| rules::spans_of(f, &deny.never);
        let (n4, n6) = (never(Family::V4), never(Family::V6));
        let ops = if base {
            ruleset::base(c, &n4, &n6)
        } else {
            ruleset::never_sets(&n4, &n6)
        };
        inner
            .nft
            .commit(&c.table, &ops)
            .map_err(nl_err("write the base ruleset"))?;
        *lock(&inner.deny) = deny;
        Ok(())
    }

    /// A network for sandbox `id`: its own namespace (`lo` up, `eth0` with
    /// its addresses and default routes, the sysctls), the host end of its
    /// veth with routes to it. From the pool when one is ready and `alloc`
    /// is `None`; `Some` makes one with those addresses (a record that
    /// already has them). Nothing passes until [`Network::apply`].
    pub fn prepare(
        &self,
        id: &SandboxId,
        alloc: Option<Allocation>,
    ) -> Result<SandboxNet, NetError> {
        let inner = &self.inner;
        let net = |m: Made| SandboxNet {
            id: id.clone(),
            netns: Arc::new(m.netns),
            alloc: m.alloc,
            host_link: m.slot.link,
        };
        let (n, alloc, fresh) = match alloc {
            None => {
                let pooled = lock(&inner.pool).pop();
                inner.wake.notify_all();
                if let Some(m) = pooled {
                    let r = link::set_alias(&lock(&inner.rt), m.host_index, id.as_str());
                    match r {
                        Ok(()) => return Ok(net(m)),
                        // Its link is gone (or broken): drop it, make one.
                        Err(e) => {
                            tracing::warn!(link = %m.slot.link, error = %e, "a prepared namespace is unusable");
                            let n = m.slot.n;
                            let _ = link::delete(&lock(&inner.rt), m.host_index);
                            lock(&inner.alloc).free(n);
                        }
                    }
                }
                let mut a = lock(&inner.alloc);
                let n = a.take()?;
                (n, a.at(n), true)
            }
            Some(given) => {
                let mut a = lock(&inner.alloc);
                let n = a.offset(&given)?;
                (n, given, a.reserve(&given)?)
            }
        };
        match inner.make(n, alloc, Some(id.as_str())) {
            Ok(m) => Ok(net(m)),
            Err(e) => {
                if fresh {
                    lock(&inner.alloc).free(n);
                }
                Err(e)
            }
        }
    }

    /// Puts `policy` in force for `net` (`tenants`: the addresses its
    /// `Tenant` rules stand for), replacing what was: one transaction.
    /// Call it again when the tenants change.
    pub fn apply(
        &self,
        net: &SandboxNet,
        policy: &NetworkPolicy,
        tenants: &TenantSets,
    ) -> Result<(), NetError> {
        let inner = &self.inner;
        let n = lock(&inner.alloc).offset(&net.alloc)?;
        let slot = Slot::new(&inner.config, n);
        let compiled = {
            let deny = lock(&inner.deny);
            rules::compile(
                policy,
                inner.config.default_egress,
                tenants,
                &deny,
                net.alloc.ipv6.is_some(),
            )
        };
        let ops: Vec<Op> = ruleset::sandbox(&inner.config, &slot, &compiled);
        inner
            .nft
            .commit(&inner.config.table, &ops)
            .map_err(nl_err(format!("apply the policy of {}", net.id)))
    }

    /// Re-adopts a running sandbox after a restart: its namespace through
    /// `/proc/<init_pid>/ns/net`, its link found by its allocation (whose
    /// rules and connections were never touched).
    pub fn adopt(
        &self,
        id: &SandboxId,
        alloc: Allocation,
        init_pid: i32,
    ) -> Result<SandboxNet, NetError> {
        let inner = &self.inner;
        let n = lock(&inner.alloc).offset(&alloc)?;
        let slot = Slot::new(&inner.config, n);
        let netns: OwnedFd = std::fs::File::open(format!("/proc/{init_pid}/ns/net"))
            .map_err(io_err("open the sandbox's network namespace"))?
            .into();
        let rt = lock(&inner.rt);
        let l = link::find(&rt, &slot.link)
            .map_err(nl_err(format!("find {}", slot.link)))?
            .ok_or_else(|| NetError::Missing {
                id: id.clone(),
                link: slot.link.clone(),
            })?;
        if l.alias.as_deref() != Some(id.as_str()) {
            link::set_alias(&rt, l.index, id.as_str())
                .map_err(nl_err(format!("name {}", slot.link)))?;
        }
        drop(rt);
        lock(&inner.alloc).reserve(&alloc)?;
        Ok(SandboxNet {
            id: id.clone(),
            netns: Arc::new(netns),
            alloc,
            host_link: slot.link,
        })
    }

    /// Removes everything of sandbox `id`: its link (and with it the
    /// veth's other end and the routes), chains, sets, map elements and
    /// conntrack entries; frees its addresses. Idempotent. A slot now
    /// named for another sandbox is left alone.
    pub fn release(&self, id: &SandboxId, alloc: &Allocation) -> Result<(), NetError> {
        let inner = &self.inner;
        let n = lock(&inner.alloc).offset(alloc)?;
        let slot = Slot::new(&inner.config, n);
        let l = link::find(&lock(&inner.rt), &slot.link)
            .map_err(nl_err(format!("find {}", slot.link)))?;
        if let Some(other) = l.as_ref().and_then(|l| l.alias.as_deref()) {
            if other != id.as_str() {
                tracing::warn!(sandbox_id = %id, owner = other, link = %slot.link,
                    "not released: the link belongs to another sandbox");
                return Ok(());
            }
        }
        // Released already, and the slot went back to the pool: a second
        // release (a retry, a sweep racing a delete) must not take a
        // prepared namespace's link, nor free its offset a second time.
        if lock(&inner.pool).iter().any(|m| m.slot.n == n) {
            return Ok(());
        }
        inner.remove_slot(n, l.map(|l| l.index))?;
        lock(&inner.alloc).free(n);
        Ok(())
    }

    /// Removes the debris of sandboxes `keep` rejects (links named for
    /// them), and of slots nobody holds (a link without an owner, chains
    /// and sets without a link, e.g. after a crash between two steps).
    /// Returns how many slots it cleaned.
    pub fn sweep(&self, keep: impl Fn(&SandboxId) -> bool) -> Result<usize, NetError> {
        let inner = &self.inner;
        let c = &inner.config;
        let links = link::links(&lock(&inner.rt)).map_err(nl_err("list links"))?;
        let pooled: HashSet<u32> = lock(&inner.pool).iter().map(|m| m.slot.n).collect();
        let mut live = HashSet::new();
        let mut cleaned = 0;
        for l in links {
            let Some(n) = Slot::parse_link(c, &l.name) else {
                continue;
            };
            let owned = match l.alias.as_deref().map(SandboxId::parse) {
                Some(Ok(id)) => keep(&id),
                // Being prepared right now, or in the pool.
                None => pooled.contains(&n) || lock(&inner.alloc).is_used(n),
                Some(Err(_)) => false,
            };
            if owned {
                live.insert(n);
                continue;
            }
            inner.remove_slot(n, Some(l.index))?;
            lock(&inner.alloc).free(n);
            live.insert(n);
            cleaned += 1;
        }
        let mut orphans: HashSet<u32> = HashSet::new();
        let chains = inner.nft.chains(&c.table).map_err(nl_err("list chains"))?;
        let sets = inner.nft.sets(&c.table).map_err(nl_err("list sets"))?;
        for name in chains.iter().chain(&sets) {
            if let Some(n) = ruleset::sandbox_object(name) {
                if !live.contains(&n) && !lock(&inner.alloc).is_used(n) {
                    orphans.insert(n);
                }
            }
        }
        for n in orphans {
            inner.remove_slot(n, None)?;
            cleaned += 1;
        }
        Ok(cleaned)
    }

    /// How many conntrack entries involve `alloc` (diagnostics, tests).
    pub fn connections(&self, alloc: &Allocation) -> Result<usize, NetError> {
        self.inner
            .ct
            .count(&Inner::addrs(alloc))
            .map_err(nl_err("list connections"))
    }

    /// The ranges the firewall keeps every sandbox from, as of the last
    /// read of the host's addresses: `(never, private)`, where `never`
    /// holds link-local, the host's own addresses and `extra_deny`, and
    /// `private` what only a CIDR rule naming it opens. The resolver and
    /// the proxy check names' addresses against the same ranges.
    pub fn deny_ranges(&self) -> (Vec<IpNet>, Vec<IpNet>) {
        let deny = lock(&self.inner.deny);
        (deny.never.clone(), deny.private.clone())
    }

    /// How many namespaces are ready in the pool.
    pub fn pooled(&self) -> usize {
        lock(&self.inner.pool).len()
    }
}

impl Network {
    /// Stops the pool and removes its namespaces' links; every sandbox's
    /// link, rules and connections stay (a daemon going away, even on
    /// purpose, cuts nothing). Idempotent; the drop does it too. A daemon
    /// calls it on a clean stop, so that the pool is gone before the
    /// process exits whoever still holds the network (a runtime thread's
    /// handle would otherwise leave the links to the kernel's teardown of
    /// the namespaces, which lags the exit).
    pub fn close_pool(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.wake.notify_all();
        let filler = lock(&self.filler).take();
        if let Some(t) = filler {
            let _ = t.join();
        }
        let pool = std::mem::take(&mut *lock(&self.inner.pool));
        for m in pool {
            let _ = link::delete(&lock(&self.inner.rt), m.host_index);
            lock(&self.inner.alloc).free(m.slot.n);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.close_pool();
    }
}
