//! Moving a call to a runner and its answer back: the caller's metadata
//! goes along (its key, deadlines, request ids), the extensions (the
//! principal this gateway found) stay here.

use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use super::directory::Runner;

/// Headers of the caller's connection to this gateway, not of the call:
/// the gateway's own channel to the runner sets its own.
const HOP_BY_HOP: &[&str] = &[
    "grpc-encoding",
    "grpc-accept-encoding",
    "host",
    "connection",
];

fn call_metadata(mut metadata: MetadataMap) -> MetadataMap {
    for name in HOP_BY_HOP {
        metadata.remove(*name);
    }
    metadata
}

/// `request` as a new request to a runner.
pub(super) fn onward<T>(request: Request<T>) -> Request<T> {
    let (metadata, _, message) = request.into_parts();
    Request::from_parts(call_metadata(metadata), Default::default(), message)
}

/// `message` with `metadata` as a new request to a runner.
pub(super) fn with_metadata<T>(metadata: &MetadataMap, message: T) -> Request<T> {
    Request::from_parts(call_metadata(metadata.clone()), Default::default(), message)
}

/// A runner's answer as this gateway's.
pub(super) fn back<T>(response: Response<T>) -> Response<T> {
    let (metadata, message, _) = response.into_parts();
    Response::from_parts(metadata, message, Default::default())
}

/// A runner's error as this gateway's. A runner that cannot be reached
/// is named (the client retries UNAVAILABLE); a runner's own refusal goes
/// back unchanged, with its ErrorInfo.
pub(super) fn runner_error(runner: &Runner, status: Status) -> Status {
    let unreachable = status.code() == Code::Unavailable
        && status.metadata().get("grpc-status").is_none()
        && status.details().is_empty();
    if unreachable {
        return crate::api::errors::status(
            Code::Unavailable,
            format!(
                "runner {} cannot be reached: {}",
                runner.status.id,
                status.message()
            ),
            crate::api::errors::reason::INTERNAL,
            &[("runner_id", runner.status.id.as_str().to_owned())],
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_and_deadline_go_on_and_the_connections_headers_stay() {
        let mut r = Request::new(());
        let m = r.metadata_mut();
        m.insert("authorization", "Bearer k".parse().unwrap());
        m.insert("grpc-timeout", "5S".parse().unwrap());
        m.insert("grpc-encoding", "gzip".parse().unwrap());
        m.insert("x-request-id", "abc".parse().unwrap());
        r.extensions_mut()
            .insert(crate::model::Principal("alice".into()));
        let out = onward(r);
        let m = out.metadata();
        assert_eq!(m.get("authorization").unwrap(), "Bearer k");
        assert_eq!(m.get("grpc-timeout").unwrap(), "5S");
        assert_eq!(m.get("x-request-id").unwrap(), "abc");
        assert!(m.get("grpc-encoding").is_none());
        // What this gateway found (the principal) is not the runner's.
        assert!(out.extensions().get::<crate::model::Principal>().is_none());
    }
}
