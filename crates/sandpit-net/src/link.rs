//! Links, addresses and routes over rtnetlink (typed messages from
//! `netlink-packet-route`, sent on our blocking socket). No `ip` process.

use std::net::IpAddr;
use std::os::fd::RawFd;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::nl::{NlError, Socket, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};

const NLM_F_REPLACE: u16 = 0x100;
const RT_TABLE_MAIN: u8 = 254;

/// Encodes `msgs` back to back, each asking for an ack, and waits for all.
fn request(sock: &Socket, flags: u16, msgs: Vec<RouteNetlinkMessage>) -> Result<(), NlError> {
    let mut buf = Vec::new();
    let mut acks = Vec::with_capacity(msgs.len());
    for m in msgs {
        let seq = sock.seq();
        acks.push(seq);
        let mut header = NetlinkHeader::default();
        header.flags = crate::nl::NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(m));
        msg.finalize();
        let start = buf.len();
        buf.resize(start + msg.buffer_len(), 0);
        msg.serialize(&mut buf[start..]);
    }
    sock.transact(&buf, &acks)
}

fn dump(sock: &Socket, m: RouteNetlinkMessage, mut each: impl FnMut(&[u8])) -> Result<(), NlError> {
    let mut header = NetlinkHeader::default();
    header.flags = crate::nl::NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sock.seq();
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(m));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.dump(&buf, |_, payload| each(payload))
}

fn up() -> (LinkFlags, LinkFlags) {
    (LinkFlags::Up, LinkFlags::Up)
}

/// From inside a new namespace (`sock` opened there): `eth0` here, its
/// peer `peer` in the namespace of `host_ns`. Both down: a veth cannot
/// come up before its peer is registered (ENOTCONN); [`up_msg`] them.
pub(crate) fn create_veth(sock: &Socket, peer: &str, host_ns: RawFd) -> Result<(), NlError> {
    let mut peer_msg = LinkMessage::default();
    peer_msg.attributes = vec![
        LinkAttribute::IfName(peer.into()),
        LinkAttribute::NetNsFd(host_ns),
    ];
    let mut msg = LinkMessage::default();
    msg.attributes = vec![
        LinkAttribute::IfName("eth0".into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]),
    ];
    request(
        sock,
        NLM_F_CREATE | NLM_F_EXCL,
        vec![RouteNetlinkMessage::NewLink(msg)],
    )
}

/// A port-less bridge, up (already there is fine): it only holds the
/// gateway addresses (local whatever its carrier) and the subnets' routes,
/// which swallow traffic to unassigned sandbox addresses. A bridge rather
/// than a dummy: every kernel that has veths has bridges (this one has no
/// dummy driver).
pub(crate) fn create_holder(sock: &Socket, name: &str) -> Result<(), NlError> {
    let mut msg = LinkMessage::default();
    (msg.header.flags, msg.header.change_mask) = up();
    msg.attributes = vec![
        LinkAttribute::IfName(name.into()),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
    ];
    match request(
        sock,
        NLM_F_CREATE | NLM_F_EXCL,
        vec![RouteNetlinkMessage::NewLink(msg)],
    ) {
        Err(e) if e.errno == libc::EEXIST => set_up(sock, index(sock, name)?.unwrap_or(0)),
        other => other,
    }
}

/// Brings a link up.
pub(crate) fn set_up(sock: &Socket, index: u32) -> Result<(), NlError> {
    request(sock, 0, vec![up_msg(index)])
}

/// The message that brings a link up.
pub(crate) fn up_msg(index: u32) -> RouteNetlinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    (msg.header.flags, msg.header.change_mask) = up();
    RouteNetlinkMessage::SetLink(msg)
}

/// Sets a link's alias (where the sandbox id is kept on the host).
pub(crate) fn set_alias(sock: &Socket, index: u32, alias: &str) -> Result<(), NlError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes = vec![LinkAttribute::IfAlias(alias.into())];
    request(sock, 0, vec![RouteNetlinkMessage::SetLink(msg)])
}

