//! [`Puller`]: endpoints, resolution, layer downloads, coalescing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sandpit_image::{
    Compression, Digest, Image, ImageConfig, ImageError, ImageStore, LayerInfo, Reference,
};
use ureq::tls::Certificate;

use crate::auth::{credentials_tag, AuthCache};
use crate::client::{self, Agents, Endpoint, Session};
use crate::manifest::{self, Manifest, Platform};
use crate::{
    chain, Credentials, Failure, LayerProgressInfo, Progress, PullError, PullErrorKind,
    RegistryConfig, RegistryError,
};

/// Largest manifest, index or image config accepted.
const METADATA_MAX: u64 = 4 << 20;
/// Docker Hub's registry API host.
const DOCKER_HUB_ENDPOINT: &str = "https://registry-1.docker.io";
/// Progress is reported at most once per this many bytes of a layer.
const PROGRESS_STEP: u64 = 1 << 20;

/// Parses a digest from a registry document (or the reference): past
/// this point every digest is a validated `sha256:<hex>`.
fn check_digest(digest: &str, what: &str) -> Result<Digest, Failure> {
    Digest::parse(digest)
        .map_err(|_| Failure::invalid(format!("{what} digest {digest:?} is not sha256:<hex>")))
}

/// The outcome of one pull, shared with the callers that joined it.
#[derive(Debug, Default)]
struct Flight {
    outcome: Mutex<Option<Result<Image, PullError>>>,
    done: Condvar,
}

/// Pulls images into an [`ImageStore`]. `Send + Sync`: share it with an
/// `Arc`; concurrent pulls of one reference are coalesced.
pub struct Puller {
    store: Arc<ImageStore>,
    config: RegistryConfig,
    platform: Platform,
    /// Agents per configured registry (their own CA roots).
    host_agents: HashMap<String, Agents>,
    default_agents: Agents,
    auth: AuthCache,
    in_flight: Mutex<HashMap<String, Arc<Flight>>>,
}

impl fmt::Debug for Puller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Puller")
            .field("store", &self.store.root())
            .field("config", &self.config)
            .field("platform", &self.platform.to_string())
            .finish_non_exhaustive()
    }
}

/// What a manifest resolves to.
#[derive(Debug)]
struct Resolved {
    manifest_digest: Digest,
    /// Bottom first.
    layers: Vec<Layer>,
    config: ImageConfig,
}

/// One layer of a resolved image, verified against its manifest and config.
#[derive(Debug)]
struct Layer {
    /// Digest of the blob (compressed).
    digest: Digest,
    /// Blob size the manifest gives.
    size: u64,
    compression: Compression,
    /// The config's `rootfs.diff_ids` entry for this layer.
    diff_id: Digest,
}

