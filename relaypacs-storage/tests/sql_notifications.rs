//! `SqlNotificationStore` on SQLite (a file) and PostgreSQL (a throwaway
//! cluster): one notification per (study, kind, subject) however many
//! gateways race, ever (a notification pruned by the cap is not created
//! again); the per-user cap, newest last; owner-only read marks; the
//! repair pass's query for deliveries whose notification was never
//! written; batches of inserts racing the same way.
#![cfg(all(feature = "sqlite", feature = "postgres"))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::report_source::sample_report as report;
use relaypacs_core::{SessionState, SessionStore, Verification};
use relaypacs_storage::sql_notifications::{MAX_PER_USER, NewNotification};
use relaypacs_storage::{SqlNotificationStore, SqlOptions, SqlSessionStore, SqlState};

/// A database URL and what keeps it alive.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(#[allow(dead_code)] relaypacs_test_peers::Postgres, String),
}

impl Db {
    async fn sqlite() -> Self {
        Db::Sqlite(tempfile::TempDir::new().unwrap())
    }
    async fn postgres() -> Self {
        let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start)
            .await
            .unwrap();
        let url = pg.create_database("relay");
        Db::Postgres(pg, url)
    }
    fn url(&self) -> String {
        match self {
            Db::Sqlite(d) => format!("sqlite://{}", d.path().join("state.db").display()),
            Db::Postgres(_, u) => u.clone(),
        }
    }
    /// A gateway's own pool on the database.
    async fn gateway(&self) -> SqlState {
        SqlState::connect(&self.url(), None, &SqlOptions::default())
            .await
            .unwrap()
    }
}

fn new<'a>(id: &'a str, owner: &'a str, study: &'a str, subject: &'a str) -> NewNotification<'a> {
    NewNotification {
        id,
        owner,
        kind: "delivered",
        study,
        subject,
        created_at: "2026-11-30T20:00:00Z",
        body: id,
    }
}

