//! Issue 11, items 5 and 6 in the core: the per-user cap on open sessions
//! holds under a concurrent burst, creation is refused below the storage
//! watermark, listings are paginated, and every cross-user attempt is
//! recorded as one aggregated Security Alert while its answer stays
//! "not found". On the real embedded adapters (files, JSONL trail).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use relaypacs_core::pipeline::{GaugeFn, Page, PageCursor, PageRequest};
use relaypacs_core::testing::pieces;
use relaypacs_core::{
    Actor, AuditAction, AuditEvent, AuditOutcome, AuditSink as _, Error, ErrorKind, FileState,
    NewFile, NewSession, Pipeline, PipelineConfig, SessionId, SessionRecord, Sha256Digest,
};
use relaypacs_integration::{Embedded, dicom, new_study, open_session, put};
use time::OffsetDateTime;

fn fixed(t: OffsetDateTime) -> relaypacs_core::pipeline::denials::Clock {
    Arc::new(move || t)
}

/// The start of a minute, so a test's denials all fall in it.
fn a_minute() -> OffsetDateTime {
    // 1_900_000_020 is a multiple of 60.
    let t = OffsetDateTime::from_unix_timestamp(1_900_000_020).unwrap();
    assert_eq!(t.second(), 0);
    t
}

async fn events(e: &Embedded) -> Vec<AuditEvent> {
    e.audit.events().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_400_creations_leaves_exactly_the_cap_open() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let cap = e.pipeline.config().max_open_sessions_per_user;
    assert_eq!(cap, 64);
    let t = a_minute();
    e.pipeline.denials().set_clock(fixed(t));
    let alice = Actor::user("alice");
    let barrier = Arc::new(tokio::sync::Barrier::new(400));
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let (p, a, b) = (e.pipeline.clone(), alice.clone(), barrier.clone());
            tokio::spawn(async move {
                b.wait().await;
                p.create_session(&a, NewSession::default()).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(err) => {
                assert_eq!(err.code(), "RELAY_TOO_MANY_SESSIONS", "{err:?}");
                assert_eq!(err.kind(), ErrorKind::LimitExceeded);
                assert!(matches!(err, Error::TooMany { limit: 64, .. }));
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (64, 336));
    // The store agrees: exactly the cap, nothing half-created.
    use relaypacs_core::SessionStore as _;
    assert_eq!(e.sessions.list_sessions().await.unwrap().len(), 64);

    // 336 refusals: one record now, one summary when the minute closes.
    let refusals = |evs: &[AuditEvent]| -> Vec<AuditEvent> {
        evs.iter()
            .filter(|ev| {
                ev.action == AuditAction::SessionCreated && ev.outcome == AuditOutcome::MinorFailure
            })
            .cloned()
            .collect()
    };
    let r = refusals(&events(&e).await);
    assert_eq!(r.len(), 1, "{r:?}");
    assert!(r[0].detail.contains("RELAY_TOO_MANY_SESSIONS"), "{r:?}");
    e.pipeline
        .denials()
        .flush_at(t + time::Duration::minutes(1))
        .await
        .unwrap();
    let r = refusals(&events(&e).await);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r[1].detail.contains("count=336 "), "{r:?}");

    // Another user is not affected; alice gets one back when one ends.
    open_session(&e.pipeline, &Actor::user("bob"))
        .await
        .unwrap();
    let first = e
        .pipeline
        .list_sessions_page(&alice, PageRequest::default())
        .await
        .unwrap()
        .items[0]
        .id;
    e.pipeline.abort_session(&alice, first).await.unwrap();
    open_session(&e.pipeline, &alice).await.unwrap();
    let err = open_session(&e.pipeline, &alice).await.unwrap_err();
    assert_eq!(err.code(), "RELAY_TOO_MANY_SESSIONS");
}

#[tokio::test]
async fn the_cap_counts_open_sessions_only_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        max_open_sessions_per_user: 3,
        ..PipelineConfig::default()
    };
    let alice = Actor::user("alice");
    let ids = {
        let e = Embedded::open(dir.path(), config.clone()).await.unwrap();
        let p = &e.pipeline;
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(open_session(p, &alice).await.unwrap());
        }
        assert!(matches!(
            open_session(p, &alice).await,
            Err(Error::TooMany { .. })
        ));
        // A session that is completed leaves the count: here an empty one,
        // which completing ends.
        let err = p.complete_session(&alice, ids[0]).await.unwrap_err();
        assert_eq!(err.code(), "RELAY_SESSION_EMPTY");
        ids[0] = open_session(p, &alice).await.unwrap();
        // A study put in the outbox is not open any more either.
        let data = dicom(&new_study(), 1);
        let f = p
            .add_file(
                &alice,
                ids[1],
                NewFile {
                    name: "a.dcm".into(),
                    size: data.len() as u64,
                    sha256: Some(Sha256Digest::of(&data)),
                },
            )
            .await
            .unwrap();
        p.ingest_stream(&alice, ids[1], f.id, pieces(&data, 65_536))
            .await
            .unwrap();
        p.complete_session(&alice, ids[1]).await.unwrap();
        ids[1] = open_session(p, &alice).await.unwrap();
        assert!(matches!(
            open_session(p, &alice).await,
            Err(Error::TooMany { .. })
        ));
        ids
    };
    // A new process sees the same three open sessions (one full scan).
    let e = Embedded::open(dir.path(), config).await.unwrap();
    assert!(matches!(
        open_session(&e.pipeline, &alice).await,
        Err(Error::TooMany { .. })
    ));
    e.pipeline.abort_session(&alice, ids[2]).await.unwrap();
    open_session(&e.pipeline, &alice).await.unwrap();
}

