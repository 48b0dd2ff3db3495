//! `spec.volumes` and the container's `volume_mounts`: checked into
//! [`VolumeRequest`]s. Registered volumes and snapshots are looked up later,
//! by the handler, which knows the caller's records.

use std::collections::HashSet;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_runtime::quantity::parse_memory;

use super::{check_abs_path, Refusal, Rejection};
use crate::engine::StorageOffer;
use crate::storage::model::{Medium, MountSpec, RequestedSource, VolumeRequest};

/// Most volumes per sandbox.
pub const MAX_VOLUMES: usize = 16;
/// Most mounts per container.
pub const MAX_MOUNTS: usize = 32;

/// Paths a volume must not be mounted on (or under): the runtime's own.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev"];

/// A volume name: a DNS label, as Kubernetes volume names are.
pub fn valid_volume_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Checks `spec.volumes` (at `p`) and the first container's mounts (at
/// `cp`); `None` storage: every volume is refused as not offered.
pub(super) fn check(
    rej: &mut Rejection,
    spec: &pb::SandboxSpec,
    mounts: &[pb::VolumeMount],
    p: &str,
    cp: &str,
    storage: Option<&StorageOffer>,
) -> Vec<VolumeRequest> {
    let Some(offer) = storage else {
        for (i, v) in spec.volumes.iter().enumerate() {
            if matches!(&v.source, Some(pb::sandbox_volume::Source::Scratch(s)) if !s.restore_from_snapshot_id.is_empty())
            {
                rej.refuse(
                    Refusal::SNAPSHOTS,
                    format!("{p}.volumes[{i}].scratch.restore_from_snapshot_id"),
                    "file-system snapshots are not supported on this runner",
                );
            }
        }
        if !spec.volumes.is_empty() {
            rej.unsupported(format!("{p}.volumes"), "this runner offers no volumes");
        }
        if !mounts.is_empty() {
            rej.unsupported(
                format!("{cp}.volume_mounts"),
                "this runner offers no volumes",
            );
        }
        return Vec::new();
    };
    if spec.volumes.len() > MAX_VOLUMES {
        rej.invalid(
            format!("{p}.volumes"),
            format!("more than {MAX_VOLUMES} volumes"),
        );
        return Vec::new();
    }
    let mut out: Vec<VolumeRequest> = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let f = format!("{p}.volumes[{i}]");
        if !valid_volume_name(&v.name) {
            rej.invalid(
                format!("{f}.name"),
                format!(
                    "{:?} is not a volume name (1-63 of [a-z0-9._-], starting alphanumeric)",
                    v.name
                ),
            );
            continue;
        }
        if out.iter().any(|o| o.name == v.name) {
            rej.invalid(
                format!("{f}.name"),
                format!("{:?} is declared twice", v.name),
            );
            continue;
        }
        let source = match &v.source {
            // proto3: an unset source is a scratch volume with defaults
            // (what the client sends for `ScratchVolumeOptions()`).
            None => Some(RequestedSource::Scratch {
                size_bytes: None,
                medium: Medium::Disk,
                restore_from: None,
            }),
            Some(pb::sandbox_volume::Source::Scratch(s)) => scratch(rej, s, &f, offer),
            Some(pb::sandbox_volume::Source::VolumeId(id)) => {
                if id.is_empty() {
                    rej.invalid(format!("{f}.volume_id"), "required");
                    None
                } else {
                    Some(RequestedSource::Registered {
                        volume_id: id.clone(),
                    })
                }
            }
        };
        if let Some(source) = source {
            out.push(VolumeRequest {
                name: v.name.clone(),
                source,
                mounts: Vec::new(),
            });
        }
    }
    if mounts.len() > MAX_MOUNTS {
        rej.invalid(
            format!("{cp}.volume_mounts"),
            format!("more than {MAX_MOUNTS} mounts"),
        );
        return out;
    }
    let mut paths = HashSet::new();
    for (i, m) in mounts.iter().enumerate() {
        let f = format!("{cp}.volume_mounts[{i}]");
        let Some(target) = out.iter_mut().find(|v| v.name == m.volume) else {
            let why = if m.volume.is_empty() {
                "required".to_owned()
            } else {
                format!("{:?} names no volume of spec.volumes", m.volume)
            };
            rej.invalid(format!("{f}.volume"), why);
            continue;
        };
        let before = rej.invalid.len();
        check_abs_path(rej, &format!("{f}.mount_path"), &m.mount_path);
        if rej.invalid.len() > before {
            continue;
        }
        let path = normalise(&m.mount_path);
        if path == "/" {
            rej.invalid(format!("{f}.mount_path"), "cannot mount over \"/\"");
            continue;
        }
        if RESERVED
            .iter()
            .any(|r| path == *r || path.starts_with(&format!("{r}/")))
        {
            rej.invalid(
                format!("{f}.mount_path"),
                format!("{path:?} is reserved for the runtime"),
            );
            continue;
        }
        if !paths.insert(path.clone()) {
            rej.invalid(
                format!("{f}.mount_path"),
                format!("{path:?} is mounted twice"),
            );
            continue;
        }
        let sub_path = match m.sub_path.trim_matches('/') {
            "" => None,
            s if s.split('/').any(|c| c == ".." || c == ".")
                || s.contains('\0')
                || s.len() > 1024 =>
            {
                rej.invalid(
                    format!("{f}.sub_path"),
                    format!(
                        "{:?} must be a relative path without \".\" or \"..\"",
                        m.sub_path
                    ),
                );
                continue;
            }
            s => Some(normalise(s).trim_start_matches('/').to_owned()),
        };
        target.mounts.push(MountSpec {
            mount_path: path,
            read_only: m.read_only,
            sub_path,
        });
    }
    out
}

