//! Chunks: putting one chunk of a file (range reservation, verification while it
//! streams, durable record), a client's streamed range cut into durable
//! segments under one reservation, and a whole file put through the same
//! rules.

use super::completion::{AuditPlan, ONE_THREAD_READ_BACK, Written};
use super::*;

/// What [`Pipeline::put_chunk`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PutOutcome {
    /// The chunk is now durable and recorded.
    Stored {
        /// The record.
        chunk: ChunkRecord,
    },
    /// The identical chunk was already stored; nothing changed.
    AlreadyStored {
        /// The existing record.
        chunk: ChunkRecord,
    },
}

impl PutOutcome {
    /// The chunk record either way.
    pub fn chunk(&self) -> &ChunkRecord {
        match self {
            Self::Stored { chunk } | Self::AlreadyStored { chunk } => chunk,
        }
    }
}

/// Describes a client's streamed range for [`Pipeline::put_range`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeWrite {
    /// Byte offset of the range in the file.
    pub offset: u64,
    /// Exact length of the body.
    pub length: u64,
    /// Length of the durable segments the range is cut into (see
    /// [`plan_segments`]); a value of `length` or more stores the range as
    /// one chunk.
    pub segment_size: u64,
    /// Declared SHA-256 of the whole range; with one, the range is stored
    /// as one chunk, verified whole.
    #[serde(default)]
    pub sha256: Option<Sha256Digest>,
    /// The range must start exactly where the file's stored bytes end (a
    /// tus PATCH continues the upload): checked once the range is
    /// reserved, so of two writers racing from one offset, on any
    /// gateways, the second fails with 409 `RELAY_OFFSET_MISMATCH` instead
    /// of counting as a retry.
    #[serde(default)]
    pub continues: bool,
}

/// What [`Pipeline::put_range`] reports when the range is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeDone {
    /// The end of the range: the upload's new offset.
    pub end: u64,
    /// The file's declared size.
    pub size: u64,
    /// When the session expires if nothing else happens, as read before
    /// the write (a write only pushes it later).
    pub expires_at: OffsetDateTime,
}

impl RangeWrite {
    /// A range of `length` bytes at `offset` cut into segments of
    /// `segment_size`, with no declared digest.
    pub fn new(offset: u64, length: u64, segment_size: u64) -> Self {
        Self {
            offset,
            length,
            segment_size,
            sha256: None,
            continues: false,
        }
    }
}

/// Cut `length` bytes at `offset` into `(offset, length)` segments of
/// `segment` bytes (a `segment` of 0 counts as 1); a tail shorter than
/// `min` joins the previous segment, so only a range's last segment is
/// ever shorter than `segment`, and never shorter than `min` unless it is
/// the only one. Pure: the plan [`Pipeline::put_range`] follows.
pub fn plan_segments(offset: u64, length: u64, segment: u64, min: u64) -> Vec<(u64, u64)> {
    let segment = segment.max(1);
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = offset;
    let end = offset.saturating_add(length);
    while at < end {
        let n = segment.min(end - at);
        out.push((at, n));
        at += n;
    }
    if out.len() > 1
        && let Some(&(_, last)) = out.last()
        && last < min
    {
        out.pop();
        if let Some(prev) = out.last_mut() {
            prev.1 += last;
        }
    }
    out
}

/// What [`Pipeline::put_range`] read for its first segment while holding
/// the session's gate (read) and the range's reservation: the segment
/// uses them instead of reading the same scope and chunk list again.
struct Prefetched<'g> {
    gate: tokio::sync::RwLockReadGuard<'g, ()>,
    known: Known,
}

/// A chunk's file scope, and the file's chunk records when they were read
/// under the chunk's range reservation.
struct Known {
    scope: FileScope,
    chunks: Option<Vec<ChunkRecord>>,
}

/// Who holds the range reservation of a chunk being put.
enum Reserve<'g> {
    /// Take one for the chunk's range.
    Range,
    /// The caller holds one covering it, and may have read the chunk's
    /// scope under it (see [`Prefetched`]).
    Held(Option<Box<Prefetched<'g>>>),
}

/// A range's body, read by its segments in turn.
struct RangeSource {
    stream: ByteStream,
    leftover: bytes::Bytes,
}

impl RangeSource {
    /// At most `max` bytes (the next piece of the body, split when longer);
    /// `None` at the end of the body.
    async fn next(&mut self, max: u64) -> Option<Result<bytes::Bytes>> {
        let mut piece = if self.leftover.is_empty() {
            match self.stream.next().await? {
                Ok(b) => b,
                Err(e) => return Some(Err(e)),
            }
        } else {
            std::mem::take(&mut self.leftover)
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if piece.len() > max {
            self.leftover = piece.split_off(max);
        }
        Some(Ok(piece))
    }

    /// The body must end here: `Ok` at its end, the body's own error as it
    /// is, a byte past `end` as a length mismatch.
    async fn expect_end(&mut self, end: u64) -> Result<()> {
        loop {
            match self.next(u64::MAX).await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) if b.is_empty() => {}
                Some(Ok(b)) => {
                    return Err(IntegrityError::ChunkLength {
                        offset: end,
                        expected: 0,
                        actual: b.len() as u64,
                    }
                    .into());
                }
            }
        }
    }
}

/// The next `length` bytes of `src` as one segment's body, streamed (never
/// gathered). With `end` (the last segment), the segment also checks that
/// the body ends with it, so an error or extra byte after the range fails
/// this segment before it is durable. A body that ends early ends the
/// segment short, which the chunk verification reports as a length
/// mismatch.
fn segment_body(
    src: Arc<tokio::sync::Mutex<RangeSource>>,
    length: u64,
    end: Option<u64>,
) -> ByteStream {
    Box::pin(futures::stream::unfold(Some(length), move |left| {
        let src = src.clone();
        async move {
            let left = left?;
            let mut s = src.lock().await;
            if left == 0 {
                let end = end?;
                return match s.expect_end(end).await {
                    Ok(()) => None,
                    Err(e) => Some((Err(e), None)),
                };
            }
            match s.next(left).await {
                None => None,
                Some(Err(e)) => Some((Err(e), None)),
                Some(Ok(b)) => {
                    let rest = left - b.len() as u64;
                    Some((Ok(b), Some(rest)))
                }
            }
        }
    }))
}

