//! `SqlAuditSink`: the audit sink conformance suite on SQLite and
//! PostgreSQL, one unbroken chain from two gateways appending at once, the
//! append-only triggers, and the verifier naming each kind of tampering.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::collections::BTreeSet;

use relaypacs_core::{AuditAction, AuditEvent, AuditOutcome, AuditSink};
use relaypacs_storage::{
    ChainErrorKind, ChainHead, SqlAuditSink, SqlOptions, SqlState, read_verified_sql_events,
    verify_sql_chain, verify_sql_chain_against,
};
use relaypacs_test_peers::Postgres;
use sqlx::Row;
use tempfile::TempDir;

async fn sqlite_db(dir: &TempDir) -> SqlState {
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    SqlState::connect(&url, None, &SqlOptions::default())
        .await
        .expect("connect sqlite")
}

async fn sqlite_audit() -> (SqlAuditSink, TempDir) {
    let dir = TempDir::new().expect("tempdir");
    (SqlAuditSink::new(sqlite_db(&dir).await), dir)
}

relaypacs_core::audit_sink_conformance!(sqlite_audit_sink, sqlite_audit);

async fn start_postgres() -> Postgres {
    tokio::task::spawn_blocking(Postgres::start)
        .await
        .expect("start postgres")
}

async fn connect(url: &str) -> SqlState {
    SqlState::connect(url, None, &SqlOptions::default())
        .await
        .expect("connect postgres")
}

/// A fresh PostgreSQL cluster per case (durable settings, as deployed).
async fn postgres_audit() -> (SqlAuditSink, Postgres) {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    (SqlAuditSink::new(connect(&url).await), pg)
}

relaypacs_core::audit_sink_conformance!(postgres_audit_sink, postgres_audit);

fn event(gateway: usize, i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        format!("user-{gateway}"),
        AuditAction::ChunkStored,
        AuditOutcome::Success,
    );
    e.detail = format!("gateway {gateway} event {i}");
    e
}

async fn record_n(sink: &SqlAuditSink, n: usize) {
    for i in 0..n {
        sink.record(&event(0, i)).await.expect("record");
    }
}

/// Two gateways (two pools on one database), each with one sink and 4
/// tasks appending 50 records: one chain of 400 records, distinct seqs 0..400, each
/// task's records in the order it made them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_append_one_unbroken_chain() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    let gateways = [connect(&url).await, connect(&url).await];
    let mut tasks = Vec::new();
    for (g, db) in gateways.iter().enumerate() {
        // One sink per gateway, shared by its tasks (their records are
        // group-committed), as a server does.
        let gateway_sink = SqlAuditSink::new(db.clone());
        for t in 0..4 {
            let sink = gateway_sink.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    sink.record(&event(g * 10 + t, i)).await.expect("record");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("append task");
    }

    let head = verify_sql_chain(&gateways[0])
        .await
        .expect("one unbroken chain");
    assert_eq!(head.count, 400);
    let sink = SqlAuditSink::new(gateways[1].clone());
    assert_eq!(sink.head().await.expect("head"), head);

    let seqs: BTreeSet<i64> = sqlx::query("SELECT seq FROM audit_events")
        .fetch_all(gateways[1].pool())
        .await
        .expect("seqs")
        .iter()
        .map(|r| r.try_get::<i64, _>(0).expect("seq"))
        .collect();
    assert_eq!(seqs, (0..400).collect::<BTreeSet<i64>>());

    let events = sink.events().await.expect("events");
    assert_eq!(events.len(), 400);
    for g in 0..2 {
        for t in 0..4 {
            let user = format!("user-{}", g * 10 + t);
            let mine: Vec<_> = events.iter().filter(|e| e.user == user).collect();
            let expected: Vec<_> = (0..50).map(|i| event(g * 10 + t, i)).collect();
            assert_eq!(mine.len(), 50, "{user}");
            for (got, want) in mine.iter().zip(&expected) {
                assert_eq!(got.detail, want.detail, "{user}: order kept");
            }
        }
    }
}

/// The error message of a refused statement.
async fn refused(db: &SqlState, sql: &str) -> String {
    let err = sqlx::query(sql)
        .execute(db.pool())
        .await
        .expect_err(&format!("{sql} must be refused"));
    err.to_string()
}

