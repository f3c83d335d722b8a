//! UP-2, SQLite style: the k-th storage call of an upload fails (EIO,
//! ENOSPC, or a short write), for every k. The failing request must report
//! a storage error, nothing unacknowledged may be recorded, every chunk
//! acknowledged before stays verified, the failure is audited, and a retry
//! once the fault is gone completes the file byte-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use relaypacs_core::testing::collect;
use relaypacs_core::{
    AuditOutcome, AuditSink, ByteStream, ChunkInsert, ChunkPlacement, ChunkRecord, ChunkStore,
    Error, ErrorKind, FileId, FileKey, InstanceClaim, NewFile, Pipeline, PipelineConfig, Result,
    SessionId, SessionRecord, SessionStore, Sha256Digest, Uid, Versioned,
};
use relaypacs_integration::{Embedded, dicom_of_size, new_study, put};

#[derive(Debug, Clone, Copy)]
enum Fault {
    Eio,
    Enospc,
    ShortWrite,
}

#[derive(Debug)]
struct Faults {
    calls: AtomicU64,
    fail_at: AtomicU64,
    fault: Fault,
}

impl Faults {
    /// Count a call; fail it if it is the k-th.
    fn hit(&self, op: &'static str) -> Result<bool> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.fail_at.load(Ordering::SeqCst) {
            return Ok(false);
        }
        match self.fault {
            Fault::Eio => Err(Error::io(op, std::io::Error::from_raw_os_error(5))),
            Fault::Enospc => Err(Error::io(op, std::io::Error::from_raw_os_error(28))),
            Fault::ShortWrite => Ok(true),
        }
    }
}

#[derive(Debug)]
struct FaultyChunks(Arc<dyn ChunkStore>, Arc<Faults>);
#[derive(Debug)]
struct FaultySessions(Arc<dyn SessionStore>, Arc<Faults>);

impl fmt::Display for FaultyChunks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.0)
    }
}
impl fmt::Display for FaultySessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "faulty({})", self.0)
    }
}

#[async_trait]
impl ChunkStore for FaultyChunks {
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
        if self.1.hit("create file")? {
            return Err(Error::io(
                "create file",
                std::io::Error::from_raw_os_error(5),
            ));
        }
        self.0.create_file(key, size).await
    }
    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String> {
        if self.1.hit("write chunk")? {
            // A short write: half the bytes reach the disk, then the device fails.
            let half = placement.length / 2;
            let mut seen = 0u64;
            let cut = body
                .take_while(move |item| {
                    let keep = seen < half;
                    if let Ok(b) = item {
                        seen += b.len() as u64;
                    }
                    futures::future::ready(keep)
                })
                .chain(futures::stream::once(async {
                    Err(Error::io(
                        "write chunk",
                        std::io::Error::from_raw_os_error(5),
                    ))
                }))
                .boxed();
            return self.0.put_chunk(key, placement, cut).await;
        }
        self.0.put_chunk(key, placement, body).await
    }
    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        self.1.hit("seal file")?;
        self.0.seal_file(key, size, chunks).await
    }
    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        self.1.hit("read file")?;
        self.0.read(key, range).await
    }
    async fn delete_file(&self, key: FileKey) -> Result<()> {
        self.0.delete_file(key).await
    }
    async fn delete_session(&self, s: SessionId) -> Result<()> {
        self.0.delete_session(s).await
    }
}

#[async_trait]
impl SessionStore for FaultySessions {
    async fn create_session(&self, s: &SessionRecord) -> Result<Versioned<SessionRecord>> {
        self.1.hit("create session")?;
        self.0.create_session(s).await
    }
    async fn load_session(&self, id: SessionId) -> Result<Versioned<SessionRecord>> {
        self.0.load_session(id).await
    }
    async fn update_session(&self, s: &SessionRecord, expected: u64) -> Result<u64> {
        self.1.hit("update session")?;
        self.0.update_session(s, expected).await
    }
    async fn delete_session(&self, id: SessionId, expected: u64) -> Result<()> {
        self.0.delete_session(id, expected).await
    }
    async fn list_sessions(&self) -> Result<Vec<SessionId>> {
        self.0.list_sessions().await
    }
    async fn record_chunk(
        &self,
        id: SessionId,
        file: FileId,
        c: &ChunkRecord,
    ) -> Result<ChunkInsert> {
        self.1.hit("record chunk")?;
        self.0.record_chunk(id, file, c).await
    }
    async fn chunks(&self, id: SessionId, file: FileId) -> Result<Vec<ChunkRecord>> {
        self.0.chunks(id, file).await
    }
    async fn delete_chunks(&self, id: SessionId, file: FileId) -> Result<()> {
        self.0.delete_chunks(id, file).await
    }
    async fn claim_instance(&self, c: &InstanceClaim) -> Result<InstanceClaim> {
        self.1.hit("claim instance")?;
        self.0.claim_instance(c).await
    }
    async fn instance_claim(&self, sop: &Uid) -> Result<Option<InstanceClaim>> {
        self.0.instance_claim(sop).await
    }
    async fn release_instance(&self, sop: &Uid, id: SessionId, file: FileId) -> Result<()> {
        self.0.release_instance(sop, id, file).await
    }
}

