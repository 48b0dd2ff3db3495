//! Counters, per sandbox and per server, and the state of the per-sandbox
//! bounds (query rate, queries in flight, connections). Everything is an
//! atomic or a short critical section: the hot paths never wait on it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

macro_rules! reasons {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            /// Every reason, in counter order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];

            /// The reason's name in metrics and logs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Why the resolver refused a query.
    DnsDenial {
        /// No grant matches the name (answered NXDOMAIN).
        NotGranted => "not_granted",
        /// A runner carve-out (`dns_name_except`) matches (NXDOMAIN).
        CarvedOut => "carved_out",
        /// Every address of the answer was in the deny set (NXDOMAIN).
        PrivateAnswer => "private_answer",
        /// A type the sandbox may not ask for: zone transfers and ANY
        /// always (REFUSED), and for a granted name anything but A, AAAA
        /// and CNAME (an empty answer).
        QueryType => "query_type",
        /// Over the sandbox's query rate (dropped).
        RateLimited => "rate_limited",
        /// Too many of the sandbox's queries or connections in flight
        /// (dropped).
        Busy => "busy",
        /// Not a well-formed standard query (dropped or FORMERR).
        Malformed => "malformed",
        /// The upstreams failed or timed out (SERVFAIL).
        Upstream => "upstream",
    }
}

reasons! {
    /// Why the proxy refused a connection.
    ProxyRefusal {
        /// No grant matches the name for this port.
        NotGranted => "not_granted",
        /// A runner carve-out (`dns_name_except`) matches.
        CarvedOut => "carved_out",
        /// The name resolved to an address in the deny set.
        PrivateAddress => "private_address",
        /// No name to route by: a ClientHello without SNI, a request
        /// without `Host`.
        NoName => "no_name",
        /// The name is not a host name (an IP literal, bad characters).
        BadName => "bad_name",
        /// Not a TLS ClientHello / not an HTTP/1 request.
        Malformed => "malformed",
        /// The ClientHello or the request head is over its size bound.
        TooLarge => "too_large",
        /// The ClientHello or the request head did not arrive in time.
        Timeout => "timeout",
        /// The name did not resolve (or only to nothing usable).
        ResolveFailed => "resolve_failed",
        /// No resolved address accepted the connection in time.
        ConnectFailed => "connect_failed",
        /// Over the sandbox's (or the proxy's) connection bound.
        TooManyConnections => "too_many_connections",
    }
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// One sandbox's counters and bounds' state. Shared by the resolver and
/// the proxy through its [`crate::SandboxPolicy`].
#[derive(Debug)]
pub struct SandboxUsage {
    dns_answered: AtomicU64,
    dns_denied: [AtomicU64; 8],
    proxy_allowed: AtomicU64,
    proxy_refused: [AtomicU64; 11],
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    connections: AtomicUsize,
    dns_in_flight: AtomicUsize,
    dns_tcp: AtomicUsize,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Default for SandboxUsage {
    fn default() -> Self {
        Self {
            dns_answered: AtomicU64::new(0),
            dns_denied: counters(),
            proxy_allowed: AtomicU64::new(0),
            proxy_refused: counters(),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            dns_in_flight: AtomicUsize::new(0),
            dns_tcp: AtomicUsize::new(0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                at: None,
            }),
        }
    }
}

/// Which of a sandbox's bounded counts a [`Slot`] holds.
#[derive(Debug, Clone, Copy)]
enum Bounded {
    Connections,
    DnsInFlight,
    DnsTcp,
}

/// A slot in one of a sandbox's bounded counts, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    usage: Arc<SandboxUsage>,
    which: Bounded,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.usage.count(self.which).fetch_sub(1, Relaxed);
    }
}

impl SandboxUsage {
    /// Queries the resolver answered (from upstream, NXDOMAIN and empty
    /// answers from upstream included; denials not).
    pub fn dns_answered(&self) -> u64 {
        self.dns_answered.load(Relaxed)
    }

    /// Queries refused for `reason`.
    pub fn dns_denied(&self, reason: DnsDenial) -> u64 {
        self.dns_denied[reason as usize].load(Relaxed)
    }