#[tokio::test]
async fn postgres_refuses_update_delete_truncate_even_to_the_owner() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    let db = connect(&url).await;
    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 3).await;
    for sql in [
        "UPDATE audit_events SET event = event WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 2",
        "TRUNCATE audit_events",
    ] {
        let msg = refused(&db, sql).await;
        assert!(msg.contains("append-only"), "{sql}: {msg}");
    }
    assert_eq!(verify_sql_chain(&db).await.expect("intact").count, 3);
    assert_eq!(sink.events().await.expect("events").len(), 3);
}

#[tokio::test]
async fn sqlite_refuses_update_and_delete() {
    let (sink, dir) = sqlite_audit().await;
    record_n(&sink, 3).await;
    let db = sqlite_db(&dir).await;
    for sql in [
        "UPDATE audit_events SET event = event WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 2",
        "DELETE FROM audit_events",
    ] {
        let msg = refused(&db, sql).await;
        assert!(msg.contains("append-only"), "{sql}: {msg}");
    }
    assert_eq!(verify_sql_chain(&db).await.expect("intact").count, 3);
}

/// A database of 10 records with the append-only trigger dropped (as
/// the superuser), as an attacker with the owner's rights could.
async fn tamperable(pg: &Postgres, name: &str) -> SqlState {
    let url = pg.create_database(name);
    let db = connect(&url).await;
    record_n(&SqlAuditSink::new(db.clone()), 10).await;
    assert_eq!(verify_sql_chain(&db).await.expect("intact").count, 10);
    pg.psql(
        &url,
        "DROP TRIGGER audit_events_append_only ON audit_events",
    );
    db
}

async fn exec(db: &SqlState, sql: &str) {
    sqlx::query(sql).execute(db.pool()).await.expect(sql);
}

#[tokio::test]
async fn verifier_names_each_tampering_on_postgres() {
    let pg = start_postgres().await;

    // A flipped byte in one event.
    let db = tamperable(&pg, "modified").await;
    exec(
        &db,
        "UPDATE audit_events SET event = replace(event, 'event 3', 'event 8') WHERE seq = 3",
    )
    .await;
    let err = verify_sql_chain(&db).await.expect_err("modified event");
    assert_eq!(
        (err.kind, err.index, err.seq),
        (ChainErrorKind::HashMismatch, 3, Some(3)),
        "{err}"
    );
    let err = read_verified_sql_events(&db)
        .await
        .expect_err("no events from a broken chain");
    assert_eq!((err.kind, err.index), (ChainErrorKind::HashMismatch, 3));

    // A removed row: a gap in seq.
    let db = tamperable(&pg, "deleted").await;
    exec(&db, "DELETE FROM audit_events WHERE seq = 4").await;
    let err = verify_sql_chain(&db).await.expect_err("deleted row");
    assert_eq!(
        (err.kind, err.index, err.seq),
        (ChainErrorKind::OutOfSequence, 4, Some(5)),
        "{err}"
    );

    // Two rows swapped (each moved to the other's seq).
    let db = tamperable(&pg, "swapped").await;
    exec(&db, "UPDATE audit_events SET seq = 1000 WHERE seq = 5").await;
    exec(&db, "UPDATE audit_events SET seq = 5 WHERE seq = 6").await;
    exec(&db, "UPDATE audit_events SET seq = 6 WHERE seq = 1000").await;
    let err = verify_sql_chain(&db).await.expect_err("swapped rows");
    assert_eq!(
        (err.kind, err.index, err.seq),
        (ChainErrorKind::Unlinked, 5, Some(5)),
        "{err}"
    );

    // The same swap, with the events only: each fails its own hash.
    let db = tamperable(&pg, "swapped_events").await;
    exec(
        &db,
        "UPDATE audit_events AS a SET event = b.event FROM audit_events AS b \
         WHERE (a.seq, b.seq) IN ((5, 6), (6, 5))",
    )
    .await;
    let err = verify_sql_chain(&db).await.expect_err("swapped events");
    assert_eq!(
        (err.kind, err.index),
        (ChainErrorKind::HashMismatch, 5),
        "{err}"
    );

    // A cut tail: seen against audit_head while it is left as it was...
    let db = tamperable(&pg, "cut").await;
    let anchor: ChainHead = SqlAuditSink::new(db.clone()).head().await.expect("head");
    exec(&db, "DELETE FROM audit_events WHERE seq >= 8").await;
    let err = verify_sql_chain(&db).await.expect_err("cut tail");
    assert_eq!(
        (err.kind, err.index),
        (ChainErrorKind::Truncated, 8),
        "{err}"
    );
    // ...not once the head row is rewritten with it (undetectable without
    // an anchor kept elsewhere), but always against such an anchor.
    let last_hash: String = sqlx::query("SELECT hash FROM audit_events WHERE seq = 7")
        .fetch_one(db.pool())
        .await
        .expect("row 7")
        .get(0);
    sqlx::query("UPDATE audit_head SET records = 8, last_hash = $1")
        .bind(last_hash)
        .execute(db.pool())
        .await
        .expect("rewrite head");
    assert_eq!(verify_sql_chain(&db).await.expect("cut unseen").count, 8);
    let err = verify_sql_chain_against(&db, anchor)
        .await
        .expect_err("cut tail against the anchor");
    assert_eq!(
        (err.kind, err.index),
        (ChainErrorKind::Truncated, 8),
        "{err}"
    );
    let err = verify_sql_chain_against(
        &db,
        ChainHead {
            count: 5,
            hash: [7; 32],
        },
    )
    .await
    .expect_err("a different chain than anchored");
    assert_eq!(
        (err.kind, err.index),
        (ChainErrorKind::AnchorMismatch, 4),
        "{err}"
    );
}

