//! The resolver and the proxy end to end on loopback: a real upstream DNS
//! server (hickory-server), real HTTP and HTTPS origins with a private CA,
//! clients sending from sandbox stand-in addresses (`127.0.9.x`).

mod dns;
mod hostile;
mod proxy;

use sandpit_egress::testing::{Lab, Zone, ORIGIN_IP};

/// The names every test's upstream serves.
pub(crate) fn zone() -> Zone {
    Zone::new()
        .addr("api.test", ORIGIN_IP)
        .addr("other.test", ORIGIN_IP)
        .addr("files.test", ORIGIN_IP)
        .addr("a.files.test", ORIGIN_IP)
        .addr("deep.a.files.test", ORIGIN_IP)
        .addr("db.internal.test", ORIGIN_IP)
        .cname("alias.test", "api.test")
        .addr("rebind-lo.test", "127.0.0.1".parse().unwrap())
        .addr("rebind-ten.test", "10.0.0.1".parse().unwrap())
        .addr("metadata.test", "169.254.169.254".parse().unwrap())
        .addr("mixed.test", ORIGIN_IP)
        .addr("mixed.test", "10.0.0.1".parse().unwrap())
        .addr("mapped.test", "::ffff:127.0.0.1".parse().unwrap())
}

/// Certificate names of the HTTPS origin.
pub(crate) const CERT_NAMES: &[&str] = &[
    "api.test",
    "other.test",
    "files.test",
    "a.files.test",
    "deep.a.files.test",
    "db.internal.test",
    "alias.test",
    "mixed.test",
];

pub(crate) async fn lab() -> Lab {
    Lab::start(&zone(), CERT_NAMES).await
}
