//! Turns a CreateSandboxRequest into the domain's [`NewSandbox`], or says
//! precisely which fields are wrong or not supported.
//!
//! Every field of the spec is either honoured, checked to hold its default,
//! or refused with CWSANDBOX_NOT_IMPLEMENTED naming it: nothing is silently
//! ignored. Output-only fields are ignored, as the API intends.

use std::collections::BTreeMap;

use prost::Message;
use sandpit_image::Reference;
use sandpit_proto::sandbox::v1 as pb;
use sandpit_runtime::quantity::{parse_cpu_millis, parse_memory};
use tonic::{Code, Status};

use super::errors::{invalid_request, reason, refused, Violation};

mod disk;
mod probe;
mod security;
#[cfg(test)]
mod test_support;
pub mod volumes;

use crate::model::{MountedFile, NewSandbox, ResourceSpec, Resources};
use crate::secrets::SecretRef;
pub use disk::{DiskPolicy, EPHEMERAL_STORAGE_ANNOTATION, MIN_DISK_BYTES};
pub use probe::PROBE_ANNOTATION;

/// Most mounted files per sandbox.
pub const MAX_FILES: usize = 1000;
/// Most bytes of mounted files per sandbox.
pub const MAX_FILES_BYTES: usize = 64 << 20;
/// Most bytes of command and arguments together.
pub const MAX_ARGV_BYTES: usize = 1 << 20;
/// Most bytes of environment variables together.
pub const MAX_ENV_BYTES: usize = 1 << 20;
/// Most tags per sandbox.
pub const MAX_TAGS: usize = 64;
/// Most annotations per sandbox.
pub const MAX_ANNOTATIONS: usize = 64;
/// Longest tag, annotation key, display name or request id.
pub const MAX_LABEL_LEN: usize = 256;
/// Longest annotation value.
pub const MAX_ANNOTATION_VALUE_LEN: usize = 4096;
/// Longest path.
pub const MAX_PATH_LEN: usize = 4096;

/// Server facts validation depends on.
#[derive(Debug, Clone)]
pub struct CreatePolicy {
    /// This runner's id (`spec.runner_ids` must include it when set).
    pub runner_id: String,
    /// Requests and limits of a sandbox that asks for none.
    pub default_resources: ResourceSpec,
    /// Longest lifetime granted (seconds); longer requests are refused.
    pub max_lifetime_seconds: u32,
    /// The network sandboxes get; `None`: loopback only.
    pub network: Option<crate::engine::NetworkOffer>,
    /// The volumes and snapshots offered; `None`: none.
    pub storage: Option<crate::engine::StorageOffer>,
    /// Sizes of writable layers.
    pub disk: DiskPolicy,
}

impl CreatePolicy {
    /// The policy of `manager`'s runner `runner_id` (volumes off: see
    /// `SandboxApi::with_storage`).
    pub fn of<E: crate::engine::Engine>(
        manager: &crate::manager::Manager<E>,
        runner_id: String,
    ) -> Self {
        Self {
            runner_id,
            default_resources: manager.config().default_resources,
            max_lifetime_seconds: manager.config().max_max_lifetime_seconds,
            network: manager.engine().network(),
            storage: None,
            disk: manager.config().disk,
        }
    }

    /// The runtime classes this runner offers, by name (what a sandbox's
    /// status reports as its `effective_runtime_class`).
    pub const RUNTIME_CLASSES: &'static [&'static str] = &[super::convert::RUNTIME_CLASS];
}

/// A refusal the client maps to a typed exception (or to a skip): a code
/// and reason of their own, not the generic CWSANDBOX_NOT_IMPLEMENTED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The gRPC code.
    pub code: Code,
    /// The `ErrorInfo.reason`.
    pub reason: &'static str,
}

