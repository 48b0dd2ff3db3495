//! ReadFile and WriteFile, through the sandbox's agent: paths are resolved
//! inside the sandbox (its mount namespace and root), so nothing a sandbox
//! plants (symlinks included) reaches the host's files.

use std::time::Duration;

use sandpit_proto::sandbox::v1 as pb;
use sandpit_wire::async_client::ClientError;
use sandpit_wire::ErrorKind;
use tonic::{Code, Request, Response, Status};

use super::errors::{self, invalid_request, reason, Violation};
use super::exec::check_container;
use super::{known_id, principal};
use crate::engine::Engine;
use crate::manager::Manager;

/// Default largest file moved in one ReadFile/WriteFile message.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 32 << 20;

/// Bound on each read or write of the agent's connection during a file
/// transfer.
const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Mode of files WriteFile creates (an existing file keeps its own).
const NEW_FILE_MODE: u32 = 0o644;

fn validate(sandbox_id: &str, path: &str, container: &str) -> Result<(), Status> {
    let mut violations = vec![];
    if sandbox_id.is_empty() {
        violations.push(Violation::new("sandbox_id", "required"));
    }
    if path.is_empty() {
        violations.push(Violation::new("path", "required"));
    } else if path.contains('\0') {
        violations.push(Violation::new("path", "must not contain NUL"));
    }
    if !violations.is_empty() {
        return Err(invalid_request(&violations));
    }
    check_container(container)
}

/// RESOURCE_EXHAUSTED with what the client needs to switch to streaming.
pub fn too_large(path: &str, size: u64, max: u64) -> Status {
    errors::status(
        Code::ResourceExhausted,
        format!("{path}: {size} bytes exceed the limit of {max} bytes for one message"),
        reason::FILE_TOO_LARGE,
        &[
            ("filepath", path.to_owned()),
            ("size_bytes", size.to_string()),
            ("max_size_bytes", max.to_string()),
        ],
    )
}

/// The status for a failed transfer of `path`.
pub fn file_error(path: &str, e: ClientError) -> Status {
    let meta = |detail: &str| vec![("filepath", path.to_owned()), ("detail", detail.to_owned())];
    match e {
        ClientError::TooLarge { size, max } => too_large(path, size, max),
        ClientError::Agent { kind, message } => {
            let (code, why) = match kind {
                ErrorKind::NotFound => (Code::NotFound, reason::FILE_NOT_FOUND),
                ErrorKind::IsDirectory => (Code::FailedPrecondition, reason::FILE_IS_DIRECTORY),
                ErrorKind::PermissionDenied => {
                    (Code::PermissionDenied, reason::FILE_PERMISSION_DENIED)
                }
                ErrorKind::NotRegularFile => (Code::FailedPrecondition, reason::FILE_IO_FAILED),
                ErrorKind::InvalidArgument => {
                    return invalid_request(&[Violation::new("path", message)])
                }
                _ => (Code::Internal, reason::FILE_IO_FAILED),
            };
            errors::status(code, message.clone(), why, &meta(&message))
        }
        other => {
            let message = crate::chain(&other);
            tracing::warn!(path, error = %message, "file transfer failed");
            errors::status(
                Code::Internal,
                format!("{path}: {message}"),
                reason::FILE_IO_FAILED,
                &meta(&message),
            )
        }
    }
}

/// ReadFile: the whole file, up to `max_bytes`.
pub async fn read_file<E: Engine>(
    manager: &Manager<E>,
    max_bytes: u64,
    request: Request<pb::ReadFileRequest>,
) -> Result<Response<pb::ReadFileResponse>, Status> {
    let principal = principal(&request)?;
    let req = request.into_inner();
    validate(&req.sandbox_id, &req.path, &req.container)?;
    let agent = manager
        .agent_for(&principal, &known_id(&req.sandbox_id)?)
        .await
        .map_err(errors::from_manager)?
        .with_timeout(AGENT_IO_TIMEOUT);
    let read = agent.read_file(&req.path, max_bytes).await;
    match read {
        Ok(content) => Ok(Response::new(pb::ReadFileResponse { content })),
        Err(e) => Err(file_error(&req.path, e)),
    }
}

/// WriteFile: atomically replaces (or creates, with parent directories)
/// the file.
pub async fn write_file<E: Engine>(
    manager: &Manager<E>,
    max_bytes: u64,
    request: Request<pb::WriteFileRequest>,
) -> Result<Response<pb::WriteFileResponse>, Status> {
    let principal = principal(&request)?;
    let req = request.into_inner();
    validate(&req.sandbox_id, &req.path, &req.container)?;
    let size = req.content.len() as u64;
    if size > max_bytes {
        return Err(too_large(&req.path, size, max_bytes));
    }
    let agent = manager
        .agent_for(&principal, &known_id(&req.sandbox_id)?)
        .await
        .map_err(errors::from_manager)?
        .with_timeout(AGENT_IO_TIMEOUT);
    let written = agent
        .write_file(&req.path, NEW_FILE_MODE, &req.content)
        .await;
    match written {
        Ok(()) => Ok(Response::new(pb::WriteFileResponse {})),
        Err(e) => Err(file_error(&req.path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn info(s: &Status) -> (Code, String, std::collections::HashMap<String, String>) {
        let d = s.get_error_details();
        let i = d.error_info().unwrap();
        assert_eq!(i.domain, errors::DOMAIN);
        (s.code(), i.reason.clone(), i.metadata.clone())
    }

    #[test]
    fn agent_errors_map_to_the_clients_reasons() {
        let agent = |kind| ClientError::Agent {
            kind,
            message: "/x: boom".into(),
        };
        for (kind, code, why) in [
            (ErrorKind::NotFound, Code::NotFound, reason::FILE_NOT_FOUND),
            (
                ErrorKind::IsDirectory,
                Code::FailedPrecondition,
                reason::FILE_IS_DIRECTORY,
            ),
            (
                ErrorKind::PermissionDenied,
                Code::PermissionDenied,
                reason::FILE_PERMISSION_DENIED,
            ),
            (
                ErrorKind::NotRegularFile,
                Code::FailedPrecondition,
                reason::FILE_IO_FAILED,
            ),
            (ErrorKind::Io, Code::Internal, reason::FILE_IO_FAILED),
        ] {
            let (c, r, m) = info(&file_error("/x", agent(kind)));
            assert_eq!((c, r.as_str()), (code, why), "{kind:?}");
            assert_eq!(m["filepath"], "/x");
        }
        let (c, r, m) = info(&file_error(
            "/big",
            ClientError::TooLarge { size: 10, max: 5 },
        ));
        assert_eq!(
            (c, r.as_str()),
            (Code::ResourceExhausted, reason::FILE_TOO_LARGE)
        );
        assert_eq!(m["size_bytes"], "10");
        assert_eq!(m["max_size_bytes"], "5");
        assert_eq!(
            file_error("/x", agent(ErrorKind::InvalidArgument)).code(),
            Code::InvalidArgument
        );
    }
}
