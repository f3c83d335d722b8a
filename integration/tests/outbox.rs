//! The outbox on the embedded adapters, with faults injected around the
//! real local archive sink: per-instance retries after a partial refusal
//! (and the audit split), dead letters at the first permanent refusal,
//! one worker at a time (leases), and a crashed attempt taken over.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::SessionStore as _;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use relaypacs_core::{
    Actor, AuditAction, AuditOutcome, AuditSink, DeliveryReport, Holding, Instance,
    InstanceOutcome, InstanceSource, Next, OutboxConfig, PacsSink, PipelineConfig, Result,
    SessionId, SessionState, Uid,
};
use relaypacs_integration::{Embedded, dicom, new_study, open_session, upload_file};
use relaypacs_pacs::LocalArchiveSink;

/// The real archive, refusing chosen instances (once, or always) and
/// recording what it was asked to deliver; optionally stalling forever.
#[derive(Debug)]
struct Faulty {
    inner: LocalArchiveSink,
    refuse: Mutex<HashSet<Uid>>,
    transient: bool,
    once: bool,
    stall: std::sync::atomic::AtomicBool,
    stalled: std::sync::atomic::AtomicBool,
    asked: Mutex<Vec<Uid>>,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

#[async_trait]
impl PacsSink for Faulty {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        // Stall the first call forever (a worker that hangs, then dies).
        if self.stall.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.stalled
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.asked
            .lock()
            .unwrap()
            .extend(instances.iter().map(|i| i.dicom.sop_instance_uid.clone()));
        let mut refuse = self.refuse.lock().unwrap().clone();
        let pass: Vec<Instance> = instances
            .iter()
            .filter(|i| !refuse.contains(&i.dicom.sop_instance_uid))
            .cloned()
            .collect();
        let mut done = self
            .inner
            .deliver(&pass, source)
            .await?
            .outcomes
            .into_iter();
        let outcomes = instances
            .iter()
            .map(|i| {
                let uid = i.dicom.sop_instance_uid.clone();
                if refuse.remove(&uid) {
                    let reason = "C-STORE status 0xA700: out of resources".to_owned();
                    (
                        uid,
                        InstanceOutcome::Failed {
                            transient: self.transient,
                            reason,
                        },
                    )
                } else {
                    done.next().unwrap()
                }
            })
            .collect();
        if self.once {
            self.refuse.lock().unwrap().clear();
        }
        Ok(DeliveryReport {
            outcomes,
            retry_after: None,
        })
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        self.inner.verify(instances).await
    }
}

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
    let e = Embedded::open_wrapped(dir.path(), PipelineConfig::default(), move |a| {
        let f = Arc::new(Faulty {
            inner: a,
            refuse: Mutex::default(),
            transient,
            once,
            stall: stall.into(),
            stalled: false.into(),
            asked: Mutex::default(),
        });
        *s2.lock().unwrap() = Some(f.clone());
        f
    })
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
    {
        let mut r = sink.refuse.lock().unwrap();
        for i in refuse {
            r.insert(uids[*i].clone());
        }
    }
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
    s.sink.asked.lock().unwrap().clear();
    let (ev, _) = p.attempt_delivery(s.sid, "w", &fast()).await.unwrap();
    assert!(
        matches!(
            ev,
            Some(relaypacs_core::OutboxEvent::Delivered { instances: 3, .. })
        ),
        "{ev:?}"
    );
    assert_eq!(
        *s.sink.asked.lock().unwrap(),
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
    s.sink.refuse.lock().unwrap().clear();
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
        if s.sink.stalled.load(std::sync::atomic::Ordering::SeqCst) {
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
    assert!(s.sink.asked.lock().unwrap().is_empty());

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
