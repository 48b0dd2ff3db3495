//! [`S3BlobStore`]: blobs in an S3-compatible bucket, shared by daemons.
//!
//! Keys are `<prefix>/sha256/<hex>`. Through `object_store` (async), behind
//! a blocking API: the store owns a small multi-threaded tokio runtime and
//! every call is `block_on` on it. Callers are on tokio's blocking pool (or
//! plain threads), never on an async worker: `block_on` there would panic,
//! and `Handle::current().block_on` would stall the caller's runtime. The
//! runtime is shut down in the background on drop, so dropping the store
//! from async code is fine.
//!
//! Uploads stream from the staged file through `object_store`'s
//! `BufWriter`: one PUT up to [`S3_PART_SIZE`], a multipart upload above it
//! (aborted on error). Reads stream and verify ([`VerifyingReader`]): the
//! bucket is not trusted with integrity.

use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use sandpit_image::Digest;
use tokio::io::AsyncWriteExt;

use crate::verify::VerifyingReader;
use crate::{BlobRef, BlobStore, SnapshotError};

/// Part size of multipart uploads; blobs up to it go in one PUT. S3 allows
/// 10,000 parts: 160 GB per blob.
pub const S3_PART_SIZE: usize = 16 << 20;
/// Parts in flight per upload (memory: this times [`S3_PART_SIZE`]).
const UPLOAD_CONCURRENCY: usize = 4;

/// Where the bucket is and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Key prefix (`snapshots` or `snapshots/`); may be empty.
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allow a plain `http://` endpoint (loopback, tests).
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// The runtime, shut down without blocking when the last user goes.
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.0
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(f)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Blobs in a bucket; see the module docs.
#[derive(Debug)]
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    rt: Arc<Runtime>,
    bucket: String,
    /// Normalised: no leading or trailing `/`; may be empty.
    prefix: String,
}

fn store_err(op: &'static str) -> impl FnOnce(object_store::Error) -> SnapshotError {
    move |source| SnapshotError::Store { op, source }
}

fn normalize_prefix(prefix: &str) -> Result<String, SnapshotError> {
    let trimmed = prefix.trim_matches('/');
    let valid = trimmed.split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if !trimmed.is_empty() && !valid {
        return Err(SnapshotError::Config(format!(
            "prefix {prefix:?}: segments of [A-Za-z0-9._-] separated by '/'"
        )));
    }
    Ok(trimmed.to_owned())
}

impl S3BlobStore {
    /// A store over `config`'s bucket. Nothing is contacted yet.
    pub fn new(config: &S3Config) -> Result<Self, SnapshotError> {
        let prefix = normalize_prefix(&config.prefix)?;
        if config.bucket.is_empty() {
            return Err(SnapshotError::Config("bucket must not be empty".into()));
        }
        if config.access_key_id.is_empty() || config.secret_access_key.is_empty() {
            return Err(SnapshotError::Config(
                "access_key_id and secret_access_key are required".into(),
            ));
        }
        let mut builder = AmazonS3Builder::new()
            .with_region(&config.region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_allow_http(config.allow_http)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120)),
            )
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &config.endpoint {
            // Path-style requests: S3-compatible servers rarely have
            // per-bucket host names.
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let store = builder
            .build()
            .map_err(|e| SnapshotError::Config(sandpit_errors::chain(&e)))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sandpit-s3")
            .enable_all()
            .build()
            .map_err(|e| SnapshotError::io("start the s3 runtime for", "", e))?;
        Ok(Self {
            store: Arc::new(store),
            rt: Arc::new(Runtime(Some(rt))),
            bucket: config.bucket.clone(),
            prefix,
        })
    }

    fn dir(&self) -> String {
        if self.prefix.is_empty() {
            "sha256".into()
        } else {
            format!("{}/sha256", self.prefix)
        }
    }

    /// The object key of `digest`.
    pub fn key(&self, digest: &Digest) -> String {
        format!("{}/{}", self.dir(), digest.hex())
    }
}

