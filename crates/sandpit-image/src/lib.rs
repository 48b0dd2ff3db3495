//! Sandpit's content-addressed image store.
//!
//! Layers are stored unpacked, once per diff id (the sha256 of the
//! uncompressed layer tar), and shared between images; an image record names
//! its layers bottom first plus the runtime subset of the OCI config. Layers
//! are written with their ownership shifted into the sandboxes' uid range
//! ([`IdShift`]), so a sandbox mounts them as overlayfs lower dirs without any
//! per-sandbox chown.
//!
//! ```text
//! <root>/store.json                     {version, uid_base, uid_count}
//! <root>/layers/sha256/<hex>/rootfs/    unpacked layer (overlayfs lower dir)
//! <root>/layers/sha256/<hex>/layer.json {diff_id, digest?, size}
//! <root>/images/<sha256(reference)>.json
//! <root>/leases/<holder>.json           layers a sandbox has mounted
//! <root>/tmp/                           staging, cleared at open
//! ```
//!
//! # Hostile tars
//!
//! Entries are unpacked one by one (never with `tar::Archive::unpack`), with
//! `*at` syscalls from a directory fd of the layer root:
//!
//! - **Refused** (the import fails and leaves nothing behind): a `..` path
//!   component; a path whose parent is a symlink (even one planted by an
//!   earlier entry and pointing inside the layer) or not a directory; a hard
//!   link whose target has `..`, is missing, is a directory or goes through
//!   a symlink; a digest mismatch; more than the size cap.
//! - **Rewritten**: leading `/` and `./` are stripped (absolute paths land
//!   inside the layer); ids are shifted, out-of-range ids clamped to the
//!   range's nobody ([`IdShift::map`]); `security.capability` becomes a v3
//!   capability rooted at the shifted root; ACL ids are shifted; OCI
//!   whiteouts become overlayfs whiteouts (0/0 character devices) and
//!   `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr.
//! - **Skipped**: device nodes (counted, debug log; `/dev` of a sandbox is a
//!   tmpfs), unknown entry types, other `.wh..wh.*` names, a whiteout of an
//!   entry of the same layer, xattrs other than `user.*`,
//!   `security.capability` and POSIX ACLs (`trusted.*` would let an image
//!   forge overlayfs metadata).
//! - **Kept**: modes including setuid/setgid/sticky (sandboxes run with
//!   `no_new_privs` and shifted ids), mtimes (directories' applied last),
//!   symlink targets verbatim (they resolve inside the sandbox). Later
//!   entries replace earlier ones; a directory over a directory keeps its
//!   content.
//!
//! # Digests
//!
//! Diff ids, blob and manifest digests and image ids are [`Digest`]s
//! (`sha256:<64 lowercase hex>`, validated when parsed or read from a store
//! file). Only sha256 is supported; see `digest.rs`.
//!
//! # Leases
//!
//! `<root>/leases/<holder>.json` names the layers a sandbox has mounted;
//! `gc` and `remove` keep them whichever process asks (see `lease.rs`).
//!
//! `layers/` and `tmp/` are mode 0700: host users cannot reach the
//! layers' setuid files.

use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod commit;
mod digest;
mod lease;
mod reference;
mod store;
mod unpack;

pub use commit::{COMMIT_MAX_BYTES, COMMIT_MAX_DEPTH, COMMIT_MAX_ENTRIES};
pub use digest::{Digest, DigestWriter};
pub use lease::LeaseGuard;
pub use reference::{Reference, DEFAULT_REGISTRY, DEFAULT_TAG};
pub use store::{CommittedLayer, ImageStore, ROOTFS_MAX_BYTES};

/// How layer ownership is shifted: id `n` of a tar entry is stored as host id
/// `base + n`. Ids `>= count` cannot be mapped and are clamped to the range's
/// "nobody" (`base + 65534`, or `base + count - 1` for a smaller range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdShift {
    /// Host id of the sandboxes' root.
    pub base: u32,
    /// Number of ids in the range.
    pub count: u32,
}

impl Default for IdShift {
    fn default() -> Self {
        Self {
            base: 1_000_000_000,
            count: 65536,
        }
    }
}

impl IdShift {
    /// The id in-range ids that cannot be mapped are clamped to.
    pub fn overflow_id(&self) -> u32 {
        self.base + self.count.saturating_sub(1).min(65534)
    }

    /// Host id for id `id` of a tar entry, and whether it had to be clamped.
    pub fn map(&self, id: u64) -> (u32, bool) {
        match u32::try_from(id) {
            Ok(id) if id < self.count => (self.base + id, false),
            _ => (self.overflow_id(), true),
        }
    }

    fn validate(&self) -> Result<(), &'static str> {
        if self.base == 0 {
            return Err("base must not be 0 (layers would be owned by host root)");
        }
        if self.count == 0 {
            return Err("count must not be 0");
        }
        // The last id must stay below u32::MAX, which chown reads as "unchanged".
        if self.base.checked_add(self.count).is_none() {
            return Err("range overflows the uid space");
        }
        Ok(())
    }
}

impl fmt::Display for IdShift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.base, self.count)
    }
}

