//! The outbox on the embedded adapters, with faults injected around the
//! real local archive sink: per-instance retries after a partial refusal
//! (and the audit split), dead letters at the first permanent refusal,
//! one worker at a time (leases), and a crashed attempt taken over.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::{Arc, Mutex};
use std::time::Duration;

use relaypacs_core::SessionStore as _;
use relaypacs_core::testing::faults::{FaultyPacsSink, Refusal};
use relaypacs_core::{
    Actor, AuditAction, AuditOutcome, AuditSink, Next, OutboxConfig, PipelineConfig, SessionId,
    SessionState, Uid,
};
use relaypacs_integration::{Embedded, StateDb, dicom, new_study, open_session, upload_file};
use relaypacs_pacs::LocalArchiveSink;

/// The real archive, refusing chosen instances (once, or always) and
/// recording what it was asked to deliver; optionally stalling forever.
type Faulty = FaultyPacsSink<LocalArchiveSink>;

/// Why the archive refuses an instance.
const REASON: &str = "C-STORE status 0xA700: out of resources";

struct Setup {
    e: Embedded,
    sink: Arc<Faulty>,
    sid: SessionId,
    uids: Vec<Uid>,
    _dir: tempfile::TempDir,
}

async fn setup(n: usize, refuse: &[usize], transient: bool, once: bool, stall: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let slot: Arc<Mutex<Option<Arc<Faulty>>>> = Arc::default();
    let s2 = slot.clone();
    let e = Embedded::open_wrapped(
        dir.path(),
        PipelineConfig::default(),
        &StateDb::Sqlite,
        move |a| {
            let f = Arc::new(FaultyPacsSink::counting(Arc::new(a)));
            if stall {
                f.stall_next_deliver();
            }
            *s2.lock().unwrap() = Some(f.clone());
            f
        },
    )
    .await
    .unwrap();
    let sink = slot.lock().unwrap().clone().unwrap();
    let actor = Actor::user("alice");
    let sid = open_session(&e.pipeline, &actor).await.unwrap();
    let study = new_study();
    let mut uids = Vec::new();
    for i in 0..n {
        let f = upload_file(
            &e.pipeline,
            &actor,
            sid,
            &format!("f{i}"),
            &dicom(&study, i as u64),
            1 << 20,
        )
        .await
        .unwrap();
        match f.state {
            relaypacs_core::FileState::Valid { dicom } => uids.push(dicom.sop_instance_uid),
            s => panic!("{s:?}"),
        }
    }
    let refusal = if transient {
        Refusal::transient(REASON)
    } else {
        Refusal::permanent(REASON)
    };
    sink.refuse(
        refuse.iter().map(|i| uids[*i].clone()),
        if once { refusal.once() } else { refusal },
    );
    e.pipeline.complete_session(&actor, sid).await.unwrap();
    Setup {
        e,
        sink,
        sid,
        uids,
        _dir: dir,
    }
}

fn fast() -> OutboxConfig {
    OutboxConfig {
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
        ..OutboxConfig::default()
    }
}

async fn state(s: &Setup) -> relaypacs_core::SessionRecord {
    s.e.sessions.load_session(s.sid).await.unwrap().value
}

