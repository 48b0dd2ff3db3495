//! The warm pools' templates: each configured shape is run through the
//! validation of a CreateSandbox, so that a pool's sandbox is made exactly
//! as a create asking for that shape would be (the runner's defaults for
//! resources, writable layer and network filled in the same way), and a
//! create fits the pool when it asks for the same.

use sandpit_proto::sandbox::v1 as pb;

use super::validate::{self, CreatePolicy};
use crate::engine::Engine;
use crate::manager::{Manager, PoolTemplate};
use crate::poolconfig::PoolSettings;

/// The create a pool stands for, as a client would send it.
fn request(p: &PoolSettings) -> pb::CreateSandboxRequest {
    let limits = (p.cpu.is_some() || p.memory.is_some()).then(|| pb::Resources {
        cpu: p.cpu.clone().unwrap_or_default(),
        memory: p.memory.clone().unwrap_or_default(),
        gpu: None,
    });
    pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(pb::SandboxSpec {
                containers: vec![pb::Container {
                    image: p.image.clone(),
                    resource_requirements: limits.map(|l| pb::ResourceRequirements {
                        requests: Some(l.clone()),
                        limits: Some(l),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The templates of `pools` on runner `runner_id`; an error names the pool
/// and what validation refused.
pub fn templates<E: Engine>(
    manager: &Manager<E>,
    runner_id: &str,
    pools: &[PoolSettings],
) -> Result<Vec<PoolTemplate>, String> {
    let policy = CreatePolicy::of(manager, runner_id.to_owned());
    pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let new = validate::create_request(&request(p), &policy)
                .map_err(|s| format!("pool {i} ({}): {}", p.image, s.message()))?;
            Ok(PoolTemplate {
                name: new.image.clone(),
                size: p.size,
                request: new,
            })
        })
        .collect()
}
