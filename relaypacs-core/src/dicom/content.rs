//! Content digests of a Part-10 file, computed while it streams by: the
//! whole file and the data set after the file meta group.
//!
//! Two digests because destinations differ in what they keep: a DICOMweb
//! PACS may return the file byte for byte, or with a file meta group of
//! its own (another implementation class, a source AE title), and a
//! C-STORE receiver never sees the sender's meta group at all. The data
//! set after the meta group is what every faithful copy has in common.

use sha2::{Digest, Sha256};

use super::DicomError;
use super::prescan::file_meta;
use crate::digest::Sha256Digest;

/// What a [`Part10Hasher`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentDigest {
    /// SHA-256 of every byte, when the hasher computed it.
    pub whole: Option<Sha256Digest>,
    /// SHA-256 of the data set after the file meta group; `None` when the
    /// bytes were not a Part-10 file whose meta group could be read.
    pub data_set: Option<Sha256Digest>,
    /// (0002,0010) Transfer Syntax UID from the file meta group.
    pub transfer_syntax: Option<String>,
    /// Bytes seen.
    pub size: u64,
}

/// Streaming digests of a Part-10 file (see the module docs). Memory is
/// bounded by `max_meta_bytes`: bytes are buffered only until the file
/// meta group has been read.
#[derive(Clone, Debug)]
pub struct Part10Hasher {
    whole: Option<Sha256>,
    data_set: Sha256,
    /// Bytes held until the meta group is known.
    head: Vec<u8>,
    /// Length of `head` at which the meta group is looked for next.
    next_try: usize,
    /// `(transfer syntax, data set offset)` once known; `Err` once the
    /// bytes are known not to be Part-10.
    meta: Option<Result<String, DicomError>>,
    max_meta_bytes: usize,
    size: u64,
}

impl Part10Hasher {
    /// Digests of the whole file and of its data set. The meta group must
    /// end within `max_meta_bytes`, or the data set digest is `None`.
    pub fn new(max_meta_bytes: usize) -> Self {
        Self {
            whole: Some(Sha256::new()),
            ..Self::data_set_only(max_meta_bytes)
        }
    }

    /// Only the data set digest (when the whole-file digest is computed
    /// elsewhere).
    pub fn data_set_only(max_meta_bytes: usize) -> Self {
        Self {
            whole: None,
            data_set: Sha256::new(),
            head: Vec::new(),
            next_try: 256,
            meta: None,
            max_meta_bytes,
            size: 0,
        }
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, buf: &[u8]) {
        if let Some(w) = &mut self.whole {
            w.update(buf);
        }
        self.size += buf.len() as u64;
        match &self.meta {
            Some(Ok(_)) => self.data_set.update(buf),
            Some(Err(_)) => {}
            None => {
                self.head.extend_from_slice(buf);
                // Looked for at doubling lengths, so tiny pieces cost
                // linear time in total.
                if self.head.len() >= self.next_try {
                    self.next_try = self.head.len().saturating_mul(2);
                    self.find_meta(None);
                }
            }
        }
    }

    fn find_meta(&mut self, total: Option<u64>) {
        // Only the first `max_meta_bytes` count: a meta group ending past
        // them is refused whether the bytes came in one piece or many (the
        // answer must not depend on how much was buffered at the look).
        let limit = self.head.len().min(self.max_meta_bytes);
        match file_meta(&self.head[..limit], total) {
            Ok(Some((ts, offset))) => {
                let at = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(self.head.len());
                self.data_set.update(&self.head[at..]);
                self.head = Vec::new();
                self.meta = Some(Ok(ts));
            }
            Ok(None) if self.head.len() > self.max_meta_bytes => {
                self.head = Vec::new();
                self.meta = Some(Err(DicomError::HeaderTooLarge {
                    max: self.max_meta_bytes as u64,
                }));
            }
            Ok(None) => {}
            Err(e) => {
                self.head = Vec::new();
                self.meta = Some(Err(e));
            }
        }
    }

