//! Manifests, indexes and image configs: media types, parsing, platform
//! selection.

use std::fmt;

use sandpit_image::{Compression, ImageConfig};
use serde::Deserialize;

use crate::chain;

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header of manifest requests: what this client understands.
pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub urls: Vec<String>,
}

/// An OS/architecture pair, with an optional variant (`v8`, `v7`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// The platform of this host, in OCI spelling.
    pub(crate) fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Self {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Variants this platform runs, best first; `""` is "no variant".
    fn variants(&self) -> &'static [&'static str] {
        match self.architecture.as_str() {
            // Higher amd64 levels need CPU features the host may lack.
            "amd64" => &["", "v1"],
            "arm64" => &["", "v8"],
            "arm" => &["v7", "", "v6", "v5"],
            _ => &[""],
        }
    }
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Manifest {
    /// OCI index or Docker manifest list.
    Index(Vec<Descriptor>),
    /// OCI image manifest or Docker schema 2 manifest.
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// The media type of a `Content-Type` value, parameters dropped.
fn bare_media_type(value: &str) -> &str {
    value.split(';').next().unwrap_or("").trim()
}

/// Parses a manifest. Its kind comes from its `mediaType`, else the
/// response's `Content-Type`, else its shape.
pub(crate) fn parse_manifest(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, String> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("malformed manifest: {}", chain(&e)))?;
    let declared = raw
        .media_type
        .as_deref()
        .filter(|t| !t.is_empty())
        .or(content_type.map(bare_media_type))
        .filter(|t| !t.is_empty() && *t != "application/json");
    if raw.schema_version == Some(1) || matches!(declared, Some(DOCKER_V1 | DOCKER_V1_SIGNED)) {
        return Err("schema 1 manifests are not supported".to_owned());
    }
    if raw.schema_version.is_some_and(|v| v != 2) {
        return Err(format!(
            "unsupported manifest schema version {}",
            raw.schema_version.unwrap_or_default()
        ));
    }
    let is_index = match declared {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => return Err(format!("unsupported manifest media type {other:?}")),
        None => raw.manifests.is_some(),
    };
    if is_index {
        let manifests = raw.manifests.ok_or("index without manifests")?;
        Ok(Manifest::Index(manifests))
    } else {
        let config = raw.config.ok_or("manifest without config")?;
        let layers = raw.layers.ok_or("manifest without layers")?;
        if !config.media_type.is_empty()
            && config.media_type != OCI_CONFIG
            && config.media_type != DOCKER_CONFIG
        {
            // Artifacts (Helm charts, signatures) are not images.
            return Err(format!(
                "not an image: config media type {:?}",
                config.media_type
            ));
        }
        Ok(Manifest::Image { config, layers })
    }
}

/// Picks the index entry for `platform`: same OS and architecture, the
/// best variant the platform runs. Attestations (`unknown/unknown`) and
/// entries without a platform are skipped. The error lists what the index
/// offers.
pub(crate) fn select_platform<'a>(
    entries: &'a [Descriptor],
    platform: &Platform,
) -> Result<&'a Descriptor, String> {
    let mut best: Option<(usize, &Descriptor)> = None;
    let mut available = Vec::new();
    for entry in entries {
        let Some(p) = &entry.platform else { continue };
        if p.os == "unknown" || p.architecture == "unknown" {
            continue;
        }
        available.push(p.to_string());
        if p.os != platform.os || p.architecture != platform.architecture {
            continue;
        }
        let variant = p.variant.as_deref().unwrap_or("");
        let Some(rank) = platform.variants().iter().position(|v| *v == variant) else {
            continue;
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, entry));
        }
    }
    match best {
        Some((_, entry)) => Ok(entry),
        None => {
            available.dedup();
            let available = if available.is_empty() {
                "none".to_owned()
            } else {
                available.join(", ")
            };
            Err(format!(
                "no manifest for {platform} (available: {available})"
            ))
        }
    }
}

