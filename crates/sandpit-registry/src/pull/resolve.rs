//! Resolving a reference at one endpoint: the manifest (through an index
//! to the host platform's) and the config, each verified against its
//! digest, and every digest they name parsed once.

use sandpit_image::{Compression, Digest, ImageConfig, Reference};

use super::Puller;
use crate::client::{self, Session};
use crate::manifest::{self, Manifest};
use crate::{Failure, PullErrorKind};

/// Largest manifest, index or image config accepted.
const METADATA_MAX: u64 = 4 << 20;

/// Parses a digest from a registry document (or the reference): past
/// this point every digest is a validated `sha256:<hex>`.
fn check_digest(digest: &str, what: &str) -> Result<Digest, Failure> {
    Digest::parse(digest)
        .map_err(|_| Failure::invalid(format!("{what} digest {digest:?} is not sha256:<hex>")))
}

/// What a manifest resolves to.
#[derive(Debug)]
pub(super) struct Resolved {
    pub(super) manifest_digest: Digest,
    /// Bottom first.
    pub(super) layers: Vec<Layer>,
    pub(super) config: ImageConfig,
}

/// One layer of a resolved image, verified against its manifest and config.
#[derive(Debug)]
pub(super) struct Layer {
    /// Digest of the blob (compressed).
    pub(super) digest: Digest,
    /// Blob size the manifest gives.
    pub(super) size: u64,
    pub(super) compression: Compression,
    /// The config's `rootfs.diff_ids` entry for this layer.
    pub(super) diff_id: Digest,
}

impl Puller {
    /// Fetches and verifies the manifest (through an index to the host
    /// platform's) and the config.
    pub(super) fn resolve(
        &self,
        session: &Session<'_>,
        reference: &Reference,
    ) -> Result<Resolved, Failure> {
        let pinned = match &reference.digest {
            Some(digest) => Some(check_digest(digest, "reference")?),
            None => None,
        };
        let target = match (&pinned, &reference.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag.as_str(),
            (None, None) => sandpit_image::DEFAULT_TAG,
        };
        let (bytes, content_type) =
            session.manifest(target, manifest::MANIFEST_ACCEPT, METADATA_MAX)?;
        let manifest_digest = Digest::sha256_of(&bytes);
        if let Some(expected) = &pinned {
            if *expected != manifest_digest {
                return Err(Failure::invalid(format!(
                    "manifest digest mismatch: expected {expected}, got {manifest_digest}"
                )));
            }
        }
        let parsed =
            manifest::parse_manifest(&bytes, content_type.as_deref()).map_err(Failure::invalid)?;
        let (config, layers) = match parsed {
            Manifest::Image { config, layers } => (config, layers),
            Manifest::Index(entries) => {
                let entry = manifest::select_platform(&entries, &self.platform)
                    .map_err(|m| Failure::new(PullErrorKind::NoMatchingPlatform, m))?;
                let entry_digest = check_digest(&entry.digest, "index entry")?;
                let (bytes, content_type) = session.manifest(
                    entry_digest.as_str(),
                    manifest::MANIFEST_ACCEPT,
                    METADATA_MAX.min(entry.size.max(1)),
                )?;
                let actual = Digest::sha256_of(&bytes);
                if actual != entry_digest {
                    return Err(Failure::invalid(format!(
                        "manifest digest mismatch: expected {entry_digest}, got {actual}"
                    )));
                }
                match manifest::parse_manifest(&bytes, content_type.as_deref())
                    .map_err(Failure::invalid)?
                {
                    Manifest::Image { config, layers } => (config, layers),
                    Manifest::Index(_) => {
                        return Err(Failure::invalid("nested indexes are not supported"))
                    }
                }
            }
        };

        let config_digest = check_digest(&config.digest, "config")?;
        if config.size > METADATA_MAX {
            return Err(Failure::invalid(format!(
                "image config larger than {METADATA_MAX} bytes"
            )));
        }
        let mut response = session.blob(&config_digest)?;
        let bytes = client::read_limited(&mut response, METADATA_MAX, "image config")?;
        let actual = Digest::sha256_of(&bytes);
        if actual != config_digest {
            return Err(Failure::invalid(format!(
                "config digest mismatch: expected {config_digest}, got {actual}"
            )));
        }
        let parsed = manifest::parse_config(&bytes).map_err(Failure::invalid)?;
        if let Some(p) = &parsed.platform {
            if p.os != self.platform.os || p.architecture != self.platform.architecture {
                return Err(Failure::new(
                    PullErrorKind::NoMatchingPlatform,
                    format!("image is for {p}, not {}", self.platform),
                ));
            }
        }
        if parsed.diff_ids.len() != layers.len() {
            return Err(Failure::invalid(format!(
                "image config has {} diff ids for {} layers",
                parsed.diff_ids.len(),
                layers.len()
            )));
        }
        let layers = layers
            .iter()
            .zip(&parsed.diff_ids)
            .map(|(layer, diff_id)| {
                Ok(Layer {
                    compression: manifest::layer_compression(&layer.media_type)
                        .map_err(Failure::invalid)?,
                    digest: check_digest(&layer.digest, "layer")?,
                    size: layer.size,
                    diff_id: check_digest(diff_id, "diff id")?,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        Ok(Resolved {
            manifest_digest,
            layers,
            config: parsed.config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_from_registry_documents_are_sha256_only() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(check_digest(&good, "layer").unwrap(), good);
        for bad in [
            format!("sha512:{}", "a".repeat(128)),
            "a".repeat(64),
            format!("sha256:{}", "A".repeat(64)),
            "amd64".to_owned(),
        ] {
            let f = check_digest(&bad, "layer").unwrap_err();
            assert_eq!(
                f,
                Failure::invalid(format!("layer digest {bad:?} is not sha256:<hex>"))
            );
        }
    }
}
