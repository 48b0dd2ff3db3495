//! Quiescing a sandbox for a checkpoint: its cgroup frozen while the host
//! copies its writable layer, thawed whatever happens.

use std::path::PathBuf;

use super::{read_record, Runtime, RuntimeError};
use crate::cgroup::Cgroup;
use crate::SandboxId;

/// A sandbox whose processes are all frozen: none runs, forks or writes
/// until this is thawed, explicitly ([`Frozen::thaw`]) or on drop (so an
/// early return or a panic while copying never leaves a sandbox stopped).
#[derive(Debug)]
#[must_use = "dropping it thaws the sandbox at once"]
pub struct Frozen {
    id: SandboxId,
    cgroup: Option<Cgroup>,
}

impl Frozen {
    /// The frozen sandbox.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Thaws the sandbox, reporting a failure (drop only logs it).
    pub fn thaw(mut self) -> Result<(), RuntimeError> {
        match self.cgroup.take() {
            Some(cgroup) => Ok(cgroup.thaw()?),
            None => Ok(()),
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            if let Err(e) = cgroup.thaw() {
                tracing::warn!(
                    sandbox_id = %self.id,
                    error = %sandpit_errors::chain(&e),
                    "thaw failed"
                );
            }
        }
    }
}

impl Runtime {
    /// Freezes every process of sandbox `id` (its cgroup) and waits until
    /// the kernel says they are frozen, typically within a millisecond.
    /// While the returned [`Frozen`] lives nothing in the sandbox writes,
    /// so its [`upper_dir`](Runtime::upper_dir) holds still for a copy.
    /// An unknown id is [`RuntimeError::NotFound`].
    pub fn freeze(&self, id: &SandboxId) -> Result<Frozen, RuntimeError> {
        if read_record(&self.dir_of(id)).is_none() {
            return Err(RuntimeError::NotFound(id.clone()));
        }
        let cgroup = self.cgroups.open(id.as_str());
        cgroup.freeze()?;
        Ok(Frozen {
            id: id.clone(),
            cgroup: Some(cgroup),
        })
    }

    /// The overlay's writable layer of sandbox `id` (its "upper" dir): what
    /// the sandbox changed relative to its image, whiteouts included. Its
    /// contents are the sandbox's, hostile: read it only with care (no
    /// symlink followed), ideally while [`freeze`](Runtime::freeze)n.
    pub fn upper_dir(&self, id: &SandboxId) -> PathBuf {
        let dir = self.dir_of(id);
        let on_disk = dir.join(super::DISK_MOUNT).join("upper");
        if on_disk.is_dir() {
            on_disk
        } else {
            dir.join("upper")
        }
    }
}
