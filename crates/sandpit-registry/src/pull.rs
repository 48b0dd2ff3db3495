//! [`Puller`]: endpoints, mirrors and coalescing; resolving a reference is
//! in `pull/resolve.rs`, downloading its layers in `pull/fetch.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use sandpit_image::{Image, ImageStore, Reference};
use ureq::tls::Certificate;

use crate::auth::{credentials_tag, AuthCache};
use crate::client::{self, Agents, Endpoint, Session};
use crate::manifest::Platform;
use crate::{
    Credentials, Failure, Progress, PullError, PullErrorKind, RegistryConfig, RegistryError,
};

mod fetch;
mod resolve;

/// Docker Hub's registry API host.
const DOCKER_HUB_ENDPOINT: &str = "https://registry-1.docker.io";

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
}