#[tokio::test]
async fn a_session_is_refused_below_the_storage_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        session_admission_bytes: 4096,
        ..PipelineConfig::default()
    };
    let e = Embedded::open(dir.path(), config).await.unwrap();
    let free = Arc::new(std::sync::atomic::AtomicU64::new(1000));
    let f = free.clone();
    e.pipeline
        .set_storage_gauge(Arc::new(GaugeFn(move |bytes: u64| {
            let free = f.load(std::sync::atomic::Ordering::SeqCst);
            if free >= bytes {
                Ok(())
            } else {
                Err(Error::InsufficientStorage {
                    needed: bytes,
                    reason: format!("{free} bytes free above the watermark"),
                })
            }
        })))
        .unwrap();
    let alice = Actor::user("alice");
    let err = open_session(&e.pipeline, &alice).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InsufficientStorage);
    assert_eq!(err.code(), "RELAY_INSUFFICIENT_STORAGE");
    assert!(matches!(
        err,
        Error::InsufficientStorage { needed: 4096, .. }
    ));
    let page = e
        .pipeline
        .list_sessions_page(&alice, PageRequest::default())
        .await
        .unwrap();
    assert!(page.items.is_empty());
    let evs = events(&e).await;
    assert!(
        evs.iter().any(|ev| ev.action == AuditAction::SessionCreated
            && ev.outcome == AuditOutcome::SeriousFailure
            && ev.detail.contains("RELAY_INSUFFICIENT_STORAGE")),
        "{evs:?}"
    );
    free.store(1 << 20, std::sync::atomic::Ordering::SeqCst);
    open_session(&e.pipeline, &alice).await.unwrap();
}

async fn walk(p: &Pipeline, actor: &Actor, limit: u32, max: usize) -> Vec<SessionRecord> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let Page { items, next } = p
            .list_sessions_page(actor, PageRequest { limit, after })
            .await
            .unwrap();
        assert!(items.len() <= max, "page of {} > {max}", items.len());
        out.extend(items);
        match next {
            // The cursor goes through text, as it would over HTTP.
            Some(c) => after = Some(PageCursor::parse(&c.to_string()).unwrap()),
            None => return out,
        }
    }
}