/// Pulls a GET's body chunk by chunk on the store's runtime.
struct S3Reader {
    rt: Arc<Runtime>,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(source)) => {
                    return Err(io::Error::other(SnapshotError::Store { op: "get", source }))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

impl BlobStore for S3BlobStore {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn put(&self, staged: &Path, blob: &BlobRef) -> Result<(), SnapshotError> {
        let meta =
            std::fs::symlink_metadata(staged).map_err(|e| SnapshotError::io("stat", staged, e))?;
        if !meta.is_file() || meta.len() != blob.size {
            return Err(SnapshotError::DigestMismatch {
                digest: blob.digest.clone(),
                detail: format!("staged file has {} bytes, not {}", meta.len(), blob.size),
            });
        }
        if !self.exists(&blob.digest)? {
            let key = Key::from(self.key(&blob.digest));
            let store: Arc<dyn ObjectStore> = self.store.clone();
            self.rt.block_on(async move {
                let mut file = tokio::fs::File::open(staged).await?;
                let mut writer = BufWriter::with_capacity(store, key, S3_PART_SIZE)
                    .with_max_concurrency(UPLOAD_CONCURRENCY);
                let copied = tokio::io::copy(&mut file, &mut writer).await;
                match copied {
                    Ok(_) => writer.shutdown().await,
                    Err(e) => {
                        if let Err(abort) = writer.abort().await {
                            tracing::warn!(error = %sandpit_errors::Chain(&abort), "aborting an upload");
                        }
                        Err(e)
                    }
                }
            })
            .map_err(|e| SnapshotError::io("upload", staged, e))?;
        }
        std::fs::remove_file(staged).map_err(|e| SnapshotError::io("remove", staged, e))
    }

    fn open(&self, blob: &BlobRef) -> Result<Box<dyn Read + Send>, SnapshotError> {
        let key = Key::from(self.key(&blob.digest));
        let got = self
            .rt
            .block_on(self.store.get(&key))
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => SnapshotError::NotFound {
                    digest: blob.digest.clone(),
                },
                source => SnapshotError::Store { op: "get", source },
            })?;
        let reader = S3Reader {
            rt: self.rt.clone(),
            stream: got.into_stream(),
            chunk: Bytes::new(),
        };
        Ok(Box::new(VerifyingReader::new(reader, blob.clone())))
    }

    fn exists(&self, digest: &Digest) -> Result<bool, SnapshotError> {
        let key = Key::from(self.key(digest));
        match self.rt.block_on(self.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(SnapshotError::Store { op: "head", source }),
        }
    }

    fn delete(&self, digest: &Digest) -> Result<(), SnapshotError> {
        let key = Key::from(self.key(digest));
        match self.rt.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(SnapshotError::Store {
                op: "delete",
                source,
            }),
        }
    }

    fn list(&self) -> Result<Vec<Digest>, SnapshotError> {
        let dir = Key::from(self.dir());
        let metas: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(store_err("list"))?;
        let mut out = Vec::new();
        for meta in metas {
            let parts: Vec<_> = meta.location.parts().collect();
            let parent_ok =
                meta.location.prefix_matches(&dir) && parts.len() == dir.parts().count() + 1;
            match meta.location.filename().map(Digest::from_sha256_hex) {
                Some(Ok(d)) if parent_ok => out.push(d),
                _ => tracing::warn!(key = %meta.location, "not a blob, ignored"),
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_prefixes() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("snapshots/").unwrap(), "snapshots");
        assert_eq!(normalize_prefix("/a/b-c_d.e/").unwrap(), "a/b-c_d.e");
        for bad in ["a//b", "a/../b", "a b", "a/./b", "ü"] {
            assert!(normalize_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let config = S3Config {
            endpoint: None,
            region: "r".into(),
            bucket: "b".into(),
            prefix: String::new(),
            access_key_id: "id".into(),
            secret_access_key: "very-secret".into(),
            allow_http: false,
        };
        assert!(!format!("{config:?}").contains("very-secret"));
    }
}
