//! What a direct data-plane certificate allows: one sandbox, one
//! principal, some data operations. It travels as the certificate's only
//! URI subject alternative name, signed by the cluster CA, so a runner
//! needs nothing but the CA's certificate to check it.

use sandpit_proto::sandbox::v1 as pb;

/// The URI prefix (and version) of a grant.
const PREFIX: &str = "urn:sandpit:data:v1:";

/// A sandbox-scoped credential's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The one sandbox it reaches.
    pub sandbox_id: String,
    /// Whose calls it makes (the sandbox's owner, when issued).
    pub principal: String,
    /// `pb::SandboxDataPermission` values, sorted, no duplicates.
    pub permissions: Vec<i32>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A permission the direct endpoint serves.
pub fn is_data_permission(p: i32) -> bool {
    matches!(
        pb::SandboxDataPermission::try_from(p),
        Ok(pb::SandboxDataPermission::Exec
            | pb::SandboxDataPermission::StreamExec
            | pb::SandboxDataPermission::StreamLogs
            | pb::SandboxDataPermission::WriteFile
            | pb::SandboxDataPermission::ReadFile)
    )
}

impl Grant {
    /// The grant as a URI. Sandbox ids are `[a-z0-9-]` and the principal
    /// is hex-encoded, so no field can forge a separator.
    pub fn to_uri(&self) -> String {
        let perms: Vec<String> = self.permissions.iter().map(i32::to_string).collect();
        format!(
            "{PREFIX}{}:{}:{}",
            self.sandbox_id,
            perms.join(","),
            hex(self.principal.as_bytes())
        )
    }

    /// The grant a URI carries; `None` for anything else.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(PREFIX)?;
        let mut parts = rest.split(':');
        let sandbox_id = parts.next()?;
        let perms = parts.next()?;
        let principal = String::from_utf8(unhex(parts.next()?)?).ok()?;
        if parts.next().is_some()
            || sandbox_id.is_empty()
            || !sandbox_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return None;
        }
        let mut permissions = Vec::new();
        for p in perms.split(',').filter(|p| !p.is_empty()) {
            let p: i32 = p.parse().ok()?;
            if !is_data_permission(p) {
                return None;
            }
            permissions.push(p);
        }
        permissions.sort_unstable();
        permissions.dedup();
        Some(Self {
            sandbox_id: sandbox_id.to_owned(),
            principal,
            permissions,
        })
    }

    /// Whether it allows `permission` on `sandbox_id`.
    pub fn allows(&self, sandbox_id: &str, permission: pb::SandboxDataPermission) -> bool {
        self.sandbox_id == sandbox_id && self.permissions.contains(&(permission as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_round_trips_and_allows_only_what_it_names() {
        let g = Grant {
            sandbox_id: "ab12-cd".into(),
            principal: "alice:with:colons".into(),
            permissions: vec![1, 4],
        };
        let back = Grant::from_uri(&g.to_uri()).unwrap();
        assert_eq!(back, g);
        assert!(back.allows("ab12-cd", pb::SandboxDataPermission::Exec));
        assert!(!back.allows("ab12-cd", pb::SandboxDataPermission::ReadFile));
        assert!(!back.allows("other", pb::SandboxDataPermission::Exec));
    }

    #[test]
    fn anything_else_is_no_grant() {
        for uri in [
            "https://example.com",
            "urn:sandpit:data:v1:",
            "urn:sandpit:data:v1:id:1:zz",
            "urn:sandpit:data:v1:id:1:616c:extra",
            "urn:sandpit:data:v1:ID:1:616c",
            "urn:sandpit:data:v1:id:99:616c",
            "urn:sandpit:data:v1:id:0:616c",
            "urn:sandpit:data:v2:id:1:616c",
        ] {
            assert_eq!(Grant::from_uri(uri), None, "{uri}");
        }
    }
}