/// Default chunk size of [`Pipeline::ingest_stream`] (8 MiB).
pub const INGEST_CHUNK_SIZE: u64 = 8 << 20;

/// Cuts a byte stream into chunks of exact lengths.
struct ChunkReader {
    stream: ByteStream,
    leftover: bytes::Bytes,
}

impl ChunkReader {
    /// The next `length` bytes (of the chunk at `offset`), gathered in one
    /// buffer.
    async fn take(&mut self, offset: u64, length: u64) -> Result<bytes::Bytes> {
        let want = usize::try_from(length).map_err(|_| Error::LimitExceeded {
            what: "chunk size",
            limit: usize::MAX as u64,
            actual: length,
        })?;
        if self.leftover.len() >= want {
            return Ok(self.leftover.split_to(want));
        }
        let mut buf = bytes::BytesMut::with_capacity(want);
        buf.extend_from_slice(&std::mem::take(&mut self.leftover));
        while buf.len() < want {
            let Some(item) = self.stream.next().await else {
                return Err(IntegrityError::ChunkLength {
                    offset,
                    expected: length,
                    actual: buf.len() as u64,
                }
                .into());
            };
            let mut piece = item?;
            let room = want - buf.len();
            if piece.len() > room {
                self.leftover = piece.split_off(room);
            }
            buf.extend_from_slice(&piece);
        }
        Ok(buf.freeze())
    }

    /// The stream must hold no byte after the declared `size`.
    async fn expect_end(&mut self, size: u64) -> Result<()> {
        let mut extra = self.leftover.len() as u64;
        while extra == 0 {
            match self.stream.next().await {
                Some(item) => extra += item?.len() as u64,
                None => return Ok(()),
            }
        }
        Err(IntegrityError::ChunkLength {
            offset: size,
            expected: 0,
            actual: extra,
        }
        .into())
    }
}

/// Releases a reserved byte range when dropped (also on cancellation).
struct Reservation {
    gate: Arc<Gate>,
    file: FileId,
    range: Range<u64>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut r = lock(&self.gate.reserved);
        if let Some(i) = r
            .iter()
            .position(|(f, rg)| *f == self.file && *rg == self.range)
        {
            r.swap_remove(i);
        }
    }
}

impl Reservation {
    /// Reserve `range` of `file` in the session's gate, or answer busy when
    /// another request is writing an overlapping range.
    fn take(gate: &Arc<Gate>, file: FileId, range: Range<u64>) -> Result<Self> {
        let mut r = lock(&gate.reserved);
        if r.iter().any(|(f, rg)| *f == file && overlaps(rg, &range)) {
            return Err(Error::Busy {
                what: format!(
                    "range {}..{} is being written by another request",
                    range.start, range.end
                ),
            });
        }
        r.push((file, range.clone()));
        Ok(Self {
            gate: gate.clone(),
            file,
            range,
        })
    }
}

/// How long a range reservation in the session store lasts unless
/// renewed, and how often the holder renews it while writing.
const SHARED_LEASE: time::Duration = time::Duration::seconds(30);
const SHARED_RENEW: std::time::Duration = std::time::Duration::from_secs(10);

/// A byte-range reservation in the session store, which every process
/// sharing the store sees (two gateways never write one range at once):
/// renewed while held, released when dropped. If the holder dies, the
/// lease runs out after [`SHARED_LEASE`].
struct SharedReservation {
    sessions: Arc<dyn SessionStore>,
    session: SessionId,
    file: FileId,
    range: Range<u64>,
    holder: String,
    renew: tokio::task::JoinHandle<()>,
}

impl SharedReservation {
    async fn take(
        sessions: &Arc<dyn SessionStore>,
        session: SessionId,
        file: FileId,
        range: Range<u64>,
    ) -> Result<Self> {
        let holder = crate::ids::FileId::random().to_string();
        sessions
            .reserve_range(
                session,
                file,
                range.clone(),
                &holder,
                OffsetDateTime::now_utc() + SHARED_LEASE,
            )
            .await?;
        let renew = {
            let (sessions, range, holder) = (sessions.clone(), range.clone(), holder.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SHARED_RENEW).await;
                    let until = OffsetDateTime::now_utc() + SHARED_LEASE;
                    if let Err(e) = sessions
                        .reserve_range(session, file, range.clone(), &holder, until)
                        .await
                    {
                        // The write goes on: every chunk is verified against
                        // its digest when recorded and at completion, so a
                        // second writer after a lost lease cannot make a
                        // wrong byte count as stored.
                        tracing::warn!(error = %e, session = %session, "range reservation not renewed");
                    }
                }
            })
        };
        Ok(Self {
            sessions: sessions.clone(),
            session,
            file,
            range,
            holder,
            renew,
        })
    }
}

impl SharedReservation {
    /// Stop renewing and release now (waiting for the store).
    async fn release(mut self) {
        self.renew.abort();
        let holder = std::mem::take(&mut self.holder);
        if let Err(e) = self
            .sessions
            .release_range(self.session, self.file, self.range.clone(), &holder)
            .await
        {
            tracing::debug!(error = %e, "range reservation not released; it expires");
        }
    }
}