impl Refusal {
    /// GPUs on this CPU-only runner: a resource ceiling (another placement
    /// mode could satisfy it, so the client may spill over).
    pub const GPU: Refusal = Refusal {
        code: Code::InvalidArgument,
        reason: reason::RESOURCE_CEILING_EXCEEDED,
    };
    /// A volume larger than this runner's largest.
    pub const CEILING: Refusal = Refusal {
        code: Code::InvalidArgument,
        reason: reason::RESOURCE_CEILING_EXCEEDED,
    };
    /// File-system snapshots (restores, snapshot on delete).
    pub const SNAPSHOTS: Refusal = Refusal {
        code: Code::FailedPrecondition,
        reason: reason::FSS_NOT_SUPPORTED,
    };
    /// TLS passthrough endpoints of services.
    pub const TLS_PASSTHROUGH: Refusal = Refusal {
        code: Code::FailedPrecondition,
        reason: reason::TLS_PASSTHROUGH_ENDPOINTS_NOT_SUPPORTED,
    };
}

/// Why a request was refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Invalid values.
    pub invalid: Vec<Violation>,
    /// Fields this server does not honour (yet): CWSANDBOX_NOT_IMPLEMENTED.
    pub unsupported: Vec<Violation>,
    /// Fields refused with a reason of their own.
    pub refused: Vec<(Refusal, Violation)>,
}

impl Rejection {
    fn is_empty(&self) -> bool {
        self.invalid.is_empty() && self.unsupported.is_empty() && self.refused.is_empty()
    }

    fn invalid(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.invalid.push(Violation::new(field, description));
    }

    fn unsupported(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.unsupported.push(Violation::new(field, description));
    }

    fn refuse(&mut self, why: Refusal, field: impl Into<String>, description: impl Into<String>) {
        self.refused.push((why, Violation::new(field, description)));
    }

    /// The gRPC status: INVALID_ARGUMENT (CWSANDBOX_INVALID_REQUEST) when
    /// anything is invalid; otherwise the first specific refusal's code and
    /// reason; otherwise UNIMPLEMENTED with CWSANDBOX_NOT_IMPLEMENTED.
    /// Every violation is listed either way.
    pub fn into_status(self) -> Status {
        let all: Vec<Violation> = self
            .invalid
            .iter()
            .chain(self.refused.iter().map(|(_, v)| v))
            .chain(&self.unsupported)
            .cloned()
            .collect();
        if !self.invalid.is_empty() {
            invalid_request(&all)
        } else if let Some((why, _)) = self.refused.first() {
            refused(why.code, why.reason, &all)
        } else {
            refused(Code::Unimplemented, reason::NOT_IMPLEMENTED, &all)
        }
    }
}

fn check_label(rej: &mut Rejection, field: &str, value: &str, max: usize) {
    if value.is_empty() {
        rej.invalid(field, "must not be empty");
    } else if value.len() > max {
        rej.invalid(field, format!("longer than {max} bytes"));
    } else if value.contains('\0') {
        rej.invalid(field, "contains a NUL byte");
    }
}

/// An absolute path without `..` components.
fn check_abs_path(rej: &mut Rejection, field: &str, path: &str) {
    if path.is_empty() {
        rej.invalid(field, "required");
    } else if !path.starts_with('/') {
        rej.invalid(field, format!("{path:?} is not an absolute path"));
    } else if path.split('/').any(|c| c == "..") {
        rej.invalid(field, format!("{path:?} contains a \"..\" component"));
    } else if path.contains('\0') {
        rej.invalid(field, "contains a NUL byte");
    } else if path.len() > MAX_PATH_LEN {
        rej.invalid(field, format!("longer than {MAX_PATH_LEN} bytes"));
    }
}

