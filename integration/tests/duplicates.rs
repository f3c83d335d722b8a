//! The gateway knows what it accepted, and delivery proves content:
//! - the index of accepted instances makes a re-upload of the same data set
//!   an idempotent success and refuses other content under a known SOP
//!   Instance UID, exactly once under concurrency;
//! - a destination already holding an identical copy is not sent it again;
//!   one holding a different object is a conflict before a byte is sent,
//!   dead-lettered with the UID named, never retried blindly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::testing::faults::FaultyPacsSink;
use relaypacs_core::{
    Actor, DuplicatePolicy, Error, FileState, OutboxConfig, PipelineConfig, SessionState,
    Verification,
};
use relaypacs_integration::{Embedded, StateDb, open_session, upload_file};
use relaypacs_pacs::LocalArchiveSink;

/// A small file of `study` with the given SOP Instance UID; `seed` picks
/// the pixels, so two seeds give two different objects under one UID.
fn file(study: &str, sop: &str, seed: u64) -> Vec<u8> {
    generate(&DicomSpec {
        study_uid: study.to_owned(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: sop.to_owned(),
        seed,
        rows: 256,
        cols: 256,
        ..DicomSpec::default()
    })
    .unwrap()
}

fn warnings(rec: &relaypacs_core::FileRecord) -> Vec<String> {
    match &rec.state {
        FileState::Valid { dicom } => dicom.warnings.clone(),
        s => panic!("not valid: {s:?}"),
    }
}

/// Counts what the pipeline hands the archive.
type Counting = FaultyPacsSink<LocalArchiveSink>;

async fn open(dir: &std::path::Path, config: PipelineConfig) -> (Embedded, Arc<Counting>) {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s2 = slot.clone();
    let e = Embedded::open_wrapped(dir, config, &StateDb::Sqlite, move |a| {
        let c = Arc::new(Counting::counting(Arc::new(a)));
        *s2.lock().unwrap() = Some(c.clone());
        c
    })
    .await
    .unwrap();
    let c = slot.lock().unwrap().clone().unwrap();
    (e, c)
}

fn fast() -> OutboxConfig {
    OutboxConfig {
        base_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(5),
        ..OutboxConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_content_again_is_an_idempotent_success_pointing_at_the_earlier_study() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sink) = open(dir.path(), PipelineConfig::default()).await;
    let p = &e.pipeline;
    let (alice, bob) = (Actor::user("alice"), Actor::user("bob"));
    let study = new_uid();
    let sop = new_uid();
    let bytes = file(&study, &sop, 1);
    let s1 = open_session(p, &alice).await.unwrap();
    let first = upload_file(p, &alice, s1, "a.dcm", &bytes, 1 << 16)
        .await
        .unwrap();
    assert!(warnings(&first).is_empty(), "{:?}", warnings(&first));
    let done = p.complete_and_deliver(&alice, s1, &fast()).await.unwrap();
    assert!(
        matches!(
            done.state,
            SessionState::Delivered {
                verified: Verification::Content,
                ..
            }
        ),
        "{:?}",
        done.state
    );
    assert_eq!(sink.instances_asked(), 1);
    // Another user sends the same object later: accepted, with a warning
    // that names the earlier study (its Study Instance UID, which the
    // sender's own file carries; never the other user's session).
    let s2 = open_session(p, &bob).await.unwrap();
    let again = upload_file(p, &bob, s2, "b.dcm", &bytes, 1 << 16)
        .await
        .unwrap();
    let w = warnings(&again);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains(&sop) && w[0].contains(&study), "{w:?}");
    assert!(w[0].contains("same content"), "{w:?}");
    assert!(
        !w[0].contains(&s1.to_string()),
        "another user's session named"
    );
    // Delivery: the PACS check finds the identical copy; nothing is resent.
    let done = p.complete_and_deliver(&bob, s2, &fast()).await.unwrap();
    assert!(
        matches!(
            done.state,
            SessionState::Delivered {
                verified: Verification::Content,
                ..
            }
        ),
        "{:?}",
        done.state
    );
    assert_eq!(
        done.delivery.confirmed.get(&sop),
        Some(&Verification::Content)
    );
    assert_eq!(
        sink.instances_asked(),
        1,
        "an identical copy at the PACS was sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_content_under_a_known_uid_is_refused_until_the_earlier_upload_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _sink) = open(dir.path(), PipelineConfig::default()).await;
    let p = &e.pipeline;
    let alice = Actor::user("alice");
    let (study, sop) = (new_uid(), new_uid());
    let s1 = open_session(p, &alice).await.unwrap();
    upload_file(p, &alice, s1, "a.dcm", &file(&study, &sop, 1), 1 << 16)
        .await
        .unwrap();
    // Same UID, other pixels, in another session of another study.
    let other_study = new_uid();
    let s2 = open_session(p, &alice).await.unwrap();
    let err = upload_file(
        p,
        &alice,
        s2,
        "b.dcm",
        &file(&other_study, &sop, 2),
        1 << 16,
    )
    .await
    .unwrap_err();
    let Error::FileRefused {
        sop_instance_uid, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        sop_instance_uid.as_ref().map(|u| u.as_str()),
        Some(sop.as_str())
    );
    assert_eq!(err.code(), "RELAY_INSTANCE_CONFLICT");
    let msg = err.to_string();
    assert!(msg.contains(&sop) && msg.contains(&study), "{msg}");
    // The refused file left its session; the session is still open.
    let rec = p.session(&alice, s2).await.unwrap();
    assert!(rec.files.is_empty());
    assert_eq!(rec.state, SessionState::Open);
    // Completing a session with no valid file ends it (422).
    let err = p.complete_session(&alice, s2).await.unwrap_err();
    assert_eq!(err.code(), "RELAY_SESSION_EMPTY");
    assert!(matches!(
        p.session(&alice, s2).await,
        Err(Error::NotFound { .. })
    ));
    // Once the earlier (still open) upload is aborted, the UID is free.
    p.abort_session(&alice, s1).await.unwrap();
    let s3 = open_session(p, &alice).await.unwrap();
    let ok = upload_file(
        p,
        &alice,
        s3,
        "c.dcm",
        &file(&other_study, &sop, 2),
        1 << 16,
    )
    .await
    .unwrap();
    assert!(warnings(&ok).is_empty(), "{:?}", warnings(&ok));
    // Removing a valid file releases its claim too.
    p.remove_file(&alice, s3, ok.id).await.unwrap();
    let s4 = open_session(p, &alice).await.unwrap();
    upload_file(p, &alice, s4, "d.dcm", &file(&study, &sop, 3), 1 << 16)
        .await
        .unwrap();
}

/// Two sessions race with one SOP Instance UID and different bytes:
/// exactly one is accepted, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_racing_with_one_uid_exactly_one_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _sink) = open(
        dir.path(),
        PipelineConfig {
            // Every round leaves its sessions open: more than the default cap.
            max_open_sessions_per_user: 1000,
            ..PipelineConfig::default()
        },
    )
    .await;
    let p = &e.pipeline;
    let (alice, bob) = (Actor::user("alice"), Actor::user("bob"));
    for round in 0..120 {
        let sop = new_uid();
        let a = file(&new_uid(), &sop, 2 * round);
        let b = file(&new_uid(), &sop, 2 * round + 1);
        let sa = open_session(p, &alice).await.unwrap();
        let sb = open_session(p, &bob).await.unwrap();
        let (ra, rb) = tokio::join!(
            upload_file(p, &alice, sa, "a", &a, 1 << 16),
            upload_file(p, &bob, sb, "b", &b, 1 << 16)
        );
        let oks = [ra.is_ok(), rb.is_ok()];
        assert_eq!(
            oks.iter().filter(|o| **o).count(),
            1,
            "round {round}: {ra:?} {rb:?}"
        );
        for r in [ra, rb].into_iter().filter_map(|r| r.err()) {
            assert_eq!(r.code(), "RELAY_INSTANCE_CONFLICT", "round {round}: {r:?}");
        }
    }
}

