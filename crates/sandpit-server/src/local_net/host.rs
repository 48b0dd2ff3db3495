//! What the daemon keeps on the host for its sandboxes' networks: one
//! record per sandbox (`<id>.json`), the share token key, and the host-wide
//! lock of its network layout.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::engine::EngineError;
use crate::model::SandboxId;

use super::{io_err, Persisted};

/// Where host-wide locks of network layouts live.
const LOCK_DIR: &str = "/run/sandpit";

/// An exclusive lock on the host for `table`'s layout. Two daemons on one
/// layout would replace each other's base rules and sweep each other's
/// sandboxes' links: the second one is refused at start, whatever its data
/// dir.
pub(super) fn lock_layout(table: &str) -> Result<nix::fcntl::Flock<std::fs::File>, EngineError> {
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

/// HMAC-SHA256 of `msg` under `key`.
pub(super) fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The key share tokens derive from, made once (0600) and kept: tokens
/// handed out stay valid across restarts.
pub(super) fn load_token_key(path: &Path) -> std::io::Result<[u8; 32]> {
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

pub(super) fn read_one(path: &Path) -> Option<Persisted> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable sandbox network record");
            None
        }
    }
}

pub(super) fn read_all(dir: &Path) -> Vec<(SandboxId, Persisted)> {
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
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
    use sandpit_net::policy::NetworkPolicy;

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
        let hosts = super::super::hosts_file(&all[0].0, &p.alloc);
        assert!(hosts.contains("10.209.0.5\tsb-1\n") && hosts.contains("fd5a:9d17:4e3c::5\tsb-1"));
    }
}
