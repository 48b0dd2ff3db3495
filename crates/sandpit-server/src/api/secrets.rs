//! A container's `secret_stores`: which secrets become which environment
//! variables (checked with the rest of the request, [`check`]), and their
//! values ([`resolve`], by the CreateSandbox handler once the request is
//! valid).
//!
//! Rules: a variable name is POSIX (`[A-Za-z_][A-Za-z0-9_]*`) and defaults
//! to the secret's name; one variable gets one secret (the same mapping
//! twice is harmless, two different secrets for one name are refused); a
//! secret wins over a plain `environment_variables` entry (and the image's
//! environment) of the same name, as a later entry does in a Kubernetes
//! `env` list. No variable is reserved: nothing of ours reads the sandbox's
//! environment.
//!
//! Errors name the store, the secret and the field path
//! (`sandbox.spec.containers[0].secret_stores[i].secrets[j]`), never a value:
//! an unknown store is the operator's configuration (FAILED_PRECONDITION), a
//! missing secret or field is NOT_FOUND, a secret that cannot serve
//! (not JSON where a field is asked for, undecryptable) FAILED_PRECONDITION,
//! a name the store cannot hold INVALID_ARGUMENT.

use std::collections::BTreeMap;

use sandpit_proto::sandbox::v1 as pb;
use tonic::{Code, Status};

use super::errors::{invalid_request, reason, refused_with, Violation};
use super::validate::MAX_ENV_BYTES;
use crate::secrets::{SecretEnvRef, SecretError, SecretStores, SecretValue};

/// Most secrets per sandbox.
pub const MAX_SECRETS: usize = 100;
/// Longest variable name.
pub const MAX_ENV_NAME_LEN: usize = 256;
/// Longest field name.
pub const MAX_FIELD_LEN: usize = 256;

/// A POSIX environment variable name.
fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks the mappings of container `c` (at field path `p`), pushing what
/// is wrong onto `invalid`; returns the mappings, one per variable.
pub(super) fn check(invalid: &mut Vec<Violation>, c: &pb::Container, p: &str) -> Vec<SecretEnvRef> {
    let mut out: Vec<SecretEnvRef> = Vec::new();
    let total: usize = c.secret_stores.iter().map(|s| s.secrets.len()).sum();
    if total > MAX_SECRETS {
        invalid.push(Violation::new(
            format!("{p}.secret_stores"),
            format!("{total} secrets; at most {MAX_SECRETS}"),
        ));
        return out;
    }
    // Variable -> index in `out`.
    let mut by_var: BTreeMap<String, usize> = BTreeMap::new();
    for (i, store) in c.secret_stores.iter().enumerate() {
        let sp = format!("{p}.secret_stores[{i}]");
        let before = invalid.len();
        if store.store_name.is_empty() {
            invalid.push(Violation::new(format!("{sp}.store_name"), "required"));
        } else if let Err(why) = sandpit_secrets::check_store_name(&store.store_name) {
            invalid.push(Violation::new(
                format!("{sp}.store_name"),
                format!("{:?} {why}", store.store_name),
            ));
        }
        let store_ok = invalid.len() == before;
        for (j, m) in store.secrets.iter().enumerate() {
            let fp = format!("{sp}.secrets[{j}]");
            let before = invalid.len();
            if m.path.is_empty() {
                invalid.push(Violation::new(format!("{fp}.path"), "required"));
            } else if let Err(why) = crate::secrets::check_path(&m.path) {
                invalid.push(Violation::new(format!("{fp}.path"), why));
            }
            if m.field.len() > MAX_FIELD_LEN || m.field.contains('\0') {
                invalid.push(Violation::new(
                    format!("{fp}.field"),
                    format!("not a field name (NUL, or longer than {MAX_FIELD_LEN} bytes)"),
                ));
            }
            let env_var = if m.env_var.is_empty() {
                m.path.clone()
            } else {
                m.env_var.clone()
            };
            if !is_env_name(&env_var) || env_var.len() > MAX_ENV_NAME_LEN {
                let why = if m.env_var.is_empty() {
                    format!(
                        "required: the secret's name {:?} is not a variable name \
                         ([A-Za-z_][A-Za-z0-9_]*)",
                        m.path
                    )
                } else {
                    format!(
                        "{env_var:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*, \
                         at most {MAX_ENV_NAME_LEN} bytes)"
                    )
                };
                invalid.push(Violation::new(format!("{fp}.env_var"), why));
            }
            if !store_ok || invalid.len() != before {
                continue;
            }
            let mapping = SecretEnvRef {
                field_path: fp.clone(),
                store: store.store_name.clone(),
                name: m.path.clone(),
                field: m.field.clone(),
                env_var: env_var.clone(),
            };
            match by_var.get(&env_var).map(|&k| &out[k]) {
                // The same secret twice: one variable, no conflict.
                Some(other)
                    if (&other.store, &other.name, &other.field)
                        == (&mapping.store, &mapping.name, &mapping.field) => {}
                Some(other) => invalid.push(Violation::new(
                    format!("{fp}.env_var"),
                    format!(
                        "{env_var:?} is already set by {} from another secret",
                        other.field_path
                    ),
                )),
                None => {
                    by_var.insert(env_var, out.len());
                    out.push(mapping);
                }
            }
        }
    }
    out
}

