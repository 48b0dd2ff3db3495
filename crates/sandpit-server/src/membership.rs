//! The runner role (docs/scale-out.md): this daemon's place in the shared
//! store. It registers at start-up (a new incarnation), reconciles what
//! the store says it holds with what it holds, then heartbeats every
//! quarter of the lease and syncs ended sandboxes back to the store.
//!
//! The store is the arbiter. A sandbox the store failed while this runner
//! was away (its lease expired) is stopped here: clients were told it
//! FAILED. A sandbox the store thinks live but this runner no longer has
//! is failed in the store. Once another incarnation registers under this
//! runner's id, this one stops ([`MembershipError::Superseded`]).

use std::collections::HashMap;
use std::time::Duration;

use sandpit_cluster::{
    Capacity, Error as StoreError, Registration, RunnerId, SandboxState, Store, StoreConfig,
};

use crate::clusterconfig::ClusterSettings;
use crate::engine::Engine;
use crate::manager::Manager;
use crate::model::{SandboxRecord, State};

/// How long a placement may stay unbound before the runner fails it (its
/// gateway died between placing and hearing the runner's answer).
const UNBOUND_PLACEMENT: Duration = Duration::from_secs(60);

/// Why the runner cannot go on in the cluster.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The runner id in the config is not a DNS label.
    #[error("runner id {0:?} is not a DNS label (1-63 of a-z, 0-9, -)")]
    RunnerId(String),
    /// The store refused or failed.
    #[error("shared state")]
    Store(#[from] StoreError),
    /// Another process registered as this runner.
    #[error("another sandpitd registered as runner {0}; this one stops")]
    Superseded(String),
}

/// A registered runner.
#[derive(Debug)]
pub struct Membership {
    store: Store,
    registration: Registration,
    incarnation: i64,
    lease: Duration,
}

