//! Making a sandbox's network namespace: on a dedicated thread, which
//! unshares `CLONE_NEWNET` itself (the daemon never forks, and a thread of
//! its blocking pool must not wander into a sandbox's namespace), keeps an
//! fd of it, wires it to the host and returns to the host's namespace.
//!
//! Inside: `lo` up, `eth0` with the sandbox's addresses (/32 and /128: it
//! reaches everything, siblings included, through the gateway, so the
//! host's firewall sees every packet), a route to the gateway on the link
//! and default routes through it (IPv6 through `fe80::1`, the host end's
//! link-local address), and the sysctls the spawner sets for a
//! loopback-only sandbox. Outside: the host end `sp-<n>`, up, routes to
//! the sandbox's addresses, `fe80::1`.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use crate::alloc::{Allocation, Slot};
use crate::config::NetConfig;
use crate::link;
use crate::nl::{self, Socket};
use crate::NetError;

/// The host end's link-local address: every sandbox's IPv6 gateway.
pub(crate) const HOST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

fn nl_err(step: String) -> impl FnOnce(nl::NlError) -> NetError {
    move |source| NetError::Netlink { step, source }
}

fn io_err(step: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Io { step, source }
}

/// The calling thread's network namespace.
pub(crate) fn current() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

/// Moves the calling thread into the namespace `fd`.
pub(crate) fn enter(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: setns only changes this thread's namespace; `fd` is valid.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new namespace for the calling thread, which stays in it.
pub(crate) fn unshare() -> io::Result<OwnedFd> {
    // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace
    // (allowed in a multi-threaded process, unlike CLONE_NEWUSER).
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    current()
}

/// The sysctls a sandbox's namespace gets (as the spawner sets them for
/// loopback-only sandboxes; Docker's defaults): an unprivileged root may
/// bind low ports and ping; no duplicate address detection (nothing else
/// on the link can hold the sandbox's addresses).
fn sysctls(v6: bool) -> Result<(), NetError> {
    let mut keys = vec![
        ("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647"),
    ];
    if v6 {
        keys.push(("/proc/sys/net/ipv6/conf/default/accept_dad", "0"));
        keys.push(("/proc/sys/net/ipv6/conf/all/accept_dad", "0"));
    }
    for (key, value) in keys {
        // /proc/sys/net resolves to the opening thread's namespace.
        std::fs::write(key, value).map_err(io_err("set sandbox sysctl"))?;
    }
    Ok(())
}

/// A prepared namespace on the host: the fd that keeps it, and its link.
#[derive(Debug)]
pub(crate) struct Made {
    pub(crate) netns: OwnedFd,
    pub(crate) slot: Slot,
    pub(crate) alloc: Allocation,
    pub(crate) host_index: u32,
}

/// Makes the namespace of `slot` and wires it to the host; runs on a
/// thread of its own, started in the host's namespace `host_ns` and back
/// there at the end. `alias`: the sandbox id, when known.
pub(crate) fn make(
    config: &NetConfig,
    host_ns: &OwnedFd,
    slot: Slot,
    alloc: Allocation,
    alias: Option<&str>,
) -> Result<Made, NetError> {
    // Its own socket of the host's namespace (opened before leaving it):
    // no lock shared with the daemon's other calls.
    let rt = &Socket::open(nl::ROUTE).map_err(io_err("open netlink socket"))?;
    let inside = unshare()
        .map_err(io_err("create network namespace"))
        .and_then(|netns| configure_inside(config, host_ns, &slot, &alloc).map(|()| netns));
    // Back home whatever happened: the next job must not start inside.
    enter(host_ns).map_err(io_err("return to the host network namespace"))?;
    let netns = inside?;
    match configure_host(rt, &slot, &alloc, alias) {
        Ok(host_index) => Ok(Made {
            netns,
            slot,
            alloc,
            host_index,
        }),
        Err(e) => {
            if let Ok(Some(i)) = link::index(rt, &slot.link) {
                let _ = link::delete(rt, i);
            }
            Err(e)
        }
    }
}

fn configure_host(
    rt: &Socket,
    slot: &Slot,
    alloc: &Allocation,
    alias: Option<&str>,
) -> Result<u32, NetError> {
    let find = || format!("find {}", slot.link);
    let index = link::index(rt, &slot.link)
        .map_err(nl_err(find()))?
        .ok_or_else(|| NetError::Netlink {
            step: find(),
            source: nl::NlError {
                errno: libc::ENODEV,
                message: None,
            },
        })?;
    let v4 = IpAddr::V4(alloc.ipv4);
    let mut msgs = vec![
        link::up_msg(index),
        link::route(Some((v4, 32)), v4, None, index),
    ];
    if let Some(v6) = alloc.ipv6 {
        let v6 = IpAddr::V6(v6);
        msgs.insert(0, link::address(index, IpAddr::V6(HOST_LL), 64));
        msgs.push(link::route(Some((v6, 128)), v6, None, index));
    }
    link::add(rt, msgs).map_err(nl_err(format!("address and route {}", slot.link)))?;
    if let Some(id) = alias {
        link::set_alias(rt, index, id).map_err(nl_err(format!("name {}", slot.link)))?;
    }
    Ok(index)
}

fn configure_inside(
    config: &NetConfig,
    host_ns: &OwnedFd,
    slot: &Slot,
    alloc: &Allocation,
) -> Result<(), NetError> {
    sysctls(alloc.ipv6.is_some())?;
    let sock = Socket::open(nl::ROUTE).map_err(io_err("open netlink socket"))?;
    link::create_veth(&sock, &slot.link, host_ns.as_raw_fd())
        .map_err(nl_err(format!("create veth {}", slot.link)))?;
    let eth0 = link::index(&sock, "eth0")
        .map_err(nl_err("find eth0".into()))?
        .unwrap_or(0);
    let gw4 = IpAddr::V4(config.gateway_v4());
    let v4 = IpAddr::V4(alloc.ipv4);
    let mut msgs = vec![
        link::up_msg(1), // lo
        link::up_msg(eth0),
        link::address(eth0, v4, 32),
        link::route(Some((gw4, 32)), v4, None, eth0),
        link::route(None, v4, Some(gw4), eth0),
    ];
    if let Some(v6) = alloc.ipv6 {
        let v6 = IpAddr::V6(v6);
        msgs.push(link::address(eth0, v6, 128));
        msgs.push(link::route(None, v6, Some(IpAddr::V6(HOST_LL)), eth0));
    }
    link::add(&sock, msgs).map_err(nl_err("address and route eth0".into()))
}
