//! Downloading a resolved image's missing layers, `concurrent_layers` at
//! a time, each streamed from HTTP into the store's verified import, then
//! recording the image.

use std::collections::HashSet;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sandpit_image::{Digest, Image, ImageError, LayerInfo, Reference};

use super::resolve::{Layer, Resolved};
use super::Puller;
use crate::client::{self, Endpoint, Session};
use crate::{chain, Credentials, Failure, LayerProgressInfo, Progress, PullErrorKind};

/// Progress is reported at most once per this many bytes of a layer.
const PROGRESS_STEP: u64 = 1 << 20;

impl Puller {
    /// Downloads the missing layers, then writes the image record.
    pub(super) fn fetch(
        &self,
        reference: &Reference,
        endpoints: &[Endpoint],
        credentials: Option<&Credentials>,
        resolved: Resolved,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<Image, Failure> {
        progress(&Progress::Resolved {
            endpoint: endpoints[0].url.clone(),
            manifest_digest: resolved.manifest_digest.clone(),
            layers: resolved
                .layers
                .iter()
                .map(|l| LayerProgressInfo {
                    digest: l.digest.clone(),
                    size: l.size,
                })
                .collect(),
        });
        let mut todo = Vec::new();
        let mut queued = HashSet::new();
        let mut cached_bytes = 0u64;
        for (index, Layer { diff_id, .. }) in resolved.layers.iter().enumerate() {
            if self.store.has_layer(diff_id) {
                cached_bytes = cached_bytes
                    .saturating_add(self.store.layer(diff_id).map(|l| l.size).unwrap_or(0));
                progress(&Progress::LayerCached { index });
            } else if queued.insert(diff_id) {
                todo.push(index);
            } else {
                // The same layer twice in one image: one download serves both.
                progress(&Progress::LayerCached { index });
            }
        }

        let limit = self.config.max_image_bytes;
        if cached_bytes > limit {
            return Err(Failure::new(
                PullErrorKind::TooLarge,
                format!("image larger than {limit} bytes"),
            ));
        }
        let total = AtomicU64::new(cached_bytes);
        let next = AtomicUsize::new(0);
        let cancel = AtomicBool::new(false);
        let failure: Mutex<Option<Failure>> = Mutex::new(None);
        let fail = |f: Failure| {
            let mut slot = failure.lock().unwrap_or_else(|e| e.into_inner());
            // The first failure is the cause; later ones are its echo.
            if slot.is_none() {
                *slot = Some(f);
            }
            cancel.store(true, Ordering::SeqCst);
        };
        let workers = self.config.concurrent_layers.min(todo.len());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    if cancel.load(Ordering::SeqCst) {
                        break;
                    }
                    let Some(&index) = todo.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        break;
                    };
                    match self.fetch_layer(
                        reference,
                        endpoints,
                        credentials,
                        &resolved,
                        index,
                        &cancel,
                        progress,
                    ) {
                        Ok(info) => {
                            let sum = total.fetch_add(info.size, Ordering::SeqCst) + info.size;
                            if sum > limit {
                                fail(Failure::new(
                                    PullErrorKind::TooLarge,
                                    format!("image larger than {limit} bytes"),
                                ));
                                break;
                            }
                            progress(&Progress::LayerDone { index });
                        }
                        Err(None) => break,
                        Err(Some(f)) => {
                            fail(f);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(f) = failure.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(f);
        }
        let diff_ids: Vec<Digest> = resolved.layers.iter().map(|l| l.diff_id.clone()).collect();
        self.store
            .put_image(
                reference,
                &diff_ids,
                resolved.config,
                Some(resolved.manifest_digest),
            )
            .map_err(|e| store_failure(&e, "record image"))
    }

    /// Downloads layer `index`, falling through mirrors that fail.
    /// `Err(None)`: cancelled because another layer failed.
    #[allow(clippy::too_many_arguments)]
    fn fetch_layer(
        &self,
        reference: &Reference,
        endpoints: &[Endpoint],
        credentials: Option<&Credentials>,
        resolved: &Resolved,
        index: usize,
        cancel: &AtomicBool,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<LayerInfo, Option<Failure>> {
        let layer = &resolved.layers[index];
        let mut result = Err(None);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let session = self.session(endpoint, &reference.repository, credentials);
            result = self.fetch_layer_from(&session, resolved, index, cancel, progress);
            match &result {
                Err(Some(f))
                    if endpoint.mirror
                        && i + 1 < endpoints.len()
                        && matches!(
                            f.kind,
                            PullErrorKind::NotFound
                                | PullErrorKind::Unreachable
                                | PullErrorKind::Unauthorized
                        ) =>
                {
                    tracing::warn!(
                        mirror = %endpoint.url,
                        layer = %layer.digest,
                        error = %f.message,
                        "mirror failed, trying the next endpoint"
                    );
                }
                _ => break,
            }
        }
        result
    }

    fn fetch_layer_from(
        &self,
        session: &Session<'_>,
        resolved: &Resolved,
        index: usize,
        cancel: &AtomicBool,
        progress: &(dyn Fn(&Progress) + Sync),
    ) -> Result<LayerInfo, Option<Failure>> {
        let layer = &resolved.layers[index];
        let started = Instant::now();
        let response = session.blob(&layer.digest)?;
        let mut reader = BlobReader {
            inner: response.into_body().into_reader(),
            digest: &layer.digest,
            index,
            done: 0,
            total: layer.size,
            reported: 0,
            cancel,
            progress,
            failure: None,
            cancelled: false,
        };
        let result = self.store.import_layer_verified(
            &mut reader,
            layer.compression,
            Some(&layer.digest),
            Some(&layer.diff_id),
            self.config.max_layer_bytes,
        );
        match result {
            Ok(info) => {
                tracing::debug!(
                    layer = %layer.digest,
                    diff_id = %info.diff_id,
                    endpoint = %session.endpoint.url,
                    bytes = reader.done,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "layer pulled"
                );
                Ok(info)
            }
            Err(_) if reader.cancelled => Err(None),
            Err(e) => Err(Some(reader.failure.take().unwrap_or_else(|| {
                store_failure(&e, &format!("layer {}", layer.digest))
            }))),
        }
    }
}

/// The failure an error of the store means.
fn store_failure(e: &ImageError, context: &str) -> Failure {
    match e {
        ImageError::TooLarge { .. } => Failure::new(PullErrorKind::TooLarge, chain(e)),
        ImageError::DigestMismatch { .. }
        | ImageError::DiffIdMismatch { .. }
        | ImageError::BadEntry { .. }
        | ImageError::Entry { .. }
        | ImageError::Archive(_)
        | ImageError::InvalidDigest { .. }
        | ImageError::UnsupportedMediaType(_) => {
            Failure::invalid(format!("{context}: {}", chain(e)))
        }
        _ => Failure::new(PullErrorKind::Store, format!("{context}: {}", chain(e))),
    }
}

/// The HTTP body of a blob on its way into the store: reports progress,
/// stops when the pull is cancelled, enforces the descriptor's size, and
/// remembers a network failure (the store only sees an `io::Error`).
struct BlobReader<'a, R> {
    inner: R,
    digest: &'a Digest,
    index: usize,
    done: u64,
    total: u64,
    reported: u64,
    cancel: &'a AtomicBool,
    progress: &'a (dyn Fn(&Progress) + Sync),
    failure: Option<Failure>,
    cancelled: bool,
}