impl Drop for SharedReservation {
    fn drop(&mut self) {
        self.renew.abort();
        // Released in the background (Drop cannot wait); a release that
        // fails or never runs ends with the lease.
        if self.holder.is_empty() {
            return; // released already
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (sessions, session, file, range, holder) = (
                self.sessions.clone(),
                self.session,
                self.file,
                self.range.clone(),
                std::mem::take(&mut self.holder),
            );
            rt.spawn(async move {
                if let Err(e) = sessions.release_range(session, file, range, &holder).await {
                    tracing::debug!(error = %e, "range reservation not released; it expires");
                }
            });
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// A new range must not overlap a recorded chunk (other than one at the
/// same offset and length, which is a retry).
fn check_no_overlap(recorded: &[ChunkRecord], range: &Range<u64>) -> Result<()> {
    match recorded
        .iter()
        .find(|c| overlaps(&(c.offset..c.end()), range))
    {
        Some(c) => Err(Error::conflict(
            "RELAY_CHUNK_OVERLAP",
            format!(
                "range {}..{} overlaps the stored chunk {}..{}",
                range.start,
                range.end,
                c.offset,
                c.end()
            ),
        )),
        None => Ok(()),
    }
}

impl Pipeline {
    /// Store one chunk of a file. The body is verified against
    /// `chunk.length` and `chunk.sha256` while it streams; only once the
    /// bytes are durable is the chunk recorded. Re-sending a stored chunk
    /// is a no-op; the same range with other bytes is a conflict.
    pub async fn put_chunk(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<PutOutcome> {
        self.put_chunk_audited(actor, id, file, chunk, body, Reserve::Range)
            .await
    }

    /// [`put_chunk`](Self::put_chunk) with the range reservation taken here
    /// ([`Reserve::Range`]) or already held by the caller
    /// ([`Reserve::Held`], as [`put_range`](Self::put_range) does for its
    /// whole range). With [`Prefetched`], the caller holds the session's gate
    /// and has read the scope (and chunk list) under it: they are used
    /// instead of being read again.
    async fn put_chunk_audited(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        chunk: PutChunk,
        body: ByteStream,
        reserve: Reserve<'_>,
    ) -> Result<PutOutcome> {
        let gate = self.gate(id);
        // The session's gate (read) is held for the whole chunk: by the
        // caller's guard in `pre`, or taken here.
        let take_range = matches!(reserve, Reserve::Range);
        let (_held, _own, known);
        match reserve {
            Reserve::Held(Some(p)) => {
                let Prefetched { gate: g, known: k } = *p;
                _held = Some(g);
                _own = None;
                known = k;
            }
            Reserve::Held(None) | Reserve::Range => {
                _held = None;
                _own = Some(gate.rw.read().await);
                known = Known {
                    scope: self
                        .load_scope_owned_as(actor, id, Some(file), Access::session("access"))
                        .await?,
                    chunks: None,
                };
            }
        }
        let mut ev = Self::event(
            actor,
            AuditAction::ChunkStored,
            AuditOutcome::Success,
            Some(id),
        );
        ev.file = Some(file);
        ev.detail = format!("offset={} length={}", chunk.offset, chunk.length);
        match self
            .put_chunk_inner(
                take_range.then_some(&gate),
                id,
                file,
                known,
                chunk,
                body,
                &ev,
            )
            .await
        {
            Ok((out, audited)) => {
                if matches!(out, PutOutcome::Stored { .. }) && !audited {
                    self.audit(ev).await?;
                }
                Ok(out)
            }
            Err(e) => self.refuse(ev, e).await,
        }
    }

    /// The chunk stored and recorded; `true` beside the outcome when its
    /// audit record (`ev`) was committed with the chunk record.
    #[allow(clippy::too_many_arguments)] // one call site, all needed
    async fn put_chunk_inner(
        &self,
        reserve_in: Option<&Arc<Gate>>,
        id: SessionId,
        file_id: FileId,
        known: Known,
        chunk: PutChunk,
        body: ByteStream,
        ev: &AuditEvent,
    ) -> Result<(PutOutcome, bool)> {
        let Known {
            scope: current,
            chunks: recorded,
        } = known;
        let range = Self::check_chunk(&current.session.value, file_id, &chunk)?;
        // Already recorded? Then this is a retry (no-op) or a conflict; the
        // stored range is never written again either way. A list the caller
        // read under this range's reservation is current for it: nobody else
        // writes the range meanwhile, and other ranges cannot overlap it.
        let recorded = match recorded {
            Some(r) => r,
            None => self.inner.sessions.chunks(id, file_id).await?,
        };
        if let Some(existing) = recorded
            .iter()
            .find(|c| c.offset == chunk.offset && c.length == chunk.length)
        {
            return Ok((self.retry_of(existing.clone(), chunk, body).await?, false));
        }
        check_no_overlap(&recorded, &range)?;
        // Without a gate here the caller holds a reservation covering this
        // range (put_range).
        let reservation = match reserve_in {
            Some(gate) => Some((
                Reservation::take(gate, file_id, range.clone())?,
                SharedReservation::take(&self.inner.sessions, id, file_id, range).await?,
            )),
            None => None,
        };
        let out = self
            .store_and_record(id, file_id, current, chunk, body, ev)
            .await;
        // Released now, whatever the outcome, so a retry of the range right
        // after finds it free (a dropped future releases in the background).
        if let Some((local, shared)) = reservation {
            drop(local);
            shared.release().await;
        }
        out
    }

    /// Store a reserved chunk, record it and keep the session alive. When
    /// the session store appends to the audit sink's own trail (one
    /// database, see [`SessionStore::record_chunk_audited`]), the chunk's
    /// record and its audit record `ev` commit in one transaction and the
    /// answer says `true`: one sync per chunk instead of two.
    async fn store_and_record(
        &self,
        id: SessionId,
        file_id: FileId,
        current: FileScope,
        chunk: PutChunk,
        body: ByteStream,
        ev: &AuditEvent,
    ) -> Result<(PutOutcome, bool)> {
        let key = FileKey {
            session: id,
            file: file_id,
        };
        let record = self.store_chunk(key, chunk, body).await?;
        let sessions = &self.inner.sessions;
        let joint = self.audit_joins_state();
        let insert = if joint {
            sessions
                .record_chunk_audited(id, file_id, &record, ev)
                .await?
        } else {
            sessions.record_chunk(id, file_id, &record).await?
        };
        match insert {
            ChunkInsert::Inserted => {}
            ChunkInsert::Existing(other)
                if other.sha256 == record.sha256 && other.length == record.length =>
            {
                return Ok((PutOutcome::AlreadyStored { chunk: other }, false));
            }
            ChunkInsert::Existing(_) => {
                return Err(Error::conflict(
                    "RELAY_CHUNK_CONFLICT",
                    "another chunk was recorded at this offset",
                ));
            }
        }
        // A failure here refuses the request (audited as such); the chunk
        // stays recorded and, with `joint`, so does its success record:
        // both are true, the chunk is durable and acknowledged on retry.
        self.keep_alive(id, file_id, current).await?;
        Ok((PutOutcome::Stored { chunk: record }, joint))
    }

    /// Whether [`ingest_first_file`](Self::ingest_first_file) creates its
    /// session in the file's own write (the audit trail is in the state
    /// database); else it creates the session first, and a caller that can
    /// overlap that creation with receiving the file should call
    /// [`create_session`](Self::create_session) itself.
    pub fn creates_session_with_first_file(&self) -> bool {
        self.audit_joins_state()
    }

    /// Whether the session store appends to the audit sink's own trail
    /// (one database): a step's state and its audit records then commit in
    /// one transaction.
    pub(crate) fn audit_joins_state(&self) -> bool {
        matches!(
            (self.inner.audit.trail_key(), self.inner.sessions.audit_trail_key()),
            (Some(a), Some(b)) if a == b
        )
    }

    /// The file of an open session that still takes bytes.
    fn uploading_file(rec: &SessionRecord, file_id: FileId) -> Result<&FileRecord> {
        Self::require_open(rec)?;
        let file = rec
            .files
            .get(&file_id)
            .ok_or(Error::NotFound { what: "file" })?;
        if !matches!(file.state, FileState::Uploading) {
            return Err(Error::conflict(
                "RELAY_FILE_COMPLETE",
                "the file is already complete",
            ));
        }
        Ok(file)
    }

    /// The chunk rules that need no I/O: the session is open, the file is
    /// uploading, the range lies in the file and its length is within the
    /// session's limits (only the last chunk may be shorter than the
    /// minimum). Returns the chunk's byte range.
    fn check_chunk(rec: &SessionRecord, file_id: FileId, chunk: &PutChunk) -> Result<Range<u64>> {
        let file = Self::uploading_file(rec, file_id)?;
        let limits = &rec.limits;
        let end = chunk
            .offset
            .checked_add(chunk.length)
            .filter(|e| *e <= file.size)
            .ok_or_else(|| {
                Error::invalid(
                    "RELAY_BAD_RANGE",
                    format!("chunk range exceeds the declared file size {}", file.size),
                )
            })?;
        if chunk.length == 0 {
            return Err(Error::invalid(
                "RELAY_BAD_RANGE",
                "chunk length must be at least 1",
            ));
        }
        if chunk.length > limits.max_chunk_size {
            return Err(Error::LimitExceeded {
                what: "chunk size",
                limit: limits.max_chunk_size,
                actual: chunk.length,
            });
        }
        if chunk.length < limits.min_chunk_size && end != file.size {
            return Err(Error::invalid(
                "RELAY_CHUNK_TOO_SMALL",
                format!(
                    "only the last chunk may be smaller than {} bytes",
                    limits.min_chunk_size
                ),
            ));
        }
        Ok(chunk.offset..end)
    }

    /// Stream the body into the chunk store, verified against the declared
    /// length and digest on the way; the record of the durable chunk.
    ///
    /// This is the one SHA-256 pass over a chunk's bytes before they are
    /// stored, and it is needed: its digest is what the chunk is recorded
    /// and acknowledged with, and it checks a declared digest. It proves
    /// the bytes received, not the bytes stored; `complete_file` reads the
    /// stored bytes back and proves them against it.
    async fn store_chunk(
        &self,
        key: FileKey,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<ChunkRecord> {
        self.store_verified(key, chunk, body, false)
            .await
            .map(|(c, _)| c)
    }

    /// [`store_chunk`](Self::store_chunk); with `new_file`, the chunk is a
    /// whole new file (`0..size`), created and stored by one
    /// [`ChunkStore::put_file_syncing`], and returned with what the
    /// pipeline holds of it ([`Written`]): the file is durable (and may be
    /// recorded) only once its sync resolves.
    async fn store_verified(
        &self,
        key: FileKey,
        chunk: PutChunk,
        body: ByteStream,
        new_file: bool,
    ) -> Result<(ChunkRecord, Option<Written>)> {
        let (verifying, slot) =
            VerifyingStream::new(body, chunk.offset, chunk.length, chunk.sha256);
        let placement = ChunkPlacement {
            offset: chunk.offset,
            length: chunk.length,
        };
        let (receipt, written) = if new_file {
            // A file the read-back proves on one thread: the verified
            // buffers the store took are kept (shared, not copied), so
            // that the read-back compares the stored bytes with them
            // instead of hashing them again (see `read_back_small`).
            let kept =
                (chunk.length <= ONE_THREAD_READ_BACK).then(|| Arc::new(Mutex::new(Vec::new())));
            let body: ByteStream = match &kept {
                Some(kept) => {
                    let kept = kept.clone();
                    Box::pin(verifying.inspect(move |item| {
                        if let Ok(b) = item {
                            lock(&kept).push(b.clone());
                        }
                    }))
                }
                None => Box::pin(verifying),
            };
            let (r, syncing) = self
                .inner
                .chunks
                .put_file_syncing(key, chunk.length, body)
                .await?;
            let received = kept.map(|k| std::mem::take(&mut *lock(&k)));
            (r, Some(Written { syncing, received }))
        } else {
            let r = self
                .inner
                .chunks
                .put_chunk(key, placement, Box::pin(verifying))
                .await?;
            (r, None)
        };
        let sha256 = slot.get().ok_or_else(|| {
            Error::storage(
                crate::error::StorageErrorKind::Io,
                "put chunk",
                format!(
                    "{} returned before consuming the whole chunk body",
                    self.inner.chunks
                ),
            )
        })?;
        let record = ChunkRecord {
            offset: chunk.offset,
            length: chunk.length,
            sha256,
            receipt,
        };
        Ok((record, written))
    }

    /// Keep the session's activity time fresh for expiry: at most once a
    /// minute (one extra durable write per minute of upload), and at least
    /// four times per TTL, so a short TTL never expires a session that
    /// receives chunks.
    async fn keep_alive(&self, id: SessionId, file: FileId, current: FileScope) -> Result<()> {
        let rec = &current.session.value;
        let every = (rec.limits.session_ttl_secs / 4).min(60);
        let idle = (OffsetDateTime::now_utc() - rec.updated_at).whole_seconds();
        if idle >= 0 && idle as u64 >= every {
            self.update_scoped(id, Some(file), current, |_, _| Ok(()))
                .await?;
        }
        Ok(())
    }

    /// A chunk for an already-recorded range: identical bytes are a no-op,
    /// other bytes a conflict. The body is only read (to compare) when no
    /// digest was declared.
    async fn retry_of(
        &self,
        existing: ChunkRecord,
        chunk: PutChunk,
        body: ByteStream,
    ) -> Result<PutOutcome> {
        let same = match chunk.sha256 {
            Some(d) => d == existing.sha256,
            None => {
                let (mut s, slot) = VerifyingStream::new(body, chunk.offset, chunk.length, None);
                while let Some(item) = s.next().await {
                    item?;
                }
                slot.get() == Some(existing.sha256)
            }
        };
        if same {
            Ok(PutOutcome::AlreadyStored { chunk: existing })
        } else {
            Err(Error::conflict(
                "RELAY_CHUNK_CONFLICT",
                format!(
                    "a different chunk is already stored at offset {}",
                    existing.offset
                ),
            ))
        }
    }

    /// Store a client's streamed range of a file: `range.length` bytes of
    /// `body` at `range.offset`, under **one** reservation of the whole
    /// range (so a second writer of an overlapping range of the same file
    /// is refused while this one runs), cut into durable segments by
    /// [`plan_segments`] (of `range.segment_size`; a tail shorter than the
    /// session's smallest chunk joins the previous segment; with a declared
    /// `range.sha256` the whole range is one chunk). Each segment streams
    /// from `body` (nothing is gathered in memory) through the same
    /// verification, durable record and audit as
    /// [`put_chunk`](Self::put_chunk), and `progress` is called with the
    /// new end and the file's declared size after each durable segment. A
    /// segment already stored with the same bytes is a no-op. Returns the
    /// end of the range, the file's size and the session's expiry as read
    /// before the write (writes only push it later).
    ///
    /// The body must hold exactly `range.length` bytes: the last segment
    /// reads to the body's end, so an error the body yields after its last
    /// byte (a trailing checksum that does not match, say) fails that
    /// segment and leaves it unstored.
    ///
    /// # Errors
    /// [`Error::Busy`] when another request is writing an overlapping range
    /// of the file; `RELAY_BAD_RANGE` for an empty range or one past the
    /// file's declared size (with `range.continues`, checked after the
    /// offset, so a PATCH from a stale offset gets tus's 409
    /// `RELAY_OFFSET_MISMATCH` first); the session and file rules and
    /// errors of [`put_chunk`](Self::put_chunk) for each segment; a body shorter or
    /// longer than `range.length` fails with `RELAY_CHUNK_LENGTH_MISMATCH`;
    /// an error of the body itself is returned as it is. On any error the
    /// segments before the failing one stay durable and recorded (their
    /// `progress` calls were made); the failing one is not recorded.
    ///
    /// # Cancellation
    /// Dropping the future drops the reservation and the body. Segments
    /// already recorded stay; the segment in flight is not recorded (the
    /// chunk store's contract leaves no partial chunk visible), so a retry
    /// resumes at the last `progress` value.
    pub async fn put_range(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        range: RangeWrite,
        body: ByteStream,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<RangeDone> {
        let mut ev = Self::event(
            actor,
            AuditAction::ChunkStored,
            AuditOutcome::Success,
            Some(id),
        );
        ev.file = Some(file);
        ev.detail = format!("offset={} length={}", range.offset, range.length);
        let gate = self.gate(id);
        // The gate (read) from before the scope is read until the first
        // segment is recorded, so that segment can use this scope and chunk
        // list instead of reading them again (a session-wide change such as
        // completion or abort takes the gate to write and waits).
        let guard = gate.rw.read().await;
        let current = self
            .load_scope_owned_as(actor, id, Some(file), Access::file("put_range", file))
            .await?;
        let expires_at = session_expiry(&current.session.value);
        // tus answers a stale offset before a body that would not fit: with
        // `continues`, the fit is checked once the offset is known right.
        let (size, plan) =
            match Self::plan_range(&current.session.value, file, &range, !range.continues) {
                Ok(p) => p,
                Err(e) => return self.refuse(ev, e).await,
            };
        let end = range.offset.saturating_add(range.length);
        let _reservation = match Reservation::take(&gate, file, range.offset..end) {
            Ok(r) => r,
            Err(e) => return self.refuse(ev, e).await,
        };
        let shared = match SharedReservation::take(
            &self.inner.sessions,
            id,
            file,
            range.offset..end,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return self.refuse(ev, e).await,
        };
        let mut chunks = None;
        if range.continues {
            // Under the reservation: whoever held the range before us has
            // recorded what it wrote.
            let stored = match self.inner.sessions.chunks(id, file).await {
                Ok(c) => {
                    let end = contiguous_end(&c);
                    chunks = Some(c);
                    end
                }
                Err(e) => {
                    shared.release().await;
                    return self.refuse(ev, e).await;
                }
            };
            if stored != range.offset {
                shared.release().await;
                let e = Error::conflict(
                    "RELAY_OFFSET_MISMATCH",
                    format!(
                        "the range starts at {}, the upload's stored bytes end at {stored}",
                        range.offset
                    ),
                );
                return self.refuse(ev, e).await;
            }
            if let Err(e) = Self::range_fits(&range, size) {
                shared.release().await;
                return self.refuse(ev, e).await;
            }
        }
        let src = Arc::new(tokio::sync::Mutex::new(RangeSource {
            stream: body,
            leftover: bytes::Bytes::new(),
        }));
        let segments = plan.len();
        let mut written = Ok(end);
        let mut first = Some(Box::new(Prefetched {
            gate: guard,
            known: Known {
                scope: current,
                chunks,
            },
        }));
        for (i, (offset, length)) in plan.into_iter().enumerate() {
            let last = (i + 1 == segments).then_some(end);
            let chunk = PutChunk {
                offset,
                length,
                sha256: range.sha256,
            };
            let body = segment_body(src.clone(), length, last);
            if let Err(e) = self
                .put_chunk_audited(actor, id, file, chunk, body, Reserve::Held(first.take()))
                .await
            {
                written = Err(e);
                break;
            }
            progress(offset + length, size);
        }
        // Released now, whatever the outcome, so a retry right after finds
        // the range free (a dropped future releases in the background).
        shared.release().await;
        written.map(|end| RangeDone {
            end,
            size,
            expires_at,
        })
    }

    /// The rules of a range that need no I/O (the session is open, the
    /// file uploading, the range non-empty and inside the file): the
    /// file's declared size and the range's segments; each segment then
    /// meets the chunk rules. With `check_fit`, also that the range lies
    /// inside the file; without, [`range_fits`](Self::range_fits) must be
    /// called before a byte is written.
    fn plan_range(
        rec: &SessionRecord,
        file_id: FileId,
        range: &RangeWrite,
        check_fit: bool,
    ) -> Result<(u64, Vec<(u64, u64)>)> {
        let size = Self::uploading_file(rec, file_id)?.size;
        if range.length == 0 {
            return Err(Error::invalid(
                "RELAY_BAD_RANGE",
                "range length must be at least 1",
            ));
        }
        if check_fit {
            Self::range_fits(range, size)?;
        }
        let segments = if range.sha256.is_some() {
            vec![(range.offset, range.length)]
        } else {
            plan_segments(
                range.offset,
                range.length,
                range.segment_size,
                rec.limits.min_chunk_size,
            )
        };
        Ok((size, segments))
    }

    /// The range ends inside a file of declared `size` (`RELAY_BAD_RANGE`
    /// otherwise).
    fn range_fits(range: &RangeWrite, size: u64) -> Result<()> {
        range
            .offset
            .checked_add(range.length)
            .filter(|e| *e <= size)
            .map(|_| ())
            .ok_or_else(|| {
                Error::invalid(
                    "RELAY_BAD_RANGE",
                    format!("range exceeds the declared file size {size}"),
                )
            })
    }

    /// Put a whole declared file through the chunk rules and complete it:
    /// `bytes` (exactly the file's declared size) is cut into chunks of
    /// [`INGEST_CHUNK_SIZE`] (at most the session's largest chunk), each
    /// put as [`put_chunk`](Self::put_chunk) does for a client's chunk
    /// (range reservation, SHA-256 computed on the way and recorded,
    /// durable record, audit); then
    /// [`complete_file`](Self::complete_file) verifies and validates the
    /// file. A chunk already stored with the same bytes is a no-op, so a
    /// repeated call resumes where an earlier one stopped.
    ///
    /// # Errors
    /// Those of [`put_chunk`](Self::put_chunk) and
    /// [`complete_file`](Self::complete_file) (a file refused for its
    /// content has left its session: [`Error::FileRefused`]); a stream
    /// shorter or longer than the declared size fails with
    /// `RELAY_CHUNK_LENGTH_MISMATCH`, and an error of the stream itself is
    /// returned as it is.
    pub async fn ingest_stream(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        bytes: ByteStream,
    ) -> Result<FileRecord> {
        self.ingest_stream_chunked(actor, id, file, INGEST_CHUNK_SIZE, bytes)
            .await
    }

    /// [`ingest_stream`](Self::ingest_stream) with chunks of `chunk_size`
    /// bytes (at most the session's largest chunk; a size below the
    /// session's smallest chunk is refused by the chunk rules).
    ///
    /// # Errors
    /// As [`ingest_stream`](Self::ingest_stream).
    pub async fn ingest_stream_chunked(
        &self,
        actor: &Actor,
        id: SessionId,
        file: FileId,
        chunk_size: u64,
        bytes: ByteStream,
    ) -> Result<FileRecord> {
        let current = self
            .load_scope_owned_as(actor, id, Some(file), Access::session("access"))
            .await?
            .session
            .value;
        let size = current
            .files
            .get(&file)
            .ok_or(Error::NotFound { what: "file" })?
            .size;
        let chunk_size = chunk_size.min(current.limits.max_chunk_size).max(1);
        let mut reader = ChunkReader {
            stream: bytes,
            leftover: bytes::Bytes::new(),
        };
        let mut offset = 0u64;
        while offset < size {
            let length = chunk_size.min(size - offset);
            let data = reader.take(offset, length).await?;
            // No digest is computed here: `put_chunk`'s verifying stream
            // hashes the bytes once on their way to the store and records
            // that digest (a digest computed here first would be a second
            // pass over the same bytes, checked against itself). A declared
            // whole-file digest is checked by `complete_file`, as before.
            let spec = PutChunk {
                offset,
                length,
                sha256: None,
            };
            self.put_chunk(actor, id, file, spec, crate::digest::bytes_stream(data))
                .await?;
            offset += length;
        }
        reader.expect_end(size).await?;
        self.complete_file(actor, id, file).await
    }

    /// Declare, store, verify and validate a whole file of one chunk (at
    /// most the session's largest chunk) in one step: what
    /// [`add_file`](Self::add_file), [`ingest_stream`](Self::ingest_stream)
    /// and [`complete_file`](Self::complete_file) do, under the same rules
    /// (limits, verification, the index of accepted instances, one file
    /// per SOP Instance UID and study per session), with one write of the
    /// session state instead of three and the file's three audit records
    /// (added, chunk stored, completed) appended together.
    ///
    /// The file enters the session only once it is proven and valid: its
    /// bytes are made durable first (a new chunk area, nobody else can
    /// know its id), then the file, its chunk record and its valid state
    /// are one write ([`SessionStore::update_file_scope_with_chunks`]);
    /// its audit records are durable before this returns. A crash before
    /// that write leaves an unrecorded chunk area, removed by the orphan
    /// sweep or with its session.
    ///
    /// # Errors
    /// Those of the three calls it stands for. On any error the file is
    /// not in the session (its bytes are removed), so there is nothing to
    /// remove; a file refused for its content is [`Error::FileRefused`].
    pub async fn ingest_file(
        &self,
        actor: &Actor,
        id: SessionId,
        req: NewFile,
        bytes: ByteStream,
    ) -> Result<FileRecord> {
        self.ingest_file_inner(actor, id, req, bytes, false, None)
            .await
            .map(|(f, _)| f)
    }

    /// [`ingest_file`](Self::ingest_file), and when the file is its
    /// session's only one, the same write completes the session (as
    /// [`complete_session`](Self::complete_session) would next: the
    /// session enters the outbox, its "queued" audit record with the
    /// file's). For a request that carries a whole study of one instance
    /// (a one-part STOW-RS request): one write of the session state and
    /// one sync instead of two each. Returns the file and whether the
    /// session was queued; when it was not (the session holds other
    /// files), complete it with `complete_session` once they are done.
    ///
    /// # Errors
    /// Those of `ingest_file`; on an error the session is not queued.
    pub async fn ingest_file_and_queue(
        &self,
        actor: &Actor,
        id: SessionId,
        req: NewFile,
        bytes: ByteStream,
    ) -> Result<(FileRecord, bool)> {
        self.ingest_file_inner(actor, id, req, bytes, true, None)
            .await
    }

    /// A new session and its first file, as
    /// [`create_session`](Self::create_session) then
    /// [`ingest_file`](Self::ingest_file) (with `queue`,
    /// [`ingest_file_and_queue`](Self::ingest_file_and_queue)) do, for a
    /// request that brings its own session (a STOW-RS request). With the
    /// audit trail in the state database, the file's write also creates
    /// the session (capped as `create_session` caps it, its creation's
    /// audit record first): one write and one sync instead of two. When
    /// the file does not enter the session (refused, or failed), the
    /// session is written on its own before that is recorded, so the two
    /// calls' results hold either way.
    ///
    /// Returns the session's id and the file's result.
    ///
    /// # Errors
    /// Those of `create_session`, when the session was not created: then
    /// nothing of it or of the file is kept.
    pub async fn ingest_first_file(
        &self,
        actor: &Actor,
        req: NewSession,
        file: NewFile,
        bytes: ByteStream,
        queue: bool,
    ) -> Result<(SessionId, Result<(FileRecord, bool)>)> {
        if !self.audit_joins_state() {
            let s = self.create_session(actor, req).await?;
            let r = self
                .ingest_file_inner(actor, s.id, file, bytes, queue, None)
                .await;
            return Ok((s.id, r));
        }
        let pending = self.defer_session(actor, req).await?;
        let id = pending.rec.id;
        let r = self
            .ingest_file_inner(actor, id, file, bytes, queue, Some(&pending))
            .await;
        if pending.written() {
            return Ok((id, r));
        }
        // Not created (at the cap, or the store failed): the file's error is
        // the session's, and the session's chunk area goes (its file's went
        // already; were this to fail, the orphan sweep removes it later).
        if let Err(e) = self.inner.chunks.delete_session(id).await {
            tracing::warn!(session = %id, error = %e, "an unwritten session's chunk area left for the sweep");
        }
        Err(match r {
            Err(e) => e,
            Ok(_) => Error::storage(
                crate::error::StorageErrorKind::Io,
                "create session",
                "the file was recorded but its session was not written",
            ),
        })
    }

    #[allow(clippy::too_many_arguments)] // private; each argument is one step's input
    async fn ingest_file_inner(
        &self,
        actor: &Actor,
        id: SessionId,
        req: NewFile,
        bytes: ByteStream,
        queue: bool,
        pending: Option<&PendingSession>,
    ) -> Result<(FileRecord, bool)> {
        let gate = self.gate(id);
        let _g = gate.rw.read().await;
        let joint = self.audit_joins_state();
        let (current, pending) = match pending {
            // Not written yet: version 0, written by the file's write.
            Some(p) if joint => (
                FileScope::of(
                    Versioned {
                        value: p.rec.clone(),
                        version: 0,
                    },
                    None,
                ),
                Some(p),
            ),
            // Only a joint write creates a session with its file.
            Some(p) => (FileScope::of(self.write_session(p).await?, None), None),
            // A request-scoped session this process just created starts
            // from its record as written (one read fewer on a STOW-RS
            // request's path); the file's write is conditional on its
            // version, and reloads if it moved on.
            None => match self.take_fresh(id) {
                Some(v) if Self::check_owner(actor, &v.value).is_ok() => {
                    (FileScope::of(v, None), None)
                }
                _ => (
                    self.load_scope_owned_as(actor, id, None, Access::session("add_file"))
                        .await?,
                    None,
                ),
            },
        };
        // A file that does not enter a session not written yet: the
        // session is written on its own before that is recorded.
        let settle = || async {
            match pending {
                Some(p) => self.write_session(p).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let mut added = Self::event(
            actor,
            AuditAction::FileAdded,
            AuditOutcome::Success,
            Some(id),
        );
        let file = match Self::new_file_record(&current.session.value, req).and_then(|f| {
            let max = current.session.value.limits.max_chunk_size;
            if f.size > max {
                return Err(Error::LimitExceeded {
                    what: "chunk size",
                    limit: max,
                    actual: f.size,
                });
            }
            // The session's totals, checked again by the write.
            Self::admit_file(&mut current.session.value.clone(), &current, &f)?;
            Ok(f)
        }) {
            Ok(f) => f,
            Err(e) => {
                settle().await?;
                return self.refuse(added, e).await;
            }
        };
        added.file = Some(file.id);
        added.detail = format!("size={}", file.size);
        let mut stored = Self::event(
            actor,
            AuditAction::ChunkStored,
            AuditOutcome::Success,
            Some(id),
        );
        stored.file = Some(file.id);
        stored.detail = format!("offset=0 length={}", file.size);
        let key = FileKey {
            session: id,
            file: file.id,
        };
        let spec = PutChunk {
            offset: 0,
            length: file.size,
            sha256: None,
        };
        // Written here; durable (the new file's name, size and bytes) once
        // its sync resolves, which prove_and_record awaits after the
        // read-back and validation (they run while the disk syncs) and
        // before anything records the file.
        let (chunk, written) = match self.store_verified(key, spec, bytes, true).await {
            Ok(c) => c,
            Err(e) => {
                self.discard_area(key).await;
                settle().await?;
                Self::failed(&mut stored, &e);
                self.audit_all(&[added, stored]).await?;
                return Err(e);
            }
        };
        let mut done = Self::event(
            actor,
            AuditAction::FileCompleted,
            AuditOutcome::Success,
            Some(id),
        );
        done.file = Some(file.id);
        let owner = current.session.value.owner.clone();
        // With the audit trail in the state database, the three records
        // commit in the file's own write (one sync instead of two).
        let before = if joint {
            vec![added.clone(), stored.clone()]
        } else {
            Vec::new()
        };
        let plan = joint.then_some(AuditPlan {
            before: &before,
            done: &done,
        });
        let queued_template = queue.then(|| {
            Self::event(
                actor,
                AuditAction::ForwardStarted,
                AuditOutcome::Success,
                Some(id),
            )
        });
        match self
            .prove_and_record(
                id,
                &file,
                std::slice::from_ref(&chunk),
                current,
                true,
                plan,
                queued_template.as_ref(),
                pending,
                written,
            )
            .await
        {
            Ok(recorded) => {
                let f = recorded.file;
                let queued = recorded.queued.is_some();
                if !joint {
                    Self::describe_valid(&mut done, &f);
                    let mut events = vec![added, stored, done];
                    events.extend(recorded.queued);
                    self.audit_all(&events).await?;
                }
                if queued {
                    self.inner.index.closed(id);
                    self.wake_outbox(id);
                }
                Ok((f, queued))
            }
            Err((err, known)) => {
                self.discard_area(key).await;
                settle().await?;
                let uid = |v: &Option<String>| v.as_deref().and_then(|v| Uid::parse(v).ok());
                let err = if super::completion::refuses_content(&err) {
                    // The file never entered its session: its analytics
                    // fact is the refusal's one write, and the refusal is
                    // reported only once the fact is durable (else the
                    // store's error is, and the client's retry refuses
                    // again).
                    let fact = Self::refused_fact(id, &owner, file.id, file.size, &err);
                    match self.inner.sessions.record_upload_fact(&fact).await {
                        Ok(()) => {
                            done.study = uid(&known.study_instance_uid);
                            done.patient_id = known.patient_id.clone();
                            Error::FileRefused {
                                sop_class_uid: uid(&known.sop_class_uid),
                                sop_instance_uid: uid(&known.sop_instance_uid),
                                source: Box::new(err),
                            }
                        }
                        Err(e) => e,
                    }
                } else {
                    err
                };
                Self::failed(&mut done, &err);
                self.audit_all(&[added, stored, done]).await?;
                Err(err)
            }
        }
    }

    /// The chunk area of a file that never entered its session; were this
    /// to fail, the orphan sweep removes it later.
    async fn discard_area(&self, key: FileKey) {
        if let Err(e) = self.inner.chunks.delete_file(key).await {
            tracing::warn!(session = %key.session, error = %e, "an unrecorded file's chunks left for the sweep");
        }
    }

    /// What the audit record of a completed file names (as
    /// [`complete_file`](Self::complete_file) records it).
    pub(super) fn describe_valid(event: &mut AuditEvent, f: &FileRecord) {
        if let FileState::Valid { dicom } = &f.state {
            event.study = Some(dicom.study_instance_uid.clone());
            event.patient_id = Some(dicom.patient_id.clone());
            event.detail = format!(
                "sop_instance_uid={} sha256={}",
                dicom.sop_instance_uid,
                f.sha256.map(|d| d.to_hex()).unwrap_or_default()
            );
            if !dicom.warnings.is_empty() {
                event
                    .detail
                    .push_str(&format!(" warnings={}", dicom.warnings.join("; ")));
            }
        }
    }

    /// Mark `event` as the failure `err` (as [`refuse`](Self::refuse) does).
    fn failed(event: &mut AuditEvent, err: &Error) {
        event.outcome = match err.kind() {
            ErrorKind::Storage
            | ErrorKind::InsufficientStorage
            | ErrorKind::Pacs
            | ErrorKind::Audit => AuditOutcome::SeriousFailure,
            _ => AuditOutcome::MinorFailure,
        };
        event.detail = format!("{}: {}", err.code(), err);
    }

    /// Record several audit events together (one commit where the trail
    /// groups them); a failure refuses the action (fail closed).
    pub(crate) async fn audit_all(&self, events: &[AuditEvent]) -> Result<()> {
        self.inner
            .audit
            .record_all(events)
            .await
            .map_err(|e| Error::Audit {
                source: Box::new(e),
            })
    }
}