#[tokio::test]
async fn pages_walk_every_own_session_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        max_page_size: 7,
        ..PipelineConfig::default()
    };
    let e = Embedded::open(dir.path(), config.clone()).await.unwrap();
    let p = &e.pipeline;
    let (alice, bob) = (Actor::user("alice"), Actor::user("bob"));
    let mut mine = Vec::new();
    for i in 0..40 {
        if i % 4 == 3 {
            open_session(p, &bob).await.unwrap();
        } else {
            mine.push(open_session(p, &alice).await.unwrap());
        }
    }
    // Another gateway process sharing the stores: its sessions are listed too.
    let other = Pipeline::new(
        Arc::new(e.chunks.clone()),
        Arc::new(e.sessions.clone()),
        Arc::new(e.archive.clone()),
        Arc::new(e.audit.clone()),
        config,
    );
    mine.push(open_session(&other, &alice).await.unwrap());
    assert_eq!(mine.len(), 31);

    for limit in [0, 1, 5, 7, 1000] {
        let got = walk(p, &alice, limit, 7).await;
        let ids: Vec<SessionId> = got.iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), mine.len(), "limit {limit}");
        assert_eq!(
            ids.iter().collect::<HashSet<_>>(),
            mine.iter().collect::<HashSet<_>>(),
            "limit {limit}"
        );
        assert!(got.iter().all(|r| r.owner == "alice"));
        // Stable order: creation time, then id.
        assert!(
            got.windows(2)
                .all(|w| (w[0].created_at, w[0].id) < (w[1].created_at, w[1].id))
        );
    }
    let page = p
        .list_sessions_page(
            &alice,
            PageRequest {
                limit: 1000,
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.len(), 7);
    // An admin walks everyone's.
    assert_eq!(walk(p, &Actor::system(), 3, 7).await.len(), 41);
    // Bob sees his own ten only.
    assert_eq!(walk(p, &bob, 0, 7).await.len(), 10);

    // Changes in the middle of a walk: removed sessions vanish, new ones
    // come at the end, nothing repeats or is skipped.
    let first = p
        .list_sessions_page(
            &alice,
            PageRequest {
                limit: 5,
                after: None,
            },
        )
        .await
        .unwrap();
    let mut seen: Vec<SessionId> = first.items.iter().map(|r| r.id).collect();
    let removed = mine[20];
    p.abort_session(&alice, removed).await.unwrap();
    other.abort_session(&alice, mine[30]).await.unwrap();
    let added = open_session(p, &alice).await.unwrap();
    let mut after = first.next;
    while let Some(c) = after {
        let page = p
            .list_sessions_page(
                &alice,
                PageRequest {
                    limit: 5,
                    after: Some(c),
                },
            )
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|r| r.id));
        after = page.next;
    }
    let mut want: Vec<SessionId> = mine
        .iter()
        .copied()
        .filter(|id| *id != removed && *id != mine[30])
        .collect();
    want.push(added);
    assert_eq!(seen.len(), want.len());
    assert_eq!(
        seen.iter().collect::<HashSet<_>>(),
        want.iter().collect::<HashSet<_>>()
    );
    assert_eq!(seen.last(), Some(&added));

    for bad in ["", "x", "s1.12.nothex", "s1.1.2.3", &"s".repeat(200)] {
        let err = PageCursor::parse(bad).unwrap_err();
        assert_eq!(err.code(), "RELAY_BAD_CURSOR", "{bad}");
    }
}

