//! `[storage]`: volumes and file-system snapshots on this runner,
//! validated once at start-up into [`StorageSettings`].
//!
//! ```toml
//! [storage]
//! enabled = true                   # false: volumes and snapshots refused
//! scratch_default_size = "10Gi"    # a scratch volume that names no size
//! max_volume_size = "1Ti"          # the largest scratch or registered volume
//! volume_capacity = "10Gi"         # a registered volume's capacity
//! max_snapshot_size = "20Gi"       # file contents in one snapshot
//! snapshot_backend = "local"       # or "s3": where the managed snapshots go
//! [storage.s3]                     # the shared backend (and bring-your-own buckets)
//! endpoint = "http://127.0.0.1:9000"
//! region = "us-east-1"
//! bucket = "sandpit-snapshots"     # the managed bucket
//! prefix = "snapshots/"
//! access_key_id = "..."
//! secret_access_key_file = "/etc/sandpit/s3-secret"   # or env SANDPIT_S3_SECRET_ACCESS_KEY
//! allow_http = true                # plain HTTP endpoints (loopback tests)
//! ```

use std::path::PathBuf;

use sandpit_runtime::quantity::parse_memory;
use serde::Deserialize;

use crate::config::ConfigError;

/// `[storage]` as the file spells it, every key optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStorage {
    enabled: Option<bool>,
    scratch_default_size: Option<String>,
    max_volume_size: Option<String>,
    volume_capacity: Option<String>,
    max_snapshot_size: Option<String>,
    snapshot_backend: Option<SnapshotBackend>,
    s3: Option<FileS3>,
}

/// `[storage.s3]` as the file spells it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileS3 {
    endpoint: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    access_key_id: Option<String>,
    secret_access_key_file: Option<PathBuf>,
    allow_http: Option<bool>,
}

/// Where snapshots of principals that chose no bucket go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotBackend {
    /// The content-addressed store under the data dir.
    #[default]
    Local,
    /// `[storage.s3].bucket`.
    S3,
}

/// An S3-compatible endpoint (validated): `bucket` is the managed
/// bucket; a principal's own bucket is the same endpoint with another.
pub use sandpit_snapshot::S3Config as S3Settings;

/// Storage on this runner, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSettings {
    /// Volumes and snapshots offered.
    pub enabled: bool,
    /// Size of a scratch volume that names none.
    pub scratch_default_size: u64,
    /// The largest volume.
    pub max_volume_size: u64,
    /// A registered volume's capacity.
    pub volume_capacity: u64,
    /// File contents in one snapshot.
    pub max_snapshot_size: u64,
    /// Where managed snapshots go.
    pub snapshot_backend: SnapshotBackend,
    /// The S3-compatible backend, when configured.
    pub s3: Option<S3Settings>,
}

/// The name snapshots kept under the data dir report as their bucket.
pub const LOCAL_BUCKET: &str = "local";