/// Validates a CreateSandboxRequest.
pub fn create_request(
    req: &pb::CreateSandboxRequest,
    policy: &CreatePolicy,
) -> Result<NewSandbox, Status> {
    let mut rej = Rejection::default();
    let Some(sandbox) = &req.sandbox else {
        rej.invalid("sandbox", "required");
        return Err(rej.into_status());
    };
    let Some(spec) = &sandbox.spec else {
        rej.invalid("sandbox.spec", "required");
        return Err(rej.into_status());
    };
    let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
    if let Some(rid) = &request_id {
        check_label(&mut rej, "request_id", rid, MAX_LABEL_LEN);
    }
    if sandbox.display_name.len() > MAX_LABEL_LEN {
        rej.invalid(
            "sandbox.display_name",
            format!("longer than {MAX_LABEL_LEN} bytes"),
        );
    }
    let mut out = NewSandbox {
        request_id,
        display_name: sandbox.display_name.clone(),
        ..Default::default()
    };
    check_spec(&mut rej, spec, policy, &mut out);
    match spec.containers.as_slice() {
        [] => rej.invalid(
            "sandbox.spec.containers",
            "exactly one container is required",
        ),
        [c] => check_container(&mut rej, c, "sandbox.spec.containers[0]", policy, &mut out),
        [c, ..] => {
            rej.unsupported(
                "sandbox.spec.containers",
                format!(
                    "{} containers given; multi-container sandboxes are not implemented",
                    spec.containers.len()
                ),
            );
            check_container(&mut rej, c, "sandbox.spec.containers[0]", policy, &mut out);
        }
    }
    out.startup_probe = probe::check(&mut rej, spec);
    let mounts = spec
        .containers
        .first()
        .map_or(&[][..], |c| &c.volume_mounts[..]);
    out.volumes = volumes::check(
        &mut rej,
        spec,
        mounts,
        "sandbox.spec",
        "sandbox.spec.containers[0]",
        policy.storage.as_ref(),
    );
    if !rej.is_empty() {
        return Err(rej.into_status());
    }
    out.spec_echo = spec_echo(spec);
    Ok(out)
}

/// The requests and limits a create gets, as [`create_request`] grants
/// them: what a gateway places by before the runner validates the rest.
pub fn requested_resources(
    req: &pb::CreateSandboxRequest,
    defaults: &ResourceSpec,
) -> Result<ResourceSpec, Status> {
    let container = req
        .sandbox
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.containers.first());
    let Some(c) = container else {
        // The runner refuses it with every reason; placement needs none.
        return Ok(*defaults);
    };
    let mut rej = Rejection::default();
    let out = check_resources(&mut rej, c, "sandbox.spec.containers[0]", defaults);
    if !rej.is_empty() {
        return Err(rej.into_status());
    }
    Ok(out)
}

/// The spec as returned by Get/List: as sent, minus mounted files' content
/// (which can be megabytes per sandbox and would swell every listing).
fn spec_echo(spec: &pb::SandboxSpec) -> Vec<u8> {
    let mut spec = spec.clone();
    for c in &mut spec.containers {
        for f in &mut c.files {
            f.content.clear();
        }
    }
    spec.encode_to_vec()
}