/// Every cross-user attempt answers "not found", as an unknown id does,
/// and leaves exactly one Security Alert per (actor, attempt, object) in
/// the minute; repeating it only raises the count of the summary.
#[tokio::test]
async fn every_cross_user_attempt_is_one_aggregated_security_alert() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let p = &e.pipeline;
    let t = a_minute();
    p.denials().set_clock(fixed(t));
    let (alice, bob) = (
        Actor::user("alice"),
        Actor::user("bob").with_address("10.9.8.7"),
    );
    let s = open_session(p, &alice).await.unwrap();
    let data = dicom(&new_study(), 11);
    let decl = |name: &str, d: &[u8]| NewFile {
        name: name.into(),
        size: d.len() as u64,
        sha256: Some(Sha256Digest::of(d)),
    };
    let done = p
        .add_file(&alice, s, decl("done.dcm", &data))
        .await
        .unwrap();
    p.ingest_stream(&alice, s, done.id, pieces(&data, 65_536))
        .await
        .unwrap();
    let other = dicom(&new_study(), 12);
    let up = p.add_file(&alice, s, decl("up.dcm", &other)).await.unwrap();
    let before = events(&e).await.len();

    // What bob tries, twice each; the attempt name and object recorded.
    let attempts: Vec<(&str, String)> = vec![
        ("read_session", format!("session {s}")),
        ("read_file", format!("session {s} file {}", done.id)),
        ("file_status", format!("session {s} file {}", up.id)),
        ("file_chunks", format!("session {s} file {}", up.id)),
        ("file_offsets", format!("session {s}")),
        ("add_file", format!("session {s}")),
        ("access", format!("session {s}")), // put_chunk
        ("complete_file", format!("session {s} file {}", up.id)),
        ("remove_file", format!("session {s} file {}", done.id)),
        ("complete_session", format!("session {s}")),
        ("abort_session", format!("session {s}")),
        ("read_report", format!("session {s}")),
    ];
    for _ in 0..2 {
        let results: Vec<(&str, Error)> = vec![
            ("read_session", p.session(&bob, s).await.unwrap_err()),
            (
                "read_file",
                p.read_file(&bob, s, done.id).await.err().unwrap(),
            ),
            (
                "file_status",
                p.file_status(&bob, s, up.id).await.unwrap_err(),
            ),
            (
                "file_chunks",
                p.file_chunks(&bob, s, up.id).await.unwrap_err(),
            ),
            ("file_offsets", p.file_offsets(&bob, s).await.unwrap_err()),
            (
                "add_file",
                p.add_file(&bob, s, decl("x.dcm", &other))
                    .await
                    .unwrap_err(),
            ),
            (
                "put_chunk",
                put(p, &bob, s, up.id, 0, &other[..1000]).await.unwrap_err(),
            ),
            (
                "complete_file",
                p.complete_file(&bob, s, up.id).await.unwrap_err(),
            ),
            (
                "remove_file",
                p.remove_file(&bob, s, done.id).await.unwrap_err(),
            ),
            (
                "complete_session",
                p.complete_session(&bob, s).await.unwrap_err(),
            ),
            ("abort_session", p.abort_session(&bob, s).await.unwrap_err()),
            (
                "read_report",
                p.fetch_report(&bob, s, "1.2.3").await.err().unwrap(),
            ),
        ];
        for (what, err) in results {
            assert!(matches!(err, Error::NotFound { .. }), "{what}: {err:?}");
        }
    }
    // An id that exists for nobody: not found, and not recorded.
    let ghost = SessionId::random();
    assert!(matches!(
        p.session(&bob, ghost).await.unwrap_err(),
        Error::NotFound { .. }
    ));

    let new: Vec<AuditEvent> = events(&e).await.split_off(before);
    assert!(new.iter().all(|ev| ev.user == "bob"), "{new:?}");
    assert!(
        new.iter().all(|ev| ev.action == AuditAction::SecurityAlert
            && ev.event_id == 110113
            && ev.outcome == AuditOutcome::MinorFailure
            && ev.address.as_deref() == Some("10.9.8.7")
            && ev.session == Some(s)),
        "{new:?}"
    );
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for ev in &new {
        let key = ev.detail.split(": count=").next().unwrap().to_string();
        *per_key.entry(key).or_default() += 1;
        assert!(ev.detail.contains("count=1 "), "{ev:?}");
        assert!(ev.detail.contains("RELAY_NOT_FOUND"), "{ev:?}");
    }
    for (what, object) in &attempts {
        let key = format!("denied {what} on {object}");
        assert_eq!(per_key.get(&key), Some(&1), "{key}: {per_key:?}");
    }
    assert_eq!(new.len(), attempts.len(), "{per_key:?}");
    // Files named in the attempt are named in the record.
    assert!(
        new.iter()
            .any(|ev| ev.file == Some(done.id) && ev.detail.starts_with("denied read_file"))
    );

    // The minute closes: one summary per key, count=2.
    let summaries = p
        .denials()
        .flush_at(t + time::Duration::minutes(1))
        .await
        .unwrap();
    assert_eq!(summaries, attempts.len());
    let tail: Vec<AuditEvent> = events(&e).await.split_off(before + attempts.len());
    assert_eq!(tail.len(), attempts.len());
    assert!(tail.iter().all(|ev| ev.detail.contains("count=2 ")));

    // Alice's session is untouched, and she is never denied.
    let rec = p.session(&alice, s).await.unwrap();
    assert!(matches!(rec.files[&done.id].state, FileState::Valid { .. }));
    assert_eq!(rec.files.len(), 2);
    assert!(
        events(&e)
            .await
            .iter()
            .all(|ev| ev.action != AuditAction::SecurityAlert || ev.user == "bob")
    );
}
