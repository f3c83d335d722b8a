//! Exactly one `delivered` notification per study, on SQLite and on
//! PostgreSQL, even when the process died between the delivery's commit
//! and the notification's insert: the repair pass (run at every start and
//! every minute, by every gateway) creates the missing one, once however
//! many gateways run it at the same time; two delivery notifiers racing on
//! one event insert one row. The same for each report found after
//! delivery: one `report_ready` notification per report, repaired when the
//! process died between recording the report and notifying it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use relaypacs_core::testing::report_source::sample_report as report;
use relaypacs_core::{OutboxEvent, OutboxListener, SessionState, SessionStore, Verification};
use relaypacs_http::metrics::Metrics;
use relaypacs_http::notify::{
    DeliveryNotifier, Hub, NotificationKind, REPAIR_WINDOW, delivered_message, report_message,
};
use relaypacs_storage::{SqlNotificationStore, SqlOptions, SqlSessionStore, SqlState};

async fn gateway(url: &str) -> SqlState {
    SqlState::connect(url, None, &SqlOptions::default())
        .await
        .unwrap()
}

/// A study as the outbox commits it once the PACS confirmed its
/// `instances`: delivered, content-verified.
fn delivered(owner: &str, instances: usize) -> relaypacs_core::SessionRecord {
    let mut rec = relaypacs_core::testing::session_store::sample_session();
    rec.owner = owner.into();
    rec.state = SessionState::Delivered {
        at: time::OffsetDateTime::now_utc(),
        sink: "test".into(),
        verified: Verification::Content,
    };
    rec.delivery.confirmed = (0..instances)
        .map(|i| (format!("1.2.826.0.1.{i}"), Verification::Content))
        .collect();
    rec
}