/// The status for resolution errors, by the strongest kind among them:
/// INVALID_ARGUMENT (a bad name) over FAILED_PRECONDITION (no such store,
/// an unusable secret) over NOT_FOUND (no such secret or field).
fn failure(errors: &[(&SecretEnvRef, SecretError)]) -> Status {
    let rank = |e: &SecretError| match e {
        SecretError::BadName { .. } => 0,
        SecretError::UnknownStore(_) | SecretError::Unusable { .. } => 1,
        SecretError::NotFound { .. } | SecretError::NoField { .. } => 2,
    };
    let (r, e) = errors
        .iter()
        .min_by_key(|(_, e)| rank(e))
        .map(|(r, e)| (*r, e))
        .expect("at least one error");
    let violations: Vec<Violation> = errors
        .iter()
        .map(|(r, e)| Violation::new(r.field_path.clone(), e.to_string()))
        .collect();
    let (code, why) = match e {
        SecretError::BadName { .. } => return invalid_request(&violations),
        SecretError::UnknownStore(_) => (Code::FailedPrecondition, reason::SECRET_STORE_NOT_FOUND),
        SecretError::Unusable { .. } => (Code::FailedPrecondition, reason::SECRET_UNUSABLE),
        SecretError::NotFound { .. } | SecretError::NoField { .. } => {
            (Code::NotFound, reason::SECRET_NOT_FOUND)
        }
    };
    let fields = violations
        .iter()
        .map(|v| v.field.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut metadata = vec![
        ("secret_store", r.store.clone()),
        ("secret", r.name.clone()),
        ("field", fields),
    ];
    if !r.field.is_empty() {
        metadata.push(("secret_field", r.field.clone()));
    }
    refused_with(code, why, &metadata, &violations)
}

/// The values of `refs`, by variable, read on a blocking thread (a managed
/// store decrypts; a directory store reads files). `env` is the request's
/// plain environment: together they fit [`MAX_ENV_BYTES`].
pub(super) async fn resolve(
    stores: &SecretStores,
    refs: &[SecretEnvRef],
    env: &[(String, String)],
    p: &str,
) -> Result<Vec<(String, SecretValue)>, Status> {
    if refs.is_empty() {
        return Ok(vec![]);
    }
    let stores = stores.clone();
    let owned = refs.to_vec();
    let results = tokio::task::spawn_blocking(move || {
        owned
            .iter()
            .map(|r| stores.resolve_env(r))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|_| {
        super::errors::status(Code::Internal, "secret task failed", reason::INTERNAL, &[])
    })?;
    let mut values = Vec::with_capacity(refs.len());
    let mut errors = Vec::new();
    for (r, result) in refs.iter().zip(results) {
        match result {
            Ok(v) => values.push((r.env_var.clone(), v)),
            Err(e) => errors.push((r, e)),
        }
    }
    if !errors.is_empty() {
        return Err(failure(&errors));
    }
    let bytes: usize = env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .chain(values.iter().map(|(k, v)| k.len() + v.len() + 2))
        .sum();
    if bytes > MAX_ENV_BYTES {
        return Err(invalid_request(&[Violation::new(
            format!("{p}.secret_stores"),
            format!("secrets and environment_variables together exceed {MAX_ENV_BYTES} bytes"),
        )]));
    }
    Ok(values)
}

#[cfg(test)]
#[path = "secrets_tests.rs"]
mod tests;
