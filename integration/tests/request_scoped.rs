//! A STOW-RS request's session belongs to that request: if the gateway dies
//! during the request, nobody can ever complete the session (no client
//! knows its id) and it would hold its owner's open-session cap until it
//! expires. Found by the soak campaign (RELIABILITY.md): at start the
//! pipeline ends such sessions, and only those.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::{
    Actor, AuditAction, AuditSink as _, Error, NewSession, PipelineConfig, SessionState,
};
use relaypacs_integration::{Embedded, PgCluster, dicom, new_study, upload_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_scoped_session_left_open_by_a_dead_run_is_ended_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let actor = Actor::user("lena");
    let sop = new_uid();
    let (orphan, kept, completed) = {
        let e = Embedded::open(dir.path(), PipelineConfig::default())
            .await
            .unwrap();
        let p = &e.pipeline;
        let scoped = NewSession {
            request_scoped: true,
            ..NewSession::default()
        };
        // A STOW-RS request stored one instance, then the gateway died.
        let orphan = p.create_session(&actor, scoped.clone()).await.unwrap().id;
        let file = generate(&DicomSpec {
            study_uid: new_study(),
            sop_instance_uid: sop.clone(),
            seed: 1,
            ..DicomSpec::default()
        })
        .unwrap();
        upload_file(p, &actor, orphan, "a.dcm", &file, 64 << 10)
            .await
            .unwrap();
        // A tus study in progress: its client knows its id and resumes.
        let kept = p
            .create_session(&actor, NewSession::default())
            .await
            .unwrap()
            .id;
        // A STOW-RS request that finished: acknowledged, in the outbox.
        let completed = p.create_session(&actor, scoped).await.unwrap().id;
        upload_file(
            p,
            &actor,
            completed,
            "b.dcm",
            &dicom(&new_study(), 2),
            64 << 10,
        )
        .await
        .unwrap();
        p.complete_session(&actor, completed).await.unwrap();
        (orphan, kept, completed)
    };

    // The next run.
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let ended = e.pipeline.end_orphaned_request_sessions().await.unwrap();
    assert_eq!(ended, vec![orphan]);
    assert!(matches!(
        e.pipeline.session(&actor, orphan).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(
        e.pipeline.session(&actor, kept).await.unwrap().state,
        SessionState::Open
    );
    assert_ne!(
        e.pipeline.session(&actor, completed).await.unwrap().state,
        SessionState::Open
    );
    // Its instance is no longer one the gateway accepted: other content
    // under the same SOP Instance UID is not a conflict (while the orphan
    // lived, it was refused as RELAY_INSTANCE_CONFLICT).
    let other = generate(&DicomSpec {
        study_uid: new_study(),
        sop_instance_uid: sop,
        seed: 99,
        ..DicomSpec::default()
    })
    .unwrap();
    let again = e
        .pipeline
        .create_session(&actor, NewSession::default())
        .await
        .unwrap()
        .id;
    let rec = upload_file(&e.pipeline, &actor, again, "a.dcm", &other, 64 << 10)
        .await
        .unwrap();
    assert!(matches!(rec.state, relaypacs_core::FileState::Valid { .. }));
    // Audited as aborted by the system, naming the owner.
    let events = e.audit.events().await.unwrap();
    let ev = events
        .iter()
        .find(|ev| ev.action == AuditAction::SessionAborted && ev.session == Some(orphan))
        .expect("the ending is audited");
    assert_eq!(ev.user, Actor::system().user);
    assert!(ev.detail.contains("lena"), "{}", ev.detail);
    // A second call finds nothing more to end.
    assert!(
        e.pipeline
            .end_orphaned_request_sessions()
            .await
            .unwrap()
            .is_empty()
    );
}

/// Several gateways on one PostgreSQL: a gateway starting leaves alone the
/// request-scoped session of a STOW-RS request another, running gateway
/// is serving, and ends it once that gateway is gone (its process, hence
/// its instance lock, ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_database_only_a_dead_gateways_request_sessions_are_ended() {
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let db = cluster.fresh_db();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let actor = Actor::user("lena");
    let a = Embedded::open_on(dir_a.path(), PipelineConfig::default(), &db)
        .await
        .unwrap();
    let scoped = NewSession {
        request_scoped: true,
        ..NewSession::default()
    };
    let live = a.pipeline.create_session(&actor, scoped).await.unwrap().id;
    upload_file(
        &a.pipeline,
        &actor,
        live,
        "a.dcm",
        &dicom(&new_study(), 1),
        64 << 10,
    )
    .await
    .unwrap();
    // B starts while A serves the request.
    let b = Embedded::open_on(dir_b.path(), PipelineConfig::default(), &db)
        .await
        .unwrap();
    assert!(
        b.pipeline
            .end_orphaned_request_sessions()
            .await
            .unwrap()
            .is_empty(),
        "a running gateway's request was ended"
    );
    // A's request goes on and completes.
    assert_eq!(
        a.pipeline.session(&actor, live).await.unwrap().state,
        SessionState::Open
    );
    let second = a
        .pipeline
        .create_session(
            &actor,
            NewSession {
                request_scoped: true,
                ..NewSession::default()
            },
        )
        .await
        .unwrap()
        .id;
    upload_file(
        &a.pipeline,
        &actor,
        second,
        "b.dcm",
        &dicom(&new_study(), 2),
        64 << 10,
    )
    .await
    .unwrap();
    a.pipeline.complete_session(&actor, live).await.unwrap();
    // A dies with `second` open: the next start ends it, and only it.
    a.close().await;
    drop(a);
    let ended = b.pipeline.end_orphaned_request_sessions().await.unwrap();
    assert_eq!(ended, vec![second]);
    assert_ne!(
        b.pipeline.session(&actor, live).await.unwrap().state,
        SessionState::Open
    );
    b.close().await;
}

#[tokio::test]
async fn clients_cannot_ask_for_a_request_scoped_session() {
    let req: NewSession =
        serde_json::from_str(r#"{"allow_multiple_studies":true,"request_scoped":true}"#).unwrap();
    assert!(!req.request_scoped);
    assert!(req.allow_multiple_studies);
}