fn check_spec(
    rej: &mut Rejection,
    spec: &pb::SandboxSpec,
    policy: &CreatePolicy,
    out: &mut NewSandbox,
) {
    const P: &str = "sandbox.spec";
    if spec.max_lifetime_seconds < 0 {
        rej.invalid(
            format!("{P}.max_lifetime_seconds"),
            format!("{} is negative", spec.max_lifetime_seconds),
        );
    } else if spec.max_lifetime_seconds as u32 > policy.max_lifetime_seconds {
        // Refused rather than clamped: a caller that asked for a week must
        // not find its sandbox gone after a day.
        rej.invalid(
            format!("{P}.max_lifetime_seconds"),
            format!(
                "{} s exceeds this runner's maximum of {} s",
                spec.max_lifetime_seconds, policy.max_lifetime_seconds
            ),
        );
    } else if spec.max_lifetime_seconds > 0 {
        out.max_lifetime_seconds = Some(spec.max_lifetime_seconds as u32);
    }

    if spec.tags.len() > MAX_TAGS {
        rej.invalid(format!("{P}.tags"), format!("more than {MAX_TAGS} tags"));
    }
    for (i, t) in spec.tags.iter().enumerate() {
        check_label(rej, &format!("{P}.tags[{i}]"), t, MAX_LABEL_LEN);
        if !out.tags.contains(t) {
            out.tags.push(t.clone());
        }
    }
    if spec.annotations.len() > MAX_ANNOTATIONS {
        rej.invalid(
            format!("{P}.annotations"),
            format!("more than {MAX_ANNOTATIONS} annotations"),
        );
    }
    let mut annotations = BTreeMap::new();
    for (k, v) in &spec.annotations {
        let field = format!("{P}.annotations[{k:?}]");
        check_label(rej, &field, k, MAX_LABEL_LEN);
        if v.len() > MAX_ANNOTATION_VALUE_LEN {
            rej.invalid(
                field,
                format!("value longer than {MAX_ANNOTATION_VALUE_LEN} bytes"),
            );
        }
        annotations.insert(k.clone(), v.clone());
    }
    out.disk_bytes = disk::check(rej, &annotations, &policy.disk);
    out.annotations = annotations;

    if !spec.runner_ids.is_empty() && !spec.runner_ids.contains(&policy.runner_id) {
        rej.invalid(
            format!("{P}.runner_ids"),
            format!(
                "no such runner; this server is the single runner {:?}",
                policy.runner_id
            ),
        );
    }
    // Without a network there is nothing to publish; with one, the
    // services are checked with the network below.
    let services = if policy.network.is_some() {
        &[][..]
    } else {
        &spec.services[..]
    };
    for (i, svc) in services.iter().enumerate() {
        if svc.endpoint.as_ref().map(|e| e.kind) == Some(pb::EndpointKind::TlsPassthrough as i32) {
            rej.refuse(
                Refusal::TLS_PASSTHROUGH,
                format!("{P}.services[{i}].endpoint.kind"),
                "TLS passthrough endpoints are not supported on this runner",
            );
        }
    }
    if !services.is_empty() {
        rej.unsupported(
            format!("{P}.services"),
            "exposed services need a network (networking is off on this runner)",
        );
    }
    if !spec.network_ids.is_empty() {
        rej.unsupported(format!("{P}.network_ids"), "networks are not implemented");
    }
    if !spec.network_config_id.is_empty() {
        rej.unsupported(
            format!("{P}.network_config_id"),
            "network configs are not implemented",
        );
    }
    if spec.object_storage_access.is_some() {
        rej.unsupported(
            format!("{P}.object_storage_access"),
            "object storage access is not implemented",
        );
    }
    if !spec.instance_type.is_empty() {
        rej.unsupported(
            format!("{P}.instance_type"),
            "instance types are not implemented",
        );
    }
    match pb::SandboxMode::try_from(spec.mode) {
        // Sandpit is its own placement layer: a single local runner is what
        // CKS placement pins to (the client sets CKS whenever runner_ids
        // are given), and what SERVERLESS placement gets. The mode is kept
        // in the spec and reported with it.
        Ok(pb::SandboxMode::Unspecified | pb::SandboxMode::Cks | pb::SandboxMode::Serverless) => {}
        Err(_) => rej.invalid(format!("{P}.mode"), format!("unknown mode {}", spec.mode)),
    }
    if !spec.runtime_class.is_empty()
        && !CreatePolicy::RUNTIME_CLASSES.contains(&spec.runtime_class.as_str())
    {
        rej.invalid(
            format!("{P}.runtime_class"),
            format!(
                "no runtime class {:?} on this runner; it offers {}",
                spec.runtime_class,
                CreatePolicy::RUNTIME_CLASSES.join(", ")
            ),
        );
    }
    match pb::RuntimeClass::try_from(spec.runtime_class_selection) {
        Ok(pb::RuntimeClass::Unspecified | pb::RuntimeClass::CpuDefault) => {}
        Ok(other) => rej.invalid(
            format!("{P}.runtime_class_selection"),
            format!(
                "{} is not offered on this runner; it offers RUNTIME_CLASS_CPU_DEFAULT",
                other.as_str_name()
            ),
        ),
        Err(_) => rej.invalid(
            format!("{P}.runtime_class_selection"),
            format!("unknown runtime class {}", spec.runtime_class_selection),
        ),
    }
    match (&policy.network, &spec.network) {
        (Some(offer), net) => {
            let default = pb::NetworkOptions::default();
            let net = net.as_ref().unwrap_or(&default);
            check_dns_egress(rej, net);
            let services = match super::services::check(&spec.services, &offer.public) {
                Ok(s) => s,
                Err(problems) => {
                    for p in problems {
                        match p {
                            super::services::Problem::Invalid(f, why) => rej.invalid(f, why),
                            super::services::Problem::Unsupported(f, why) => {
                                rej.unsupported(f, why)
                            }
                        }
                    }
                    Vec::new()
                }
            };
            match super::network::check(net, "sandbox.spec.network") {
                Ok(p) => {
                    out.network = Some(crate::engine::LaunchNetwork {
                        policy: p,
                        owner: String::new(),
                        services,
                    })
                }
                Err(bad) => {
                    for (field, why) in bad {
                        rej.invalid(field, why);
                    }
                }
            }
        }
        (None, Some(net)) => check_network(rej, net),
        (None, None) => {}
    }
}

