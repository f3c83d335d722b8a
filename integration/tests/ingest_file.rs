//! `Pipeline::ingest_file`: a whole file of one chunk declared, stored,
//! proven, validated and recorded in one step (the STOW-RS path). The same
//! rules as add_file + ingest_stream + complete_file, one write of the
//! session state, and on any failure the file is not in its session and
//! its bytes are gone. On both state engines where the store matters.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use relaypacs_core::testing::faults::{Fault, FaultPlan, FaultyChunkStore, FaultySessionStore, Op};
use relaypacs_core::{
    Actor, AuditAction, AuditOutcome, AuditSink, Error, ErrorKind, FileState, Limits, NewFile,
    Pipeline, PipelineConfig, SessionId, SessionStore, Sha256Digest, bytes_stream,
};
use relaypacs_integration::{
    Embedded, PgCluster, StateDb, dicom_of_size, dicom_with_sop, new_study, open_session,
};
use relaypacs_storage::{SqlAuditSink, SqlSessionStore, verify_sql_chain};

fn new_file(data: &[u8], declared: bool) -> NewFile {
    NewFile {
        name: "part.dcm".into(),
        size: data.len() as u64,
        sha256: declared.then(|| Sha256Digest::of(data)),
    }
}

async fn ingest(
    p: &Pipeline,
    a: &Actor,
    s: SessionId,
    data: &[u8],
) -> Result<relaypacs_core::FileRecord, Error> {
    p.ingest_file(
        a,
        s,
        new_file(data, false),
        bytes_stream(bytes::Bytes::copy_from_slice(data)),
    )
    .await
}

/// `ingest_file_and_queue` of `data` in session `s`.
async fn ingest_queued(
    p: &Pipeline,
    a: &Actor,
    s: SessionId,
    data: &[u8],
) -> Result<(relaypacs_core::FileRecord, bool), Error> {
    p.ingest_file_and_queue(
        a,
        s,
        new_file(data, false),
        bytes_stream(bytes::Bytes::copy_from_slice(data)),
    )
    .await
}

/// The "queued" records of session `s` (ForwardStarted, success).
async fn queued_records(audit: &dyn AuditSink, s: SessionId) -> usize {
    audit
        .events()
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| {
            ev.session == Some(s)
                && ev.action == AuditAction::ForwardStarted
                && ev.outcome == AuditOutcome::Success
                && ev.detail.starts_with("queued")
        })
        .count()
}

/// Session `s` holds no file, and its chunk area no bytes (`what` left
/// nothing).
async fn assert_no_file(e: &Embedded, s: SessionId, what: &str) {
    let scope = e.sessions.load_session(s).await.unwrap();
    assert!(scope.value.files.is_empty(), "{what} was recorded");
    assert_eq!(stored_files(e, s), 0, "{what}'s bytes stayed");
}

/// Files of the chunk area of session `s` (data files on disk).
fn stored_files(e: &Embedded, s: SessionId) -> usize {
    match std::fs::read_dir(e.root.join("chunks").join(s.to_string())) {
        Ok(d) => d.count(),
        Err(_) => 0,
    }
}

