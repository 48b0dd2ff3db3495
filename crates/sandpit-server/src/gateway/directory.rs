//! The runners a gateway knows, with a channel to each: read from the
//! store's registry, refreshed on the lease timer and whenever a call
//! names a runner not seen yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sandpit_cluster::{RunnerStatus, SandboxRow, Store};
use sandpit_proto::sandbox::v1::discovery_service_client::DiscoveryServiceClient;
use sandpit_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::api::errors::{self, reason};

/// One runner as last read, and its channel.
#[derive(Clone, Debug)]
pub(super) struct Runner {
    /// Its registry row.
    pub(super) status: RunnerStatus,
    channel: Channel,
}

#[derive(Default, Debug)]
struct Known {
    runners: HashMap<String, Runner>,
}

/// The runners, shared by the gateway's services. Cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct Directory {
    store: Store,
    known: Arc<Mutex<Known>>,
    max_message_bytes: usize,
}

impl Directory {
    /// An empty directory over `store`; filled by the first refresh.
    pub(super) fn new(store: Store, max_message_bytes: usize) -> Self {
        Self {
            store,
            known: Arc::default(),
            max_message_bytes,
        }
    }

    /// The shared store.
    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the registry again. A channel is kept while its runner's
    /// endpoint stays the same, so connections survive refreshes.
    pub(super) async fn refresh(&self) {
        let rows = match self.store.runners().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %sandpit_errors::chain(&e), "cannot read the runner registry");
                return;
            }
        };
        let mut known = self.known();
        let mut next = HashMap::with_capacity(rows.len());
        for status in rows {
            let id = status.id.as_str().to_owned();
            let channel = match known.runners.remove(&id) {
                Some(r) if r.status.endpoint == status.endpoint => r.channel,
                _ => match channel_to(&status.endpoint) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(runner = %id, endpoint = %status.endpoint, error = %e, "runner endpoint unusable");
                        continue;
                    }
                },
            };
            next.insert(id, Runner { status, channel });
        }
        known.runners = next;
    }

    /// A runner by id, reading the registry again if it is not known yet.
    pub(super) async fn runner(&self, id: &str) -> Option<Runner> {
        if let Some(r) = self.known().runners.get(id).cloned() {
            return Some(r);
        }
        self.refresh().await;
        self.known().runners.get(id).cloned()
    }

    /// Every runner known, live or not, by id.
    pub(super) async fn all(&self) -> Vec<Runner> {
        if self.known().runners.is_empty() {
            self.refresh().await;
        }
        let mut all: Vec<Runner> = self.known().runners.values().cloned().collect();
        all.sort_by(|a, b| a.status.id.as_str().cmp(b.status.id.as_str()));
        all
    }

    /// The live runners, by id.
    pub(super) async fn live(&self) -> Vec<Runner> {
        let mut live = self.all().await;
        live.retain(|r| r.status.live);
        live
    }

    /// A client of `runner`'s SandboxService.
    pub(super) fn sandbox_client(&self, runner: &Runner) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::new(runner.channel.clone())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// A client of `runner`'s DiscoveryService.
    pub(super) fn discovery_client(&self, runner: &Runner) -> DiscoveryServiceClient<Channel> {
        DiscoveryServiceClient::new(runner.channel.clone())
    }

    /// Where a call about `sandbox_id` of `caller` goes.
    pub(super) async fn route(&self, caller: &str, sandbox_id: &str) -> Result<Route, Status> {
        let row = self
            .store
            .sandbox(sandbox_id)
            .await
            .map_err(store_status)?
            // Another principal's sandbox is as unknown as a missing one.
            .filter(|row| row.principal == caller)
            .ok_or_else(|| errors::sandbox_not_found(sandbox_id))?;
        if row.state == sandpit_cluster::SandboxState::Failed {
            return Ok(Route::Failed(row));
        }
        match self.runner(row.runner.as_str()).await {
            Some(runner) => Ok(Route::Runner(runner)),
            None => Err(Status::internal(format!(
                "sandbox {sandbox_id} is on runner {}, which is not registered",
                row.runner
            ))),
        }
    }
}

/// Where a call goes.
#[derive(Debug)]
pub(super) enum Route {
    /// To the runner holding the sandbox.
    Runner(Runner),
    /// Nowhere: the sandbox failed (its runner's lease expired, or its
    /// runner came back without it); its row is the answer.
    Failed(SandboxRow),
}

fn channel_to(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(5))
        .connect_lazy())
}

/// A store failure as the client sees it: UNAVAILABLE (which it retries)
/// while PostgreSQL is away, INTERNAL otherwise.
pub(super) fn store_status(e: sandpit_cluster::Error) -> Status {
    let message = format!("shared state: {}", sandpit_errors::chain(&e));
    if e.is_transient() {
        errors::status(Code::Unavailable, message, reason::INTERNAL, &[])
    } else {
        errors::status(Code::Internal, message, reason::INTERNAL, &[])
    }
}