/// `dns_egress` on a runner with a network: DNS always goes to the
/// runner's resolver, which answers what the policy grants (ALLOW, the
/// default). DENY (no DNS at all) is not offered.
fn check_dns_egress(rej: &mut Rejection, net: &pb::NetworkOptions) {
    const P: &str = "sandbox.spec.network.dns_egress";
    match pb::DnsEgressMode::try_from(net.dns_egress) {
        Ok(pb::DnsEgressMode::Unspecified | pb::DnsEgressMode::Allow) => {}
        Ok(pb::DnsEgressMode::Deny) => rej.unsupported(
            P,
            "DNS is answered by the runner's resolver within the egress policy; it cannot be turned off",
        ),
        Err(_) => rej.invalid(P, format!("unknown DNS egress mode {}", net.dns_egress)),
    }
}

/// Sandboxes have a loopback interface only (networking is off on this
/// runner): no egress and no ingress.
/// Options that ask for exactly that are honoured; anything else is not.
fn check_network(rej: &mut Rejection, net: &pb::NetworkOptions) {
    const P: &str = "sandbox.spec.network";
    if !net.ingress.is_empty() {
        rej.unsupported(
            format!("{P}.ingress"),
            "ingress rules are not implemented (sandboxes have no network)",
        );
    }
    if !net.egress.is_empty() {
        rej.unsupported(
            format!("{P}.egress"),
            "egress rules are not implemented (sandboxes have no network)",
        );
    }
    if net.deny_egress == Some(false) {
        rej.unsupported(
            format!("{P}.deny_egress"),
            "network egress is not implemented (sandboxes have no network)",
        );
    }
    if net.deny_ingress == Some(false) {
        rej.unsupported(
            format!("{P}.deny_ingress"),
            "network ingress is not implemented (sandboxes have no network)",
        );
    }
    match pb::DnsEgressMode::try_from(net.dns_egress) {
        Ok(pb::DnsEgressMode::Unspecified | pb::DnsEgressMode::Deny) => {}
        Ok(pb::DnsEgressMode::Allow) => rej.unsupported(
            format!("{P}.dns_egress"),
            "DNS egress is not implemented (sandboxes have no network)",
        ),
        Err(_) => rej.invalid(
            format!("{P}.dns_egress"),
            format!("unknown DNS egress mode {}", net.dns_egress),
        ),
    }
}

