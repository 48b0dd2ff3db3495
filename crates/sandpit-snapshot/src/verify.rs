//! [`VerifyingReader`]: every blob read from a store passes through one, so
//! a blob whose bytes were changed where it is stored is refused.

use std::io::{self, Read};

use sandpit_image::DigestWriter;

use crate::{BlobRef, SnapshotError};

/// Hashes and counts the bytes of an inner reader; at its EOF, a digest or
/// size other than the blob's is an error (an `io::Error` wrapping
/// [`SnapshotError::DigestMismatch`]), as is any byte past the blob's size
/// (reported at once: a store cannot make a reader read forever). The error
/// repeats on every later read.
pub struct VerifyingReader<R> {
    inner: R,
    blob: BlobRef,
    digest: DigestWriter,
    read: u64,
    /// Set at EOF or on a mismatch.
    done: Option<Result<(), String>>,
}

impl<R> std::fmt::Debug for VerifyingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingReader")
            .field("blob", &self.blob)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, blob: BlobRef) -> Self {
        Self {
            inner,
            blob,
            digest: DigestWriter::new(),
            read: 0,
            done: None,
        }
    }

    fn mismatch(&self, detail: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            SnapshotError::DigestMismatch {
                digest: self.blob.digest.clone(),
                detail: detail.to_owned(),
            },
        )
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.done {
            Some(Ok(())) => return Ok(0),
            Some(Err(detail)) => return Err(self.mismatch(detail)),
            None => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        // One byte more than the blob may hold, to see an overlong blob.
        let room = (self.blob.size - self.read).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        if self.read > self.blob.size {
            let detail = format!("more than {} bytes", self.blob.size);
            let e = self.mismatch(&detail);
            self.done = Some(Err(detail));
            return Err(e);
        }
        if n == 0 {
            let actual = self.digest.digest();
            let verdict = if self.read != self.blob.size {
                Err(format!("{} bytes, expected {}", self.read, self.blob.size))
            } else if actual != self.blob.digest {
                Err(format!("content hashes to {actual}"))
            } else {
                Ok(())
            };
            self.done = Some(verdict);
            return match &self.done {
                Some(Err(detail)) => Err(self.mismatch(detail)),
                _ => Ok(0),
            };
        }
        self.digest.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_image::Digest;

    fn read_all(data: &[u8], blob: BlobRef) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::new();
        VerifyingReader::new(data, blob)
            .read_to_end(&mut out)
            .map_err(crate::read_error)?;
        Ok(out)
    }

    #[test]
    fn passes_matching_bytes_and_refuses_others() {
        let blob = BlobRef {
            digest: Digest::sha256_of(b"hello"),
            size: 5,
        };
        assert_eq!(read_all(b"hello", blob.clone()).unwrap(), b"hello");
        for bad in [&b"hellp"[..], b"hell", b"hello!", b""] {
            match read_all(bad, blob.clone()) {
                Err(SnapshotError::DigestMismatch { digest, .. }) => {
                    assert_eq!(digest, blob.digest)
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