/// Appends after a verification go on from the head: the chain stays
/// whole across reconnects (a gateway restart).
#[tokio::test]
async fn chain_continues_across_reconnects_on_sqlite() {
    let (sink, dir) = sqlite_audit().await;
    record_n(&sink, 5).await;
    let again = SqlAuditSink::new(sqlite_db(&dir).await);
    record_n(&again, 5).await;
    let head = verify_sql_chain(&sqlite_db(&dir).await)
        .await
        .expect("one chain");
    assert_eq!(head.count, 10);
    assert_eq!(again.head().await.expect("head"), head);
    let (verified_head, verified) = read_verified_sql_events(&sqlite_db(&dir).await)
        .await
        .expect("verified events");
    assert_eq!(verified_head, head);
    assert_eq!(verified, again.events().await.expect("events"));
    assert_eq!(verified.len(), 10);
}

/// The grants documented in `migrations/postgres/0002_audit.sql`: a
/// gateway connected as a role holding only them records and verifies,
/// and can neither change nor remove a record nor lift the trigger.
#[tokio::test]
async fn gateway_role_with_the_documented_grants_only_appends() {
    let pg = start_postgres().await;
    let owner_url = pg.create_database("relay");
    let owner = connect(&owner_url).await; // migrates, as the owner
    record_n(&SqlAuditSink::new(owner.clone()), 2).await;
    pg.psql(
        &owner_url,
        "CREATE ROLE relaypacs LOGIN; \
         GRANT SELECT, INSERT ON audit_events TO relaypacs; \
         REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM relaypacs; \
         GRANT SELECT, UPDATE ON audit_head TO relaypacs; \
         GRANT SELECT ON _sqlx_migrations TO relaypacs; \
         GRANT CREATE ON SCHEMA public TO relaypacs",
    );
    let gateway_url = owner_url.replacen("postgres@", "relaypacs@", 1);
    let gateway = connect(&gateway_url).await;
    let sink = SqlAuditSink::new(gateway.clone());
    record_n(&sink, 3).await;
    assert_eq!(verify_sql_chain(&gateway).await.expect("chain").count, 5);
    for sql in [
        "UPDATE audit_events SET event = event WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 2",
        "TRUNCATE audit_events",
        "DROP TRIGGER audit_events_append_only ON audit_events",
    ] {
        let msg = refused(&gateway, sql).await;
        assert!(
            msg.contains("permission denied") || msg.contains("must be owner"),
            "{sql}: {msg}"
        );
    }
    assert_eq!(verify_sql_chain(&owner).await.expect("chain").count, 5);
}