/// Connects to the store, waiting out PostgreSQL while it is away (a
/// runner starting before its database is normal in a cluster).
pub async fn connect(settings: &ClusterSettings) -> Result<Store, StoreError> {
    let config = StoreConfig {
        lease: settings.lease,
        ..StoreConfig::default()
    };
    let mut warned = false;
    loop {
        match Store::connect(&settings.database_url, config.clone()).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_transient() => {
                if !warned {
                    tracing::warn!(error = %sandpit_errors::chain(&e), "PostgreSQL not reachable; retrying every 2 s");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the store should record for a sandbox this runner ended.
fn ended(record: &SandboxRecord) -> Option<(SandboxState, String)> {
    match record.state {
        State::Completed | State::Terminated => {
            Some((SandboxState::Terminated, record.state_reason.clone()))
        }
        State::Failed => Some((SandboxState::Failed, record.state_reason.clone())),
        _ => None,
    }
}

impl Membership {
    /// Registers `runner_id` with its `allocatable` capacity (and its
    /// direct endpoint, when it serves one) and reconciles
    /// `manager`'s sandboxes with what the store says this runner holds.
    pub async fn join<E: Engine>(
        store: Store,
        settings: &ClusterSettings,
        runner_id: &str,
        allocatable: Capacity,
        direct: Option<sandpit_cluster::DirectEndpoint>,
        manager: &Manager<E>,
    ) -> Result<Self, MembershipError> {
        let id = RunnerId::new(runner_id.to_owned())
            .map_err(|_| MembershipError::RunnerId(runner_id.to_owned()))?;
        // "Unlimited" (u64::MAX) is stored as the largest figure PostgreSQL
        // holds.
        let most = i64::MAX as u64;
        let allocatable = Capacity {
            cpu_millis: allocatable.cpu_millis.min(most),
            memory_bytes: allocatable.memory_bytes.min(most),
            sandboxes: allocatable.sandboxes.min(i32::MAX as u32),
        };
        let registration = Registration {
            id,
            endpoint: settings.advertise.clone().unwrap_or_default(),
            labels: settings.labels.clone(),
            allocatable,
            direct,
        };
        let adoption = store.register(&registration).await?;
        tracing::info!(
            runner = %registration.id,
            incarnation = adoption.incarnation,
            live = adoption.live.len(),
            endpoint = %registration.endpoint,
            "registered in the cluster"
        );
        let this = Self {
            store,
            registration,
            incarnation: adoption.incarnation,
            lease: settings.lease,
        };
        this.adopt(manager, &adoption.live).await?;
        Ok(this)
    }

    /// Stops what the store failed while this runner was away.
    async fn adopt<E: Engine>(
        &self,
        manager: &Manager<E>,
        live: &[sandpit_cluster::SandboxRow],
    ) -> Result<(), MembershipError> {
        let kept: std::collections::HashSet<&str> = live.iter().map(|r| r.id.as_str()).collect();
        for record in manager.all_records() {
            if record.state.is_terminal() || kept.contains(record.id.as_str()) {
                continue;
            }
            // Only sandboxes the store knows and ended; one it never saw
            // (created on this runner directly) is this runner's own.
            let Some(row) = self.store.sandbox(record.id.as_str()).await? else {
                continue;
            };
            if row.runner != self.registration.id || row.state.is_live() {
                continue;
            }
            tracing::warn!(sandbox_id = %record.id, reason = %row.reason, "stopping a sandbox the cluster failed while this runner was away");
            if let Err(e) = manager.stop_lost(&record.id, row.reason.clone()).await {
                tracing::warn!(sandbox_id = %record.id, error = %sandpit_errors::chain(&e), "cannot stop it");
            }
        }
        self.sync(manager).await
    }

    /// Records in the store what ended here: a live row whose sandbox this
    /// runner has ended (or no longer has) is released with its outcome.
    async fn sync<E: Engine>(&self, manager: &Manager<E>) -> Result<(), MembershipError> {
        let rows = self.store.live_on(&self.registration.id).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let here: HashMap<String, SandboxRecord> = manager
            .all_records()
            .into_iter()
            .map(|r| (r.id.as_str().to_owned(), r))
            .collect();
        for row in rows {
            // Unbound reservations are the gateways' (and expire below).
            if row.state != SandboxState::Running {
                continue;
            }
            let (state, reason) = match here.get(&row.id) {
                Some(record) => match ended(record) {
                    Some(end) => end,
                    None => continue,
                },
                None => (
                    SandboxState::Failed,
                    format!(
                        "runner {} no longer holds the sandbox (its state was lost)",
                        self.registration.id
                    ),
                ),
            };
            self.store.release(&row.id, state, &reason).await?;
            tracing::debug!(sandbox_id = %row.id, ?state, "released in the cluster");
        }
        Ok(())
    }

    /// Heartbeats and syncs until another incarnation takes over.
    /// PostgreSQL being away is waited out (the lease may expire meanwhile:
    /// the store then fails this runner's sandboxes, and the next
    /// registration would stop them).
    pub async fn run<E: Engine>(self, manager: Manager<E>) -> MembershipError {
        let mut tick = tokio::time::interval(self.lease / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let beat = self
                .store
                .heartbeat(
                    &self.registration.id,
                    self.incarnation,
                    self.registration.allocatable,
                )
                .await;
            match beat {
                Ok(()) => {}
                Err(StoreError::Superseded(_)) => {
                    return MembershipError::Superseded(self.registration.id.to_string())
                }
                Err(e) => {
                    tracing::warn!(error = %sandpit_errors::chain(&e), "heartbeat failed");
                    continue;
                }
            }
            if let Err(e) = self.sync(&manager).await {
                tracing::warn!(error = %sandpit_errors::chain(&e), "cannot sync sandboxes to the cluster");
            }
            if let Err(e) = self
                .store
                .expire_placements(&self.registration.id, UNBOUND_PLACEMENT)
                .await
            {
                tracing::warn!(error = %sandpit_errors::chain(&e), "cannot expire unbound placements");
            }
        }
    }
}