impl Puller {
    /// A puller for `store` with `config` (validated here). Reads the
    /// system roots and the configured CA files.
    pub fn new(store: Arc<ImageStore>, config: RegistryConfig) -> Result<Self, RegistryError> {
        config.validate()?;
        let system: Arc<Vec<Certificate<'static>>> = Arc::new(client::system_roots());
        let default_agents = Agents::new(&config, client::roots(&system, None)?);
        let mut host_agents = HashMap::new();
        for (host, settings) in &config.registries {
            let agents = match &settings.ca_file {
                Some(path) => Agents::new(&config, client::roots(&system, Some(path))?),
                None => default_agents.clone(),
            };
            host_agents.insert(host.clone(), agents);
        }
        Ok(Self {
            store,
            config,
            platform: Platform::host(),
            host_agents,
            default_agents,
            auth: AuthCache::default(),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// The store images are pulled into.
    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    /// Resolves, downloads, verifies and unpacks `reference` into the
    /// store, and records it under `reference` (the reference asked for,
    /// even when a mirror served it). `credentials` win over the
    /// registry's configured ones.
    ///
    /// Concurrent calls for the same reference (and credentials) are
    /// coalesced into one pull: every caller gets the same outcome, and the
    /// joiners' `progress` only sees [`Progress::Waiting`]. Layers already
    /// in the store (by diff id from the config) are not downloaded again.
    pub fn pull(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Image, PullError> {
        self.pull_with(reference, credentials, progress, false)
    }

    /// [`Puller::pull`], unless the store already has an image recorded
    /// under `reference` (Docker's `--pull missing`, what a sandbox start
    /// wants): then that image, without asking the registry. The store is
    /// checked under the lock that starts and joins pulls, and a pull
    /// records its image before it retires, so a caller that just missed a
    /// pull of the same reference finds its image instead of pulling again.
    pub fn pull_if_missing(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Image, PullError> {
        self.pull_with(reference, credentials, progress, true)
    }

    fn pull_with(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        progress: &(dyn Fn(&Progress) + Sync),
        if_missing: bool,
    ) -> Result<Image, PullError> {
        let credentials = credentials.cloned().or_else(|| {
            let host = self.config.registries.get(&reference.registry)?;
            Some(Credentials {
                username: host.username.clone()?,
                password: host.password.clone()?,
            })
        });
        let key = format!("{reference} {}", credentials_tag(credentials.as_ref()));
        let (flight, leader) = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if if_missing {
                if let Ok(image) = self.store.get(reference) {
                    return Ok(image);
                }
            }
            match in_flight.get(&key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = Arc::new(Flight::default());
                    in_flight.insert(key.clone(), flight.clone());
                    (flight, true)
                }
            }
        };
        if !leader {
            progress(&Progress::Waiting);
            tracing::debug!(reference = %reference, "joining a pull in progress");
            let mut outcome = flight.outcome.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(result) = outcome.as_ref() {
                    return result.clone();
                }
                outcome = flight.done.wait(outcome).unwrap_or_else(|e| e.into_inner());
            }
        }

        /// Publishes the outcome and retires the flight, even if the pull
        /// panics: joiners must not wait forever.
        struct Publish<'a> {
            puller: &'a Puller,
            key: &'a str,
            flight: &'a Flight,
            reference: String,
            result: Option<Result<Image, PullError>>,
        }
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                let result = self.result.take().unwrap_or_else(|| {
                    Err(Failure::new(PullErrorKind::Store, "pull aborted")
                        .into_pull_error(&self.reference))
                });
                *self
                    .flight
                    .outcome
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(result);
                self.flight.done.notify_all();
                self.puller
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(self.key);
            }
        }
        let mut publish = Publish {
            puller: self,
            key: &key,
            flight: &flight,
            reference: reference.to_string(),
            result: None,
        };
        let started = Instant::now();
        let result = self
            .pull_once(reference, credentials.as_ref(), progress)
            .map_err(|f| f.into_pull_error(&reference.to_string()));
        match &result {
            Ok(image) => tracing::info!(
                reference = %reference,
                id = %image.id,
                layers = image.layers.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "image pulled"
            ),
            Err(e) => {
                tracing::warn!(reference = %reference, kind = %e.kind(), error = %e, "pull failed")
            }
        }
        publish.result = Some(result.clone());
        drop(publish);
        result
    }

    /// Mirrors in order, then the registry itself.
    fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let host = self.config.registries.get(registry);
        let agents = self
            .host_agents
            .get(registry)
            .unwrap_or(&self.default_agents);
        let mut out = Vec::new();
        for mirror in host.map(|h| h.mirrors.as_slice()).unwrap_or_default() {
            out.push(Endpoint {
                url: mirror.trim_end_matches('/').to_owned(),
                mirror: true,
                agents: agents.clone(),
            });
        }
        let insecure = host.is_some_and(|h| h.insecure);
        let url = match host.and_then(|h| h.endpoint.as_deref()) {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if registry == sandpit_image::DEFAULT_REGISTRY => DOCKER_HUB_ENDPOINT.to_owned(),
            None if insecure => format!("http://{registry}"),
            None => format!("https://{registry}"),
        };
        out.push(Endpoint {
            url,
            mirror: false,
            agents: agents.clone(),
        });
        out
    }

    fn session<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        repository: &'a str,
        credentials: Option<&'a Credentials>,
    ) -> Session<'a> {
        Session {
            endpoint,
            repository,
            credentials,
            cache: &self.auth,
            cache_key: (
                endpoint.url.clone(),
                repository.to_owned(),
                credentials_tag(credentials),
            ),
        }
    }

    fn pull_once(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Image, Failure> {
        let endpoints = self.endpoints(&reference.registry);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let session = self.session(endpoint, &reference.repository, credentials);
            match self.resolve(&session, reference) {
                Ok(resolved) => {
                    tracing::info!(
                        reference = %reference,
                        endpoint = %endpoint.url,
                        mirror = endpoint.mirror,
                        manifest = %resolved.manifest_digest,
                        "manifest resolved"
                    );
                    return self.fetch(reference, &endpoints[i..], credentials, resolved, progress);
                }
                Err(f) if endpoint.mirror => {
                    tracing::warn!(
                        reference = %reference,
                        mirror = %endpoint.url,
                        error = %f.message,
                        "mirror failed, trying the next endpoint"
                    );
                }
                Err(f) => return Err(f),
            }
        }
        unreachable!("the registry itself is the last endpoint")
    }

    /// Fetches and verifies the manifest (through an index to the host
    /// platform's) and the config.
    fn resolve(&self, session: &Session<'_>, reference: &Reference) -> Result<Resolved, Failure> {
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

    /// Downloads the missing layers, then writes the image record.
    fn fetch(
        &self,
        reference: &Reference,
        endpoints: &[Endpoint],
        credentials: Option<&Credentials>,
        resolved: Resolved,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Image, Failure> {
        progress(&Progress::Resolved {
            endpoint: endpoints[0].url.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| LayerProgressInfo {
                    digest: l.digest.clone(),
                    size: l.size,
                })
                .collect(),
        });
        let mut todo = Vec::new();
        let mut queued = HashSet::new();
        let mut cached_bytes = 0u64;
        for (index, Layer { diff_id, .. }) in resolved.layers.iter().enumerate() {
            if self.store.has_layer(diff_id) {
                cached_bytes = cached_bytes
                    .saturating_add(self.store.layer(diff_id).map(|l| l.size).unwrap_or(0));
                progress(&Progress::LayerCached { index });
            } else if queued.insert(diff_id) {
                todo.push(index);
            } else {
                // The same layer twice in one image: one download serves both.
                progress(&Progress::LayerCached { index });
            }
        }

        let limit = self.config.max_image_bytes;
        if cached_bytes > limit {
            return Err(Failure::new(
                PullErrorKind::TooLarge,
                format!("image larger than {limit} bytes"),
            ));
        }
        let total = AtomicU64::new(cached_bytes);
        let next = AtomicUsize::new(0);
        let cancel = AtomicBool::new(false);
        let failure: Mutex<Option<Failure>> = Mutex::new(None);
        let fail = |f: Failure| {
            let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
            // The first failure is the cause; later ones are its echo.
            if slot.is_none() {
                *slot = Some(f);
            }
            cancel.store(true, Ordering::SeqCst);
        };
        let workers = self.config.concurrent_layers.min(todo.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if cancel.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some(&index) = todo.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        break;
                    };
                    match self.fetch_layer(
                        reference,
                        endpoints,
                        credentials,
                        &resolved,
                        index,
                        &cancel,
                        progress,
                    ) {
                        Ok(info) => {
                            let sum = total.fetch_add(info.size, Ordering::SeqCst) + info.size;
                            if sum > limit {
                                fail(Failure::new(
                                    PullErrorKind::TooLarge,
                                    format!("image larger than {limit} bytes"),
                                ));
                                break;
                            }
                            progress(&Progress::LayerDone { index });
                        }
                        Err(None) => break,
                        Err(Some(f)) => {
                            fail(f);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(f);
        }
        let diff_ids: Vec<Digest> = resolved.layers.iter().map(|l| l.diff_id.clone()).collect();
        self.store
            .put_image(
                reference,
                &diff_ids,
                resolved.config,
                Some(resolved.manifest_digest),
            )
            .map_err(|e| store_failure(&e, "record image"))
    }

    /// Downloads layer `index`, falling through mirrors that fail.
    /// `Err(None)`: cancelled because another layer failed.
    #[allow(clippy::too_many_arguments)]
    fn fetch_layer(
        &self,
        reference: &Reference,
        endpoints: &[Endpoint],
        credentials: Option<&Credentials>,
        resolved: &Resolved,
        index: usize,
        cancel: &AtomicBool,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<LayerInfo, Option<Failure>> {
        let layer = &resolved.layers[index];
        let mut result = Err(None);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let session = self.session(endpoint, &reference.repository, credentials);
            result = self.fetch_layer_from(&session, resolved, index, cancel, progress);
            match &result {
                Err(Some(f))
                    if endpoint.mirror
                        && i + 1 < endpoints.len()
                        && matches!(
                            f.kind,
                            PullErrorKind::NotFound
                                | PullErrorKind::Unreachable
                                | PullErrorKind::Unauthorized
                        ) =>
                {
                    tracing::warn!(
                        mirror = %endpoint.url,
                        layer = %layer.digest,
                        error = %f.message,
                        "mirror failed, trying the next endpoint"
                    );
                }
                _ => break,
            }
        }
        result
    }

    fn fetch_layer_from(
        &self,
        session: &Session<'_>,
        resolved: &Resolved,
        index: usize,
        cancel: &AtomicBool,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<LayerInfo, Option<Failure>> {
        let layer = &resolved.layers[index];
        let started = Instant::now();
        let response = session.blob(&layer.digest)?;
        let mut reader = BlobReader {
            inner: response.into_body().into_reader(),
            digest: &layer.digest,
            index,
            done: 0,
            total: layer.size,
            reported: 0,
            cancel,
            progress,
            failure: None,
            cancelled: false,
        };
        let result = self.store.import_layer_verified(
            &mut reader,
            layer.compression,
            Some(&layer.digest),
            Some(&layer.diff_id),
            self.config.max_layer_bytes,
        );
        match result {
            Ok(info) => {
                tracing::debug!(
                    layer = %layer.digest,
                    diff_id = %info.diff_id,
                    endpoint = %session.endpoint.url,
                    bytes = reader.done,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "layer pulled"
                );
                Ok(info)
            }
            Err(_) if reader.cancelled => Err(None),
            Err(e) => Err(Some(reader.failure.take().unwrap_or_else(|| {
                store_failure(&e, &format!("layer {}", layer.digest))
            }))),
        }
    }
}

/// The failure an error of the store means.
fn store_failure(e: &ImageError, context: &str) -> Failure {
    match e {
        ImageError::TooLarge { .. } => Failure::new(PullErrorKind::TooLarge, chain(e)),
        ImageError::DigestMismatch { .. }
        | ImageError::DiffIdMismatch { .. }
        | ImageError::BadEntry { .. }
        | ImageError::Entry { .. }
        | ImageError::Archive(_)
        | ImageError::InvalidDigest { .. }
        | ImageError::UnsupportedMediaType(_) => {
            Failure::invalid(format!("{context}: {}", chain(e)))
        }
        _ => Failure::new(PullErrorKind::Store, format!("{context}: {}", chain(e))),
    }
}

/// The HTTP body of a blob on its way into the store: reports progress,
/// stops when the pull is cancelled, enforces the descriptor's size, and
/// remembers a network failure (the store only sees an `io::Error`).
struct BlobReader<'a, R> {
    inner: R,
    digest: &'a Digest,
    index: usize,
    done: u64,
    total: u64,
    reported: u64,
    cancel: &'a AtomicBool,
    progress: &'a (dyn Fn(&Progress) + Sync),
    failure: Option<Failure>,
    cancelled: bool,
}

impl<R: Read> Read for BlobReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            self.cancelled = true;
            return Err(io::Error::other("pull cancelled"));
        }
        // One byte more than the descriptor says is enough to know it lies.
        let room = usize::try_from(self.total.saturating_sub(self.done).saturating_add(1))
            .unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                self.failure = Some(Failure::new(
                    PullErrorKind::Unreachable,
                    format!("registry unreachable: {}", client::io_reason(&e)),
                ));
                return Err(e);
            }
        };
        self.done += n as u64;
        if self.done > self.total {
            self.failure = Some(Failure::invalid(format!(
                "blob {} longer than its descriptor's {} bytes",
                self.digest, self.total
            )));
            return Err(io::Error::other("blob longer than its descriptor"));
        }
        if n == 0 && self.done < self.total && !buf.is_empty() {
            self.failure = Some(Failure::new(
                PullErrorKind::Unreachable,
                format!(
                    "registry unreachable: connection closed after {} of {} bytes",
                    self.done, self.total
                ),
            ));
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if self.done - self.reported >= PROGRESS_STEP || (n > 0 && self.done == self.total) {
            self.reported = self.done;
            (self.progress)(&Progress::LayerBytes {
                index: self.index,
                done: self.done,
                total: self.total,
            });
        }
        Ok(n)
    }
}