impl StorageSettings {
    /// The bucket snapshots of a principal that chose none go to.
    pub fn managed_bucket(&self) -> String {
        match (&self.snapshot_backend, &self.s3) {
            (SnapshotBackend::S3, Some(s3)) => s3.bucket.clone(),
            _ => LOCAL_BUCKET.to_owned(),
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        FileStorage::default()
            .resolve_with(|_| None)
            .expect("the defaults are valid")
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn size(key: &'static str, value: Option<String>, default: &str) -> Result<u64, ConfigError> {
    let v = value.unwrap_or_else(|| default.to_owned());
    match parse_memory(&v) {
        Ok(0) => Err(invalid(key, "must be more than 0")),
        Ok(n) => Ok(n),
        Err(e) => Err(invalid(key, format!("{v:?}: {e}"))),
    }
}

impl FileStorage {
    /// Validates the section.
    pub fn resolve(self) -> Result<StorageSettings, ConfigError> {
        self.resolve_with(|k| std::env::var(k).ok())
    }

    fn resolve_with(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<StorageSettings, ConfigError> {
        let max_volume_size = size("storage.max_volume_size", self.max_volume_size, "1Ti")?;
        let scratch_default_size = size(
            "storage.scratch_default_size",
            self.scratch_default_size,
            "10Gi",
        )?;
        let volume_capacity = size("storage.volume_capacity", self.volume_capacity, "10Gi")?;
        for (key, v) in [
            ("storage.scratch_default_size", scratch_default_size),
            ("storage.volume_capacity", volume_capacity),
        ] {
            if v > max_volume_size {
                return Err(invalid(key, "exceeds storage.max_volume_size"));
            }
        }
        let s3 = match self.s3 {
            None => None,
            Some(s3) => Some(s3.resolve(&env)?),
        };
        let snapshot_backend = self.snapshot_backend.unwrap_or_default();
        if snapshot_backend == SnapshotBackend::S3 && s3.is_none() {
            return Err(invalid(
                "storage.snapshot_backend",
                "\"s3\" needs a [storage.s3] section",
            ));
        }
        Ok(StorageSettings {
            enabled: self.enabled.unwrap_or(true),
            scratch_default_size,
            max_volume_size,
            volume_capacity,
            max_snapshot_size: size("storage.max_snapshot_size", self.max_snapshot_size, "20Gi")?,
            snapshot_backend,
            s3,
        })
    }
}

impl FileS3 {
    fn resolve(self, env: &impl Fn(&str) -> Option<String>) -> Result<S3Settings, ConfigError> {
        let bucket = self.bucket.unwrap_or_default();
        if !valid_bucket(&bucket) {
            return Err(invalid(
                "storage.s3.bucket",
                format!("{bucket:?} is not an S3 bucket name"),
            ));
        }
        let secret = match (
            &self.secret_access_key_file,
            env("SANDPIT_S3_SECRET_ACCESS_KEY"),
        ) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| {
                    invalid(
                        "storage.s3.secret_access_key_file",
                        format!("{}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (None, Some(v)) => v,
            (None, None) => String::new(),
        };
        if let Some(ep) = &self.endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(invalid(
                    "storage.s3.endpoint",
                    format!("{ep:?} is not an http(s) URL"),
                ));
            }
        }
        Ok(S3Settings {
            endpoint: self.endpoint,
            region: self.region.unwrap_or_else(|| "us-east-1".into()),
            bucket,
            prefix: self.prefix.unwrap_or_default(),
            access_key_id: self.access_key_id.unwrap_or_default(),
            secret_access_key: secret,
            allow_http: self.allow_http.unwrap_or(false),
        })
    }
}

/// S3's bucket naming rules (3-63 of `[a-z0-9.-]`, alphanumeric at both ends).
pub fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<StorageSettings, ConfigError> {
        let f: FileStorage = toml::from_str(toml_text).unwrap();
        f.resolve_with(|k| (k == "SANDPIT_S3_SECRET_ACCESS_KEY").then(|| "s3cr3t".to_owned()))
    }

    #[test]
    fn defaults_keep_snapshots_local_and_sizes_sane() {
        let s = StorageSettings::default();
        assert!(s.enabled);
        assert_eq!(s.scratch_default_size, 10 << 30);
        assert_eq!(s.managed_bucket(), LOCAL_BUCKET);
        assert!(s.s3.is_none());
    }

    #[test]
    fn an_s3_backend_is_validated_and_its_secret_never_printed() {
        let s = parse(
            "snapshot_backend = \"s3\"\n[s3]\nendpoint = \"http://127.0.0.1:9000\"\nbucket = \"snaps\"\naccess_key_id = \"k\"\nallow_http = true\n",
        )
        .unwrap();
        assert_eq!(s.managed_bucket(), "snaps");
        let s3 = s.s3.unwrap();
        assert_eq!(s3.secret_access_key, "s3cr3t");
        assert!(!format!("{s3:?}").contains("s3cr3t"));
        for bad in [
            "snapshot_backend = \"s3\"\n",
            "[s3]\nbucket = \"No_Such\"\n",
            "[s3]\nbucket = \"ok-bucket\"\nendpoint = \"ftp://x\"\n",
            "scratch_default_size = \"0\"\n",
            "scratch_default_size = \"2Ti\"\n",
            "max_snapshot_size = \"lots\"\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
