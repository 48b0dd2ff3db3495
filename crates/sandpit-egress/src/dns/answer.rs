//! One query from one sandbox, answered: checked against its policy,
//! forwarded upstream when permitted, addresses in the deny set stripped.

use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::net::{DnsError, NetError};

use crate::access::{Resolution, SandboxPolicy};
use crate::denyset::DenySet;
use crate::upstream::Upstream;
use crate::usage::DnsDenial;

/// The UDP payload we advertise and answer within (the DNS flag day's).
pub(crate) const UDP_PAYLOAD: u16 = 1232;

/// What the resolver needs to answer, shared by its UDP and TCP sides.
#[derive(Debug)]
pub(crate) struct Answerer {
    pub(crate) upstream: Upstream,
    pub(crate) deny: DenySet,
    pub(crate) resolve_all_with_cidr_rules: bool,
    pub(crate) query_timeout: Duration,
}

/// The empty response to `query` with `rcode`.
pub(crate) fn response(query: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(UDP_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// `name` lowercase, as text, without the trailing dot: what policies
/// match. Escaped labels keep their escapes, so they never match a grant.
fn query_name(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

fn is_address_type(t: RecordType) -> bool {
    matches!(t, RecordType::A | RecordType::AAAA | RecordType::CNAME)
}

impl Answerer {
    /// The answer to `query` from the sandbox of `policy`. Counts it.
    pub(crate) async fn answer(&self, policy: &SandboxPolicy, query: &Message) -> Message {
        let usage = policy.usage();
        let md = &query.metadata;
        if md.message_type != MessageType::Query || query.queries.len() != 1 {
            usage.deny(DnsDenial::Malformed);
            return response(query, ResponseCode::FormErr);
        }
        if md.op_code != OpCode::Query {
            usage.deny(DnsDenial::Malformed);
            return response(query, ResponseCode::NotImp);
        }
        let q = &query.queries[0];
        let qtype = q.query_type();
        if q.query_class() != DNSClass::IN
            || matches!(
                qtype,
                RecordType::AXFR | RecordType::IXFR | RecordType::ANY | RecordType::OPT
            )
        {
            usage.deny(DnsDenial::QueryType);
            return response(query, ResponseCode::Refused);
        }
        let name = query_name(q.name());
        match policy.resolution(&name, self.resolve_all_with_cidr_rules) {
            Resolution::Denied(reason) => {
                tracing::debug!(sandbox = policy.id(), %name, %reason, "dns denied");
                usage.deny(reason);
                return response(query, ResponseCode::NXDomain);
            }
            Resolution::Addresses if !is_address_type(qtype) => {
                usage.deny(DnsDenial::QueryType);
                return response(query, ResponseCode::NoError);
            }
            Resolution::Addresses | Resolution::AnyType => {}
        }
        let mut fqdn = q.name().to_lowercase();
        fqdn.set_fqdn(true);
        let lookup = tokio::time::timeout(self.query_timeout, self.upstream.lookup(fqdn, qtype));
        match lookup.await {
            Ok(Ok(lookup)) => self.forwarded(policy, query, lookup.answers()),
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(none)))) => {
                usage.answered();
                let mut m = response(query, none.response_code);
                if let Some(soa) = none.soa {
                    m.add_authority(soa.into_record_of_rdata());
                }
                m
            }
            Ok(Err(e)) => {
                tracing::debug!(sandbox = policy.id(), %name, error = %e, "upstream failed");
                usage.deny(DnsDenial::Upstream);
                response(query, ResponseCode::ServFail)
            }
            Err(_) => {
                usage.deny(DnsDenial::Upstream);
                response(query, ResponseCode::ServFail)
            }
        }
    }

    /// The upstream's `answers`, without the addresses the sandbox may not
    /// reach (unless one of its CIDR rules names them): NXDOMAIN when that
    /// leaves no address at all.
    fn forwarded(&self, policy: &SandboxPolicy, query: &Message, answers: &[Record]) -> Message {
        let mut kept = Vec::with_capacity(answers.len());
        let mut stripped = false;
        let mut addresses = 0;
        for record in answers {
            let ip = match &record.data {
                RData::A(a) => Some(a.0.into()),
                RData::AAAA(a) => Some(a.0.into()),
                _ => None,
            };
            if let Some(ip) = ip {
                if self
                    .deny
                    .check(ip, |a| policy.cidr_allows(a, None))
                    .is_err()
                {
                    stripped = true;
                    continue;
                }
                addresses += 1;
            }
            kept.push(record.clone());
        }
        if stripped && addresses == 0 {
            tracing::debug!(
                sandbox = policy.id(),
                "dns answer only had denied addresses"
            );
            policy.usage().deny(DnsDenial::PrivateAnswer);
            return response(query, ResponseCode::NXDomain);
        }
        policy.usage().answered();
        let mut m = response(query, ResponseCode::NoError);
        m.add_answers(kept);
        m
    }
}

/// `m` encoded within `limit` bytes: truncated (TC set, sections dropped)
/// when it does not fit, so the client retries over TCP.
pub(crate) fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = m.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let truncated = m.truncate().to_vec().ok()?;
    (truncated.len() <= limit).then_some(truncated)
}