/// FWD-1: a 202-like partial refusal retries only the refused instance,
/// and the audit splits what was delivered from what was not (AUD-3).
#[tokio::test]
async fn a_partial_refusal_retries_only_the_refused_instance() {
    let s = setup(3, &[1], true, true, false).await;
    let p = &s.e.pipeline;
    let (ev, next) = p.attempt_delivery(s.sid, "w", &fast()).await.unwrap();
    assert!(
        matches!(ev, Some(relaypacs_core::OutboxEvent::Retrying { .. })),
        "{ev:?}"
    );
    assert!(matches!(next, Next::At(_)));
    let rec = state(&s).await;
    assert_eq!(rec.state, SessionState::Forwarding);
    assert_eq!(rec.delivery.confirmed.len(), 2);
    assert!(
        rec.delivery
            .last_error
            .as_deref()
            .unwrap()
            .contains("0xA700")
    );
    let audit = s.e.audit.events().await.unwrap();
    let fwd: Vec<_> = audit
        .iter()
        .filter(|e| e.action == AuditAction::Forwarded)
        .collect();
    assert!(
        fwd.iter()
            .any(|e| e.outcome == AuditOutcome::Success && e.detail.starts_with("instances=2"))
    );
    assert!(fwd.iter().any(|e| e.outcome == AuditOutcome::MinorFailure && e.detail.starts_with("instances=1")));

    tokio::time::sleep(Duration::from_millis(20)).await;
    s.sink.clear_asked();
    let (ev, _) = p.attempt_delivery(s.sid, "w", &fast()).await.unwrap();
    assert!(
        matches!(
            ev,
            Some(relaypacs_core::OutboxEvent::Delivered { instances: 3, .. })
        ),
        "{ev:?}"
    );
    assert_eq!(
        s.sink.asked(),
        vec![s.uids[1].clone()],
        "only the refused one again"
    );
    assert!(matches!(
        state(&s).await.state,
        SessionState::Delivered { .. }
    ));
}

/// FWD-1: a permanent refusal goes to dead letters at the first attempt.
#[tokio::test]
async fn a_permanent_refusal_is_a_dead_letter_at_once() {
    let s = setup(2, &[0], false, false, false).await;
    let (ev, next) =
        s.e.pipeline
            .attempt_delivery(s.sid, "w", &fast())
            .await
            .unwrap();
    assert!(
        matches!(ev, Some(relaypacs_core::OutboxEvent::DeadLettered { .. })),
        "{ev:?}"
    );
    assert_eq!(next, Next::Done);
    let rec = state(&s).await;
    match rec.state {
        SessionState::DeadLetter { reason, .. } => assert!(reason.contains("0xA700"), "{reason}"),
        st => panic!("{st:?}"),
    }
    assert_eq!(rec.delivery.attempts, 1);
    // Not expired by time alone, and only an admin replays it.
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    assert!(
        s.e.pipeline
            .expire_sessions(later)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.e.pipeline
            .replay(&Actor::user("alice"), s.sid)
            .await
            .is_err()
    );
    s.sink.clear_refusals();
    s.e.pipeline
        .replay(
            &Actor {
                user: "root".into(),
                admin: true,
                address: None,
            },
            s.sid,
        )
        .await
        .unwrap();
    let (ev, _) =
        s.e.pipeline
            .attempt_delivery(s.sid, "w", &fast())
            .await
            .unwrap();
    assert!(
        matches!(ev, Some(relaypacs_core::OutboxEvent::Delivered { .. })),
        "{ev:?}"
    );
}

/// Retries stop after `max_attempts`: a dead letter naming the attempts.
#[tokio::test]
async fn transient_failures_give_up_after_max_attempts() {
    let s = setup(1, &[0], true, false, false).await;
    let c = OutboxConfig {
        max_attempts: 3,
        ..fast()
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.e.pipeline.attempt_delivery(s.sid, "w", &c).await.unwrap();
    }
    match state(&s).await.state {
        SessionState::DeadLetter { reason, .. } => {
            assert!(reason.contains("after 3 attempt"), "{reason}")
        }
        st => panic!("{st:?}"),
    }
}

