//! What a cluster runner ([`crate::membership`]) asks of the manager to
//! keep the shared store and this host in agreement.

use std::time::Duration;

use super::{lock, Manager, ManagerError};
use crate::engine::Engine;
use crate::model::{SandboxId, SandboxRecord};

/// How long a sandbox the shared store failed gets to stop.
const LOST_GRACE: Duration = Duration::from_secs(1);

impl<E: Engine> Manager<E> {
    /// Every published record, whoever owns it.
    pub fn all_records(&self) -> Vec<SandboxRecord> {
        lock(&self.inner.table).records().cloned().collect()
    }

    /// Stops a sandbox whoever owns it, with `reason`: the shared store
    /// failed it while this runner was away (clients were told FAILED, so
    /// it must not run on).
    pub async fn stop_lost(
        &self,
        id: &SandboxId,
        reason: String,
    ) -> Result<SandboxRecord, ManagerError> {
        let this = self.clone();
        let owned = id.clone();
        self.detached(
            id,
            async move { this.stop(&owned, LOST_GRACE, reason).await },
        )
        .await
    }
}