impl<R: Read> Read for BlobReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            self.cancelled = true;
            return Err(io::Error::other("pull cancelled"));
        }
        // One byte more than the descriptor says is enough to know it lies.
        let room = usize::try_from(self.total.saturating_sub(self.done).saturating_add(1))
            .unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => {
                self.failure = Some(Failure::new(
                    PullErrorKind::Unreachable,
                    format!("registry unreachable: {}", client::io_reason(&e)),
                ));
                return Err(e);
            }
        };
        self.done += n as u64;
        if self.done > self.total {
            self.failure = Some(Failure::invalid(format!(
                "blob {} longer than its descriptor's {} bytes",
                self.digest, self.total
            )));
            return Err(io::Error::other("blob longer than its descriptor"));
        }
        if n == 0 && self.done < self.total && !buf.is_empty() {
            self.failure = Some(Failure::new(
                PullErrorKind::Unreachable,
                format!(
                    "registry unreachable: connection closed after {} of {} bytes",
                    self.done, self.total
                ),
            ));
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if self.done - self.reported >= PROGRESS_STEP || (n > 0 && self.done == self.total) {
            self.reported = self.done;
            (self.progress)(&Progress::LayerBytes {
                index: self.index,
                done: self.done,
                total: self.total,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_kinds_with_their_cause_once() {
        let f = store_failure(&ImageError::TooLarge { limit: 10 }, "layer x");
        assert_eq!(
            f,
            Failure::new(PullErrorKind::TooLarge, "layer larger than 10 bytes")
        );
        let mismatch = ImageError::DigestMismatch {
            expected: Digest::sha256_of(b"a"),
            actual: Digest::sha256_of(b"b"),
        };
        let f = store_failure(&mismatch, "layer x");
        assert_eq!(f.kind, PullErrorKind::Invalid);
        assert_eq!(f.message, format!("layer x: {mismatch}"));
        let f = store_failure(
            &ImageError::Archive(io::Error::other("invalid gzip header")),
            "layer x",
        );
        assert_eq!(
            f,
            Failure::invalid("layer x: read layer: invalid gzip header")
        );
        let io = ImageError::Io {
            op: "rename",
            path: "/store/layers/sha256/ab".into(),
            source: io::Error::other("no space left on device"),
        };
        assert_eq!(
            store_failure(&io, "record image"),
            Failure::new(
                PullErrorKind::Store,
                "record image: rename /store/layers/sha256/ab: no space left on device"
            )
        );
    }
}
