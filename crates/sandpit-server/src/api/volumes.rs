//! `coreweave.sandbox.v1.VolumeService`: registered volumes, only
//! delegating to [`Storage`]. On this runner a volume's `pvc` source names
//! storage the runner makes itself: `runner_id` is this runner, `namespace`
//! groups claims, `claim_name` is the storage (one per principal,
//! namespace and claim), `sub_path` the volume's root inside it.

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandbox::v1::volume_service_server::VolumeService;
use tonic::{Request, Response, Status};

use super::convert::timestamp;
use super::errors::{self, invalid_request, Violation};
use super::validate::volumes::valid_volume_name;
use super::{principal, require};
use crate::engine::Engine;
use crate::storage::model::{VolumeRecord, VolumeState};
use crate::storage::{NewVolume, Storage, VolumeUpdate};

/// Most volumes in one ListVolumes page.
const MAX_PAGE: usize = 1000;

/// The VolumeService implementation.
#[derive(Debug)]
pub struct VolumeApi<E: Engine> {
    storage: Storage<E>,
}

impl<E: Engine> VolumeApi<E> {
    /// Handlers over `storage`.
    pub fn new(storage: Storage<E>) -> Self {
        Self { storage }
    }

    fn volume(&self, v: &VolumeRecord) -> pb::Volume {
        let attached = self.storage.attached_count(&v.principal, &v.volume_id);
        message(v, attached)
    }
}

/// A volume record as the API shows it.
pub fn message(v: &VolumeRecord, attached: usize) -> pb::Volume {
    pb::Volume {
        volume_id: v.volume_id.clone(),
        spec: Some(pb::VolumeSpec {
            source: Some(pb::volume_spec::Source::Pvc(pb::PvcVolumeSource {
                runner_id: v.runner_id.clone(),
                namespace: v.namespace.clone(),
                claim_name: v.claim_name.clone(),
                sub_path: v.sub_path.clone(),
            })),
            read_only: v.read_only,
            description: v.description.clone(),
        }),
        status: Some(pb::VolumeStatus {
            state: match v.state {
                VolumeState::Validating => pb::VolumeState::Validating,
                VolumeState::Ready => pb::VolumeState::Ready,
                VolumeState::Error => pb::VolumeState::Error,
                VolumeState::Deleting => pb::VolumeState::Deleting,
            } as i32,
            state_reason: v.state_reason.clone(),
            locality: pb::VolumeLocality::ClusterLocal as i32,
            create_time: Some(timestamp(v.create_time)),
            update_time: Some(timestamp(v.update_time)),
            last_validated_time: v.last_validated_time.map(timestamp),
            access_modes: vec![if v.read_only {
                "ReadOnlyMany".into()
            } else {
                "ReadWriteMany".into()
            }],
            capacity: quantity(v.capacity_bytes),
            attached_sandbox_count: attached.min(i32::MAX as usize) as i32,
        }),
    }
}

