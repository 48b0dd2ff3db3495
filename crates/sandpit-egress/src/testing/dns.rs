//! An upstream DNS server for tests: hickory-server, authoritative for the
//! zones of the names it is given, on UDP and TCP of one address.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::RecordType;
use hickory_proto::rr::{LowerName, Name, RData, Record};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// The records a [`TestDns`] serves.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: Vec<(String, RData)>,
}

impl Zone {
    /// No records.
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` has address `ip` (A or AAAA); call again for more.
    pub fn addr(mut self, name: &str, ip: IpAddr) -> Self {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        self.records.push((name.to_owned(), data));
        self
    }

    /// `name` is an alias of `target`.
    pub fn cname(mut self, name: &str, target: &str) -> Self {
        self.records
            .push((name.to_owned(), RData::CNAME(CNAME(fqdn(target)))));
        self
    }
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).expect("a valid test name");
    n.set_fqdn(true);
    n
}

/// A running upstream DNS server; stops when dropped.
#[derive(Debug)]
pub struct TestDns {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestDns {
    /// Serves `zone` on UDP and TCP of `ip`, a free port. Every top-level
    /// domain of the zone's names becomes an authoritative zone (with an
    /// SOA, so misses are NXDOMAIN with a negative TTL).
    pub async fn start(ip: IpAddr, zone: &Zone) -> io::Result<Self> {
        let tlds: BTreeSet<String> = zone
            .records
            .iter()
            .filter_map(|(n, _)| {
                n.trim_end_matches('.')
                    .rsplit('.')
                    .next()
                    .map(str::to_owned)
            })
            .collect();
        let mut catalog = Catalog::new();
        for tld in tlds {
            let origin = fqdn(&tld);
            let mut handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
                origin.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
            );
            let soa = SOA::new(
                fqdn(&format!("ns.{tld}")),
                fqdn(&format!("admin.{tld}")),
                1,
                3600,
                600,
                86400,
                5,
            );
            handler.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1);
            for (name, data) in &zone.records {
                let name = fqdn(name);
                if origin.zone_of(&name) {
                    handler.upsert_mut(Record::from_rdata(name, 60, data.clone()), 1);
                }
            }
            let handlers: Vec<Arc<dyn ZoneHandler>> = vec![Arc::new(handler)];
            catalog.upsert(LowerName::new(&origin), handlers);
        }
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
            match TcpListener::bind(udp.local_addr()?).await {
                Ok(tcp) => break (udp, tcp),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        };
        let addr = udp.local_addr()?;
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        Ok(Self { addr, task })
    }

    /// Where it serves (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn query_message(name: &str, rtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(fqdn(name), rtype));
    m
}

fn timed_out() -> io::Error {
    io::Error::from(io::ErrorKind::TimedOut)
}

/// Asks `server` over UDP from `source` (a sandbox's stand-in address):
/// the response, or `TimedOut` when none came within 2 s.
pub async fn query_udp(
    source: IpAddr,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> io::Result<Message> {
    let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await?;
    let query = query_message(name, rtype);
    socket
        .send_to(&query.to_vec().map_err(io::Error::other)?, server)
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut buf))
        .await
        .map_err(|_| timed_out())??;
    let reply = Message::from_vec(&buf[..n]).map_err(io::Error::other)?;
    if reply.metadata.id != query.metadata.id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "reply id mismatch",
        ));
    }
    Ok(reply)
}

/// Asks `server` over TCP from `source`.
pub async fn query_tcp(
    source: IpAddr,
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
) -> io::Result<Message> {
    let mut stream = super::connect_from(source, server).await?;
    let bytes = query_message(name, rtype)
        .to_vec()
        .map_err(io::Error::other)?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await?;
    let read = async {
        let len = stream.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        io::Result::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| timed_out())??;
    Message::from_vec(&buf).map_err(io::Error::other)
}

/// The addresses in `m`'s answers.
pub fn answer_ips(m: &Message) -> Vec<IpAddr> {
    m.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
}
