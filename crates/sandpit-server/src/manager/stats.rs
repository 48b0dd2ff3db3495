//! What metrics and `sandpit stats` read of the sandboxes: counts by state
//! from the table, live figures from the engine.

use super::{lock, Manager, ManagerError};
use crate::engine::{Engine, SandboxStats};
use crate::model::{Principal, SandboxId, SandboxRecord, State};

impl<E: Engine> Manager<E> {
    /// How many published sandboxes are in each state (every state, zeros
    /// included).
    pub fn state_counts(&self) -> Vec<(State, usize)> {
        let table = lock(&self.inner.table);
        let mut counts: Vec<(State, usize)> = State::ALL.iter().map(|s| (*s, 0)).collect();
        for r in table.records() {
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == r.state) {
                c.1 += 1;
            }
        }
        counts
    }

    /// Every RUNNING sandbox, whoever owns it (the metrics endpoint).
    pub fn running_records(&self) -> Vec<SandboxRecord> {
        lock(&self.inner.table)
            .records()
            .filter(|r| r.state == State::Running)
            .cloned()
            .collect()
    }

    /// Live figures of the caller's sandboxes `ids`, or of all its RUNNING
    /// ones when `ids` is empty. Another principal's id is NOT_FOUND, like an
    /// unknown one; a named sandbox that does not run is refused.
    pub async fn sandbox_stats(
        &self,
        principal: &Principal,
        ids: &[SandboxId],
    ) -> Result<Vec<(SandboxRecord, SandboxStats)>, ManagerError> {
        let records = if ids.is_empty() {
            self.running_records()
                .into_iter()
                .filter(|r| &r.principal == principal)
                .collect()
        } else {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let r = self.get(principal, id)?;
                if r.state != State::Running {
                    return Err(ManagerError::NotRunning {
                        id: id.clone(),
                        state: r.state,
                        reason: r.state_reason,
                    });
                }
                out.push(r);
            }
            out
        };
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            match self.inner.engine.stats(&r.id).await {
                Ok(s) => out.push((r, s)),
                // Ended between the table and the engine: not running now.
                Err(crate::engine::EngineError::Unknown(_)) if ids.is_empty() => {}
                Err(e) => return Err(ManagerError::Engine(e)),
            }
        }
        Ok(out)
    }
}