/// Bytes as a Kubernetes quantity (`10Gi`), exact.
fn quantity(bytes: u64) -> String {
    for (suffix, shift) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// A relative path inside a claim: no `.`/`..`, normalised.
fn sub_path(field: &str, s: &str) -> Result<String, Status> {
    let t = s.trim_matches('/');
    if t.split('/').any(|c| c == ".." || c == ".") || t.contains('\0') || t.len() > 1024 {
        return Err(invalid_request(&[Violation::new(
            field,
            format!("{s:?} must be a relative path without \".\" or \"..\""),
        )]));
    }
    Ok(t.split('/')
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join("/"))
}

/// Checks a CreateVolume request into a [`NewVolume`].
fn new_volume(req: &pb::CreateVolumeRequest) -> Result<NewVolume, Status> {
    let Some(v) = &req.volume else {
        return Err(invalid_request(&[Violation::new("volume", "required")]));
    };
    let mut bad = Vec::new();
    if !valid_volume_name(&v.volume_id) {
        bad.push(Violation::new(
            "volume.volume_id",
            format!(
                "{:?} is not a volume id (1-63 of [a-z0-9._-], starting alphanumeric)",
                v.volume_id
            ),
        ));
    }
    let Some(spec) = &v.spec else {
        bad.push(Violation::new("volume.spec", "required"));
        return Err(invalid_request(&bad));
    };
    let Some(pb::volume_spec::Source::Pvc(pvc)) = &spec.source else {
        bad.push(Violation::new("volume.spec.pvc", "required"));
        return Err(invalid_request(&bad));
    };
    for (field, value) in [
        ("volume.spec.pvc.runner_id", &pvc.runner_id),
        ("volume.spec.pvc.namespace", &pvc.namespace),
        ("volume.spec.pvc.claim_name", &pvc.claim_name),
    ] {
        // A runner id is the runner's (a host name): only required here.
        let ok = if field.ends_with("runner_id") {
            !value.is_empty()
        } else {
            valid_volume_name(value)
        };
        if !ok {
            bad.push(Violation::new(
                field,
                format!("{value:?} must be 1-63 of [a-z0-9._-], starting alphanumeric"),
            ));
        }
    }
    if !bad.is_empty() {
        return Err(invalid_request(&bad));
    }
    Ok(NewVolume {
        volume_id: v.volume_id.clone(),
        runner_id: pvc.runner_id.clone(),
        namespace: pvc.namespace.clone(),
        claim_name: pvc.claim_name.clone(),
        sub_path: sub_path("volume.spec.pvc.sub_path", &pvc.sub_path)?,
        read_only: spec.read_only,
        description: spec.description.clone(),
        request_id: (!req.request_id.is_empty()).then(|| req.request_id.clone()),
    })
}

#[tonic::async_trait]
impl<E: Engine> VolumeService for VolumeApi<E> {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let principal = principal(&request)?;
        let new = new_volume(request.get_ref())?;
        let v = self
            .storage
            .create_volume(&principal, new)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(self.volume(&v)))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let principal = principal(&request)?;
        let id = &request.get_ref().volume_id;
        require("volume_id", id)?;
        let v = self
            .storage
            .volume(&principal, id)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(self.volume(&v)))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        if req.page_size < 0 {
            return Err(invalid_request(&[Violation::new(
                "page_size",
                "must not be negative",
            )]));
        }
        let mut states = Vec::new();
        for (i, s) in req.states.iter().enumerate() {
            match pb::VolumeState::try_from(*s) {
                Ok(s) => states.push(s as i32),
                Err(_) => {
                    return Err(invalid_request(&[Violation::new(
                        format!("states[{i}]"),
                        format!("unknown state {s}"),
                    )]))
                }
            }
        }
        let all = self
            .storage
            .volumes(&principal)
            .await
            .map_err(errors::from_storage)?;
        let matching: Vec<pb::Volume> = all
            .iter()
            .filter(|v| req.runner_ids.is_empty() || req.runner_ids.contains(&v.runner_id))
            .map(|v| self.volume(v))
            .filter(|v| {
                states.is_empty() || v.status.as_ref().is_some_and(|s| states.contains(&s.state))
            })
            // Ids are unique and sorted: the token is the last id handed out.
            .filter(|v| req.page_token.is_empty() || v.volume_id.as_str() > req.page_token.as_str())
            .collect();
        let size = if req.page_size == 0 {
            MAX_PAGE
        } else {
            (req.page_size as usize).min(MAX_PAGE)
        };
        let more = matching.len() > size;
        let page: Vec<pb::Volume> = matching.into_iter().take(size).collect();
        let next_page_token = if more {
            page.last().map(|v| v.volume_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: page,
            next_page_token,
        }))
    }

    async fn update_volume(
        &self,
        request: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        require("volume_id", &req.volume_id)?;
        let Some(given) = req.volume.as_ref().and_then(|v| v.spec.as_ref()) else {
            return Err(invalid_request(&[Violation::new(
                "volume.spec",
                "required",
            )]));
        };
        let paths: Vec<&str> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let mut update = VolumeUpdate::default();
        let all = paths.is_empty();
        for p in &paths {
            match *p {
                "spec.description" | "description" => update.description = Some(given.description.clone()),
                "spec.read_only" | "read_only" => update.read_only = Some(given.read_only),
                other => {
                    return Err(invalid_request(&[Violation::new(
                        format!("update_mask.paths[{other:?}]"),
                        "only spec.description and spec.read_only can be updated; the source is immutable",
                    )]))
                }
            }
        }
        if all {
            update.description = Some(given.description.clone());
            update.read_only = Some(given.read_only);
        }
        let v = self
            .storage
            .update_volume(&principal, &req.volume_id, update)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(self.volume(&v)))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let principal = principal(&request)?;
        let req = request.get_ref();
        require("volume_id", &req.volume_id)?;
        let v = self
            .storage
            .delete_volume(&principal, &req.volume_id, req.allow_missing)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(v.map(|v| message(&v, 0)).unwrap_or_default()))
    }

    async fn validate_volume(
        &self,
        request: Request<pb::ValidateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let principal = principal(&request)?;
        let id = &request.get_ref().volume_id;
        require("volume_id", id)?;
        let v = self
            .storage
            .revalidate_volume(&principal, id)
            .await
            .map_err(errors::from_storage)?;
        Ok(Response::new(self.volume(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn capacities_print_as_kubernetes_quantities() {
        assert_eq!(quantity(10 << 30), "10Gi");
        assert_eq!(quantity(1 << 40), "1Ti");
        assert_eq!(quantity(1536 << 20), "1536Mi");
        assert_eq!(quantity(1000), "1000");
    }

    #[test]
    fn create_requests_name_their_bad_fields() {
        let req = |id: &str, claim: &str, sub: &str| pb::CreateVolumeRequest {
            volume: Some(pb::Volume {
                volume_id: id.into(),
                spec: Some(pb::VolumeSpec {
                    source: Some(pb::volume_spec::Source::Pvc(pb::PvcVolumeSource {
                        runner_id: "r".into(),
                        namespace: "default".into(),
                        claim_name: claim.into(),
                        sub_path: sub.into(),
                    })),
                    read_only: false,
                    description: String::new(),
                }),
                status: None,
            }),
            request_id: String::new(),
        };
        let ok = new_volume(&req("data", "claim", "/a//b/")).unwrap();
        assert_eq!(ok.sub_path, "a/b");
        for (r, field) in [
            (req("Bad", "claim", ""), "volume.volume_id"),
            (req("data", "", ""), "volume.spec.pvc.claim_name"),
            (req("data", "claim", "../up"), "volume.spec.pvc.sub_path"),
        ] {
            let s = new_volume(&r).unwrap_err();
            let d = s.get_error_details();
            let fields: Vec<_> = d
                .bad_request()
                .unwrap()
                .field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect();
            assert!(fields.contains(&field.to_string()), "{field}: {fields:?}");
        }
    }
}