async fn racing_inserts_create_one(db: Db) {
    let (a, b) = (
        SqlNotificationStore::new(db.gateway().await),
        SqlNotificationStore::new(db.gateway().await),
    );
    for round in 0..100 {
        let study = format!("study-{round}");
        let (ia, ib) = (format!("a{round}"), format!("b{round}"));
        let (na, nb) = (new(&ia, "u", &study, ""), new(&ib, "u", &study, ""));
        let (ra, rb) = tokio::join!(a.insert(&na, None), b.insert(&nb, None));
        let created = [ra.unwrap(), rb.unwrap()].into_iter().flatten().count();
        assert_eq!(created, 1, "round {round}");
    }
    let list = a.list("u").await.unwrap();
    assert_eq!(list.len(), 100);
    // The list is the same from either gateway.
    assert_eq!(b.list("u").await.unwrap(), list);
    // One per report: another subject of the same study is a new one.
    assert!(
        a.insert(&new("r1", "u", "study-0", "1.2.3"), None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_inserts_create_one() {
    racing_inserts_create_one(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_racing_inserts_create_one() {
    racing_inserts_create_one(Db::postgres().await).await;
}

/// Batches (`insert_many`, one transaction each) racing on two gateways,
/// over keys in opposite orders and owners that cross: each (study, kind,
/// subject) created once, answers in the batch's order, no deadlock; a
/// key twice in one batch is created once; the cap holds within a batch.
async fn racing_batches_create_each_once(db: Db) {
    let (a, b) = (
        SqlNotificationStore::new(db.gateway().await),
        SqlNotificationStore::new(db.gateway().await),
    );
    for round in 0..100 {
        let studies: Vec<String> = (0..4).map(|i| format!("r{round}-s{i}")).collect();
        let ids: Vec<String> = (0..8).map(|i| format!("r{round}-n{i}")).collect();
        let owner = |i: usize| if i.is_multiple_of(2) { "u" } else { "w" };
        // Gateway a: studies 0..3 in order; b: studies 3..0, plus its own 4th.
        let batch_a: Vec<_> = (0..3)
            .map(|i| (new(&ids[i], owner(i), &studies[i], ""), None))
            .collect();
        let batch_b: Vec<_> = (1..4)
            .rev()
            .map(|i| (new(&ids[4 + i], owner(i + 1), &studies[i], ""), None))
            .collect();
        let (ra, rb) = tokio::join!(a.insert_many(&batch_a), b.insert_many(&batch_b));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!((ra.len(), rb.len()), (3, 3));
        for (answer, (n, _)) in ra.iter().zip(&batch_a).chain(rb.iter().zip(&batch_b)) {
            if let Some(stored) = answer {
                assert_eq!(stored.id, n.id, "answers in order");
            }
        }
        // Studies 1 and 2 are in both batches: one each; 0 and 3 in one.
        let created = ra.iter().chain(&rb).flatten().count();
        assert_eq!(created, 4, "round {round}: {ra:?} {rb:?}");
        assert!(ra[0].is_some() && rb[0].is_some(), "round {round}");
    }
    // A key twice in one batch: the first made, the second refused.
    let dup = [
        (new("d1", "u", "dup", ""), None),
        (new("d2", "u", "dup", ""), None),
    ];
    let made = a.insert_many(&dup).await.unwrap();
    assert!(made[0].is_some() && made[1].is_none(), "{made:?}");
    assert!(a.insert_many(&[]).await.unwrap().is_empty());
    // The cap holds within one batch.
    let many: Vec<(String, String)> = (0..MAX_PER_USER as usize + 3)
        .map(|i| (format!("c{i:05}"), format!("cap-{i}")))
        .collect();
    let batch: Vec<_> = many
        .iter()
        .map(|(id, study)| (new(id, "capped", study, ""), None))
        .collect();
    assert_eq!(
        a.insert_many(&batch)
            .await
            .unwrap()
            .iter()
            .flatten()
            .count(),
        many.len()
    );
    let list = b.list("capped").await.unwrap();
    assert_eq!(list.len(), MAX_PER_USER as usize);
    assert_eq!(list.last().unwrap().id, many.last().unwrap().0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_racing_batches_create_each_once() {
    racing_batches_create_each_once(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_racing_batches_create_each_once() {
    racing_batches_create_each_once(Db::postgres().await).await;
}

async fn cap_order_and_owner(db: Db) {
    let s = SqlNotificationStore::new(db.gateway().await);
    let extra = 5;
    let total = MAX_PER_USER as usize + extra;
    for i in 0..total {
        let id = format!("n{i:05}");
        s.insert(&new(&id, "u", &format!("s{i}"), ""), None)
            .await
            .unwrap()
            .unwrap();
    }
    s.insert(&new("v0", "v", "sv", ""), None)
        .await
        .unwrap()
        .unwrap();
    let list = s.list("u").await.unwrap();
    assert_eq!(list.len(), MAX_PER_USER as usize);
    // Oldest deleted first; newest last.
    assert_eq!(list[0].id, format!("n{extra:05}"));
    assert_eq!(list.last().unwrap().id, format!("n{:05}", total - 1));
    assert!(list.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(s.list("v").await.unwrap().len(), 1);
    // A pruned notification is not created again.
    assert!(
        s.insert(&new("again", "u", "s0", ""), None)
            .await
            .unwrap()
            .is_none()
    );
    // Owner only.
    let id = &list[0].id;
    assert!(s.mark_read("v", id).await.unwrap().is_none());
    assert!(s.held_by_another("v", id).await.unwrap());
    assert!(!s.held_by_another("u", id).await.unwrap());
    assert!(!s.held_by_another("v", "unknown").await.unwrap());
    assert!(!s.list("u").await.unwrap()[0].read);
    let marked = s.mark_read("u", id).await.unwrap().unwrap();
    assert!(marked.read);
    assert!(s.get(id).await.unwrap().unwrap().read);
    assert!(s.list("u").await.unwrap()[0].read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_cap_order_and_owner() {
    cap_order_and_owner(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cap_order_and_owner() {
    cap_order_and_owner(Db::postgres().await).await;
}

async fn missed_lists_deliveries_without_notification(db: Db) {
    let state = db.gateway().await;
    let sessions = SqlSessionStore::new(state.clone());
    let s = SqlNotificationStore::new(state);
    // A delivered study, as the outbox commits it, whose notification the
    // process never wrote (it died in between).
    let mut rec = relaypacs_core::testing::session_store::sample_session();
    rec.state = SessionState::Delivered {
        at: time::OffsetDateTime::now_utc(),
        sink: "test".into(),
        verified: Verification::Content,
    };
    rec.delivery.confirmed = [
        ("1.2.3.1".to_owned(), Verification::Content),
        ("1.2.3.2".to_owned(), Verification::Content),
    ]
    .into_iter()
    .collect();
    sessions.create_session(&rec).await.unwrap();
    let mut open = relaypacs_core::testing::session_store::sample_session();
    open.owner = "bob".into();
    sessions.create_session(&open).await.unwrap();

    // A window that starts after the delivery's write leaves it out; one
    // that starts before lists it, as the full pass does.
    let now = time::OffsetDateTime::now_utc();
    let later = now + time::Duration::hours(1);
    assert!(s.missed(100, Some(later)).await.unwrap().is_empty());
    let recent = s
        .missed(100, Some(now - time::Duration::hours(1)))
        .await
        .unwrap();
    assert_eq!(recent.len(), 1, "{recent:?}");
    let missed = s.missed(100, None).await.unwrap();
    let ids = |v: &[relaypacs_storage::sql_notifications::MissedNotification]| {
        v.iter().map(|m| m.session.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&missed), ids(&recent));
    assert_eq!(missed.len(), 1, "{missed:?}");
    assert_eq!(missed[0].session, rec.id.to_string());
    assert_eq!(missed[0].owner, rec.owner);
    assert_eq!(missed[0].instances, 2);
    assert!(matches!(
        missed[0].state,
        SessionState::Delivered {
            verified: Verification::Content,
            ..
        }
    ));
    let id = rec.id.to_string();
    s.insert(&new("n1", &rec.owner, &id, ""), None)
        .await
        .unwrap()
        .unwrap();
    assert!(s.missed(100, None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_missed_lists_deliveries_without_notification() {
    missed_lists_deliveries_without_notification(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_missed_lists_deliveries_without_notification() {
    missed_lists_deliveries_without_notification(Db::postgres().await).await;
}

async fn missed_reports_lists_reports_without_notification(db: Db) {
    use relaypacs_storage::sql_notifications::{KIND_REPORT_READY, MissedReport};
    let state = db.gateway().await;
    let sessions = SqlSessionStore::new(state.clone());
    let s = SqlNotificationStore::new(state);
    let delivered = |reports: &[&str]| {
        let mut rec = relaypacs_core::testing::session_store::sample_session();
        rec.state = SessionState::Delivered {
            at: time::OffsetDateTime::now_utc(),
            sink: "test".into(),
            verified: Verification::Content,
        };
        rec.delivery.reports = reports.iter().map(|u| report(u)).collect();
        rec
    };
    // Two delivered studies with reports, one without, and an open session
    // whose record (oddly) holds a report: only delivered studies count.
    let a = delivered(&["1.2.5.1", "1.2.5.2"]);
    let b = delivered(&["1.2.5.3"]);
    let none = delivered(&[]);
    let mut open = delivered(&["1.2.5.4"]);
    open.state = SessionState::Open;
    for rec in [&a, &b, &none, &open] {
        sessions.create_session(rec).await.unwrap();
    }
    let keys = |v: &[MissedReport]| {
        let mut k: Vec<(String, String)> = v
            .iter()
            .map(|m| (m.session.clone(), m.report.sop_instance_uid.to_string()))
            .collect();
        k.sort();
        k
    };
    let expect = |pairs: &[(&relaypacs_core::SessionRecord, &str)]| {
        let mut k: Vec<(String, String)> = pairs
            .iter()
            .map(|(r, u)| (r.id.to_string(), (*u).to_owned()))
            .collect();
        k.sort();
        k
    };
    let (all, next) = s.missed_reports(100, None, None).await.unwrap();
    assert!(next.is_none(), "a page that was not full has no next");
    assert_eq!(
        keys(&all),
        expect(&[(&a, "1.2.5.1"), (&a, "1.2.5.2"), (&b, "1.2.5.3")])
    );
    assert!(all.iter().all(|m| m.owner == a.owner));
    // One report notified: the others remain.
    let id = a.id.to_string();
    let mut n = new("r1", &a.owner, &id, "1.2.5.1");
    n.kind = KIND_REPORT_READY;
    s.insert(&n, None).await.unwrap().unwrap();
    // Page by page, one session a page: the pages together are the rest.
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = s.missed_reports(1, None, cursor.as_ref()).await.unwrap();
        pages.extend(page);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(keys(&pages), expect(&[(&a, "1.2.5.2"), (&b, "1.2.5.3")]));
    // A window starting after the last write lists nothing.
    let later = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert!(
        s.missed_reports(100, Some(later), None)
            .await
            .unwrap()
            .0
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_missed_reports_lists_reports_without_notification() {
    missed_reports_lists_reports_without_notification(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_missed_reports_lists_reports_without_notification() {
    missed_reports_lists_reports_without_notification(Db::postgres().await).await;
}