/// A worker that died mid-attempt leaves its lease: a second worker on a
/// shared store waits for it to run out; the sole worker of an exclusive
/// store (the server's case, after a restart) takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_attempt_is_taken_over() {
    let s = setup(2, &[], true, false, true).await;
    let p = s.e.pipeline.clone();
    let sid = s.sid;
    let crashed = tokio::spawn(async move {
        let c = OutboxConfig {
            lease: Duration::from_secs(3600),
            ..fast()
        };
        p.attempt_delivery(sid, "dead-worker", &c).await
    });
    // Wait until the worker is inside the sink, then "crash" it.
    for _ in 0..500 {
        if s.sink.is_stalled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    crashed.abort();
    let rec = state(&s).await;
    assert_eq!(rec.delivery.lease_owner.as_deref(), Some("dead-worker"));

    let shared = OutboxConfig {
        exclusive: false,
        ..fast()
    };
    let (ev, next) =
        s.e.pipeline
            .attempt_delivery(sid, "other", &shared)
            .await
            .unwrap();
    assert!(ev.is_none(), "a live lease is respected on a shared store");
    assert!(
        matches!(next, Next::At(t) if t > time::OffsetDateTime::now_utc() + time::Duration::minutes(30))
    );
    assert!(s.sink.asked().is_empty());

    let exclusive = OutboxConfig {
        exclusive: true,
        ..fast()
    };
    let (ev, _) =
        s.e.pipeline
            .attempt_delivery(sid, "restarted", &exclusive)
            .await
            .unwrap();
    assert!(
        matches!(ev, Some(relaypacs_core::OutboxEvent::Delivered { .. })),
        "{ev:?}"
    );
    assert_eq!(state(&s).await.delivery.lease_owner, None);
}

/// A batch of due entries: the leases in one store write, the sends, the
/// outcomes in another; each entry ends as its own attempt would (one
/// delivered, one dead letter), entries not to attempt are answered
/// without a write, and every attempt is audited as alone.
#[tokio::test]
async fn a_batch_ends_each_entry_as_its_own_attempt_would() {
    let s = setup(1, &[], false, false, false).await;
    let actor = Actor::user("alice");
    let p = &s.e.pipeline;
    // A second completed study, refused for good by the archive.
    let refused = open_session(p, &actor).await.unwrap();
    let f = upload_file(p, &actor, refused, "r", &dicom(&new_study(), 9), 1 << 20)
        .await
        .unwrap();
    let relaypacs_core::FileState::Valid { dicom: d } = f.state else {
        panic!("{:?}", f.state)
    };
    s.sink
        .refuse([d.sop_instance_uid.clone()], Refusal::permanent(REASON));
    p.complete_session(&actor, refused).await.unwrap();
    // An open study (nothing to deliver) and an id nobody holds.
    let open = open_session(p, &actor).await.unwrap();
    let unknown = SessionId::random();
    let ids = [s.sid, refused, open, unknown, s.sid];
    let answers = p.attempt_deliveries(&ids, "w", &fast()).await;
    assert_eq!(answers.len(), 4, "one answer per distinct id: {answers:?}");
    for (id, answer) in answers {
        let (ev, next) = answer.unwrap();
        if id == s.sid {
            assert!(
                matches!(ev, Some(relaypacs_core::OutboxEvent::Delivered { .. })),
                "{ev:?}"
            );
            // Then a report check, if a report source is set (none here).
            assert_eq!(next, Next::Done);
        } else if id == refused {
            assert!(
                matches!(ev, Some(relaypacs_core::OutboxEvent::DeadLettered { .. })),
                "{ev:?}"
            );
            assert_eq!(next, Next::Done);
        } else {
            assert_eq!(ev, None, "{id}");
            assert_eq!(next, Next::Done, "{id}");
        }
    }
    let delivered = state(&s).await;
    assert!(
        matches!(delivered.state, SessionState::Delivered { .. }),
        "{:?}",
        delivered.state
    );
    assert_eq!(delivered.delivery.attempts, 1);
    assert_eq!(
        delivered.delivery.lease_owner, None,
        "the lease is released"
    );
    let dead = s.e.sessions.load_session(refused).await.unwrap().value;
    assert!(
        matches!(dead.state, SessionState::DeadLetter { .. }),
        "{:?}",
        dead.state
    );
    assert_eq!(dead.delivery.attempts, 1);
    let opened = s.e.sessions.load_session(open).await.unwrap().value;
    assert_eq!(
        opened.delivery.attempts, 0,
        "an open study is not attempted"
    );
    // Each attempt audited as alone: its start, and its outcome (the
    // queueing at completion is the uploader's record).
    let audit = s.e.audit.events().await.unwrap();
    for (sid, outcome) in [
        (s.sid, AuditOutcome::Success),
        (refused, AuditOutcome::SeriousFailure),
    ] {
        let of = |action| {
            audit
                .iter()
                .filter(|e| {
                    e.session == Some(sid) && e.action == action && e.user == "system:outbox"
                })
                .collect::<Vec<_>>()
        };
        let started = of(AuditAction::ForwardStarted);
        assert_eq!(started.len(), 1, "{sid}: {started:?}");
        assert!(started[0].detail.starts_with("attempt=1 "), "{started:?}");
        let fwd = of(AuditAction::Forwarded);
        assert_eq!(fwd.len(), 1, "{sid}: {fwd:?}");
        assert_eq!(fwd[0].outcome, outcome, "{sid}");
    }
    // Nothing left to do for them: a second pass writes nothing.
    let again = p.attempt_deliveries(&[s.sid, refused], "w", &fast()).await;
    for (id, answer) in again {
        let (ev, _) = answer.unwrap();
        assert_eq!(ev, None, "{id}");
    }
    assert_eq!(state(&s).await.delivery.attempts, 1);
}