/// With the database down, every record of a group-committed batch fails
/// (none is acknowledged); once it is back, appends go on and the chain
/// holds exactly the records acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_fail_while_the_database_is_down_and_resume() {
    let mut pg = start_postgres().await;
    let url = pg.create_database("relay");
    let mut options = SqlOptions::default();
    options.acquire_timeout = std::time::Duration::from_secs(2);
    let db = SqlState::connect(&url, None, &options)
        .await
        .expect("connect");
    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 3).await;
    pg.stop();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let sink = sink.clone();
            tokio::spawn(async move { sink.record(&event(1, i)).await })
        })
        .collect();
    for t in tasks {
        let res = t.await.expect("task");
        assert!(res.is_err(), "a record acknowledged with the database down");
    }
    pg.start_again();
    let mut acked = 3;
    // The pool may hand out dead connections once more before it notices.
    for i in 0..20 {
        if sink.record(&event(2, i)).await.is_ok() {
            acked += 1;
        }
    }
    assert!(acked >= 3 + 10, "appends resume: {acked}");
    let head = verify_sql_chain(&db).await.expect("chain");
    assert_eq!(head.count, acked);
}

/// A session store given the sink (`with_audit`) records a chunk and its
/// audit record in one transaction: both are there after an insert, the
/// chain verifies, the sink's head moves; an insert that finds the chunk
/// already recorded adds no audit record; a store without the sink, or
/// given a sink on another database, has no trail to write to.
async fn chunk_and_audit_record_commit_together(db: SqlState, other: SqlState) {
    use relaypacs_core::testing::session_store::sample_session;
    use relaypacs_core::{ChunkInsert, ChunkRecord, SessionStore, Sha256Digest};
    use relaypacs_storage::SqlSessionStore;

    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 3).await;
    let store = SqlSessionStore::new(db.clone()).with_audit(&sink);
    assert_eq!(store.audit_trail_key(), sink.trail_key());
    assert!(store.audit_trail_key().is_some());
    let s = sample_session();
    let file = *s.files.keys().next().unwrap();
    store.create_session(&s).await.unwrap();
    let chunk = ChunkRecord::new(0, 1 << 20, Sha256Digest::of(b"chunk 0"), "r0");
    let mut ev = event(0, 99);
    ev.session = Some(s.id);
    ev.file = Some(file);
    assert_eq!(
        store
            .record_chunk_audited(s.id, file, &chunk, &ev)
            .await
            .unwrap(),
        ChunkInsert::Inserted
    );
    assert_eq!(store.chunks(s.id, file).await.unwrap(), vec![chunk.clone()]);
    let events = sink.events().await.unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(events[3], ev);
    assert_eq!(sink.last_head().map(|h| h.count), Some(4));
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 4);
    // The same offset again: nothing new, not even the audit record.
    assert!(matches!(
        store
            .record_chunk_audited(s.id, file, &chunk, &ev)
            .await
            .unwrap(),
        ChunkInsert::Existing(c) if c == chunk
    ));
    // The sink's own appends continue the same chain.
    record_n(&sink, 2).await;
    assert_eq!(sink.events().await.unwrap().len(), 6);
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 6);
    // No sink, or one on another database: no trail.
    let plain = SqlSessionStore::new(db.clone());
    assert_eq!(plain.audit_trail_key(), None);
    assert!(
        plain
            .record_chunk_audited(s.id, file, &chunk, &ev)
            .await
            .is_err()
    );
    let elsewhere = SqlSessionStore::new(db).with_audit(&SqlAuditSink::new(other));
    assert_eq!(elsewhere.audit_trail_key(), None);
}