    /// Queries refused, all reasons.
    pub fn dns_denied_total(&self) -> u64 {
        self.dns_denied.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Connections the proxy carried.
    pub fn proxy_allowed(&self) -> u64 {
        self.proxy_allowed.load(Relaxed)
    }

    /// Connections refused for `reason`.
    pub fn proxy_refused(&self, reason: ProxyRefusal) -> u64 {
        self.proxy_refused[reason as usize].load(Relaxed)
    }

    /// Connections refused, all reasons.
    pub fn proxy_refused_total(&self) -> u64 {
        self.proxy_refused.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Bytes the sandbox sent through the proxy (ClientHello and request
    /// heads included).
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Relaxed)
    }

    /// Bytes the proxy delivered to the sandbox.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Relaxed)
    }

    /// The sandbox's connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    pub(crate) fn answered(&self) {
        self.dns_answered.fetch_add(1, Relaxed);
    }

    pub(crate) fn deny(&self, reason: DnsDenial) {
        self.dns_denied[reason as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn allow(&self) {
        self.proxy_allowed.fetch_add(1, Relaxed);
    }

    pub(crate) fn refuse(&self, reason: ProxyRefusal) {
        self.proxy_refused[reason as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    fn count(&self, which: Bounded) -> &AtomicUsize {
        match which {
            Bounded::Connections => &self.connections,
            Bounded::DnsInFlight => &self.dns_in_flight,
            Bounded::DnsTcp => &self.dns_tcp,
        }
    }

    fn slot(self: &Arc<Self>, which: Bounded, max: usize) -> Option<Slot> {
        self.count(which)
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Slot {
            usage: Arc::clone(self),
            which,
        })
    }

    /// One of at most `max` proxy connections.
    pub(crate) fn connection(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.slot(Bounded::Connections, max)
    }

    /// One of at most `max` queries in flight.
    pub(crate) fn dns_query(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.slot(Bounded::DnsInFlight, max)
    }

    /// One of at most `max` DNS-over-TCP connections.
    pub(crate) fn dns_tcp(self: &Arc<Self>, max: usize) -> Option<Slot> {
        self.slot(Bounded::DnsTcp, max)
    }

    /// Takes one query from the sandbox's token bucket (`rate` per second,
    /// up to `burst`); `false` when it is empty.
    pub(crate) fn take_token(&self, rate: u32, burst: u32) -> bool {
        let now = Instant::now();
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = b.at.map_or(f64::INFINITY, |at| (now - at).as_secs_f64());
        b.tokens = (b.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        b.at = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A server's own counters (what cannot be charged to a sandbox).
#[derive(Debug, Default)]
pub struct ServerCounters {
    unknown_sources: AtomicU64,
    busy: AtomicU64,
}

impl ServerCounters {
    /// Packets or connections from addresses no sandbox has (dropped).
    pub fn unknown_sources(&self) -> u64 {
        self.unknown_sources.load(Relaxed)
    }

    /// Packets or connections dropped at a server-wide bound.
    pub fn busy(&self) -> u64 {
        self.busy.load(Relaxed)
    }

    pub(crate) fn unknown(&self) {
        self.unknown_sources.fetch_add(1, Relaxed);
    }

    pub(crate) fn overloaded(&self) {
        self.busy.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_counters() {
        let u = SandboxUsage::default();
        assert_eq!(DnsDenial::ALL.len(), u.dns_denied.len());
        assert_eq!(ProxyRefusal::ALL.len(), u.proxy_refused.len());
        for (i, r) in DnsDenial::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            u.deny(*r);
        }
        for (i, r) in ProxyRefusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            u.refuse(*r);
        }
        assert_eq!(u.dns_denied_total(), DnsDenial::ALL.len() as u64);
        assert_eq!(u.proxy_refused(ProxyRefusal::TooLarge), 1);
        assert_eq!(ProxyRefusal::PrivateAddress.to_string(), "private_address");
    }

    #[test]
    fn slots_are_bounded_and_given_back() {
        let u = Arc::new(SandboxUsage::default());
        let a = u.connection(2).unwrap();
        let _b = u.connection(2).unwrap();
        assert!(u.connection(2).is_none());
        drop(a);
        assert_eq!(u.open_connections(), 1);
        assert!(u.connection(2).is_some());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let u = SandboxUsage::default();
        let taken = (0..20).filter(|_| u.take_token(1, 5)).count();
        assert_eq!(taken, 5);
    }
}
