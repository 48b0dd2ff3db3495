//! Starting a sandbox on the local engine: at once, or idle for a warm
//! pool and claimed later with the request's init.

use std::sync::Arc;

use sandpit_runtime::{Limits, SandboxSpec};
use sandpit_wire::{InitFile, InitSpec, MainStatus};

use super::{blocking, describe, LocalEngine, AGENT_TIMEOUT};
use crate::engine::{EngineError, LaunchSpec};
use crate::local_net::LocalNetwork;
use crate::model::SandboxId;

impl LocalEngine {
    /// Creates sandbox `id` from `spec` and returns once its agent listens:
    /// with its main command started, or `idle` (a warm pool's: nothing
    /// started until [`claim_idle`](LocalEngine::claim_idle)).
    pub(super) async fn start(
        &self,
        id: &SandboxId,
        mut spec: LaunchSpec,
        idle: bool,
    ) -> Result<(), EngineError> {
        let runtime = Arc::clone(&self.runtime);
        let network = match (&spec.network, &self.network) {
            (None, _) => None,
            (Some(n), Some(net)) => Some((n.clone(), Arc::clone(net))),
            (Some(_), None) => {
                return Err(EngineError::Start(
                    "this engine gives sandboxes no network".into(),
                ))
            }
        };
        let init = self.init_spec(&mut spec, network.as_ref().map(|(_, net)| net));
        let spec_layers = spec.layers;
        let spec_volumes = spec.volumes;
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: None,
            lower_dirs: spec.lower_dirs,
            init,
            limits: Limits {
                cpu_millis: spec.resources.limits.cpu_millis,
                memory_bytes: spec.resources.limits.memory_bytes,
                pids_max: self.pids_max,
                cpu_request_millis: spec.resources.requests.cpu_millis,
                memory_request_bytes: spec.resources.requests.memory_bytes,
                cpus: None,
            },
            read_only_root: spec.read_only_root,
            network_namespace: None,
            mounts: Vec::new(),
            disk_bytes: spec.disk_bytes,
        };
        let volumes = spec_volumes;
        let storage = match (volumes.is_empty(), &self.storage) {
            (true, _) => None,
            (false, Some(s)) => Some(Arc::clone(s)),
            (false, None) => {
                return Err(EngineError::Start("this engine offers no volumes".into()))
            }
        };
        let store = Arc::clone(&self.store);
        let layers = spec_layers;
        let sandbox = blocking(move || {
            let mut phases = sandpit_runtime::phases::Phases::start("engine create");
            // Leased before mounting: `sandpit image rm` or a gc in another
            // process must not collect a layer under a running sandbox. The
            // guard releases it on every way out but the ones that keep it.
            let lease = store
                .lease_guard_owned(spec.id.as_str(), &layers)
                .map_err(|e| EngineError::Start(Box::new(EngineError::Image(e.into()))))?;
            phases.mark("lease");
            let mut spec = spec;
            // Volumes first (a restore can fail on its content): nothing of
            // the network is made for a sandbox that cannot start.
            if let Some(storage) = &storage {
                spec.mounts = storage
                    .prepare(&spec.id, &volumes)
                    .map_err(|e| EngineError::Start(e.into()))?;
            }
            if let Some((launch, net)) = &network {
                match net.attach(&spec.id, launch) {
                    Ok(ns) => spec.network_namespace = Some(ns),
                    Err(e) => {
                        if let Some(storage) = &storage {
                            storage.release(&spec.id);
                        }
                        return Err(EngineError::Start(e.into()));
                    }
                }
            }
            phases.mark("volumes_network");
            let detach = || {
                if let Some((_, net)) = &network {
                    net.detach(&spec.id);
                }
                if let Some(storage) = &storage {
                    storage.release(&spec.id);
                }
            };
            let created = if idle {
                runtime.create_idle(&spec)
            } else {
                runtime.create(&spec)
            };
            let sandbox = match created {
                Ok(sb) => sb,
                Err(e) => {
                    detach();
                    return Err(EngineError::Start(e.into()));
                }
            };
            phases.mark("runtime");
            // The agent starts the main command before it serves its first
            // connection, so one ping tells whether it started: a client
            // then sees FAILED from CreateSandbox itself, never a RUNNING
            // that turns FAILED a few milliseconds later.
            let verdict = match sandbox.agent().with_timeout(AGENT_TIMEOUT).ping() {
                Ok(MainStatus::StartFailed(msg)) => Err(EngineError::StartFailed(msg)),
                Ok(MainStatus::Idle) if idle => Ok(()),
                Ok(other) if idle => Err(EngineError::Start(
                    format!("an idle agent reports its main {other:?}").into(),
                )),
                Ok(_) => Ok(()),
                Err(e) => Err(EngineError::Start(Box::new(EngineError::Agent(e)))),
            };
            phases.mark("ping");
            phases.log(&spec.id);
            match verdict {
                Ok(()) => {
                    lease.keep();
                    Ok(sandbox)
                }
                Err(e) => {
                    if let Err(d) = runtime.destroy(sandbox.id()) {
                        // Still mounted: the layers stay leased.
                        tracing::warn!(error = %describe(&d), "destroy after failed start");
                        lease.keep();
                    }
                    detach();
                    Err(e)
                }
            }
        })
        .await??;
        self.table().insert(id.clone(), Arc::new(sandbox));
        Ok(())
    }

    /// Hands idle sandbox `id` its request: the per-request parts of `spec`
    /// (command, environment, working dir, files, user, capabilities,
    /// startup probe) go to its agent, which applies them as it would have
    /// at start-up; its network takes the request's owner. The shape
    /// (image, limits, writable layer, network policy) is the pool's, as
    /// the caller checked.
    pub(super) async fn claim_idle(
        &self,
        id: &SandboxId,
        mut spec: LaunchSpec,
    ) -> Result<(), EngineError> {
        let sandbox = self
            .sandbox(id)
            .ok_or_else(|| EngineError::Start(format!("no idle sandbox {id}").into()))?;
        let network = match (&spec.network, &self.network) {
            (Some(launch), Some(net)) => {
                net.set_owner(id, &launch.owner);
                Some(net)
            }
            _ => None,
        };
        let init = self.init_spec(&mut spec, network);
        let claimed =
            blocking(move || sandbox.agent().with_timeout(AGENT_TIMEOUT).claim(&init)).await?;
        match claimed {
            Ok(MainStatus::StartFailed(msg)) => Err(EngineError::StartFailed(msg)),
            Ok(_) => Ok(()),
            Err(e) => Err(EngineError::Start(Box::new(EngineError::Agent(e)))),
        }
    }

    /// What the agent starts the sandbox with, taken out of `spec` (files
    /// can be megabytes: moved, not copied).
    fn init_spec(&self, spec: &mut LaunchSpec, network: Option<&Arc<LocalNetwork>>) -> InitSpec {
        // Secrets join the environment only here, on the way to the
        // agent. The runner's network environment (proxies, mirrors) goes
        // under the sandbox's own.
        let mut env = spec.environment();
        if let Some(net) = network {
            env = sandpit_wire::process::merge_env(&net.settings().sandbox_env(), &env);
        }
        InitSpec {
            argv: std::mem::take(&mut spec.argv),
            env,
            cwd: std::mem::take(&mut spec.cwd),
            files: std::mem::take(&mut spec.files)
                .into_iter()
                .map(|f| InitFile {
                    path: f.path,
                    mode: 0o644,
                    content: f.content,
                })
                .collect(),
            run_as: std::mem::take(&mut spec.run_as),
            capabilities: spec.capabilities,
            startup_probe: spec.startup_probe.take(),
        }
    }
}