/// The index of link `name`, if there is one.
pub(crate) fn index(sock: &Socket, name: &str) -> Result<Option<u32>, NlError> {
    Ok(find(sock, name)?.map(|l| l.index))
}

/// One link of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) alias: Option<String>,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        alias: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::IfAlias(a) if !a.is_empty() => l.alias = Some(a.clone()),
            _ => {}
        }
    }
    l
}

/// Link `name`, if there is one.
pub(crate) fn find(sock: &Socket, name: &str) -> Result<Option<Link>, NlError> {
    let mut msg = LinkMessage::default();
    msg.attributes = vec![LinkAttribute::IfName(name.into())];
    let mut header = NetlinkHeader::default();
    header.flags = crate::nl::NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = sock.seq();
    let mut m = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(msg)),
    );
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    let mut found = None;
    // One NEWLINK answer, then the ack.
    match sock.dump(&buf, |_, p| {
        if let Ok(m) = LinkMessage::parse(p) {
            found = Some(link_of(&m));
        }
    }) {
        Ok(()) => Ok(found),
        Err(e) if e.errno == libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every link of the socket's namespace.
pub(crate) fn links(sock: &Socket) -> Result<Vec<Link>, NlError> {
    let mut out = Vec::new();
    dump(
        sock,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        |p| {
            if let Ok(m) = LinkMessage::parse(p) {
                out.push(link_of(&m));
            }
        },
    )?;
    Ok(out)
}

/// Deletes link `name` (a veth takes its peer along); false if there was
/// none.
pub(crate) fn delete(sock: &Socket, index: u32) -> Result<bool, NlError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match request(sock, 0, vec![RouteNetlinkMessage::DelLink(msg)]) {
        Ok(()) => Ok(true),
        Err(e) if e.errno == libc::ENODEV => Ok(false),
        Err(e) => Err(e),
    }
}

fn family(a: &IpAddr) -> AddressFamily {
    match a {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// An address message: `addr/prefix` on `index`, without duplicate
/// address detection (nothing else on a sandbox's veth can hold it, and
/// DAD would keep an IPv6 address unusable for a second).
pub(crate) fn address(index: u32, addr: IpAddr, prefix: u8) -> RouteNetlinkMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&addr);
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.header.scope = match addr {
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => AddressScope::Link,
        _ => AddressScope::Universe,
    };
    if addr.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(addr));
    }
    m.attributes.push(AddressAttribute::Address(addr));
    m.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    RouteNetlinkMessage::NewAddress(m)
}

/// A route message: `dst/prefix` (`None`: default) via `gateway` or
/// directly on the link `oif`.
pub(crate) fn route(
    dst: Option<(IpAddr, u8)>,
    fam: IpAddr,
    gateway: Option<IpAddr>,
    oif: u32,
) -> RouteNetlinkMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(&fam);
    m.header.table = RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.kind = RouteType::Unicast;
    m.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if let Some((d, p)) = dst {
        m.header.destination_prefix_length = p;
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(d)));
    }
    if let Some(g) = gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    m.attributes.push(RouteAttribute::Oif(oif));
    RouteNetlinkMessage::NewRoute(m)
}

/// Adds addresses (already there is fine when `exist_ok`).
pub(crate) fn add(sock: &Socket, msgs: Vec<RouteNetlinkMessage>) -> Result<(), NlError> {
    request(sock, NLM_F_CREATE | NLM_F_REPLACE, msgs)
}

/// Every address of the socket's namespace.
pub(crate) fn addresses(sock: &Socket) -> Result<Vec<IpAddr>, NlError> {
    let mut out = Vec::new();
    dump(
        sock,
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |p| {
            if let Ok(m) = AddressMessage::parse(p) {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(a) => Some(*a),
                    _ => None,
                });
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(a) => Some(*a),
                    _ => None,
                });
                if let Some(a) = local.or(addr) {
                    out.push(a);
                }
            }
        },
    )?;
    Ok(out)
}