/// The part of an OCI image config a runtime needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    /// Environment, `K=V`.
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// Empty means `/`.
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`; empty means root.
    pub user: String,
}

/// An image record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Normalised reference (`docker.io/library/python:3.11`).
    pub reference: String,
    /// Digest of the image content (layers and config): images with the
    /// same content have the same id whatever their reference.
    pub id: Digest,
    /// Diff ids, bottom layer first.
    pub layers: Vec<Digest>,
    pub config: ImageConfig,
    /// Sum of the layers' unpacked sizes.
    pub size_bytes: u64,
    /// Unix seconds when the record was written.
    pub created: u64,
    /// Digest of the registry manifest the image came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
}

/// A stored layer (`layer.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Digest of the uncompressed tar; names the layer in the store.
    pub diff_id: Digest,
    /// Digest of the blob as it arrived (compressed), when it differs from
    /// the diff id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// Bytes of file content unpacked.
    pub size: u64,
}

impl LayerInfo {
    /// The digest of the blob as it arrived: [`LayerInfo::digest`], or the
    /// diff id for an uncompressed layer.
    pub fn blob_digest(&self) -> &Digest {
        self.digest.as_ref().unwrap_or(&self.diff_id)
    }
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of an OCI or Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Result<Self, ImageError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Self::Gzip),
            // Docker has no zstd media type of its own; BuildKit writes this one.
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Self::Zstd),
            other => Err(ImageError::UnsupportedMediaType(other.to_owned())),
        }
    }
}

/// Errors of the image store.
///
/// Messages are short and lowercase; a variant with a `#[source]` never
/// prints it (whoever reports the error joins the chain once, e.g. an
/// `anyhow` `{:#}` or the daemon's `describe`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
    #[error("image {0} not found")]
    NotFound(String),
    #[error("layer {0} not found")]
    LayerNotFound(Digest),
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest {
        digest: String,
        reason: &'static str,
    },
    #[error("invalid id shift {shift}: {reason}")]
    InvalidShift {
        shift: IdShift,
        reason: &'static str,
    },
    #[error("store {path} uses id shift {found}, not {requested}")]
    ShiftMismatch {
        path: PathBuf,
        found: IdShift,
        requested: IdShift,
    },
    #[error("store {path} has unsupported version {version}")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("corrupt {path}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("layer digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("layer diff id mismatch: expected {expected}, got {actual}")]
    DiffIdMismatch { expected: Digest, actual: Digest },
    #[error("layer larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("read layer")]
    Archive(#[source] io::Error),
    /// A tar entry that is refused: the whole import fails.
    #[error("tar entry {path:?}: {reason}")]
    BadEntry { path: String, reason: &'static str },
    #[error("tar entry {path:?}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid lease holder {0:?}")]
    InvalidLeaseHolder(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_shift_maps_and_clamps() {
        let s = IdShift::default();
        assert_eq!(s.map(0), (1_000_000_000, false));
        assert_eq!(s.map(1000), (1_000_001_000, false));
        assert_eq!(s.map(65535), (1_000_065_535, false));
        assert_eq!(s.map(65536), (1_000_065_534, true));
        assert_eq!(s.map(u64::MAX), (1_000_065_534, true));
        let small = IdShift {
            base: 100_000,
            count: 1000,
        };
        assert_eq!(small.map(1000), (100_999, true));
        assert!(IdShift { base: 0, count: 10 }.validate().is_err());
        assert!(IdShift { base: 10, count: 0 }.validate().is_err());
        assert!(IdShift {
            base: u32::MAX - 10,
            count: 11
        }
        .validate()
        .is_err());
        assert!(IdShift {
            base: u32::MAX - 11,
            count: 11
        }
        .validate()
        .is_ok());
        assert_eq!(s.to_string(), "1000000000+65536");
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar").unwrap(),
            Compression::None
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.zstd")
                .unwrap(),
            Compression::Zstd
        );
        for other in [
            "application/vnd.oci.image.layer.v1.tar+bzip2",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        ] {
            assert!(matches!(
                Compression::from_media_type(other),
                Err(ImageError::UnsupportedMediaType(_))
            ));
        }
    }

    #[test]
    fn errors_with_a_source_do_not_repeat_it() {
        let io = || io::Error::other("disk on fire");
        let corrupt = serde_json::from_slice::<Image>(b"{").unwrap_err();
        let corrupt_text = corrupt.to_string();
        let cases = [
            (
                ImageError::io("read", "/store/x.json", io()),
                "read /store/x.json: disk on fire".to_owned(),
            ),
            (
                ImageError::Archive(io()),
                "read layer: disk on fire".to_owned(),
            ),
            (
                ImageError::Entry {
                    path: "etc/passwd".into(),
                    source: io(),
                },
                "tar entry \"etc/passwd\": disk on fire".to_owned(),
            ),
            (
                ImageError::Corrupt {
                    path: "/store/images/a.json".into(),
                    source: corrupt,
                },
                format!("corrupt /store/images/a.json: {corrupt_text}"),
            ),
        ];
        for (e, want) in cases {
            let source = std::error::Error::source(&e).expect("has a source");
            assert!(
                !e.to_string().contains(&source.to_string()),
                "{e} repeats its source"
            );
            assert_eq!(sandpit_errors::chain(&e), want);
        }
        // Without a source, the message says it all.
        let e = ImageError::DigestMismatch {
            expected: Digest::sha256_of(b"a"),
            actual: Digest::sha256_of(b"b"),
        };
        assert!(std::error::Error::source(&e).is_none());
        assert!(e
            .to_string()
            .starts_with("layer digest mismatch: expected sha256:"));
    }

    #[test]
    fn public_types_are_send_sync_debug() {
        fn check<T: Send + Sync + fmt::Debug>() {}
        check::<ImageStore>();
        check::<ImageError>();
        check::<Image>();
        check::<Digest>();
        check::<DigestWriter>();
        check::<LeaseGuard<&ImageStore>>();
        check::<LeaseGuard<std::sync::Arc<ImageStore>>>();
    }
}
