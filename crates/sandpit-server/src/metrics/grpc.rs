//! `sandpit_api_errors_total`: every gRPC error the server answers, counted
//! where it leaves, by one middleware on the router: the status and the
//! `ErrorInfo` reason are read back from the response (its headers for an
//! error answered at once, its trailers for a stream that fails later), so
//! no handler, interceptor or error constructor has to remember to count,
//! and a status built but never sent is not counted.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use prost::Message;
use tonic_types::StatusExt;

/// `/package.Service/Method` of every RPC in our protos: the method label
/// takes only these (the path is the caller's to choose; anything else is
/// `unknown`, so no caller grows the label set).
static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(sandpit_proto::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    let mut known = HashSet::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                known.insert(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    known
});

/// The method label of a request path: `Service/Method`, or `unknown`.
pub fn method_label(path: &str) -> String {
    if !KNOWN.contains(path) {
        return "unknown".into();
    }
    // `/coreweave.sandbox.v1.SandboxService/CreateSandbox` ->
    // `SandboxService/CreateSandbox`: the package adds nothing to a panel.
    let (service, method) = path[1..].split_once('/').unwrap_or(("", path));
    let service = service.rsplit('.').next().unwrap_or(service);
    format!("{service}/{method}")
}

/// Counts the error in `headers` (response headers or trailers), if any.
/// Returns whether there was a status at all.
pub fn count_status(method: &str, headers: &HeaderMap) -> bool {
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return false;
    };
    if status.code() != tonic::Code::Ok {
        let reason = status
            .get_details_error_info()
            .map(|i| i.reason)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "none".into());
        let code = format!("{:?}", status.code());
        super::API_ERRORS
            .with_label_values(&[method, code.as_str(), reason.as_str()])
            .inc();
    }
    true
}

/// The middleware (`axum::middleware::from_fn`).
pub async fn track(request: Request, next: Next) -> Response {
    let method = method_label(request.uri().path());
    let response = next.run(request).await;
    // An error answered at once is "trailers-only": the status is in the
    // headers and the body is empty.
    if count_status(&method, response.headers()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        Body::new(Watched {
            inner: body,
            method: Some(method),
        }),
    )
}

/// A response body whose trailers are counted as they pass.
struct Watched {
    inner: Body,
    /// Taken when the trailers were seen.
    method: Option<String>,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                if let Some(method) = self.method.take() {
                    count_status(&method, trailers);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