async fn exactly_one_delivered_per_study(url: &str) {
    let db = gateway(url).await;
    let sessions = SqlSessionStore::new(db.clone());
    // The delivery committed; the notification was never written (no hub
    // was running: the process died in between).
    let lost = delivered("nora", 3);
    sessions.create_session(&lost).await.unwrap();
    let study = lost.id.to_string();

    // Three gateways start at once; each runs the repair at start.
    let (a, b, c) = tokio::join!(
        async { Hub::open(SqlNotificationStore::new(gateway(url).await), None).await },
        async { Hub::open(SqlNotificationStore::new(gateway(url).await), None).await },
        async { Hub::open(SqlNotificationStore::new(gateway(url).await), None).await },
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let list = a.list("nora").await.unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].kind, NotificationKind::Delivered);
    assert_eq!(list[0].study, study);
    assert_eq!(list[0].verified, Some(Verification::Content));
    assert_eq!(list[0].message, delivered_message(3, Verification::Content));
    assert_eq!(b.list("nora").await.unwrap(), list);
    // Later passes, on every gateway at once, find nothing to do.
    let (ra, rb, rc) = tokio::join!(a.repair(), b.repair(), c.repair());
    assert_eq!(ra.unwrap() + rb.unwrap() + rc.unwrap(), 0);
    // The outbox's own event arriving late (after a repair) adds nothing.
    let notifier = DeliveryNotifier::new(c.clone(), Arc::new(Metrics::default()));
    notifier
        .on_event(&OutboxEvent::Delivered {
            session: lost.id,
            owner: "nora".into(),
            instances: 3,
            sink: "test".into(),
            verified: Verification::Content,
        })
        .await;
    assert_eq!(c.list("nora").await.unwrap(), list);

    // Two gateways' notifiers racing on one delivery: one row, 50 rounds.
    let (na, nb) = (
        DeliveryNotifier::new(a.clone(), Arc::new(Metrics::default())),
        DeliveryNotifier::new(b.clone(), Arc::new(Metrics::default())),
    );
    for round in 0..50 {
        let rec = delivered("otto", 1);
        sessions.create_session(&rec).await.unwrap();
        let ev = OutboxEvent::Delivered {
            session: rec.id,
            owner: "otto".into(),
            instances: 1,
            sink: "test".into(),
            verified: Verification::Content,
        };
        // A repair pass runs at the same time as the two notifiers.
        let (_, _, r) = tokio::join!(na.on_event(&ev), nb.on_event(&ev), c.repair());
        r.unwrap();
        let rows = a
            .list("otto")
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.study == rec.id.to_string())
            .count();
        assert_eq!(rows, 1, "round {round}");
    }
    assert_eq!(a.list("otto").await.unwrap().len(), 50);
    // Nothing left for a repair, and nora still has exactly one.
    assert_eq!(a.repair().await.unwrap(), 0);
    assert_eq!(a.list("nora").await.unwrap(), list);

    // A delivery lost while the gateways run: the periodic pass, which
    // reads only the recent window, repairs it, once across gateways.
    let late = delivered("nora", 1);
    sessions.create_session(&late).await.unwrap();
    let (ra, rb) = tokio::join!(
        a.repair_recent(REPAIR_WINDOW),
        b.repair_recent(REPAIR_WINDOW)
    );
    assert_eq!(ra.unwrap() + rb.unwrap(), 1);
    let now = a.list("nora").await.unwrap();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().any(|n| n.study == late.id.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_exactly_one_delivered_per_study() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    exactly_one_delivered_per_study(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_exactly_one_delivered_per_study() {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("relay");
    exactly_one_delivered_per_study(&url).await;
}

async fn exactly_one_report_ready_per_report(url: &str) {
    let db = gateway(url).await;
    let sessions = SqlSessionStore::new(db.clone());
    // A delivered study whose report check recorded two reports; the
    // process died before notifying them.
    let mut rec = delivered("rita", 2);
    rec.delivery.reports = vec![report("1.2.7.1"), report("1.2.7.2")];
    sessions.create_session(&rec).await.unwrap();
    let study = rec.id.to_string();
    // Two gateways start at once; each repairs at start.
    let (a, b) = tokio::join!(
        async { Hub::open(SqlNotificationStore::new(gateway(url).await), None).await },
        async { Hub::open(SqlNotificationStore::new(gateway(url).await), None).await },
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let list = a.list("rita").await.unwrap();
    let reports: Vec<_> = list
        .iter()
        .filter(|n| n.kind == NotificationKind::ReportReady)
        .collect();
    assert_eq!(reports.len(), 2, "{list:?}");
    assert!(reports.iter().all(|n| n.study == study));
    let mut messages: Vec<_> = reports.iter().map(|n| n.message.clone()).collect();
    messages.sort();
    assert_eq!(
        messages,
        [report_message("1.2.7.1"), report_message("1.2.7.2")]
    );
    // With the study's own `delivered` notification, repaired too.
    assert_eq!(list.len(), 3, "{list:?}");
    // Later passes find nothing; the worker's own event arriving late adds
    // nothing either.
    assert_eq!(a.repair().await.unwrap() + b.repair().await.unwrap(), 0);
    assert_eq!(b.repair_recent(REPAIR_WINDOW).await.unwrap(), 0);
    DeliveryNotifier::new(b.clone(), Arc::new(Metrics::default()))
        .on_event(&OutboxEvent::ReportReady {
            session: rec.id,
            owner: "rita".into(),
            report: report("1.2.7.1"),
        })
        .await;
    assert_eq!(a.list("rita").await.unwrap(), list);
    // A third report found while the gateways run, its notification lost:
    // the periodic pass (recent window) creates it, once across gateways.
    let mut current = sessions.load_session(rec.id).await.unwrap();
    current.value.delivery.reports.push(report("1.2.7.3"));
    current.value.updated_at = time::OffsetDateTime::now_utc();
    sessions
        .update_session(&current.value, current.version)
        .await
        .unwrap();
    let (ra, rb) = tokio::join!(
        a.repair_recent(REPAIR_WINDOW),
        b.repair_recent(REPAIR_WINDOW)
    );
    assert_eq!(ra.unwrap() + rb.unwrap(), 1);
    assert_eq!(a.list("rita").await.unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_exactly_one_report_ready_per_report() {
    let dir = tempfile::TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    exactly_one_report_ready_per_report(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_exactly_one_report_ready_per_report() {
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
        .await
        .unwrap();
    let url = pg.create_database("relay");
    exactly_one_report_ready_per_report(&url).await;
}