/// A new file's write with its audit records (`update_file_scope_audited`,
/// how a one-chunk STOW-RS part completes): the file, its chunk, its claim
/// and the records in one transaction; when another file holds the UID,
/// nothing is written and no record appended; without a claim the file
/// and the records are written; a store without the sink refuses.
async fn file_and_audit_records_commit_together(db: SqlState) {
    use relaypacs_core::testing::session_store::sample_session;
    use relaypacs_core::{
        ChunkRecord, ClaimedWrite, FileId, InstanceClaim, SessionStore, Sha256Digest, Uid,
    };
    use relaypacs_storage::SqlSessionStore;

    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 2).await;
    let store = SqlSessionStore::new(db.clone()).with_audit(&sink);
    let s = sample_session();
    let v = store.create_session(&s).await.unwrap().version;
    let mut rec = s.clone();
    let mut file = rec.files.values().next().unwrap().clone();
    file.id = FileId::random();
    rec.files = [(file.id, file.clone())].into_iter().collect();
    let sop = Uid::parse("2.25.4242").unwrap();
    let claim = |f: FileId, content: &[u8]| {
        InstanceClaim::new(
            sop.clone(),
            Sha256Digest::of(content),
            Uid::parse("1.2.3.4").unwrap(),
            s.id,
            f,
        )
    };
    let chunk = ChunkRecord::new(0, 1 << 20, Sha256Digest::of(b"part"), "r0");
    let events: Vec<AuditEvent> = (0..3).map(|i| event(7, i)).collect();
    let written = store
        .update_file_scope_audited(
            &rec,
            v,
            &[(file.id, chunk.clone())],
            Some(&claim(file.id, b"a")),
            &events,
        )
        .await
        .unwrap();
    assert_eq!(written, ClaimedWrite::Written(v + 1));
    assert_eq!(
        store.chunks(s.id, file.id).await.unwrap(),
        vec![chunk.clone()]
    );
    assert!(
        store
            .instance_claim(&sop)
            .await
            .unwrap()
            .unwrap()
            .held_by(s.id, file.id)
    );
    let stored = sink.events().await.unwrap();
    assert_eq!(stored.len(), 5);
    assert_eq!(&stored[2..], &events[..]);
    assert_eq!(sink.last_head().map(|h| h.count), Some(5));
    // Another file of the same UID: held, nothing written, no record.
    let mut other = file.clone();
    other.id = FileId::random();
    let mut rec2 = rec.clone();
    rec2.files = [(other.id, other.clone())].into_iter().collect();
    match store
        .update_file_scope_audited(
            &rec2,
            v + 1,
            &[(other.id, chunk.clone())],
            Some(&claim(other.id, b"b")),
            &events,
        )
        .await
        .unwrap()
    {
        ClaimedWrite::Held(c) => assert!(c.held_by(s.id, file.id), "{c:?}"),
        w => panic!("written although the UID is held: {w:?}"),
    }
    assert_eq!(store.load_session(s.id).await.unwrap().version, v + 1);
    assert!(store.chunks(s.id, other.id).await.unwrap().is_empty());
    assert_eq!(sink.events().await.unwrap().len(), 5);
    // A stale version: refused, no record.
    assert!(
        store
            .update_file_scope_audited(&rec2, v, &[(other.id, chunk.clone())], None, &events)
            .await
            .is_err()
    );
    assert_eq!(sink.events().await.unwrap().len(), 5);
    // Without a claim: the file and its records.
    assert_eq!(
        store
            .update_file_scope_audited(
                &rec2,
                v + 1,
                &[(other.id, chunk.clone())],
                None,
                &events[..1],
            )
            .await
            .unwrap(),
        ClaimedWrite::Written(v + 2)
    );
    assert_eq!(sink.events().await.unwrap().len(), 6);
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 6);
    // The sink's own appends continue the chain; a store without the sink
    // has no trail to write to.
    record_n(&sink, 1).await;
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 7);
    assert!(
        SqlSessionStore::new(db)
            .update_file_scope_audited(&rec2, v + 2, &[], None, &events)
            .await
            .is_err()
    );
}

