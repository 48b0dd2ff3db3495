//! The records in memory: each sandbox's newest version (what transitions
//! apply to), the version readers see (only once it is stored), and the
//! (principal, request id) index that makes creation idempotent.

use std::collections::HashMap;

use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::model::{Principal, SandboxId, SandboxRecord};

/// One sandbox.
pub(super) struct Entry {
    /// The newest version; may not be stored yet.
    latest: SandboxRecord,
    /// Counts the versions of `latest`.
    staged: u64,
    /// What readers see: the newest stored version (`None` until the
    /// record's first write is stored).
    published: Option<SandboxRecord>,
    /// The version of `published`.
    shown: u64,
    /// Published states, for waiters.
    changes: watch::Sender<crate::model::State>,
    /// The lifetime timer, while one is armed.
    timer: Option<AbortHandle>,
}

impl Entry {
    fn new(record: SandboxRecord, published: bool) -> Self {
        let (changes, _) = watch::channel(record.state);
        Self {
            published: published.then(|| record.clone()),
            latest: record,
            staged: 1,
            shown: u64::from(published),
            changes,
            timer: None,
        }
    }

    /// The newest version, stored or not.
    pub(super) fn latest(&self) -> &SandboxRecord {
        &self.latest
    }

    /// Makes `record` the newest version; returns its version number.
    pub(super) fn stage(&mut self, record: SandboxRecord) -> u64 {
        self.latest = record;
        self.staged += 1;
        self.staged
    }

    /// Whether readers may see it yet.
    pub(super) fn is_published(&self) -> bool {
        self.published.is_some()
    }

    /// A receiver of its published states.
    pub(super) fn subscribe(&self) -> watch::Receiver<crate::model::State> {
        self.changes.subscribe()
    }

    /// Stops the lifetime timer, if any.
    pub(super) fn cancel_timer(&mut self) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
    }

    /// Keeps `timer` (replacing and stopping an older one); refused, and
    /// `timer` stopped, when the sandbox already ended.
    pub(super) fn set_timer(&mut self, timer: AbortHandle) {
        if self.latest.state.is_terminal() {
            timer.abort();
            return;
        }
        if let Some(old) = self.timer.replace(timer) {
            old.abort();
        }
    }
}

/// Every sandbox the manager knows.
#[derive(Default)]
pub(super) struct Table {
    entries: HashMap<SandboxId, Entry>,
    /// (principal, request id) -> sandbox id, for idempotent creation.
    requests: HashMap<(Principal, String), SandboxId>,
}

impl Table {
    fn index(&mut self, record: &SandboxRecord) {
        if let Some(rid) = &record.request_id {
            self.requests
                .insert((record.principal.clone(), rid.clone()), record.id.clone());
        }
    }

    /// A record loaded from the database: stored already, so published.
    pub(super) fn insert_stored(&mut self, record: SandboxRecord) {
        self.index(&record);
        self.entries
            .insert(record.id.clone(), Entry::new(record, true));
    }

    /// A new record about to be stored: found by its request id at once (a
    /// retry joins it), seen by readers once stored. Returns its version.
    pub(super) fn insert_new(&mut self, record: SandboxRecord) -> u64 {
        self.index(&record);
        let entry = Entry::new(record, false);
        let version = entry.staged;
        self.entries.insert(entry.latest.id.clone(), entry);
        version
    }

    /// `record`, stored as `version`, becomes what readers see, unless a
    /// newer version was published already.
    pub(super) fn publish(&mut self, record: &SandboxRecord, version: u64) {
        let Some(e) = self.entries.get_mut(&record.id) else {
            return;
        };
        if version <= e.shown {
            return;
        }
        e.shown = version;
        e.published = Some(record.clone());
        e.changes.send_replace(record.state);
    }

    /// Forgets a sandbox (its record was deleted, or never stored).
    pub(super) fn remove(&mut self, id: &SandboxId) {
        if let Some(mut entry) = self.entries.remove(id) {
            if let Some(rid) = entry.latest.request_id.take() {
                self.requests.remove(&(entry.latest.principal.clone(), rid));
            }
            entry.cancel_timer();
        }
    }

    pub(super) fn get(&self, id: &SandboxId) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &SandboxId) -> Option<&mut Entry> {
        self.entries.get_mut(id)
    }

    /// What readers see of a sandbox.
    pub(super) fn published(&self, id: &SandboxId) -> Option<&SandboxRecord> {
        self.entries.get(id)?.published.as_ref()
    }

    /// The sandbox an earlier request with this id created.
    pub(super) fn by_request(&self, principal: &Principal, request_id: &str) -> Option<&SandboxId> {
        self.requests
            .get(&(principal.clone(), request_id.to_owned()))
    }

    /// Sandboxes not in a terminal state, counting those being stored.
    /// The sum of the requests of the live sandboxes.
    pub(super) fn committed(&self) -> crate::model::Resources {
        self.entries
            .values()
            .filter(|e| !e.latest.state.is_terminal())
            .fold(crate::model::Resources::default(), |acc, e| {
                super::admission::add(&acc, &e.latest.resources.requests)
            })
    }

    pub(super) fn live(&self) -> usize {
        self.entries
            .values()
            .filter(|e| !e.latest.state.is_terminal())
            .count()
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Published records.
    pub(super) fn records(&self) -> impl Iterator<Item = &SandboxRecord> {
        self.entries.values().filter_map(|e| e.published.as_ref())
    }

    /// Published records matching `pred`.
    pub(super) fn count(&self, pred: impl Fn(&SandboxRecord) -> bool) -> usize {
        self.records().filter(|r| pred(r)).count()
    }
}
