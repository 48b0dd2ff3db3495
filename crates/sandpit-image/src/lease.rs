//! Leases: the layers a running sandbox has mounted, kept from `gc`.
//!
//! A lease is a file `<root>/leases/<holder>.json` naming diff ids. It lives
//! on disk rather than in memory because the store is shared between
//! processes: `sandpit image rm` (the CLI) must not collect a layer that a
//! sandbox of the daemon has as an overlayfs lower dir. Leases are taken
//! under the store's shared lock after checking the layers exist, and `gc`
//! reads them under the exclusive lock, so a layer is either collected
//! before the lease (and the lease fails) or kept.
//!
//! [`LeaseGuard`] is the RAII form of "lease, create the sandbox, release
//! if creating failed": the daemon and `sandpit run` both need it, and a
//! guard cannot forget the release on an early return.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

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

    /// [`ImageStore::lease`] as a guard that releases the lease when dropped,
    /// unless [`LeaseGuard::keep`] was called: for "lease, then create the
    /// sandbox, and release if creating failed" without a release on every
    /// error path.
    pub fn lease_guard(
        &self,
        holder: &str,
        layers: &[Digest],
    ) -> Result<LeaseGuard<&Self>, ImageError> {
        LeaseGuard::new(self, holder, layers)
    }

    /// [`ImageStore::lease_guard`] holding the store by `Arc`: a guard that
    /// can move to another thread (a blocking task of the daemon) or
    /// outlive the caller's borrow.
    pub fn lease_guard_owned(
        self: &Arc<Self>,
        holder: &str,
        layers: &[Digest],
    ) -> Result<LeaseGuard<Arc<Self>>, ImageError> {
        LeaseGuard::new(Arc::clone(self), holder, layers)
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

/// A lease that is released when the guard is dropped, unless
/// [`LeaseGuard::keep`] is called once the leased layers are in use (the
/// sandbox is created): then the lease stays until [`ImageStore::release`]
/// after the sandbox is destroyed.
///
/// `S` is how the guard holds the store: `&ImageStore`
/// ([`ImageStore::lease_guard`]) or `Arc<ImageStore>`
/// ([`ImageStore::lease_guard_owned`]).
#[must_use = "dropping the guard releases the lease at once"]
pub struct LeaseGuard<S: Deref<Target = ImageStore>> {
    store: S,
    holder: String,
    /// Whether dropping the guard releases the lease.
    armed: bool,
}

impl<S: Deref<Target = ImageStore>> LeaseGuard<S> {
    fn new(store: S, holder: &str, layers: &[Digest]) -> Result<Self, ImageError> {
        store.lease(holder, layers)?;
        Ok(Self {
            store,
            holder: holder.to_owned(),
            armed: true,
        })
    }

    /// The lease's holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Keeps the lease past the guard: the layers are in use now, and
    /// whoever stops using them releases it ([`ImageStore::release`]).
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// Releases the lease now, reporting a failure (dropping the guard only
    /// logs it).
    pub fn release(mut self) -> Result<(), ImageError> {
        self.armed = false;
        self.store.release(&self.holder)
    }
}

impl<S: Deref<Target = ImageStore>> Drop for LeaseGuard<S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Drop cannot return the error, and the caller is already on an
        // error path of its own: a lease left behind only pins layers until
        // the holder's next lease or a sweep of the leases, so log it.
        if let Err(e) = self.store.release(&self.holder) {
            tracing::warn!(
                holder = %self.holder,
                error = &e as &dyn std::error::Error,
                "cannot release image lease"
            );
        }
    }
}

impl<S: Deref<Target = ImageStore>> fmt::Debug for LeaseGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("store", &self.store.root())
            .field("holder", &self.holder)
            .field("armed", &self.armed)
            .finish()
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

    // Leases of no layers need no import (nor root): enough for the guard's
    // own logic. `tests/lease.rs` covers guards over real layers and `gc`.
    #[test]
    fn guards_release_on_drop_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ImageStore::open(dir.path(), crate::IdShift::default()).unwrap());
        let holders = || store.lease_holders().unwrap();

        let guard = store.lease_guard("dropped", &[]).unwrap();
        assert_eq!(guard.holder(), "dropped");
        assert_eq!(holders(), ["dropped"]);
        drop(guard);
        assert!(holders().is_empty());

        store.lease_guard("kept", &[]).unwrap().keep();
        assert_eq!(holders(), ["kept"]);

        store
            .lease_guard("released", &[])
            .unwrap()
            .release()
            .unwrap();
        assert_eq!(holders(), ["kept"]);

        // Owned: moves to another thread, released there when dropped.
        let owned = store.lease_guard_owned("owned", &[]).unwrap();
        assert_eq!(holders(), ["kept", "owned"]);
        std::thread::spawn(move || drop(owned)).join().unwrap();
        assert_eq!(holders(), ["kept"]);
        let owned = store.lease_guard_owned("owned-kept", &[]).unwrap();
        std::thread::spawn(move || owned.keep()).join().unwrap();
        assert_eq!(holders(), ["kept", "owned-kept"]);

        // No guard when the lease fails; nothing to release.
        assert!(matches!(
            store.lease_guard("bad/holder", &[]),
            Err(ImageError::InvalidLeaseHolder(_))
        ));
        let missing = Digest::sha256_of(b"not in the store");
        assert!(matches!(
            store.lease_guard_owned("missing", std::slice::from_ref(&missing)),
            Err(ImageError::LayerNotFound(d)) if d == missing
        ));
        assert_eq!(holders(), ["kept", "owned-kept"]);
        let text = format!("{:?}", store.lease_guard("debug", &[]).unwrap());
        assert!(
            text.contains("debug") && text.contains("armed: true"),
            "{text}"
        );
        assert_eq!(holders(), ["kept", "owned-kept"]);
    }

    #[test]
    fn a_failed_release_on_drop_is_logged_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path(), crate::IdShift::default()).unwrap();
        let guard = store.lease_guard("stuck", &[]).unwrap();
        // A directory where the lease file was: removing it fails.
        let path = store.lease_path("stuck");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            store.release("stuck"),
            Err(ImageError::Io { op: "remove", .. })
        ));
        drop(guard);
        assert!(path.is_dir());
    }
}
