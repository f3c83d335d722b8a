//! UP-2, SQLite style: the k-th storage call of an upload fails (EIO,
//! ENOSPC, or a short write), for every k. The failing request must report
//! a storage error, nothing unacknowledged may be recorded, every chunk
//! acknowledged before stays verified, the failure is audited, and a retry
//! once the fault is gone completes the file byte-exact. On both state
//! engines: SQLite, and PostgreSQL (a fresh database of one cluster per
//! run).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use relaypacs_core::testing::collect;
use relaypacs_core::testing::faults::{Fault, FaultPlan, FaultyChunkStore, FaultySessionStore, Op};
use relaypacs_core::{
    AuditOutcome, AuditSink, ChunkStore, Error, ErrorKind, FileId, FileKey, NewFile, Pipeline,
    PipelineConfig, SessionId, SessionStore, Sha256Digest,
};
use relaypacs_integration::{Embedded, PgCluster, StateDb, dicom_of_size, new_study, put};

/// The storage calls an upload makes that can fail, counted together
/// across the chunk store and the session store.
pub(crate) const WATCHED: [Op; 9] = [
    Op::CreateFile,
    Op::PutChunk,
    Op::SyncFile,
    Op::SealFile,
    Op::ReadFile,
    Op::CreateSession,
    Op::UpdateSession,
    Op::RecordChunk,
    Op::ClaimInstance,
];

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

async fn run_with_fault(fault: Fault, k: u64, data: &[u8], db: &StateDb) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open_on(dir.path(), PipelineConfig::default(), db)
        .await
        .unwrap();
    let faults = FaultPlan::watching(WATCHED);
    faults.fail_nth(k, fault);
    let p = Pipeline::new(
        Arc::new(FaultyChunkStore::new(
            Arc::new(e.chunks.clone()),
            faults.clone(),
        )),
        Arc::new(FaultySessionStore::new(
            Arc::new(e.sessions.clone()),
            faults.clone(),
        )),
        Arc::new(e.archive.clone()),
        Arc::new(e.audit.clone()),
        PipelineConfig::default(),
    );
    let mut state = (None, None);
    let mut acked = Vec::new();
    let err = attempt(&p, data, &mut state, &mut acked).await;
    let calls = faults.calls();
    if let Some(err) = err {
        // The injected failure surfaces as a storage error, never as success.
        let want = match fault {
            Fault::Full => ErrorKind::InsufficientStorage,
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
        faults.heal();
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
    e.close().await;
    calls
}

/// Every fault at every storage call, each run on a database from `db`.
async fn every_failpoint(mut db: impl FnMut() -> StateDb) {
    let started = std::time::Instant::now();
    let data = dicom_of_size(&new_study(), 5 * CHUNK + 1000);
    let first = db();
    let n = run_with_fault(Fault::Io, u64::MAX, &data, &first).await;
    assert!(n > 8, "the upload makes {n} storage calls");
    let mut runs = 1;
    for fault in [Fault::Io, Fault::Full, Fault::ShortWrite] {
        for k in 1..=n {
            let state = db();
            run_with_fault(fault, k, &data, &state).await;
            runs += 1;
        }
    }
    eprintln!(
        "{}: {runs} runs ({n} storage calls x 3 faults) in {:.1} s",
        first.engine_name(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_fails_safely_on_sqlite() {
    every_failpoint(|| StateDb::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_fails_safely_on_postgres() {
    let cluster = PgCluster::start();
    every_failpoint(|| cluster.fresh_db()).await;
}