/// The compression of a layer media type; foreign and non-distributable
/// layers, and anything not a layer tar, are refused.
pub(crate) fn layer_compression(media_type: &str) -> Result<Compression, String> {
    if media_type.contains(".foreign.") || media_type.contains(".nondistributable.") {
        return Err(format!(
            "foreign layer {media_type:?} is not supported (it is not in the registry)"
        ));
    }
    Compression::from_media_type(media_type)
        .map_err(|_| format!("unsupported layer media type {media_type:?}"))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawRuntimeConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRootFs {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RawRuntimeConfig>,
    rootfs: RawRootFs,
}

/// What a pull needs from an image config blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedConfig {
    pub config: ImageConfig,
    pub diff_ids: Vec<String>,
    /// `os/architecture` when the config names them.
    pub platform: Option<Platform>,
}

/// Parses an image config blob.
pub(crate) fn parse_config(bytes: &[u8]) -> Result<ParsedConfig, String> {
    let raw: RawImageConfig = serde_json::from_slice(bytes)
        .map_err(|e| format!("malformed image config: {}", chain(&e)))?;
    if raw.rootfs.kind != "layers" {
        return Err(format!(
            "image config rootfs type {:?}, not \"layers\"",
            raw.rootfs.kind
        ));
    }
    let runtime = raw.config.unwrap_or(RawRuntimeConfig {
        env: None,
        entrypoint: None,
        cmd: None,
        working_dir: None,
        user: None,
    });
    let named = !raw.os.is_empty() && !raw.architecture.is_empty();
    let platform = named.then_some(Platform {
        os: raw.os,
        architecture: raw.architecture,
        variant: None,
    });
    Ok(ParsedConfig {
        config: ImageConfig {
            env: runtime.env.unwrap_or_default(),
            entrypoint: runtime.entrypoint.unwrap_or_default(),
            cmd: runtime.cmd.unwrap_or_default(),
            working_dir: runtime.working_dir.unwrap_or_default(),
            user: runtime.user.unwrap_or_default(),
        },
        diff_ids: raw.rootfs.diff_ids,
        platform,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn entry(os: &str, arch: &str, variant: Option<&str>, digest: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.to_owned(),
            digest: digest.to_owned(),
            size: 1,
            platform: Some(Platform {
                os: os.to_owned(),
                architecture: arch.to_owned(),
                variant: variant.map(str::to_owned),
            }),
            urls: Vec::new(),
        }
    }

    fn amd64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    #[test]
    fn selects_the_host_platform() {
        let entries = vec![
            entry("unknown", "unknown", None, "att"),
            entry("linux", "arm64", Some("v8"), "arm"),
            entry("linux", "amd64", Some("v3"), "amd64v3"),
            entry("linux", "amd64", Some("v1"), "amd64v1"),
            entry("linux", "amd64", None, "amd64"),
            entry("windows", "amd64", None, "win"),
        ];
        assert_eq!(select_platform(&entries, &amd64()).unwrap().digest, "amd64");
        assert_eq!(
            select_platform(&entries[..4], &amd64()).unwrap().digest,
            "amd64v1"
        );
        let arm = Platform {
            architecture: "arm64".into(),
            ..amd64()
        };
        assert_eq!(select_platform(&entries, &arm).unwrap().digest, "arm");
        let err = select_platform(&entries[..3], &amd64()).unwrap_err();
        assert_eq!(
            err,
            "no manifest for linux/amd64 (available: linux/arm64/v8, linux/amd64/v3)"
        );
        let err = select_platform(&entries[..1], &amd64()).unwrap_err();
        assert_eq!(err, "no manifest for linux/amd64 (available: none)");
        let mut no_platform = entries[4].clone();
        no_platform.platform = None;
        assert!(select_platform(&[no_platform], &amd64()).is_err());
    }

    #[test]
    fn host_platform_is_oci_spelled() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host.architecture, "amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(host.architecture, "arm64");
    }

    #[test]
    fn parses_manifests() {
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D1}","size":7}},
            "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{D1}","size":9}}]}}"#
        );
        match parse_manifest(image.as_bytes(), None).unwrap() {
            Manifest::Image { config, layers } => {
                assert_eq!(config.size, 7);
                assert_eq!(layers.len(), 1);
                assert_eq!(layers[0].size, 9);
            }
            other => panic!("{other:?}"),
        }
        // OCI without mediaType: the content type decides, else the shape.
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D1}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest(
                oci.as_bytes(),
                Some(&format!("{OCI_MANIFEST}; charset=utf-8"))
            ),
            Ok(Manifest::Image { .. })
        ));
        assert!(matches!(
            parse_manifest(oci.as_bytes(), Some("application/json")),
            Ok(Manifest::Image { .. })
        ));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":3,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        match parse_manifest(index.as_bytes(), Some(OCI_INDEX)).unwrap() {
            Manifest::Index(entries) => {
                assert_eq!(entries.len(), 1);
                assert_eq!(
                    entries[0].platform.as_ref().unwrap().to_string(),
                    "linux/amd64"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_manifest(index.as_bytes(), None),
            Ok(Manifest::Index(_))
        ));
    }

    #[test]
    fn refuses_what_it_cannot_pull() {
        let v1 = r#"{"schemaVersion":1,"name":"x","tag":"1","fsLayers":[]}"#;
        assert_eq!(
            parse_manifest(v1.as_bytes(), Some(DOCKER_V1_SIGNED)).unwrap_err(),
            "schema 1 manifests are not supported"
        );
        assert_eq!(
            parse_manifest(v1.as_bytes(), None).unwrap_err(),
            "schema 1 manifests are not supported"
        );
        assert!(parse_manifest(b"not json", None)
            .unwrap_err()
            .starts_with("malformed manifest"));
        let helm = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{D1}","size":1}},"layers":[]}}"#
        );
        assert!(parse_manifest(helm.as_bytes(), None)
            .unwrap_err()
            .starts_with("not an image"));
        let odd = r#"{"schemaVersion":2,"mediaType":"text/html"}"#;
        assert!(parse_manifest(odd.as_bytes(), None)
            .unwrap_err()
            .contains("unsupported manifest media type"));
        let no_layers =
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert_eq!(
            parse_manifest(no_layers.as_bytes(), None).unwrap_err(),
            "manifest without config"
        );
    }

    #[test]
    fn layer_media_types() {
        for (t, c) in [
            ("application/vnd.oci.image.layer.v1.tar", Compression::None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Compression::None,
            ),
        ] {
            assert_eq!(layer_compression(t).unwrap(), c, "{t}");
        }
        assert!(
            layer_compression("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
                .unwrap_err()
                .starts_with("foreign layer")
        );
        assert!(
            layer_compression("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")
                .unwrap_err()
                .starts_with("foreign layer")
        );
        assert!(layer_compression("application/vnd.in-toto+json")
            .unwrap_err()
            .starts_with("unsupported layer media type"));
    }

    #[test]
    fn parses_image_configs() {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux",
            "config":{{"Env":["PATH=/bin","A=b"],"Entrypoint":["/init"],"Cmd":["sh","-c","x"],"WorkingDir":"/app","User":"1000:1000","Labels":{{"a":"b"}}}},
            "rootfs":{{"type":"layers","diff_ids":["{D1}","{D1}"]}},"history":[]}}"#
        );
        let parsed = parse_config(config.as_bytes()).unwrap();
        assert_eq!(
            parsed.config,
            ImageConfig {
                env: vec!["PATH=/bin".into(), "A=b".into()],
                entrypoint: vec!["/init".into()],
                cmd: vec!["sh".into(), "-c".into(), "x".into()],
                working_dir: "/app".into(),
                user: "1000:1000".into(),
            }
        );
        assert_eq!(parsed.diff_ids, [D1, D1]);
        assert_eq!(parsed.platform.unwrap().to_string(), "linux/amd64");
        // `null` fields, no config section, no platform.
        let bare = r#"{"config":{"Env":null,"Cmd":null},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let parsed = parse_config(bare.as_bytes()).unwrap();
        assert_eq!(parsed.config, ImageConfig::default());
        assert_eq!(parsed.platform, None);
        assert!(
            parse_config(br#"{"rootfs":{"type":"other","diff_ids":[]}}"#)
                .unwrap_err()
                .contains("rootfs type")
        );
        assert!(parse_config(br#"{"architecture":"amd64"}"#)
            .unwrap_err()
            .starts_with("malformed image config"));
    }
}