fn scratch(
    rej: &mut Rejection,
    s: &pb::ScratchVolume,
    f: &str,
    offer: &StorageOffer,
) -> Option<RequestedSource> {
    let size_bytes = if s.size.is_empty() {
        None
    } else {
        match parse_memory(&s.size) {
            Ok(0) => {
                rej.invalid(format!("{f}.scratch.size"), "must be more than 0");
                return None;
            }
            Ok(n) if n > offer.max_volume_size => {
                rej.refuse(
                    Refusal::CEILING,
                    format!("{f}.scratch.size"),
                    format!(
                        "{} exceeds this runner's largest volume of {} bytes",
                        s.size, offer.max_volume_size
                    ),
                );
                return None;
            }
            Ok(n) => Some(n),
            Err(e) => {
                rej.invalid(format!("{f}.scratch.size"), e.to_string());
                return None;
            }
        }
    };
    let medium = match pb::StorageMedium::try_from(s.medium) {
        Ok(pb::StorageMedium::Unspecified | pb::StorageMedium::Disk) => Medium::Disk,
        Ok(pb::StorageMedium::Memory) => Medium::Memory,
        Err(_) => {
            rej.invalid(
                format!("{f}.scratch.medium"),
                format!("unknown medium {}", s.medium),
            );
            return None;
        }
    };
    let restore_from = match s.restore_from_snapshot_id.as_str() {
        "" => None,
        id if !offer.snapshots => {
            rej.refuse(
                Refusal::SNAPSHOTS,
                format!("{f}.scratch.restore_from_snapshot_id"),
                format!(
                    "cannot restore {id:?}: file-system snapshots are not offered on this runner"
                ),
            );
            return None;
        }
        id => Some(id.to_owned()),
    };
    Some(RequestedSource::Scratch {
        size_bytes,
        medium,
        restore_from,
    })
}

/// `/a//b/` -> `/a/b` (no `..` here: refused before).
fn normalise(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> StorageOffer {
        StorageOffer {
            scratch_default_size: 1 << 30,
            max_volume_size: 4 << 30,
            snapshots: true,
        }
    }

    fn scratch_vol(name: &str, size: &str) -> pb::SandboxVolume {
        pb::SandboxVolume {
            name: name.into(),
            source: Some(pb::sandbox_volume::Source::Scratch(pb::ScratchVolume {
                size: size.into(),
                ..Default::default()
            })),
        }
    }

    fn mount(volume: &str, path: &str, sub: &str) -> pb::VolumeMount {
        pb::VolumeMount {
            volume: volume.into(),
            mount_path: path.into(),
            read_only: false,
            sub_path: sub.into(),
        }
    }

    fn run(
        vols: Vec<pb::SandboxVolume>,
        mounts: Vec<pb::VolumeMount>,
        offer: Option<&StorageOffer>,
    ) -> (Vec<VolumeRequest>, Vec<String>) {
        let mut rej = Rejection::default();
        let spec = pb::SandboxSpec {
            volumes: vols,
            ..Default::default()
        };
        let out = check(&mut rej, &spec, &mounts, "s", "c", offer);
        let fields = rej
            .invalid
            .iter()
            .chain(rej.unsupported.iter())
            .map(|v| v.field.clone())
            .chain(rej.refused.iter().map(|(_, v)| v.field.clone()))
            .collect();
        (out, fields)
    }

    #[test]
    fn scratch_volumes_and_mounts_are_checked_into_requests() {
        let o = offer();
        let (out, bad) = run(
            vec![scratch_vol("workspace", "2Gi"), scratch_vol("cache", "")],
            vec![
                mount("workspace", "/work//dir/", ""),
                mount("cache", "/c", "a/b/"),
            ],
            Some(&o),
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0].source,
            RequestedSource::Scratch {
                size_bytes: Some(2 << 30),
                medium: Medium::Disk,
                restore_from: None
            }
        );
        assert_eq!(out[0].mounts[0].mount_path, "/work/dir");
        assert_eq!(out[1].mounts[0].sub_path.as_deref(), Some("a/b"));
    }

    #[test]
    fn bad_volumes_name_their_field() {
        let o = offer();
        let (_, bad) = run(
            vec![
                scratch_vol("Bad Name", ""),
                scratch_vol("big", "5Gi"),
                scratch_vol("dup", ""),
                scratch_vol("dup", ""),
                scratch_vol("z", "-1"),
            ],
            vec![
                mount("nope", "/x", ""),
                mount("dup", "relative", ""),
                mount("dup", "/proc/x", ""),
                mount("dup", "/", ""),
                mount("dup", "/a", "../etc"),
                mount("dup", "/b", ""),
                mount("dup", "/b/", ""),
            ],
            Some(&o),
        );
        for f in [
            "s.volumes[0].name",
            "s.volumes[1].scratch.size",
            "s.volumes[3].name",
            "s.volumes[4].scratch.size",
            "c.volume_mounts[0].volume",
            "c.volume_mounts[1].mount_path",
            "c.volume_mounts[2].mount_path",
            "c.volume_mounts[3].mount_path",
            "c.volume_mounts[4].sub_path",
            "c.volume_mounts[6].mount_path",
        ] {
            assert!(bad.iter().any(|b| b == f), "{f} not in {bad:?}");
        }
        assert!(!bad.iter().any(|b| b == "c.volume_mounts[5].mount_path"));
    }

    #[test]
    fn without_storage_volumes_are_refused_as_not_offered() {
        let (out, bad) = run(vec![scratch_vol("w", "")], vec![mount("w", "/w", "")], None);
        assert!(out.is_empty());
        assert_eq!(bad, vec!["s.volumes", "c.volume_mounts"]);
    }
}