async fn valid_file_with_its_chunk_and_three_audit_records(db: StateDb) {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &db)
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom_of_size(&new_study(), 300 << 10);
    let f = ingest(p, &a, s, &data).await.unwrap();
    let FileState::Valid { dicom } = &f.state else {
        panic!("not valid: {:?}", f.state)
    };
    assert_eq!(f.sha256, Some(Sha256Digest::of(&data)));
    // In the session, with its chunk record and the instance claimed.
    let status = p.file_status(&a, s, f.id).await.unwrap();
    assert_eq!(status.file, f);
    assert_eq!(status.offset, data.len() as u64);
    assert_eq!(status.chunks.len(), 1);
    assert_eq!(status.chunks[0].sha256, Sha256Digest::of(&data));
    let claim = e
        .sessions
        .instance_claim(&dicom.sop_instance_uid)
        .await
        .unwrap()
        .unwrap();
    assert!(claim.held_by(s, f.id));
    // The three records of the step, in order, each naming the file.
    let kinds: Vec<(AuditAction, AuditOutcome)> = e
        .audit
        .events()
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.file == Some(f.id))
        .map(|ev| (ev.action, ev.outcome))
        .collect();
    assert_eq!(
        kinds,
        [
            (AuditAction::FileAdded, AuditOutcome::Success),
            (AuditAction::ChunkStored, AuditOutcome::Success),
            (AuditAction::FileCompleted, AuditOutcome::Success),
        ]
    );
    // The session completes into the outbox and is read back whole.
    p.complete_session(&a, s).await.unwrap();
    let got = relaypacs_core::testing::collect(p.read_file(&a, s, f.id).await.unwrap())
        .await
        .unwrap();
    assert!(got == data);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_file_is_recorded_with_its_chunk_claim_and_audit_on_sqlite() {
    valid_file_with_its_chunk_and_three_audit_records(StateDb::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_file_is_recorded_with_its_chunk_claim_and_audit_on_postgres() {
    let cluster = PgCluster::start();
    valid_file_with_its_chunk_and_three_audit_records(cluster.fresh_db()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_content_leaves_no_file_and_no_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    // Not DICOM.
    let junk = vec![7u8; 4000];
    let err = ingest(p, &a, s, &junk).await.unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    // A declared whole-file digest that does not match.
    let data = dicom_of_size(&new_study(), 50 << 10);
    let mut req = new_file(&data, true);
    req.sha256 = Some(Sha256Digest::of(b"other"));
    let err = p
        .ingest_file(
            &a,
            s,
            req,
            bytes_stream(bytes::Bytes::copy_from_slice(&data)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    // A body shorter than declared: not content, still nothing kept.
    let mut short = new_file(&data, false);
    short.size += 10;
    let err = p
        .ingest_file(
            &a,
            s,
            short,
            bytes_stream(bytes::Bytes::copy_from_slice(&data)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert_no_file(&e, s, "a refused file").await;
    // Each refusal is audited as a failed completion or chunk.
    let failed = e
        .audit
        .events()
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.outcome != AuditOutcome::Success)
        .count();
    assert_eq!(failed, 3);
    // The session still takes a good file.
    ingest(p, &a, s, &data).await.unwrap();
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_rules_hold_duplicates_study_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        limits: Limits {
            max_files: 2,
            ..Limits::default()
        },
        ..PipelineConfig::default()
    };
    let e = Embedded::open(dir.path(), config).await.unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let study = new_study();
    let sop = relaypacs_core::testing::dicom_gen::new_uid();
    let one = dicom_with_sop(&study, &sop, 1, 64);
    let first = ingest(p, &a, s, &one).await.unwrap();
    // The same instance again in the same session: refused, the first kept.
    let err = ingest(p, &a, s, &one).await.unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    let claim = e
        .sessions
        .instance_claim(&relaypacs_core::Uid::parse(&sop).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(claim.held_by(s, first.id), "the claim left the first file");
    // Another study in a session of one study.
    let other = dicom_of_size(&new_study(), 20 << 10);
    let err = ingest(p, &a, s, &other).await.unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    // The file cap.
    ingest(
        p,
        &a,
        s,
        &dicom_with_sop(
            &study,
            &relaypacs_core::testing::dicom_gen::new_uid(),
            2,
            64,
        ),
    )
    .await
    .unwrap();
    let err = ingest(
        p,
        &a,
        s,
        &dicom_with_sop(
            &study,
            &relaypacs_core::testing::dicom_gen::new_uid(),
            3,
            64,
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
    let rec = e.sessions.load_session(s).await.unwrap().value;
    assert_eq!(rec.files.len(), 2);
    assert_eq!(
        stored_files(&e, s),
        2,
        "only the recorded files' bytes stay"
    );
    // Someone else's session is not found.
    let err = ingest(p, &Actor::user("bob"), s, &one).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    e.close().await;
}

/// A session's only file, ingested with `ingest_file_and_queue`, puts the
/// session in the outbox in the same write (one "queued" record, the
/// delivery follows); with another file in the session it does not, and
/// `complete_session` does as before.
async fn only_file_queues_its_session(db: StateDb) {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &db)
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let study = new_study();
    let s = open_session(p, &a).await.unwrap();
    let data = dicom_of_size(&study, 40 << 10);
    let (f, queued) = ingest_queued(p, &a, s, &data).await.unwrap();
    assert!(queued, "the only file did not queue its session");
    assert!(matches!(f.state, FileState::Valid { .. }));
    let rec = e.sessions.load_session(s).await.unwrap().value;
    assert_eq!(rec.state, relaypacs_core::SessionState::Forwarding);
    assert!(rec.delivery.queued_at.is_some() && rec.delivery.next_attempt_at.is_some());
    assert_eq!(
        rec.study_instance_uid.as_ref().map(|u| u.as_str()),
        Some(study.as_str())
    );
    assert_eq!(queued_records(&e.audit, s).await, 1);
    // Completing it again is the documented no-op (no second record).
    p.complete_session(&a, s).await.unwrap();
    assert_eq!(queued_records(&e.audit, s).await, 1);
    // Delivered from the outbox like any completed session.
    p.attempt_delivery(s, "w", &relaypacs_core::OutboxConfig::default())
        .await
        .unwrap();
    let rec = e.sessions.load_session(s).await.unwrap().value;
    assert!(
        matches!(rec.state, relaypacs_core::SessionState::Delivered { .. }),
        "{:?}",
        rec.state
    );

    // A session holding a file already: the second is only ingested.
    let s2 = open_session(p, &a).await.unwrap();
    let study2 = new_study();
    ingest(p, &a, s2, &dicom_of_size(&study2, 10 << 10))
        .await
        .unwrap();
    let (_, queued) = ingest_queued(p, &a, s2, &dicom_of_size(&study2, 12 << 10))
        .await
        .unwrap();
    assert!(!queued, "a file beside another queued its session");
    let rec = e.sessions.load_session(s2).await.unwrap().value;
    assert_eq!(rec.state, relaypacs_core::SessionState::Open);
    assert_eq!(queued_records(&e.audit, s2).await, 0);
    p.complete_session(&a, s2).await.unwrap();
    assert_eq!(queued_records(&e.audit, s2).await, 1);

    // A refused only file queues nothing; the session stays open.
    let s3 = open_session(p, &a).await.unwrap();
    let err = ingest_queued(p, &a, s3, &[7u8; 3000]).await.unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    let rec = e.sessions.load_session(s3).await.unwrap().value;
    assert_eq!(rec.state, relaypacs_core::SessionState::Open);
    assert_eq!(queued_records(&e.audit, s3).await, 0);
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_file_queues_its_session_on_sqlite() {
    only_file_queues_its_session(StateDb::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_file_queues_its_session_on_postgres() {
    let cluster = PgCluster::start();
    only_file_queues_its_session(cluster.fresh_db()).await;
}

/// A request-scoped session's first file starts from the session as its
/// creation wrote it, without reading it back; when the session moved on
/// in between (written behind the pipeline's back here), the file's write
/// finds the version changed, reloads and decides again: a file that is
/// no longer the session's only one does not queue it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_session_moved_on_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let scoped = relaypacs_core::NewSession {
        allow_multiple_studies: true,
        request_scoped: true,
    };
    // Moved on without a new file (a rewrite of the record): still the
    // only file, queued.
    let s = p.create_session(&a, scoped.clone()).await.unwrap().id;
    let v = e.sessions.load_session(s).await.unwrap();
    e.sessions
        .update_session(&v.value, v.version)
        .await
        .unwrap();
    let (_, queued) = ingest_queued(p, &a, s, &dicom_of_size(&new_study(), 8 << 10))
        .await
        .unwrap();
    assert!(queued);
    // Moved on with another file: not the only one, not queued.
    let s = p.create_session(&a, scoped).await.unwrap().id;
    let mut v = e.sessions.load_session(s).await.unwrap();
    let other = relaypacs_core::testing::session_store::sample_session()
        .files
        .into_values()
        .next()
        .unwrap();
    v.value.files.insert(other.id, other);
    e.sessions
        .update_session(&v.value, v.version)
        .await
        .unwrap();
    let (_, queued) = ingest_queued(p, &a, s, &dicom_of_size(&new_study(), 8 << 10))
        .await
        .unwrap();
    assert!(!queued, "queued beside a file it did not know of");
    let rec = e.sessions.load_session(s).await.unwrap().value;
    assert_eq!(rec.files.len(), 2);
    assert_eq!(rec.state, relaypacs_core::SessionState::Open);
    e.close().await;
}

/// The state database's chain verifies and holds every record of
/// `audit` (after failure point `k`).
async fn chain_holds_every_record(e: &Embedded, audit: &dyn AuditSink, k: u64) {
    assert_eq!(
        verify_sql_chain(&e.state).await.unwrap().count,
        audit.events().await.unwrap().len() as u64,
        "k={k}: the chain holds every record"
    );
}

/// Every storage call of the step fails in turn (I/O error, disk full):
/// the call fails with a storage error, the session holds no file, nothing
/// unrecorded keeps bytes, the failure is audited, and once healed the same
/// file goes in.
///
/// With `joint`, the audit trail is the state database's own chain and the
/// session store appends to it in the step's transaction (as the server on
/// SQLite): a failed write then leaves none of the step's success records.
///
/// With `queue`, the step is `ingest_file_and_queue` of the session's only
/// file: a failure leaves the session open and unqueued (no "queued"
/// record), and the healed step queues it.
async fn every_failpoint(db: impl Fn() -> StateDb, joint: bool, queue: bool) {
    let data = dicom_of_size(&new_study(), 100 << 10);
    let watched = [
        Op::CreateFile,
        Op::PutChunk,
        Op::SyncFile,
        Op::SealFile,
        Op::ReadFile,
        Op::UpdateSession,
        Op::RecordChunk,
        Op::ClaimInstance,
    ];
    let mut k = 1u64;
    loop {
        let mut failed_any = false;
        for fault in [Fault::Io, Fault::Full] {
            let dir = tempfile::tempdir().unwrap();
            let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &db())
                .await
                .unwrap();
            let plan = FaultPlan::watching(watched);
            let sql_audit = SqlAuditSink::new(e.state.clone());
            let (sessions, audit): (Arc<dyn SessionStore>, Arc<dyn AuditSink>) = if joint {
                (
                    Arc::new(SqlSessionStore::new(e.state.clone()).with_audit(&sql_audit)),
                    Arc::new(sql_audit.clone()),
                )
            } else {
                (Arc::new(e.sessions.clone()), Arc::new(e.audit.clone()))
            };
            // The joint path is the one under test (same trail on both).
            assert_eq!(
                joint,
                sessions.audit_trail_key().is_some()
                    && sessions.audit_trail_key() == audit.trail_key()
            );
            let p = Pipeline::new(
                Arc::new(FaultyChunkStore::new(
                    Arc::new(e.chunks.clone()),
                    plan.clone(),
                )),
                Arc::new(FaultySessionStore::new(sessions, plan.clone())),
                Arc::new(e.archive.clone()),
                audit.clone(),
                PipelineConfig::default(),
            );
            let a = Actor::user("alice");
            let s = open_session(&p, &a).await.unwrap();
            plan.fail_nth(k, fault);
            let step = |p: &Pipeline| {
                let p = p.clone();
                let a = a.clone();
                let data = data.clone();
                async move {
                    if queue {
                        let (f, queued) = ingest_queued(&p, &a, s, &data).await?;
                        assert!(queued, "the only file did not queue its session");
                        Ok(f)
                    } else {
                        ingest(&p, &a, s, &data).await
                    }
                }
            };
            match step(&p).await {
                Ok(_) => {
                    assert!(plan.calls() < k, "k={k}: the fault was not reported");
                }
                Err(err) => {
                    failed_any = true;
                    let want = match fault {
                        Fault::Full => ErrorKind::InsufficientStorage,
                        _ => ErrorKind::Storage,
                    };
                    assert_eq!(err.kind(), want, "k={k} {fault:?}: {err:?}");
                    let rec = e.sessions.load_session(s).await.unwrap().value;
                    assert!(
                        rec.files.is_empty(),
                        "k={k}: a failed file is in the session"
                    );
                    assert_eq!(
                        rec.state,
                        relaypacs_core::SessionState::Open,
                        "k={k}: a failed step queued its session"
                    );
                    assert_eq!(
                        queued_records(audit.as_ref(), s).await,
                        0,
                        "k={k}: a failed step recorded its session queued"
                    );
                    assert_eq!(
                        stored_files(&e, s),
                        0,
                        "k={k}: a failed file's bytes stayed"
                    );
                    let events = audit.events().await.unwrap();
                    assert!(
                        events
                            .iter()
                            .any(|ev| ev.outcome == AuditOutcome::SeriousFailure),
                        "k={k}: failure not audited"
                    );
                    // No record claims the failed file completed.
                    assert!(
                        !events
                            .iter()
                            .any(|ev| ev.action == AuditAction::FileCompleted
                                && ev.outcome == AuditOutcome::Success),
                        "k={k}: a failed file audited as completed"
                    );
                    plan.heal();
                    let f = step(&p).await.unwrap();
                    assert!(matches!(f.state, FileState::Valid { .. }));
                    if queue {
                        assert_eq!(queued_records(audit.as_ref(), s).await, 1, "k={k}");
                    }
                    if joint {
                        chain_holds_every_record(&e, audit.as_ref(), k).await;
                    }
                }
            }
            e.close().await;
        }
        if !failed_any {
            break;
        }
        k += 1;
    }
    assert!(k > 5, "the step makes {} watched storage calls", k - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_leaves_no_file_on_sqlite() {
    every_failpoint(|| StateDb::Sqlite, false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_leaves_no_file_with_the_audit_in_the_write_on_sqlite() {
    every_failpoint(|| StateDb::Sqlite, true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_leaves_the_session_unqueued_with_the_audit_in_the_write_on_sqlite()
{
    every_failpoint(|| StateDb::Sqlite, true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_leaves_no_file_on_postgres() {
    let cluster = PgCluster::start();
    every_failpoint(|| cluster.fresh_db(), false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_storage_failpoint_leaves_the_session_unqueued_on_postgres() {
    let cluster = PgCluster::start();
    every_failpoint(|| cluster.fresh_db(), false, true).await;
}

/// A pipeline on `e`'s adapters (its session store wrapped by a fault plan
/// when given): with `joint`, the audit trail is the state database's own
/// chain and the session store appends to it in each step's transaction
/// (as the server on SQLite); else `e`'s JSONL trail.
fn pipeline_on(
    e: &Embedded,
    joint: bool,
    plan: Option<Arc<FaultPlan>>,
    config: PipelineConfig,
) -> (Pipeline, Arc<dyn AuditSink>) {
    let sql_audit = SqlAuditSink::new(e.state.clone());
    let (sessions, audit): (Arc<dyn SessionStore>, Arc<dyn AuditSink>) = if joint {
        (
            Arc::new(SqlSessionStore::new(e.state.clone()).with_audit(&sql_audit)),
            Arc::new(sql_audit),
        )
    } else {
        (Arc::new(e.sessions.clone()), Arc::new(e.audit.clone()))
    };
    let (chunks, sessions): (Arc<dyn relaypacs_core::ChunkStore>, Arc<dyn SessionStore>) =
        match plan {
            Some(plan) => (
                Arc::new(FaultyChunkStore::new(
                    Arc::new(e.chunks.clone()),
                    plan.clone(),
                )),
                Arc::new(FaultySessionStore::new(sessions, plan)),
            ),
            None => (Arc::new(e.chunks.clone()), sessions),
        };
    let p = Pipeline::new(
        chunks,
        sessions,
        Arc::new(e.archive.clone()),
        audit.clone(),
        config,
    );
    (p, audit)
}

/// `ingest_first_file` of `data` for `a` in a new request-scoped session.
async fn ingest_first(
    p: &Pipeline,
    a: &Actor,
    data: &[u8],
    queue: bool,
) -> Result<(SessionId, Result<(relaypacs_core::FileRecord, bool), Error>), Error> {
    p.ingest_first_file(
        a,
        relaypacs_core::NewSession {
            allow_multiple_studies: true,
            request_scoped: true,
        },
        new_file(data, false),
        bytes_stream(bytes::Bytes::copy_from_slice(data)),
        queue,
    )
    .await
}

/// Session folders in the chunk area.
fn chunk_sessions(e: &Embedded) -> usize {
    match std::fs::read_dir(e.root.join("chunks")) {
        Ok(d) => d
            .flatten()
            .filter(|x| x.file_type().is_ok_and(|t| t.is_dir()))
            .count(),
        Err(_) => 0,
    }
}

/// The actions and outcomes of session `s`'s audit records, in order.
async fn trail_of(audit: &dyn AuditSink, s: SessionId) -> Vec<(AuditAction, AuditOutcome)> {
    audit
        .events()
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.session == Some(s))
        .map(|ev| (ev.action, ev.outcome))
        .collect()
}

/// `ingest_first_file`: a new session and its first file, as
/// `create_session` then `ingest_file_and_queue` (or `ingest_file`) leave
/// them, with the session written by the file's own write when the trail
/// is joint: the session, its file, chunk, claim, outbox entry and the five
/// records in order. A refused file leaves the session open and empty, its
/// creation recorded before the refusal. At the owner's cap (known to this
/// process, or only to the store) nothing is kept and the refusal is
/// audited once.
async fn first_file_creates_its_session(db: StateDb, joint: bool) {
    use AuditAction::*;
    use AuditOutcome::*;
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &db)
        .await
        .unwrap();
    let config = PipelineConfig {
        max_open_sessions_per_user: 2,
        ..PipelineConfig::default()
    };
    let (p, audit) = pipeline_on(&e, joint, None, config);
    assert_eq!(p.creates_session_with_first_file(), joint);
    let a = Actor::user("alice");
    let study = new_study();
    let data = dicom_of_size(&study, 60 << 10);
    let (s, done) = ingest_first(&p, &a, &data, true).await.unwrap();
    let (f, queued) = done.unwrap();
    assert!(queued, "the only file did not queue its session");
    let FileState::Valid { dicom } = &f.state else {
        panic!("not valid: {:?}", f.state)
    };
    let rec = e.sessions.load_session(s).await.unwrap();
    assert_eq!(rec.version, if joint { 1 } else { 2 });
    assert_eq!(rec.value.owner, "alice");
    assert!(rec.value.request_scoped);
    assert_eq!(rec.value.state, relaypacs_core::SessionState::Forwarding);
    assert_eq!(rec.value.files.get(&f.id), Some(&f));
    assert_eq!(
        e.sessions.chunks(s, f.id).await.unwrap()[0].sha256,
        Sha256Digest::of(&data)
    );
    assert!(
        e.sessions
            .instance_claim(&dicom.sop_instance_uid)
            .await
            .unwrap()
            .unwrap()
            .held_by(s, f.id)
    );
    assert_eq!(
        trail_of(audit.as_ref(), s).await,
        [
            (SessionCreated, Success),
            (FileAdded, Success),
            (ChunkStored, Success),
            (FileCompleted, Success),
            (ForwardStarted, Success),
        ]
    );
    // Delivered from the outbox like any completed session.
    p.attempt_delivery(s, "w", &relaypacs_core::OutboxConfig::default())
        .await
        .unwrap();
    assert!(matches!(
        e.sessions.load_session(s).await.unwrap().value.state,
        relaypacs_core::SessionState::Delivered { .. }
    ));

    // Not queued: the session stays open with its file, and completes.
    let (s2, done) = ingest_first(&p, &a, &dicom_of_size(&study, 20 << 10), false)
        .await
        .unwrap();
    assert!(!done.unwrap().1);
    let rec = e.sessions.load_session(s2).await.unwrap().value;
    assert_eq!(rec.state, relaypacs_core::SessionState::Open);
    assert_eq!(rec.files.len(), 1);
    p.complete_session(&a, s2).await.unwrap();
    assert_eq!(queued_records(audit.as_ref(), s2).await, 1);
    // The record its first file's write left (open) is not what the outbox
    // goes by once another write queued the session.
    let delivered = |s: SessionId| {
        let (p, sessions) = (p.clone(), e.sessions.clone());
        async move {
            p.attempt_delivery(s, "w", &relaypacs_core::OutboxConfig::default())
                .await
                .unwrap();
            let state = sessions.load_session(s).await.unwrap().value.state;
            assert!(
                matches!(state, relaypacs_core::SessionState::Delivered { .. }),
                "{state:?}"
            );
        }
    };
    delivered(s2).await;
    // Queued by its first file, then rewritten behind the pipeline's back:
    // the lease finds the version moved on, reloads, and delivers.
    let (s5, done) = ingest_first(&p, &a, &dicom_of_size(&study, 24 << 10), true)
        .await
        .unwrap();
    assert!(done.unwrap().1);
    let v = e.sessions.load_session(s5).await.unwrap();
    e.sessions
        .update_session(&v.value, v.version)
        .await
        .unwrap();
    delivered(s5).await;

    // A refused file: the session exists, open and empty, its creation
    // recorded before the refusal; no bytes stay.
    let (s3, done) = ingest_first(&p, &a, &[7u8; 3000], true).await.unwrap();
    let err = done.unwrap_err();
    assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
    let rec = e.sessions.load_session(s3).await.unwrap().value;
    assert_eq!(rec.state, relaypacs_core::SessionState::Open);
    assert!(rec.files.is_empty());
    assert_eq!(stored_files(&e, s3), 0);
    assert_eq!(
        trail_of(audit.as_ref(), s3).await,
        [
            (SessionCreated, Success),
            (FileAdded, Success),
            (ChunkStored, Success),
            (FileCompleted, MinorFailure),
        ]
    );
    assert_eq!(queued_records(audit.as_ref(), s3).await, 0);

    // The cap of two open sessions (s3 and one more), as this process
    // knows it: refused before anything is stored, audited.
    let s4 = open_session(&p, &a).await.unwrap();
    let before = (
        e.sessions.list_sessions().await.unwrap().len(),
        chunk_sessions(&e),
    );
    let denied = |audit: Arc<dyn AuditSink>| async move {
        audit
            .events()
            .await
            .unwrap()
            .iter()
            .filter(|ev| ev.action == SessionCreated && ev.outcome == MinorFailure)
            .count()
    };
    let denials = denied(audit.clone()).await;
    let err = ingest_first(&p, &a, &dicom_of_size(&study, 20 << 10), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_TOO_MANY_SESSIONS", "{err:?}");
    assert_eq!(
        (
            e.sessions.list_sessions().await.unwrap().len(),
            chunk_sessions(&e)
        ),
        before
    );
    assert_eq!(denied(audit.clone()).await, denials + 1);
    // Only the store knows the cap is reached: s4 ended behind this
    // process's back, and another session of alice's written straight to
    // the store. The file is stored, then its write refused at the cap:
    // nothing stays, one more denial (the alert of the minute, or its
    // count in the summary the flush writes).
    p.abort_session(&a, s4).await.unwrap();
    let mut other = relaypacs_core::testing::session_store::sample_session();
    other.owner = "alice".into();
    other.files.clear();
    e.sessions.create_session(&other).await.unwrap();
    let before = (
        e.sessions.list_sessions().await.unwrap().len(),
        chunk_sessions(&e),
    );
    let err = ingest_first(&p, &a, &dicom_of_size(&study, 20 << 10), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_TOO_MANY_SESSIONS", "{err:?}");
    assert_eq!(
        (
            e.sessions.list_sessions().await.unwrap().len(),
            chunk_sessions(&e)
        ),
        before
    );
    p.denials()
        .flush_at(time::OffsetDateTime::now_utc() + time::Duration::minutes(2))
        .await
        .unwrap();
    assert_eq!(denied(audit.clone()).await, denials + 2);
    if joint {
        assert_eq!(
            verify_sql_chain(&e.state).await.unwrap().count,
            audit.events().await.unwrap().len() as u64
        );
    }
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_file_creates_its_session_on_sqlite() {
    first_file_creates_its_session(StateDb::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_file_creates_its_session_without_a_joint_trail_on_sqlite() {
    first_file_creates_its_session(StateDb::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_file_creates_its_session_on_postgres() {
    let cluster = PgCluster::start();
    first_file_creates_its_session(cluster.fresh_db(), true).await;
}

/// A first file whose SOP Instance UID another session's file holds goes
/// the long way (its session is written first, then the claim is
/// resolved): the same outcome as `create_session` then
/// `ingest_file_and_queue`, and the session exists either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_file_of_a_held_instance_goes_the_long_way() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &StateDb::Sqlite)
        .await
        .unwrap();
    let (p, audit) = pipeline_on(&e, true, None, PipelineConfig::default());
    let a = Actor::user("alice");
    let study = new_study();
    let sop = relaypacs_core::testing::dicom_gen::new_uid();
    let data = dicom_with_sop(&study, &sop, 1, 64);
    let held = open_session(&p, &a).await.unwrap();
    ingest(&p, &a, held, &data).await.unwrap();
    // The same instance again (same content), then other content.
    for other in [data.clone(), dicom_with_sop(&study, &sop, 2, 64)] {
        let (s, done) = ingest_first(&p, &a, &other, true).await.unwrap();
        assert!(e.sessions.load_session(s).await.is_ok());
        let s2 = p
            .create_session(
                &a,
                relaypacs_core::NewSession {
                    allow_multiple_studies: true,
                    request_scoped: true,
                },
            )
            .await
            .unwrap()
            .id;
        let two_calls = ingest_queued(&p, &a, s2, &other).await;
        match (&done, &two_calls) {
            (Ok((f, q1)), Ok((g, q2))) => {
                assert_eq!((f.state.clone(), q1), (g.state.clone(), q2));
            }
            (Err(x), Err(y)) => assert_eq!(x.code(), y.code()),
            _ => panic!("{done:?} against {two_calls:?}"),
        }
        assert_eq!(
            trail_of(audit.as_ref(), s).await[0],
            (AuditAction::SessionCreated, AuditOutcome::Success)
        );
    }
    assert_eq!(
        verify_sql_chain(&e.state).await.unwrap().count,
        audit.events().await.unwrap().len() as u64
    );
    e.close().await;
}

/// Every storage call of `ingest_first_file` fails in turn (and then all
/// of them at once): either the session exists, open, empty and unqueued,
/// with the failure audited (the file's write failed, the session was
/// written on its own), or nothing of the session or its file is kept; no
/// failed file's bytes stay; once healed, the same file goes in with a new
/// session.
async fn every_first_file_failpoint(db: impl Fn() -> StateDb, joint: bool) {
    let data = dicom_of_size(&new_study(), 100 << 10);
    // Every storage call of an upload, the session's creation included.
    let watched = super::failpoints::WATCHED;
    let a = Actor::user("alice");
    let mut k = 1u64;
    loop {
        let mut failed_any = false;
        // Each fault at the k-th call; the first round also fails every
        // call at once.
        let mut runs = vec![(Fault::Io, false), (Fault::Full, false)];
        if k == 1 {
            runs.push((Fault::Io, true));
        }
        for (fault, always) in runs {
            let dir = tempfile::tempdir().unwrap();
            let e = Embedded::open_on(dir.path(), PipelineConfig::default(), &db())
                .await
                .unwrap();
            let plan = FaultPlan::watching(watched);
            let (p, audit) = pipeline_on(&e, joint, Some(plan.clone()), PipelineConfig::default());
            if always {
                plan.fail_always(fault);
            } else {
                plan.fail_nth(k, fault);
            }
            let want = match fault {
                Fault::Full => ErrorKind::InsufficientStorage,
                _ => ErrorKind::Storage,
            };
            match ingest_first(&p, &a, &data, true).await {
                Ok((_, Ok(_))) => {
                    assert!(plan.calls() < k, "k={k}: the fault was not reported");
                }
                Ok((s, Err(err))) => {
                    failed_any = true;
                    assert_eq!(err.kind(), want, "k={k} {fault:?}: {err:?}");
                    let rec = e.sessions.load_session(s).await.unwrap().value;
                    assert!(
                        rec.files.is_empty(),
                        "k={k}: a failed file is in the session"
                    );
                    assert_eq!(
                        rec.state,
                        relaypacs_core::SessionState::Open,
                        "k={k}: a failed step queued its session"
                    );
                    assert_eq!(queued_records(audit.as_ref(), s).await, 0, "k={k}");
                    assert_eq!(
                        stored_files(&e, s),
                        0,
                        "k={k}: a failed file's bytes stayed"
                    );
                    let trail = trail_of(audit.as_ref(), s).await;
                    assert_eq!(
                        trail.first(),
                        Some(&(AuditAction::SessionCreated, AuditOutcome::Success)),
                        "k={k}: {trail:?}"
                    );
                    assert!(
                        trail
                            .iter()
                            .any(|(_, o)| *o == AuditOutcome::SeriousFailure),
                        "k={k}: failure not audited: {trail:?}"
                    );
                    assert!(
                        !trail.contains(&(AuditAction::FileCompleted, AuditOutcome::Success)),
                        "k={k}: a failed file audited as completed"
                    );
                }
                Err(err) => {
                    failed_any = true;
                    assert_eq!(err.kind(), want, "k={k} {fault:?} always={always}: {err:?}");
                    assert!(
                        e.sessions.list_sessions().await.unwrap().is_empty(),
                        "k={k}: a session that was not created is kept"
                    );
                    assert_eq!(chunk_sessions(&e), 0, "k={k}: a failed file's bytes stayed");
                }
            }
            plan.heal();
            let (s, done) = ingest_first(&p, &a, &data, true).await.unwrap();
            let (f, queued) = done.unwrap();
            assert!(
                matches!(f.state, FileState::Valid { .. }) && queued,
                "k={k}"
            );
            assert_eq!(queued_records(audit.as_ref(), s).await, 1, "k={k}");
            if joint {
                chain_holds_every_record(&e, audit.as_ref(), k).await;
            }
            e.close().await;
        }
        if !failed_any {
            break;
        }
        k += 1;
    }
    assert!(k > 5, "the step makes {} watched storage calls", k - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_of_a_first_file_keeps_a_whole_session_or_none_on_sqlite() {
    every_first_file_failpoint(|| StateDb::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_of_a_first_file_keeps_a_whole_session_or_none_on_postgres() {
    let cluster = PgCluster::start();
    every_first_file_failpoint(|| cluster.fresh_db(), true).await;
}

/// A chunk store that keeps other bytes than it was given for a whole
/// file: the byte at `at` of every `put_file`/`put_file_syncing` body is
/// flipped on its way in, after the pipeline hashed it.
#[derive(Debug)]
struct Flipping {
    inner: relaypacs_storage::LocalChunkStore,
    at: u64,
}

impl std::fmt::Display for Flipping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flipping({})", self.inner)
    }
}

impl Flipping {
    fn flip(&self, body: relaypacs_core::ByteStream) -> relaypacs_core::ByteStream {
        use futures::StreamExt;
        let at = self.at;
        let mut pos = 0u64;
        Box::pin(body.map(move |item| {
            item.map(|b| {
                let start = pos;
                pos += b.len() as u64;
                if (start..pos).contains(&at) {
                    let mut v = b.to_vec();
                    v[(at - start) as usize] ^= 0x40;
                    bytes::Bytes::from(v)
                } else {
                    b
                }
            })
        }))
    }
}

#[async_trait::async_trait]
impl relaypacs_core::ChunkStore for Flipping {
    async fn create_file(
        &self,
        key: relaypacs_core::FileKey,
        size: u64,
    ) -> relaypacs_core::Result<()> {
        self.inner.create_file(key, size).await
    }

    async fn put_chunk(
        &self,
        key: relaypacs_core::FileKey,
        placement: relaypacs_core::ChunkPlacement,
        body: relaypacs_core::ByteStream,
    ) -> relaypacs_core::Result<String> {
        self.inner.put_chunk(key, placement, body).await
    }

    async fn put_file(
        &self,
        key: relaypacs_core::FileKey,
        size: u64,
        body: relaypacs_core::ByteStream,
    ) -> relaypacs_core::Result<String> {
        self.inner.put_file(key, size, self.flip(body)).await
    }

    async fn put_file_syncing(
        &self,
        key: relaypacs_core::FileKey,
        size: u64,
        body: relaypacs_core::ByteStream,
    ) -> relaypacs_core::Result<(String, relaypacs_core::Syncing)> {
        self.inner
            .put_file_syncing(key, size, self.flip(body))
            .await
    }

    async fn seal_file(
        &self,
        key: relaypacs_core::FileKey,
        size: u64,
        chunks: &[relaypacs_core::ChunkRecord],
    ) -> relaypacs_core::Result<()> {
        self.inner.seal_file(key, size, chunks).await
    }

    async fn read(
        &self,
        key: relaypacs_core::FileKey,
        range: std::ops::Range<u64>,
    ) -> relaypacs_core::Result<relaypacs_core::ByteStream> {
        self.inner.read(key, range).await
    }

    async fn delete_file(&self, key: relaypacs_core::FileKey) -> relaypacs_core::Result<()> {
        self.inner.delete_file(key).await
    }

    async fn delete_session(&self, session: SessionId) -> relaypacs_core::Result<()> {
        self.inner.delete_session(session).await
    }
}

/// A store that keeps other bytes than it acknowledged is caught by the
/// read-back of `ingest_file`, whichever way the file is proven: compared
/// with the bytes received (a small file), or hashed streaming (a file of
/// several MiB); a flipped first or last byte alike. The file is not
/// recorded, its bytes are removed, the failure is audited, and a good
/// store then takes the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_keeping_other_bytes_is_caught_by_the_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let a = Actor::user("alice");
    for size in [100 << 10, (1 << 20) + 500_000, (3 << 20) + 7] {
        let data = dicom_of_size(&new_study(), size);
        for at in [0, data.len() as u64 - 1] {
            let p = Pipeline::new(
                Arc::new(Flipping {
                    inner: e.chunks.clone(),
                    at,
                }),
                Arc::new(e.sessions.clone()),
                Arc::new(e.archive.clone()),
                Arc::new(e.audit.clone()),
                PipelineConfig::default(),
            );
            let s = open_session(&p, &a).await.unwrap();
            let err = ingest(&p, &a, s, &data).await.unwrap_err();
            assert!(
                matches!(
                    err.root(),
                    Error::Integrity(relaypacs_core::IntegrityError::StoredChunkCorrupt {
                        offset: 0,
                        ..
                    })
                ),
                "{size} bytes, flipped at {at}: {err:?}"
            );
            assert_no_file(&e, s, "a corrupt file").await;
            let failed = e
                .audit
                .events()
                .await
                .unwrap()
                .into_iter()
                .filter(|ev| {
                    ev.session == Some(s)
                        && ev.action == AuditAction::FileCompleted
                        && ev.outcome != AuditOutcome::Success
                })
                .count();
            assert_eq!(failed, 1, "the corruption is audited");
            let f = ingest(&e.pipeline, &a, s, &data).await.unwrap();
            assert!(matches!(f.state, FileState::Valid { .. }));
        }
    }
    e.close().await;
}