/// Records each batch of events the worker reports, as one list.
#[derive(Default)]
struct Batches(Mutex<Vec<Vec<relaypacs_core::OutboxEvent>>>);

#[relaypacs_core::async_trait]
impl relaypacs_core::OutboxListener for Batches {
    async fn on_event(&self, event: &relaypacs_core::OutboxEvent) {
        self.0.lock().unwrap().push(vec![event.clone()]);
    }

    async fn on_events(&self, events: &[relaypacs_core::OutboxEvent]) {
        self.0.lock().unwrap().push(events.to_vec());
    }
}

/// Three studies completed one after another while the worker runs: with
/// a `linger` longer than the completions take, the first waits for the
/// others and the three are delivered as one batch (one report to the
/// listener); when they fill the batch, they go at once instead of
/// waiting out a `linger` of a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_not_yet_full_lingers_for_more_entries() {
    for (batch, linger) in [(8, Duration::from_secs(3)), (3, Duration::from_secs(60))] {
        let dir = tempfile::tempdir().unwrap();
        let e = Embedded::open(dir.path(), PipelineConfig::default())
            .await
            .unwrap();
        let actor = Actor::user("alice");
        let mut sids = Vec::new();
        for i in 0..3 {
            let sid = open_session(&e.pipeline, &actor).await.unwrap();
            upload_file(
                &e.pipeline,
                &actor,
                sid,
                "f",
                &dicom(&new_study(), i),
                1 << 20,
            )
            .await
            .unwrap();
            sids.push(sid);
        }
        let batches = Arc::new(Batches::default());
        let worker = relaypacs_core::Outbox::new(
            e.pipeline.clone(),
            OutboxConfig {
                batch,
                linger,
                ..fast()
            },
            batches.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        let started = std::time::Instant::now();
        for sid in &sids {
            e.pipeline.complete_session(&actor, *sid).await.unwrap();
        }
        let queued_in = started.elapsed();
        assert!(queued_in < linger / 2, "completions took {queued_in:?}");
        // Within 20 s: a third of the minute a full batch would otherwise
        // have waited.
        let deadline = started + Duration::from_secs(20);
        for sid in &sids {
            while !matches!(
                e.sessions.load_session(*sid).await.unwrap().value.state,
                SessionState::Delivered { .. }
            ) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "batch {batch}: not delivered"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = stop.send(());
        run.await.unwrap();
        let seen = batches.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "batch {batch}: {seen:?}");
        assert_eq!(seen[0].len(), 3, "batch {batch}: {seen:?}");
        assert!(
            seen[0]
                .iter()
                .all(|ev| matches!(ev, relaypacs_core::OutboxEvent::Delivered { .. })),
            "{seen:?}"
        );
        e.close().await;
    }
}