/// A session's creation and a later write of it with their audit records
/// (`create_session_capped_audited`, `update_file_scope_with_facts_audited`):
/// each record lands with its write; at the cap nothing is created and no
/// record appended; a stale write appends none; a store without the sink
/// refuses both.
async fn session_writes_and_audit_records_commit_together(db: SqlState) {
    use relaypacs_core::testing::session_store::sample_session;
    use relaypacs_core::{SessionState, SessionStore};
    use relaypacs_storage::SqlSessionStore;

    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 1).await;
    let store = SqlSessionStore::new(db.clone()).with_audit(&sink);
    let s = sample_session();
    let created = event(3, 1);
    let v = store
        .create_session_capped_audited(&s, 1, &created)
        .await
        .unwrap()
        .expect("below the cap")
        .version;
    assert_eq!(store.load_session(s.id).await.unwrap().version, v);
    assert_eq!(sink.events().await.unwrap()[1], created);
    // The owner's one open session fills a cap of one: nothing, no record.
    let mut second = sample_session();
    second.owner = s.owner.clone();
    assert!(
        store
            .create_session_capped_audited(&second, 1, &event(3, 2))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.load_session(second.id).await.is_err());
    assert_eq!(sink.events().await.unwrap().len(), 2);
    // A head write with two records; a stale one appends none.
    let mut head = s.clone();
    head.files.clear();
    head.state = SessionState::Forwarding;
    let queued = [event(3, 3), event(3, 4)];
    assert_eq!(
        store
            .update_file_scope_with_facts_audited(&head, v, &[], &queued)
            .await
            .unwrap(),
        v + 1
    );
    assert_eq!(
        store.load_session(s.id).await.unwrap().value.state,
        SessionState::Forwarding
    );
    assert!(
        store
            .update_file_scope_with_facts_audited(&head, v, &[], &queued)
            .await
            .is_err()
    );
    let stored = sink.events().await.unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(&stored[2..], &queued[..]);
    assert_eq!(sink.last_head().map(|h| h.count), Some(4));
    record_n(&sink, 1).await;
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 5);
    let plain = SqlSessionStore::new(db);
    assert!(
        plain
            .create_session_capped_audited(&sample_session(), 9, &created)
            .await
            .is_err()
    );
    assert!(
        plain
            .update_file_scope_with_facts_audited(&head, v + 1, &[], &queued)
            .await
            .is_err()
    );
}

/// A session created with its first file (`create_session_with_file_audited`,
/// how a one-part STOW-RS request is recorded): the session at version 1
/// with the file, its totals, its chunk, its claim and the records in one
/// transaction; when another file holds the UID, and at the owner's cap,
/// nothing is written and no record appended; without a claim the session
/// and its file are written; a store without the sink refuses.
async fn session_and_first_file_commit_together(db: SqlState) {
    use relaypacs_core::testing::session_store::sample_session;
    use relaypacs_core::{
        ChunkRecord, ClaimedWrite, FileId, InstanceClaim, SessionId, SessionStore, Sha256Digest,
        Uid,
    };
    use relaypacs_storage::SqlSessionStore;

    let sink = SqlAuditSink::new(db.clone());
    record_n(&sink, 1).await;
    let store = SqlSessionStore::new(db.clone()).with_audit(&sink);
    let s = sample_session();
    let file = s.files.values().next().unwrap().clone();
    let sop = Uid::parse("2.25.4343").unwrap();
    let claim = |sid: SessionId, f: FileId, content: &[u8]| {
        InstanceClaim::new(
            sop.clone(),
            Sha256Digest::of(content),
            Uid::parse("1.2.3.4").unwrap(),
            sid,
            f,
        )
    };
    let chunk = ChunkRecord::new(0, file.size, Sha256Digest::of(b"part"), "r0");
    let events: Vec<AuditEvent> = (0..4).map(|i| event(9, i)).collect();
    let written = store
        .create_session_with_file_audited(
            &s,
            2,
            &[(file.id, chunk.clone())],
            Some(&claim(s.id, file.id, b"a")),
            &events,
        )
        .await
        .unwrap();
    assert_eq!(written, Some(ClaimedWrite::Written(1)));
    let loaded = store.load_session(s.id).await.unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.value.files, s.files);
    let scope = store.load_file_scope(s.id, None).await.unwrap();
    assert_eq!((scope.file_count, scope.declared_bytes), (1, file.size));
    assert_eq!(
        store.chunks(s.id, file.id).await.unwrap(),
        vec![chunk.clone()]
    );
    assert!(
        store
            .instance_claim(&sop)
            .await
            .unwrap()
            .unwrap()
            .held_by(s.id, file.id)
    );
    let stored = sink.events().await.unwrap();
    assert_eq!(&stored[1..], &events[..]);
    // Another session of the owner, whose file has the same UID: held,
    // nothing written, no record.
    let mut t = sample_session();
    t.owner = s.owner.clone();
    let t_file = t.files.keys().next().copied().unwrap();
    match store
        .create_session_with_file_audited(
            &t,
            2,
            &[(t_file, chunk.clone())],
            Some(&claim(t.id, t_file, b"b")),
            &events,
        )
        .await
        .unwrap()
    {
        Some(ClaimedWrite::Held(c)) => assert!(c.held_by(s.id, file.id), "{c:?}"),
        w => panic!("written although the UID is held: {w:?}"),
    }
    assert!(store.load_session(t.id).await.is_err());
    match store.chunks(t.id, t_file).await {
        Ok(c) => assert!(c.is_empty(), "{c:?}"),
        Err(e) => assert!(matches!(e, relaypacs_core::Error::NotFound { .. }), "{e:?}"),
    }
    assert_eq!(sink.events().await.unwrap().len(), 5);
    // The owner's open session fills a cap of one: nothing, no record.
    assert_eq!(
        store
            .create_session_with_file_audited(&t, 1, &[(t_file, chunk.clone())], None, &events)
            .await
            .unwrap(),
        None
    );
    assert!(store.load_session(t.id).await.is_err());
    assert_eq!(sink.events().await.unwrap().len(), 5);
    // Below the cap, without a claim: the session, its file, one record.
    assert_eq!(
        store
            .create_session_with_file_audited(
                &t,
                2,
                &[(t_file, chunk.clone())],
                None,
                &events[..1],
            )
            .await
            .unwrap(),
        Some(ClaimedWrite::Written(1))
    );
    assert_eq!(store.load_session(t.id).await.unwrap().value.files, t.files);
    assert_eq!(store.chunks(t.id, t_file).await.unwrap(), vec![chunk]);
    assert_eq!(verify_sql_chain(&db).await.unwrap().count, 6);
    assert!(
        SqlSessionStore::new(db)
            .create_session_with_file_audited(&sample_session(), 9, &[], None, &events)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn session_and_first_file_commit_together_on_sqlite() {
    let d = TempDir::new().unwrap();
    session_and_first_file_commit_together(sqlite_db(&d).await).await;
}

#[tokio::test]
async fn session_and_first_file_commit_together_on_postgres() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    session_and_first_file_commit_together(connect(&url).await).await;
}

