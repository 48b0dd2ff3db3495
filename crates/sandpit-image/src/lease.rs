//! Leases: the layers a running sandbox has mounted, kept from `gc`.
//!
//! A lease is a file `<root>/leases/<holder>.json` naming diff ids. It lives
//! on disk rather than in memory because the store is shared between
//! processes: `sandpit image rm` (the CLI) must not collect a layer that a
//! sandbox of the daemon has as an overlayfs lower dir. Leases are taken
//! under the store's shared lock after checking the layers exist, and `gc`
//! reads them under the exclusive lock, so a layer is either collected
//! before the lease (and the lease fails) or kept.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{read_json, write_file_synced};
use crate::{Digest, ImageError, ImageStore};

const LEASES_DIR: &str = "leases";
/// Longest holder name: file-name safe with room for the extension.
const MAX_HOLDER_LEN: usize = 128;

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    layers: Vec<Digest>,
}

fn check_holder(holder: &str) -> Result<(), ImageError> {
    let ok = !holder.is_empty()
        && holder.len() <= MAX_HOLDER_LEN
        && !holder.starts_with('.')
        && holder
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidLeaseHolder(holder.to_owned()))
    }
}

impl ImageStore {
    fn lease_path(&self, holder: &str) -> PathBuf {
        self.root().join(LEASES_DIR).join(format!("{holder}.json"))
    }

    /// Protects `layers` (diff ids) from [`ImageStore::gc`] and
    /// [`ImageStore::remove`] until [`ImageStore::release`] of `holder`
    /// (`[A-Za-z0-9_.-]`, e.g. a sandbox id). Replaces an earlier lease of
    /// the same holder. Fails with [`ImageError::LayerNotFound`] when a layer
    /// is gone (collected since the caller looked the image up).
    pub fn lease(&self, holder: &str, layers: &[Digest]) -> Result<(), ImageError> {
        check_holder(holder)?;
        let _lock = self.lock_shared()?;
        for layer in layers {
            if !self.has_layer(layer) {
                return Err(ImageError::LayerNotFound(layer.clone()));
            }
        }
        let dir = self.root().join(LEASES_DIR);
        fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
        let aside = self.root().join("tmp").join(format!("lease-{holder}"));
        let json = serde_json::to_vec(&Lease {
            layers: layers.to_vec(),
        })
        .expect("lease serialises");
        write_file_synced(&aside, &json)?;
        let path = self.lease_path(holder);
        fs::rename(&aside, &path).map_err(|e| {
            let _ = fs::remove_file(&aside);
            ImageError::io("rename", &path, e)
        })
    }

    /// Drops the lease of `holder`; releasing twice is not an error.
    pub fn release(&self, holder: &str) -> Result<(), ImageError> {
        check_holder(holder)?;
        let path = self.lease_path(holder);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("remove", &path, e)),
        }
    }

    /// The holders of the current leases, sorted (for sweeping the leases of
    /// sandboxes that no longer exist).
    pub fn lease_holders(&self) -> Result<Vec<String>, ImageError> {
        let dir = self.root().join(LEASES_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("read", &dir, e)),
        };
        let mut holders = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("read", &dir, e))?;
            let name = entry.file_name();
            if let Some(holder) = name.to_str().and_then(|n| n.strip_suffix(".json")) {
                if check_holder(holder).is_ok() {
                    holders.push(holder.to_owned());
                }
            }
        }
        holders.sort();
        Ok(holders)
    }

    /// Diff ids of every leased layer. An unreadable lease (an invalid
    /// digest included) fails the call: collecting nothing beats collecting
    /// a mounted layer.
    pub(crate) fn leased_layers(&self) -> Result<HashSet<Digest>, ImageError> {
        let mut layers = HashSet::new();
        for holder in self.lease_holders()? {
            let path = self.lease_path(&holder);
            let lease: Lease = match read_json(&path) {
                Ok(lease) => lease,
                Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e),
            };
            layers.extend(lease.layers);
        }
        Ok(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_file_name_safe() {
        for good in ["abc", "sandbox-x1_2.3", &"a".repeat(128)] {
            assert!(check_holder(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "ä", &"a".repeat(129)] {
            assert!(
                matches!(check_holder(bad), Err(ImageError::InvalidLeaseHolder(_))),
                "{bad}"
            );
        }
    }
}