const CHUNK: usize = 64 << 10;

/// Runs the upload; returns the first error, or None if it completed.
async fn attempt(
    p: &Pipeline,
    data: &[u8],
    state: &mut (Option<SessionId>, Option<FileId>),
    acked: &mut Vec<u64>,
) -> Option<Error> {
    let a = relaypacs_core::Actor::user("alice");
    let s = match state.0 {
        Some(s) => s,
        None => match p.create_session(&a, Default::default()).await {
            Ok(r) => *state.0.insert(r.id),
            Err(e) => return Some(e),
        },
    };
    let f = match state.1 {
        Some(f) => f,
        None => match p
            .add_file(
                &a,
                s,
                NewFile {
                    name: "f".into(),
                    size: data.len() as u64,
                    sha256: Some(Sha256Digest::of(data)),
                },
            )
            .await
        {
            Ok(r) => *state.1.insert(r.id),
            Err(e) => return Some(e),
        },
    };
    for (i, c) in data.chunks(CHUNK).enumerate() {
        let off = (i * CHUNK) as u64;
        if acked.contains(&off) {
            continue;
        }
        match put(p, &a, s, f, off, c).await {
            Ok(_) => acked.push(off),
            Err(e) => return Some(e),
        }
    }
    p.complete_file(&a, s, f).await.err()
}

async fn run_with_fault(fault: Fault, k: u64, data: &[u8]) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default()).unwrap();
    let faults = Arc::new(Faults {
        calls: AtomicU64::new(0),
        fail_at: AtomicU64::new(k),
        fault,
    });
    let p = Pipeline::new(
        Arc::new(FaultyChunks(Arc::new(e.chunks.clone()), faults.clone())),
        Arc::new(FaultySessions(Arc::new(e.sessions.clone()), faults.clone())),
        Arc::new(e.archive.clone()),
        Arc::new(e.audit.clone()),
        PipelineConfig::default(),
    );
    let mut state = (None, None);
    let mut acked = Vec::new();
    let err = attempt(&p, data, &mut state, &mut acked).await;
    let calls = faults.calls.load(Ordering::SeqCst);
    if let Some(err) = err {
        // The injected failure surfaces as a storage error, never as success.
        let want = match fault {
            Fault::Enospc => ErrorKind::InsufficientStorage,
            _ => ErrorKind::Storage,
        };
        assert_eq!(err.kind(), want, "k={k} {fault:?}: {err:?}");
        // What was acknowledged is recorded and verified; nothing else is recorded.
        if let (Some(s), Some(f)) = state {
            let recs = e.sessions.chunks(s, f).await.unwrap();
            let mut recorded: Vec<u64> = recs.iter().map(|c| c.offset).collect();
            recorded.sort();
            let mut want_acked = acked.clone();
            want_acked.sort();
            assert_eq!(
                recorded, want_acked,
                "k={k} {fault:?}: recorded chunks differ from acknowledged ones"
            );
            for c in &recs {
                let b = collect(
                    e.chunks
                        .read(
                            FileKey {
                                session: s,
                                file: f,
                            },
                            c.offset..c.end(),
                        )
                        .await
                        .unwrap(),
                )
                .await
                .unwrap();
                assert_eq!(Sha256Digest::of(&b), c.sha256);
            }
        }
        // The failure is in the audit trail.
        let events = e.audit.events().await.unwrap();
        assert!(
            events
                .iter()
                .any(|ev| ev.outcome == AuditOutcome::SeriousFailure),
            "k={k}: failure not audited"
        );
        // Fault gone: the client retries and finishes byte-exact.
        faults.fail_at.store(0, Ordering::SeqCst);
        assert!(
            attempt(&p, data, &mut state, &mut acked).await.is_none(),
            "k={k}: retry failed"
        );
        let a = relaypacs_core::Actor::user("alice");
        let (Some(s), Some(f)) = state else {
            panic!("no session after a successful retry")
        };
        let got = collect(p.read_file(&a, s, f).await.unwrap()).await.unwrap();
        assert!(got == data, "k={k}: completed bytes differ");
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_fails_safely() {
    let data = dicom_of_size(&new_study(), 5 * CHUNK + 1000);
    let n = run_with_fault(Fault::Eio, u64::MAX, &data).await;
    assert!(n > 8, "the upload makes {n} storage calls");
    for fault in [Fault::Eio, Fault::Enospc, Fault::ShortWrite] {
        for k in 1..=n {
            run_with_fault(fault, k, &data).await;
        }
    }
}