#[tokio::test]
async fn session_writes_and_audit_records_commit_together_on_sqlite() {
    let d = TempDir::new().unwrap();
    session_writes_and_audit_records_commit_together(sqlite_db(&d).await).await;
}

#[tokio::test]
async fn session_writes_and_audit_records_commit_together_on_postgres() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    session_writes_and_audit_records_commit_together(connect(&url).await).await;
}

#[tokio::test]
async fn file_and_audit_records_commit_together_on_sqlite() {
    let d = TempDir::new().unwrap();
    file_and_audit_records_commit_together(sqlite_db(&d).await).await;
}

#[tokio::test]
async fn file_and_audit_records_commit_together_on_postgres() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    file_and_audit_records_commit_together(connect(&url).await).await;
}

#[tokio::test]
async fn chunk_and_audit_record_commit_together_on_sqlite() {
    let (a, b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    chunk_and_audit_record_commit_together(sqlite_db(&a).await, sqlite_db(&b).await).await;
}

#[tokio::test]
async fn chunk_and_audit_record_commit_together_on_postgres() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    let other = pg.create_database("other");
    chunk_and_audit_record_commit_together(connect(&url).await, connect(&other).await).await;
}

/// Batches of every size around the INSERT's group of rows (1, 15-17,
/// 33, 256 records in one call): each record in its place, in order, the
/// chain unbroken, on both engines.
async fn batches_of_any_size_keep_the_chain(db: SqlState) {
    let sink = SqlAuditSink::new(db.clone());
    let mut want = Vec::new();
    for (b, n) in [1usize, 15, 16, 17, 33, 256].into_iter().enumerate() {
        let batch: Vec<AuditEvent> = (0..n).map(|i| event(b, i)).collect();
        sink.record_all(&batch).await.unwrap();
        want.extend(batch);
    }
    assert_eq!(sink.events().await.unwrap(), want);
    assert_eq!(
        verify_sql_chain(&db).await.unwrap().count,
        want.len() as u64
    );
}

#[tokio::test]
async fn batches_of_any_size_keep_the_chain_on_sqlite() {
    let d = TempDir::new().unwrap();
    batches_of_any_size_keep_the_chain(sqlite_db(&d).await).await;
}

#[tokio::test]
async fn batches_of_any_size_keep_the_chain_on_postgres() {
    let pg = start_postgres().await;
    let url = pg.create_database("relay");
    batches_of_any_size_keep_the_chain(connect(&url).await).await;
}