    /// The digests of everything fed.
    pub fn finish(mut self) -> ContentDigest {
        if self.meta.is_none() {
            self.find_meta(Some(self.size));
        }
        let (data_set, transfer_syntax) = match self.meta {
            Some(Ok(ts)) => (
                Some(Sha256Digest(self.data_set.finalize().into())),
                Some(ts),
            ),
            _ => (None, None),
        };
        ContentDigest {
            whole: self.whole.map(|w| Sha256Digest(w.finalize().into())),
            data_set,
            transfer_syntax,
            size: self.size,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn file(meta_extra: &[u8], data: &[u8]) -> Vec<u8> {
        let ts = b"1.2.840.10008.1.2.1\0";
        let mut meta = Vec::new();
        meta.extend_from_slice(&[0x02, 0, 0x10, 0, b'U', b'I']);
        meta.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        meta.extend_from_slice(ts);
        meta.extend_from_slice(meta_extra);
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        f.extend_from_slice(&[0x02, 0, 0, 0, b'U', b'L', 4, 0]);
        f.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        f.extend_from_slice(&meta);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn data_set_digest_ignores_the_meta_group_and_piece_sizes() {
        let data = vec![7u8; 5000];
        let a = file(&[], &data);
        // Another meta group (an implementation version name), same data set.
        let b = file(
            &[0x02, 0, 0x13, 0, b'S', b'H', 4, 0, b'X', b'Y', b'Z', b' '],
            &data,
        );
        let digest = |bytes: &[u8], piece: usize| {
            let mut h = Part10Hasher::new(1 << 20);
            for p in bytes.chunks(piece) {
                h.update(p);
            }
            h.finish()
        };
        let da = digest(&a, 1);
        let db = digest(&b, 4096);
        assert_eq!(da.data_set, Some(Sha256Digest::of(&data)));
        assert_eq!(da.data_set, db.data_set);
        assert_ne!(da.whole, db.whole);
        assert_eq!(da.whole, Some(Sha256Digest::of(&a)));
        assert_eq!(da.transfer_syntax.as_deref(), Some("1.2.840.10008.1.2.1"));
        assert_eq!(da.size, a.len() as u64);
        assert_eq!(digest(&a, 100_000), da);
    }

    /// A file the fuzzer found: its meta group ends past `max_meta_bytes`;
    /// read whole it used to be accepted, read in pieces refused.
    #[test]
    fn a_meta_group_past_the_limit_is_refused_however_the_bytes_come() {
        let data = include_bytes!("../../tests/data/fuzz-content-meta-past-limit.bin");
        let (&cut, body) = data.split_first().unwrap();
        let mut whole = Part10Hasher::new(4096);
        whole.update(body);
        let mut pieces = Part10Hasher::new(4096);
        for p in body.chunks(usize::from(cut).max(1)) {
            pieces.update(p);
        }
        let (w, p) = (whole.finish(), pieces.finish());
        assert_eq!(w, p);
        assert_eq!(w.data_set, None);
    }

    /// A file the fuzzer found: a meta group whose length points past the
    /// bytes held; read whole it was accepted, read in 33-byte pieces
    /// refused (a look at a short prefix decided for good).
    #[test]
    fn a_meta_group_is_judged_the_same_however_the_bytes_are_cut() {
        let data = include_bytes!("../../tests/data/fuzz-content-meta-cut.bin");
        let (&cut, body) = data.split_first().unwrap();
        let digest = |piece: usize| {
            let mut h = Part10Hasher::new(4096);
            for p in body.chunks(piece) {
                h.update(p);
            }
            h.finish()
        };
        let whole = digest(body.len());
        assert_eq!(whole, digest(usize::from(cut)));
        for piece in [1, 2, 7, 64, 100, 255, 256, 257, 300, 512, 700] {
            assert_eq!(whole, digest(piece), "pieces of {piece}");
        }
    }

    #[test]
    fn not_part10_has_no_data_set_digest() {
        let mut h = Part10Hasher::data_set_only(1024);
        h.update(&[0u8; 10_000]);
        let d = h.finish();
        assert_eq!(d.data_set, None);
        assert_eq!(d.whole, None);
        let mut h = Part10Hasher::new(1024);
        h.update(b"short");
        assert_eq!(h.finish().data_set, None);
    }
}
