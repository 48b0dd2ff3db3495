//! The on-disk store: layers by diff id, image records by reference.
//! Importing layers is in `import.rs`.

mod commit;
mod import;

pub use commit::CommittedLayer;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{Digest, IdShift, Image, ImageConfig, ImageError, LayerInfo, Reference};

const STORE_VERSION: u32 = 1;
const STORE_FILE: &str = "store.json";
/// Cap for [`ImageStore::import_rootfs_tar`]: operator-provided local files.
pub const ROOTFS_MAX_BYTES: u64 = 64 << 30;
/// How long a layer imported by this process stays protected from `gc`
/// while no image references it yet (a pull in progress).
const FRESH_LAYER_GRACE: Duration = Duration::from_secs(600);

#[derive(Debug, Serialize, Deserialize)]
struct StoreMeta {
    version: u32,
    uid_base: u32,
    uid_count: u32,
}

/// The image store. Cheap to share (`&ImageStore` is all methods need);
/// safe to use from several threads and several processes at once: imports
/// stage under `tmp/` and rename into place, and `gc`/`remove` take an
/// exclusive `flock` on `store.json` that imports share.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    shift: IdShift,
    /// Layers imported by this process that no image referenced yet.
    fresh: Mutex<HashMap<Digest, Instant>>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_name(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}{}-{}-{nanos:08x}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ImageError> {
    let data = fs::read(path).map_err(|e| ImageError::io("read", path, e))?;
    serde_json::from_slice(&data).map_err(|source| ImageError::Corrupt {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn write_file_synced(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let mut f = File::create(path).map_err(|e| ImageError::io("create", path, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| ImageError::io("write", path, e))
}

impl ImageStore {
    /// Opens (creating when needed) the store at `root`. Refuses a store
    /// created with another id shift: its layers are owned by other ids.
    /// Clears `tmp/` unless another user of the store is importing.
    pub fn open(root: &Path, shift: IdShift) -> Result<Self, ImageError> {
        shift
            .validate()
            .map_err(|reason| ImageError::InvalidShift { shift, reason })?;
        let mut private = fs::DirBuilder::new();
        private.recursive(true).mode(0o700);
        for dir in [
            root.to_owned(),
            root.join("layers/sha256"),
            root.join("images"),
            root.join("tmp"),
        ] {
            private
                .create(&dir)
                .map_err(|e| ImageError::io("create", &dir, e))?;
        }
        let meta_path = root.join(STORE_FILE);
        let meta: StoreMeta = match read_json(&meta_path) {
            Ok(meta) => meta,
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                // Write aside and link into place: a concurrent opener sees
                // either no file or a complete one, and exactly one wins.
                let meta = StoreMeta {
                    version: STORE_VERSION,
                    uid_base: shift.base,
                    uid_count: shift.count,
                };
                let aside = root.join("tmp").join(unique_name("store-"));
                let json = serde_json::to_vec_pretty(&meta).expect("store meta serialises");
                write_file_synced(&aside, &json)?;
                let linked = fs::hard_link(&aside, &meta_path);
                let _ = fs::remove_file(&aside);
                match linked {
                    Ok(()) => meta,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_json(&meta_path)?,
                    Err(e) => return Err(ImageError::io("create", &meta_path, e)),
                }
            }
            Err(e) => return Err(e),
        };
        if meta.version != STORE_VERSION {
            return Err(ImageError::UnsupportedVersion {
                path: root.to_owned(),
                version: meta.version,
            });
        }
        let found = IdShift {
            base: meta.uid_base,
            count: meta.uid_count,
        };
        if found != shift {
            return Err(ImageError::ShiftMismatch {
                path: root.to_owned(),
                found,
                requested: shift,
            });
        }
        let store = Self {
            root: root.to_owned(),
            shift,
            fresh: Mutex::new(HashMap::new()),
        };
        // Imports hold a shared lock: clear leftovers only when nobody does.
        if let Some(_lock) = store.try_lock_exclusive()? {
            store.clear_tmp();
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The id shift layers are stored with.
    pub fn shift(&self) -> IdShift {
        self.shift
    }

    fn lock(&self, arg: FlockArg) -> Result<Option<Flock<File>>, ImageError> {
        let path = self.root.join(STORE_FILE);
        let file = File::open(&path).map_err(|e| ImageError::io("open", &path, e))?;
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(ImageError::io("lock", &path, e.into())),
        }
    }

    pub(crate) fn lock_shared(&self) -> Result<Flock<File>, ImageError> {
        Ok(self.lock(FlockArg::LockShared)?.expect("blocking lock"))
    }

    fn lock_exclusive(&self) -> Result<Flock<File>, ImageError> {
        Ok(self.lock(FlockArg::LockExclusive)?.expect("blocking lock"))
    }

    fn try_lock_exclusive(&self) -> Result<Option<Flock<File>>, ImageError> {
        self.lock(FlockArg::LockExclusiveNonblock)
    }

    fn clear_tmp(&self) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let result = match entry.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
            if let Err(e) = result {
                tracing::warn!(path = %path.display(), error = %e, "cannot clear staging entry");
            }
        }
    }

    fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    fn record_path(&self, reference: &Reference) -> PathBuf {
        let name = Digest::sha256_of(reference.to_string().as_bytes());
        self.root
            .join("images")
            .join(format!("{}.json", name.hex()))
    }

    /// The unpacked root of layer `diff_id`: its overlayfs lower dir.
    pub fn layer_path(&self, diff_id: &Digest) -> PathBuf {
        self.layer_dir(diff_id).join("rootfs")
    }

    /// The layers' unpacked roots, top-most first: overlayfs `lowerdir` order.
    pub fn lower_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| self.layer_path(l))
            .collect()
    }

    /// Whether layer `diff_id` is in the store.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).join("layer.json").is_file()
    }

    /// The record of layer `diff_id`.
    pub fn layer(&self, diff_id: &Digest) -> Result<LayerInfo, ImageError> {
        let path = self.layer_dir(diff_id).join("layer.json");
        match read_json(&path) {
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(ImageError::LayerNotFound(diff_id.clone()))
            }
            other => other,
        }
    }

    /// The image `reference` names; [`ImageError::NotFound`] when absent.
    pub fn get(&self, reference: &Reference) -> Result<Image, ImageError> {
        let path = self.record_path(reference);
        // Digests are validated as the record is read: a corrupt one is
        // `Corrupt`, never a path outside `layers/`.
        match read_json(&path) {
            Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(ImageError::NotFound(reference.to_string()))
            }
            other => other,
        }
    }

    /// Every image, sorted by reference. Unreadable records are skipped with
    /// a warning.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let dir = self.root.join("images");
        let mut images = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| ImageError::io("read", &dir, e))? {
            let entry = entry.map_err(|e| ImageError::io("read", &dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // Invalid layer ids make a record unreadable (`Corrupt`).
            match read_json::<Image>(&path) {
                Ok(image) => images.push(image),
                Err(ImageError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = &e as &dyn std::error::Error,
                        "skipping unreadable image record"
                    )
                }
            }
        }
        images.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(images)
    }

    /// Writes the record of an image made of `layers` (diff ids, bottom
    /// first, all in the store), replacing any record of `reference`.
    pub fn put_image(
        &self,
        reference: &Reference,
        layers: &[Digest],
        config: ImageConfig,
        manifest_digest: Option<Digest>,
    ) -> Result<Image, ImageError> {
        let _lock = self.lock_shared()?;
        self.put_image_locked(reference, layers, config, manifest_digest)
    }

    fn put_image_locked(
        &self,
        reference: &Reference,
        layers: &[Digest],
        config: ImageConfig,
        manifest_digest: Option<Digest>,
    ) -> Result<Image, ImageError> {
        let mut normalised = Vec::with_capacity(layers.len());
        let mut size_bytes = 0u64;
        for layer in layers {
            let info = self.layer(layer)?;
            size_bytes = size_bytes.saturating_add(info.size);
            normalised.push(info.diff_id);
        }
        #[derive(Serialize)]
        struct Content<'a> {
            layers: &'a [Digest],
            config: &'a ImageConfig,
        }
        let content = serde_json::to_vec(&Content {
            layers: &normalised,
            config: &config,
        })
        .expect("image content serialises");
        let image = Image {
            reference: reference.to_string(),
            id: Digest::sha256_of(&content),
            layers: normalised,
            config,
            size_bytes,
            created: now_unix(),
            manifest_digest,
        };
        self.write_record(reference, &image)?;
        let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        for layer in &image.layers {
            fresh.remove(layer);
        }
        Ok(image)
    }

    fn write_record(&self, reference: &Reference, image: &Image) -> Result<(), ImageError> {
        let aside = self.root.join("tmp").join(unique_name("image-"));
        let json = serde_json::to_vec_pretty(image).expect("image serialises");
        if let Err(e) = write_file_synced(&aside, &json) {
            let _ = fs::remove_file(&aside);
            return Err(e);
        }
        let path = self.record_path(reference);
        fs::rename(&aside, &path).map_err(|e| {
            let _ = fs::remove_file(&aside);
            ImageError::io("rename", &path, e)
        })
    }

    /// Gives the image `source` names a second reference.
    pub fn tag(&self, source: &Reference, target: &Reference) -> Result<Image, ImageError> {
        let _lock = self.lock_shared()?;
        let mut image = self.get(source)?;
        image.reference = target.to_string();
        image.created = now_unix();
        self.write_record(target, &image)?;
        Ok(image)
    }

    /// Removes the record of `reference`, then collects the layers no image
    /// references any more (see [`ImageStore::gc`]; a daemon with running
    /// sandboxes should call `gc` itself with their layers).
    pub fn remove(&self, reference: &Reference) -> Result<(), ImageError> {
        let _lock = self.lock_exclusive()?;
        let path = self.record_path(reference);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(reference.to_string()))
            }
            Err(e) => return Err(ImageError::io("remove", &path, e)),
        }
        self.gc_locked(&HashSet::new())?;
        Ok(())
    }

    /// Removes every layer that no image references, that is not in
    /// `in_use` (diff ids), not leased, and that this process did not import
    /// in the last ten minutes; also clears `tmp/`. Returns the diff ids
    /// removed, sorted.
    pub fn gc(&self, in_use: &HashSet<Digest>) -> Result<Vec<Digest>, ImageError> {
        let _lock = self.lock_exclusive()?;
        self.gc_locked(in_use)
    }

    fn gc_locked(&self, in_use: &HashSet<Digest>) -> Result<Vec<Digest>, ImageError> {
        // Nobody is importing (the lock is exclusive): staging is debris.
        self.clear_tmp();
        let mut keep = in_use.clone();
        {
            let mut fresh = self.fresh.lock().unwrap_or_else(|e| e.into_inner());
            fresh.retain(|_, at| at.elapsed() < FRESH_LAYER_GRACE);
            keep.extend(fresh.keys().cloned());
        }
        // Layers mounted by sandboxes, whoever created them.
        keep.extend(self.leased_layers()?);
        let images = self.root.join("images");
        for entry in fs::read_dir(&images).map_err(|e| ImageError::io("read", &images, e))? {
            let path = entry
                .map_err(|e| ImageError::io("read", &images, e))?
                .path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            // An unreadable record (invalid layer ids included) might still
            // name layers: collect nothing.
            let image: Image = read_json(&path)?;
            keep.extend(image.layers);
        }
        let layers = self.root.join("layers/sha256");
        let mut removed = Vec::new();
        for entry in fs::read_dir(&layers).map_err(|e| ImageError::io("read", &layers, e))? {
            let entry = entry.map_err(|e| ImageError::io("read", &layers, e))?;
            let name = entry.file_name();
            // Not a layer directory's name: not ours to collect.
            let Some(diff_id) = name.to_str().and_then(|n| Digest::from_sha256_hex(n).ok()) else {
                continue;
            };
            if keep.contains(&diff_id) {
                continue;
            }
            // Out of sight first (atomic), then deleted.
            let doomed = self.root.join("tmp").join(unique_name("gc-"));
            let path = entry.path();
            fs::rename(&path, &doomed).map_err(|e| ImageError::io("rename", &path, e))?;
            fs::remove_dir_all(&doomed).map_err(|e| ImageError::io("remove", &doomed, e))?;
            tracing::debug!(layer = %diff_id, "layer collected");
            removed.push(diff_id);
        }
        removed.sort();
        Ok(removed)
    }
}