fn check_container(
    rej: &mut Rejection,
    c: &pb::Container,
    p: &str,
    policy: &CreatePolicy,
    out: &mut NewSandbox,
) {
    if c.image.is_empty() {
        rej.invalid(format!("{p}.image"), "required");
    } else {
        match Reference::parse(&c.image) {
            Ok(r) => out.image = r.to_string(),
            Err(e) => rej.invalid(format!("{p}.image"), e.to_string()),
        }
    }

    let argv_bytes = c.command.len() + c.args.iter().map(String::len).sum::<usize>();
    if argv_bytes > MAX_ARGV_BYTES {
        rej.invalid(
            format!("{p}.args"),
            format!("command and arguments exceed {MAX_ARGV_BYTES} bytes"),
        );
    }
    if c.command.contains('\0') {
        rej.invalid(format!("{p}.command"), "contains a NUL byte");
    }
    for (i, a) in c.args.iter().enumerate() {
        if a.contains('\0') {
            rej.invalid(format!("{p}.args[{i}]"), "contains a NUL byte");
        }
    }
    out.command = (!c.command.is_empty()).then(|| c.command.clone());
    out.args = c.args.clone();

    let env_bytes: usize = c
        .environment_variables
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum();
    if env_bytes > MAX_ENV_BYTES {
        rej.invalid(
            format!("{p}.environment_variables"),
            format!("exceed {MAX_ENV_BYTES} bytes"),
        );
    }
    let mut env: Vec<(String, String)> = c
        .environment_variables
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // Maps arrive in no particular order; a stable one keeps specs comparable.
    env.sort();
    for (k, v) in &env {
        let field = format!("{p}.environment_variables[{k:?}]");
        if k.is_empty() {
            rej.invalid(field, "empty variable name");
        } else if k.contains('=') || k.contains('\0') {
            rej.invalid(field, "variable names cannot contain '=' or NUL");
        } else if v.contains('\0') {
            rej.invalid(field, "value contains a NUL byte");
        }
    }
    out.env = env;

    if !c.working_dir.is_empty() {
        check_abs_path(rej, &format!("{p}.working_dir"), &c.working_dir);
        out.working_dir = Some(c.working_dir.clone());
    }

    if c.files.len() > MAX_FILES {
        rej.invalid(format!("{p}.files"), format!("more than {MAX_FILES} files"));
    }
    let total: usize = c.files.iter().map(|f| f.content.len()).sum();
    if total > MAX_FILES_BYTES {
        rej.invalid(
            format!("{p}.files"),
            format!("{total} bytes of files exceed the limit of {MAX_FILES_BYTES}"),
        );
    }
    for (i, f) in c.files.iter().enumerate() {
        check_abs_path(rej, &format!("{p}.files[{i}].path"), &f.path);
        if f.path == "/" {
            rej.invalid(format!("{p}.files[{i}].path"), "\"/\" is not a file");
        }
        out.files.push(MountedFile {
            path: f.path.clone(),
            content: f.content.clone(),
        });
    }

    out.resources = check_resources(rej, c, p, &policy.default_resources);

    out.secret_env = super::secrets::check(&mut rej.invalid, c, p);
    if let Some(ipc) = &c.image_pull_credentials {
        out.pull_secret = check_pull_credentials(rej, ipc, &format!("{p}.image_pull_credentials"));
    }
    // startup_probe: see `probe`, called with the whole spec.
    out.security = security::check(rej, c, p);
}

/// The shape of `image_pull_credentials`; the secret itself is resolved
/// by the handler, which knows the configured stores.
fn check_pull_credentials(
    rej: &mut Rejection,
    ipc: &pb::ImagePullCredentials,
    p: &str,
) -> Option<SecretRef> {
    let before = rej.invalid.len();
    let given = ipc.registry.trim().to_ascii_lowercase();
    // Normalised as in image references (`index.docker.io` is `docker.io`);
    // a name that parses as a repository (`ghcr`) is not a host.
    let registry = Reference::parse(&format!("{given}/probe"))
        .ok()
        .map(|r| r.registry)
        .filter(|r| *r == given || (r == "docker.io" && given.ends_with(".docker.io")));
    if given.is_empty() {
        rej.invalid(format!("{p}.registry"), "required");
    } else if registry.is_none() {
        rej.invalid(
            format!("{p}.registry"),
            format!(
                "{:?} is not a registry host like ghcr.io or registry.local:5000",
                ipc.registry
            ),
        );
    }
    let Some(source) = &ipc.credentials else {
        rej.invalid(format!("{p}.credentials"), "required");
        return None;
    };
    if source.store_name.is_empty() {
        rej.invalid(format!("{p}.credentials.store_name"), "required");
    }
    if source.path.is_empty() {
        rej.invalid(format!("{p}.credentials.path"), "required");
    } else if let Err(e) = crate::secrets::check_path(&source.path) {
        rej.invalid(format!("{p}.credentials.path"), e.to_string());
    }
    let registry = registry?;
    (rej.invalid.len() == before).then(|| SecretRef {
        registry,
        store: source.store_name.clone(),
        path: source.path.clone(),
        field: source.field.clone(),
    })
}

