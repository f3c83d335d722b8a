//! SHA-256 digests and the verifying byte stream.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::{Error, IntegrityError};

/// A stream of bytes as handed to and returned by stores.
///
/// An `Err` item means the stream failed; a consumer must then discard
/// everything it received from this stream.
pub type ByteStream = BoxStream<'static, Result<Bytes, Error>>;

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// Digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Parse 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(Error::invalid(
                "RELAY_BAD_DIGEST",
                "SHA-256 must be 64 hex digits",
            ));
        }
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::invalid("RELAY_BAD_DIGEST", "SHA-256 must be 64 hex digits"))?;
        Ok(Self(out))
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl FromStr for Sha256Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_hex(s)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Wraps a body stream so that it yields exactly `len` bytes whose SHA-256
/// is `expected` (when given), or ends with an `Err` item.
///
/// The check happens while streaming: bytes beyond the declared length fail
/// at once, and the final digest is compared before the stream reports its
/// end. A store consuming this stream therefore sees the error *before* it
/// would commit, which is what makes "only verified bytes are ever
/// acknowledged" hold by construction. After the stream ends, [`digest`]
/// holds the computed digest.
///
/// [`digest`]: VerifyingStream::digest
pub struct VerifyingStream {
    inner: ByteStream,
    offset: u64,
    len: u64,
    seen: u64,
    expected: Option<Sha256Digest>,
    hasher: Option<Sha256>,
    done: bool,
    result: std::sync::Arc<std::sync::Mutex<Option<Sha256Digest>>>,
}

impl fmt::Debug for VerifyingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingStream")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// Handle to read the digest a [`VerifyingStream`] computed, after it ended.
#[derive(Clone, Debug, Default)]
pub struct DigestSlot(std::sync::Arc<std::sync::Mutex<Option<Sha256Digest>>>);

impl DigestSlot {
    /// The computed digest, once the stream ended successfully.
    pub fn get(&self) -> Option<Sha256Digest> {
        // A poisoned lock only means a panic elsewhere while holding it; the
        // Option inside is still a valid value, so reading it is sound.
        match self.0.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }
}

impl VerifyingStream {
    /// Verify `inner` against the declared length and optional digest.
    /// `offset` is only used in error messages.
    pub fn new(
        inner: ByteStream,
        offset: u64,
        len: u64,
        expected: Option<Sha256Digest>,
    ) -> (Self, DigestSlot) {
        let slot = DigestSlot::default();
        (
            Self {
                inner,
                offset,
                len,
                seen: 0,
                expected,
                hasher: Some(Sha256::new()),
                done: false,
                result: slot.0.clone(),
            },
            slot,
        )
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Bytes, Error>>> {
        self.done = true;
        Poll::Ready(Some(Err(e)))
    }
}

impl Stream for VerifyingStream {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Err(e))) => self.fail(e),
            Poll::Ready(Some(Ok(b))) => {
                let seen = self.seen + b.len() as u64;
                if seen > self.len {
                    let (offset, len) = (self.offset, self.len);
                    return self.fail(
                        IntegrityError::ChunkLength {
                            offset,
                            expected: len,
                            actual: seen,
                        }
                        .into(),
                    );
                }
                self.seen = seen;
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&b);
                }
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(None) => {
                if self.seen != self.len {
                    let (offset, len, seen) = (self.offset, self.len, self.seen);
                    return self.fail(
                        IntegrityError::ChunkLength {
                            offset,
                            expected: len,
                            actual: seen,
                        }
                        .into(),
                    );
                }
                let actual = Sha256Digest(
                    self.hasher
                        .take()
                        .map(|h| h.finalize().into())
                        .unwrap_or_default(),
                );
                if let Some(expected) = self.expected
                    && expected != actual
                {
                    let offset = self.offset;
                    return self.fail(
                        IntegrityError::ChunkHash {
                            offset,
                            expected: expected.to_hex(),
                            actual: actual.to_hex(),
                        }
                        .into(),
                    );
                }
                match self.result.lock() {
                    Ok(mut g) => *g = Some(actual),
                    Err(p) => *p.into_inner() = Some(actual),
                }
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

/// A stream over one in-memory buffer (for tests, examples and small bodies).
pub fn bytes_stream(data: impl Into<Bytes>) -> ByteStream {
    let b: Bytes = data.into();
    Box::pin(futures::stream::once(async move { Ok(b) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn drain(mut s: VerifyingStream) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            out.extend_from_slice(&item?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn verifies_length_and_hash() {
        let data = b"hello world".to_vec();
        let d = Sha256Digest::of(&data);
        let (s, slot) = VerifyingStream::new(bytes_stream(data.clone()), 0, 11, Some(d));
        assert_eq!(drain(s).await.unwrap(), data);
        assert_eq!(slot.get(), Some(d));

        let (s, slot) = VerifyingStream::new(
            bytes_stream(data.clone()),
            0,
            11,
            Some(Sha256Digest::of(b"x")),
        );
        assert!(matches!(
            drain(s).await,
            Err(Error::Integrity(IntegrityError::ChunkHash { .. }))
        ));
        assert_eq!(slot.get(), None);

        let (s, _) = VerifyingStream::new(bytes_stream(data.clone()), 0, 10, None);
        assert!(matches!(
            drain(s).await,
            Err(Error::Integrity(IntegrityError::ChunkLength { .. }))
        ));
        let (s, _) = VerifyingStream::new(bytes_stream(data), 0, 12, None);
        assert!(matches!(
            drain(s).await,
            Err(Error::Integrity(IntegrityError::ChunkLength { .. }))
        ));
    }
}