/// The same race where both sessions finish their bytes first and then
/// complete at the same instant (the claim, not the upload, decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_completions_racing_with_one_uid_exactly_one_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let (e, _sink) = open(
        dir.path(),
        PipelineConfig {
            // Every round leaves its sessions open: more than the default cap.
            max_open_sessions_per_user: 1000,
            ..PipelineConfig::default()
        },
    )
    .await;
    let p = e.pipeline.clone();
    let alice = Actor::user("alice");
    for round in 0..100 {
        let sop = new_uid();
        let mut pending = Vec::new();
        for seed in [2 * round, 2 * round + 1] {
            let bytes = file(&new_uid(), &sop, seed);
            let s = open_session(&p, &alice).await.unwrap();
            let f = p
                .add_file(
                    &alice,
                    s,
                    relaypacs_core::NewFile {
                        name: "x".into(),
                        size: bytes.len() as u64,
                        sha256: None,
                    },
                )
                .await
                .unwrap();
            relaypacs_integration::put(&p, &alice, s, f.id, 0, &bytes)
                .await
                .unwrap();
            pending.push((s, f.id));
        }
        let tasks: Vec<_> = pending
            .into_iter()
            .map(|(s, f)| {
                let p = p.clone();
                let a = alice.clone();
                tokio::spawn(async move { p.complete_file(&a, s, f).await })
            })
            .collect();
        let mut accepted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => accepted += 1,
                Err(e) => assert_eq!(e.code(), "RELAY_INSTANCE_CONFLICT", "{e:?}"),
            }
        }
        assert_eq!(accepted, 1, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_holding_another_object_under_the_uid_is_a_conflict_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sink) = open(dir.path(), PipelineConfig::default()).await;
    let p = &e.pipeline;
    let alice = Actor::user("alice");
    let (study, sop) = (new_uid(), new_uid());
    let ours = file(&study, &sop, 1);
    let s = open_session(p, &alice).await.unwrap();
    let rec = upload_file(p, &alice, s, "a.dcm", &ours, 1 << 16)
        .await
        .unwrap();
    // The PACS (the archive) already keeps another version of it.
    let FileState::Valid { dicom } = &rec.state else {
        panic!()
    };
    let path = e.archive.instance_path(
        &dicom.study_instance_uid,
        &dicom.series_instance_uid,
        &dicom.sop_instance_uid,
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let theirs = file(&study, &sop, 99);
    std::fs::write(&path, &theirs).unwrap();
    let done = p.complete_and_deliver(&alice, s, &fast()).await.unwrap();
    let SessionState::DeadLetter { reason, .. } = &done.state else {
        panic!(
            "a conflicting PACS copy was not dead-lettered: {:?}",
            done.state
        )
    };
    assert!(
        reason.contains(&sop) && reason.contains("different object"),
        "{reason}"
    );
    assert_eq!(done.delivery.attempts, 1, "never retried blindly");
    assert!(done.delivery.confirmed.is_empty());
    assert_eq!(
        sink.instances_asked(),
        0,
        "bytes were sent to a PACS holding another object"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        theirs,
        "the PACS copy changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_policy_lets_other_content_in_but_never_calls_it_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let config = PipelineConfig {
        duplicates: DuplicatePolicy::Accept,
        ..PipelineConfig::default()
    };
    let (e, sink) = open(dir.path(), config).await;
    let p = &e.pipeline;
    let alice = Actor::user("alice");
    let (study, sop) = (new_uid(), new_uid());
    let s1 = open_session(p, &alice).await.unwrap();
    upload_file(p, &alice, s1, "a.dcm", &file(&study, &sop, 1), 1 << 16)
        .await
        .unwrap();
    let done = p.complete_and_deliver(&alice, s1, &fast()).await.unwrap();
    assert!(matches!(done.state, SessionState::Delivered { .. }));
    let s2 = open_session(p, &alice).await.unwrap();
    let f = upload_file(p, &alice, s2, "b.dcm", &file(&study, &sop, 2), 1 << 16)
        .await
        .unwrap();
    let w = warnings(&f);
    assert!(
        w.iter()
            .any(|w| w.contains("other content") && w.contains(&sop)),
        "{w:?}"
    );
    let done = p.complete_and_deliver(&alice, s2, &fast()).await.unwrap();
    assert!(
        matches!(done.state, SessionState::DeadLetter { .. }),
        "{:?}",
        done.state
    );
    assert_eq!(sink.instances_asked(), 1);
}
