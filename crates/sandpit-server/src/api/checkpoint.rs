//! `sandpit.v1.CheckpointService`, the extension next to
//! `coreweave.sandbox.v1`: CommitSandbox checkpoints a running sandbox's
//! root file system into an image that sandboxes start from with the
//! unmodified client (`container_image="NAME:TAG"`).
//!
//! Images in the store are host-wide, commits are not: a principal's
//! commit is stored as `localhost/sandpit-commits/<principal>/...`
//! ([`commit_reference`]) and CreateSandbox of that principal looks its
//! `container_image` up there first. Another principal's `NAME:TAG` is
//! another image (or a pull).

use sandpit_image::{Digest, Reference};
use sandpit_proto::sandpit::v1 as spb;
use sandpit_proto::sandpit::v1::checkpoint_service_server::CheckpointService;
use tonic::{Code, Request, Response, Status};

use super::errors::{self, invalid_request, Violation};
use super::{known_id, principal};
use crate::engine::Engine;
use crate::manager::Manager;
use crate::model::{Principal, State};

/// Where `principal`'s commit named `image` is stored; `None` when the name
/// is not a tag reference (a digest pins an image nobody commits to).
pub fn commit_reference(principal: &Principal, image: &str) -> Option<String> {
    let r = Reference::parse(image).ok()?;
    if r.digest.is_some() {
        return None;
    }
    let digest = Digest::sha256_of(principal.as_str().as_bytes());
    let slug = &digest.hex()[..16];
    let registry: String = r
        .registry
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let tag = r.tag.as_deref().unwrap_or("latest");
    Some(format!(
        "localhost/sandpit-commits/{slug}/{registry}/{}:{tag}",
        r.repository
    ))
}

/// The CheckpointService implementation.
#[derive(Debug)]
pub struct CheckpointApi<E: Engine> {
    manager: Manager<E>,
}

impl<E: Engine> CheckpointApi<E> {
    /// Handlers over `manager`.
    pub fn new(manager: Manager<E>) -> Self {
        Self { manager }
    }
}

#[tonic::async_trait]
impl<E: Engine> CheckpointService for CheckpointApi<E> {
    async fn commit_sandbox(
        &self,
        request: Request<spb::CommitSandboxRequest>,
    ) -> Result<Response<spb::CommitSandboxResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        if req.sandbox_id.is_empty() {
            return Err(invalid_request(&[Violation::new("sandbox_id", "required")]));
        }
        let id = known_id(&req.sandbox_id)?;
        let (name, target) = match Reference::parse(&req.image) {
            Ok(r) if r.digest.is_none() => (
                r.familiar(),
                commit_reference(&principal, &req.image).expect("a tag reference"),
            ),
            Ok(_) => {
                return Err(invalid_request(&[Violation::new(
                    "image",
                    "name a tag (NAME[:TAG]), not a digest",
                )]))
            }
            Err(e) => {
                return Err(invalid_request(&[Violation::new(
                    "image",
                    format!("{:?} is not an image name: {}", req.image, crate::chain(&e)),
                )]))
            }
        };
        let record = self
            .manager
            .get(&principal, &id)
            .map_err(errors::from_manager)?;
        if record.state != State::Running {
            return Err(errors::status(
                Code::FailedPrecondition,
                format!("sandbox {id} is {}, not running", record.state),
                errors::reason::SANDBOX_NOT_RUNNING,
                &[
                    ("sandbox_id", id.to_string()),
                    ("state", record.state.to_string()),
                ],
            ));
        }
        let started = std::time::Instant::now();
        let committed = self
            .manager
            .engine()
            .commit(&id, &record.image, &target)
            .await
            .map_err(|e| {
                tracing::warn!(sandbox_id = %id, error = %crate::chain(&e), "commit");
                errors::status(
                    Code::Internal,
                    format!("commit sandbox {id}: {}", crate::chain(&e)),
                    errors::reason::INTERNAL,
                    &[("sandbox_id", id.to_string())],
                )
            })?;
        tracing::info!(
            sandbox_id = %id,
            image = name,
            layer = committed.layer_digest,
            frozen_ms = committed.frozen.as_secs_f64() * 1e3,
            "committed"
        );
        Ok(Response::new(spb::CommitSandboxResponse {
            image: name,
            image_id: committed.image_id,
            layer_digest: committed.layer_digest,
            layer_size_bytes: committed.layer_size_bytes,
            files: committed.files,
            duration_ms: started.elapsed().as_millis() as u64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_namespaced_per_principal() {
        let a = Principal("alice".into());
        let b = Principal("bob".into());
        let ra = commit_reference(&a, "myimg:v1").unwrap();
        assert!(ra.starts_with("localhost/sandpit-commits/"), "{ra}");
        assert!(ra.ends_with("/docker-io/library/myimg:v1"), "{ra}");
        assert_ne!(ra, commit_reference(&b, "myimg:v1").unwrap());
        assert_eq!(
            ra,
            commit_reference(&a, "docker.io/library/myimg:v1").unwrap()
        );
        assert!(commit_reference(&a, "myimg").unwrap().ends_with(":latest"));
        assert!(Reference::parse(&ra).is_ok());
        let pinned = format!("myimg@sha256:{}", "a".repeat(64));
        assert_eq!(commit_reference(&a, &pinned), None);
    }
}