/// Requests and limits, Kubernetes' way: a resource with only a limit
/// requests its limit; one with only a request is capped at it (as the
/// client does when given one side: Guaranteed QoS, and never an uncapped
/// sandbox by omission); one with neither gets the runner's defaults.
fn check_resources(
    rej: &mut Rejection,
    c: &pb::Container,
    p: &str,
    defaults: &ResourceSpec,
) -> ResourceSpec {
    let parse = |rej: &mut Rejection, r: &pb::Resources, field: &str| {
        let mut out = Resources::default();
        if !r.cpu.is_empty() {
            match parse_cpu_millis(&r.cpu) {
                Ok(v) => out.cpu_millis = Some(v),
                Err(e) => rej.invalid(format!("{field}.cpu"), e.to_string()),
            }
        }
        if !r.memory.is_empty() {
            match parse_memory(&r.memory) {
                Ok(v) => out.memory_bytes = Some(v),
                Err(e) => rej.invalid(format!("{field}.memory"), e.to_string()),
            }
        }
        if let Some(g) = &r.gpu {
            if g.count != 0 || g.selector.is_some() {
                rej.refuse(
                    Refusal::GPU,
                    format!("{field}.gpu"),
                    "gpus are not supported on this runner (it has none)",
                );
            }
        }
        out
    };
    let (requests, limits) = match &c.resource_requirements {
        Some(rr) => {
            let base = format!("{p}.resource_requirements");
            let requests = rr
                .requests
                .as_ref()
                .map(|r| parse(rej, r, &format!("{base}.requests")))
                .unwrap_or_default();
            let limits = rr
                .limits
                .as_ref()
                .map(|r| parse(rej, r, &format!("{base}.limits")))
                .unwrap_or_default();
            let over =
                |r: Option<u64>, l: Option<u64>| matches!((r, l), (Some(r), Some(l)) if r > l);
            if over(requests.cpu_millis, limits.cpu_millis) {
                rej.invalid(format!("{base}.requests.cpu"), "exceeds the cpu limit");
            }
            if over(requests.memory_bytes, limits.memory_bytes) {
                rej.invalid(
                    format!("{base}.requests.memory"),
                    "exceeds the memory limit",
                );
            }
            (requests, limits)
        }
        // The older field, which the client no longer sends: limits.
        None => (
            Resources::default(),
            c.resources
                .as_ref()
                .map(|r| parse(rej, r, &format!("{p}.resources")))
                .unwrap_or_default(),
        ),
    };
    let side =
        |req: Option<u64>, lim: Option<u64>, dreq: Option<u64>, dlim: Option<u64>| match (req, lim)
        {
            (None, None) => (dreq.or(dlim), dlim),
            (Some(r), None) => (Some(r), Some(r)),
            (None, Some(l)) => (Some(l), Some(l)),
            (Some(r), Some(l)) => (Some(r), Some(l)),
        };
    let (cpu_req, cpu_lim) = side(
        requests.cpu_millis,
        limits.cpu_millis,
        defaults.requests.cpu_millis,
        defaults.limits.cpu_millis,
    );
    let (mem_req, mem_lim) = side(
        requests.memory_bytes,
        limits.memory_bytes,
        defaults.requests.memory_bytes,
        defaults.limits.memory_bytes,
    );
    ResourceSpec {
        requests: Resources {
            cpu_millis: cpu_req,
            memory_bytes: mem_req,
        },
        limits: Resources {
            cpu_millis: cpu_lim,
            memory_bytes: mem_lim,
        },
    }
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "validate_fuzz.rs"]
mod fuzz;
