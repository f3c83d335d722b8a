//! Conformance suite for [`SessionStore`] implementations.
//!
//! Run it with [`session_store_conformance!`](crate::session_store_conformance).

use std::sync::Arc;

use time::OffsetDateTime;

use crate::digest::Sha256Digest;
use crate::error::Error;
use crate::ids::{FileId, SessionId, Uid};
use crate::model::{ChunkRecord, FileRecord, FileState, Limits, SessionRecord, SessionState};
use crate::session_store::{
    ChunkInsert, ClaimedWrite, FileScope, HeadWrite, InstanceClaim, SessionStore,
};

/// A fresh session record with one file.
pub fn sample_session() -> SessionRecord {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let file = FileRecord {
        id: FileId::random(),
        name: "ct-001.dcm".into(),
        size: 4 << 20,
        sha256: Some(Sha256Digest::of(b"whole")),
        data_set_sha256: None,
        state: FileState::Uploading,
    };
    SessionRecord {
        id: SessionId::random(),
        owner: "alice".into(),
        created_at: now,
        updated_at: now,
        allow_multiple_studies: false,
        study_instance_uid: None,
        limits: Limits::default(),
        files: [(file.id, file)].into_iter().collect(),
        state: SessionState::Open,
        delivery: Default::default(),
        request_scoped: false,
        request_instance: None,
    }
}

fn chunk(offset: u64, tag: &[u8]) -> ChunkRecord {
    ChunkRecord {
        offset,
        length: 1 << 20,
        sha256: Sha256Digest::of(tag),
        receipt: format!("r{offset}"),
    }
}

/// Create then load returns the same record; creating twice fails.
pub async fn create_load(store: &dyn SessionStore) {
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create");
    assert_eq!(v.value, s);
    let loaded = store.load_session(s.id).await.expect("load");
    assert_eq!(loaded.value, s);
    assert_eq!(loaded.version, v.version);
    assert!(matches!(
        store.create_session(&s).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.load_session(SessionId::random()).await,
        Err(Error::NotFound { .. })
    ));
    assert!(store.list_sessions().await.expect("list").contains(&s.id));
}

/// File scopes: a scope holds only its file and the session's totals; a
/// scoped update writes the session and the files it carries, keeps the
/// others, keeps the totals right, and is a compare-and-set like
/// `update_session`; `files_with_instance` finds validated files by SOP
/// Instance UID.
pub async fn file_scopes(store: &dyn SessionStore) {
    let s = sample_session();
    let first = *s.files.keys().next().expect("one file");
    let v1 = store.create_session(&s).await.expect("create").version;
    let scope: FileScope = store
        .load_file_scope(s.id, Some(first))
        .await
        .expect("scope");
    assert_eq!(scope.session.version, v1);
    assert_eq!(scope.session.value, s);
    assert_eq!((scope.file_count, scope.declared_bytes), (1, 4 << 20));
    let none = store.load_file_scope(s.id, None).await.expect("scope");
    assert!(none.session.value.files.is_empty());
    assert_eq!(none.file_count, 1);
    // Add a file through a scope that does not hold the first one.
    let mut added = none.session.value.clone();
    let second = FileRecord {
        id: FileId::random(),
        name: "ct-002.dcm".into(),
        size: 1000,
        sha256: None,
        data_set_sha256: None,
        state: FileState::Uploading,
    };
    added.files.insert(second.id, second.clone());
    added.study_instance_uid = Some(Uid::parse("1.2.3").expect("uid"));
    let v2 = store
        .update_file_scope(&added, v1)
        .await
        .expect("scoped update");
    assert!(v2 > v1);
    let whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v2);
    assert_eq!(whole.value.files.len(), 2, "the first file was kept");
    assert_eq!(whole.value.files[&first], s.files[&first]);
    assert_eq!(whole.value.files[&second.id], second);
    assert_eq!(whole.value.study_instance_uid, added.study_instance_uid);
    let scope = store
        .load_file_scope(s.id, Some(second.id))
        .await
        .expect("scope");
    assert_eq!(
        (scope.file_count, scope.declared_bytes),
        (2, (4 << 20) + 1000)
    );
    assert_eq!(scope.session.value.files.len(), 1);
    // A stale scoped update fails and changes nothing.
    assert!(matches!(
        store.update_file_scope(&added, v1).await,
        Err(Error::Precondition { .. })
    ));
    // Validate the second file; then it is found by its SOP Instance UID.
    let uid = Uid::parse("1.2.840.99.1").expect("uid");
    let mut valid = scope.session.value.clone();
    valid_as(valid.files.get_mut(&second.id).expect("second"), &uid);
    let v3 = store.update_file_scope(&valid, v2).await.expect("validate");
    assert_eq!(
        store.files_with_instance(s.id, &uid).await.expect("find"),
        vec![second.id]
    );
    assert!(
        store
            .files_with_instance(s.id, &Uid::parse("1.2.840.99.2").expect("uid"))
            .await
            .expect("find")
            .is_empty()
    );
    // Pages of files, in file id order.
    let mut ids = [first, second.id];
    ids.sort();
    let page = store.list_files(s.id, None, 1).await.expect("page");
    assert_eq!(page.iter().map(|f| f.id).collect::<Vec<_>>(), vec![ids[0]]);
    let page = store
        .list_files(s.id, Some(ids[0]), 10)
        .await
        .expect("page");
    assert_eq!(page.iter().map(|f| f.id).collect::<Vec<_>>(), vec![ids[1]]);
    assert!(
        store
            .list_files(s.id, Some(ids[1]), 10)
            .await
            .expect("page")
            .is_empty()
    );
    // A whole-record update that drops a file keeps the totals right.
    let mut whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v3);
    whole.value.files.remove(&first);
    store
        .update_session(&whole.value, v3)
        .await
        .expect("update");
    let scope = store.load_file_scope(s.id, None).await.expect("scope");
    assert_eq!((scope.file_count, scope.declared_bytes), (1, 1000));
    assert!(matches!(
        store.load_file_scope(SessionId::random(), None).await,
        Err(Error::NotFound { .. })
    ));
}

/// A file is removed with its chunk records in one conditional write of
/// the session's head: the other files and their chunks stay, the totals
/// come down, the head is the one given; a stale version is a
/// `Precondition` and a file or session that is not there `NotFound`,
/// each changing nothing. `has_valid_file_except` sees only validated
/// files.
pub async fn file_removal(store: &dyn SessionStore) {
    let s = sample_session();
    let first = *s.files.keys().next().expect("one file");
    let v1 = store.create_session(&s).await.expect("create").version;
    let uid = Uid::parse("1.2.840.99.7").expect("uid");
    let mut rec = s.clone();
    let mut second = FileRecord {
        id: FileId::random(),
        name: "ct-002.dcm".into(),
        size: 1000,
        sha256: None,
        data_set_sha256: None,
        state: FileState::Uploading,
    };
    valid_as(&mut second, &uid);
    rec.files.insert(second.id, second.clone());
    rec.study_instance_uid = Some(Uid::parse("1.2.3").expect("uid"));
    let v2 = store.update_session(&rec, v1).await.expect("second file");
    for f in [first, second.id] {
        store
            .record_chunk(s.id, f, &chunk(0, b"c"))
            .await
            .expect("chunk");
    }
    assert!(
        store
            .has_valid_file_except(s.id, first)
            .await
            .expect("look")
    );
    assert!(
        !store
            .has_valid_file_except(s.id, second.id)
            .await
            .expect("look")
    );
    assert!(
        !store
            .has_valid_file_except(SessionId::random(), first)
            .await
            .expect("look")
    );
    // Remove the first file, with a head that changed too.
    let mut head = rec.clone();
    head.files = Default::default();
    head.allow_multiple_studies = true;
    assert!(matches!(
        store.remove_file_scoped(&head, v1, first, &[]).await,
        Err(Error::Precondition { .. })
    ));
    assert!(matches!(
        store
            .remove_file_scoped(&head, v2, FileId::random(), &[])
            .await,
        Err(Error::NotFound { .. })
    ));
    let whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v2, "a refused removal changes nothing");
    assert_eq!(whole.value, rec);
    let v3 = store
        .remove_file_scoped(&head, v2, first, &[])
        .await
        .expect("remove");
    assert!(v3 > v2);
    let whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v3);
    let mut want = head.clone();
    want.files = [(second.id, second.clone())].into_iter().collect();
    want.updated_at = whole.value.updated_at;
    assert_eq!(whole.value, want);
    assert!(store.chunks(s.id, first).await.expect("chunks").is_empty());
    assert_eq!(
        store.chunks(s.id, second.id).await.expect("chunks").len(),
        1
    );
    let scope = store.load_file_scope(s.id, None).await.expect("scope");
    assert_eq!((scope.file_count, scope.declared_bytes), (1, 1000));
    // Then the valid one: no valid file and no instance left.
    head.study_instance_uid = None;
    store
        .remove_file_scoped(&head, v3, second.id, &[])
        .await
        .expect("remove");
    let scope = store.load_file_scope(s.id, None).await.expect("scope");
    assert_eq!((scope.file_count, scope.declared_bytes), (0, 0));
    assert!(scope.session.value.study_instance_uid.is_none());
    assert!(
        !store
            .has_valid_file_except(s.id, first)
            .await
            .expect("look")
    );
    assert!(
        store
            .files_with_instance(s.id, &uid)
            .await
            .expect("find")
            .is_empty()
    );
    assert!(
        store
            .chunks(s.id, second.id)
            .await
            .expect("chunks")
            .is_empty()
    );
    let mut gone = head.clone();
    gone.id = SessionId::random();
    assert!(matches!(
        store.remove_file_scoped(&gone, 1, first, &[]).await,
        Err(Error::NotFound { .. })
    ));
}

/// Range reservations: overlapping ranges of two holders exclude each
/// other until released or expired; the same holder renews its own;
/// disjoint ranges and other files are independent.
pub async fn range_reservations(store: &dyn SessionStore) {
    let s = sample_session();
    let f = *s.files.keys().next().expect("one file");
    let other_file = FileId::random();
    store.create_session(&s).await.expect("create");
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(60);
    store
        .reserve_range(s.id, f, 0..100, "a", soon)
        .await
        .expect("first reservation");
    assert!(matches!(
        store.reserve_range(s.id, f, 50..150, "b", soon).await,
        Err(Error::Busy { .. })
    ));
    // Renewal by the holder, a disjoint range, another file: all fine.
    store
        .reserve_range(s.id, f, 0..100, "a", soon)
        .await
        .expect("renewal");
    store
        .reserve_range(s.id, f, 100..200, "b", soon)
        .await
        .expect("disjoint");
    store
        .reserve_range(s.id, other_file, 0..100, "b", soon)
        .await
        .expect("other file");
    // Released: b may take it.
    store
        .release_range(s.id, f, 0..100, "a")
        .await
        .expect("release");
    store
        .reserve_range(s.id, f, 0..100, "b", soon)
        .await
        .expect("after release");
    // An expired reservation does not hold.
    let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    store
        .reserve_range(s.id, f, 300..400, "a", past)
        .await
        .expect("expired at once");
    store
        .reserve_range(s.id, f, 350..450, "c", soon)
        .await
        .expect("over an expired one");
    assert!(matches!(
        store
            .reserve_range(SessionId::random(), f, 0..1, "a", soon)
            .await,
        Err(Error::NotFound { .. })
    ));
}

/// Concurrent reservations of one range by different holders: exactly one
/// wins each round.
pub async fn concurrent_reservations_have_one_winner(store: Arc<dyn SessionStore>) {
    let s = sample_session();
    let f = *s.files.keys().next().expect("one file");
    store.create_session(&s).await.expect("create");
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(60);
    for round in 0..20u64 {
        let range = round * 1000..round * 1000 + 500;
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let store = store.clone();
                let range = range.clone();
                tokio::spawn(async move {
                    store
                        .reserve_range(s.id, f, range, &format!("h{i}"), soon)
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            match t.await.expect("join") {
                Ok(()) => won += 1,
                Err(Error::Busy { .. }) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
}

/// Capped creation: a burst of concurrent creations by one owner leaves
/// exactly `cap` open sessions (20 rounds of 2 x cap + 2 creations); a
/// session that is no longer open frees its place; other owners are not
/// counted; a taken id is `AlreadyExists`, not a refusal.
pub async fn concurrent_capped_creations_stop_at_the_cap(store: Arc<dyn SessionStore>) {
    const CAP: u32 = 3;
    for round in 0..20 {
        let owner = format!("capped-{}", SessionId::random());
        let tasks: Vec<_> = (0..2 * CAP + 2)
            .map(|_| {
                let store = store.clone();
                let mut rec = sample_session();
                rec.owner = owner.clone();
                tokio::spawn(async move { store.create_session_capped(&rec, CAP).await })
            })
            .collect();
        let mut created = Vec::new();
        for t in tasks {
            match t.await.expect("join") {
                Ok(Some(v)) => {
                    assert_eq!(v.version, 1, "round {round}");
                    created.push(v.value);
                }
                Ok(None) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(created.len(), CAP as usize, "round {round}");
        if round > 0 {
            continue;
        }
        for c in &created {
            assert_eq!(store.load_session(c.id).await.expect("load").value, *c);
        }
        // Another owner has a cap of its own.
        let mut other = sample_session();
        other.owner = format!("{owner}-other");
        assert!(
            store
                .create_session_capped(&other, CAP)
                .await
                .expect("other owner")
                .is_some()
        );
        // A completed session no longer counts.
        let mut done = created[0].clone();
        done.state = SessionState::Forwarding;
        store.update_session(&done, 1).await.expect("complete");
        let mut next = sample_session();
        next.owner = owner.clone();
        assert!(
            store
                .create_session_capped(&next, CAP)
                .await
                .expect("below the cap again")
                .is_some()
        );
        let mut more = sample_session();
        more.owner = owner.clone();
        assert!(
            store
                .create_session_capped(&more, CAP)
                .await
                .expect("at the cap")
                .is_none()
        );
        assert!(matches!(
            store.load_session(more.id).await,
            Err(Error::NotFound { .. })
        ));
        // A taken id is AlreadyExists, below the cap or at it.
        assert!(matches!(
            store.create_session_capped(&next, CAP + 10).await,
            Err(Error::AlreadyExists { .. })
        ));
    }
}

/// Capped file additions: an owner's empty sessions each get one new
/// uploading file at once; exactly `cap` writes pass (20 rounds), the
/// refused ones write nothing; a write adding no file passes at the cap;
/// the files of a session no longer open do not count.
pub async fn concurrent_capped_file_additions_stop_at_the_cap(store: Arc<dyn SessionStore>) {
    const CAP: u32 = 3;
    for round in 0..20 {
        let owner = format!("uploader-{}", SessionId::random());
        let mut sessions = Vec::new();
        for _ in 0..2 * CAP + 2 {
            let mut s = sample_session();
            s.owner = owner.clone();
            s.files.clear();
            store.create_session(&s).await.expect("create");
            sessions.push(s);
        }
        let tasks: Vec<_> = sessions
            .iter()
            .map(|s| {
                let store = store.clone();
                let mut rec = s.clone();
                let f = sample_session()
                    .files
                    .into_values()
                    .next()
                    .expect("one file");
                rec.files.insert(f.id, f);
                tokio::spawn(async move {
                    let r = store.update_file_scope_capped(&rec, 1, CAP).await;
                    (rec, r)
                })
            })
            .collect();
        let mut passed = Vec::new();
        for t in tasks {
            let (rec, r) = t.await.expect("join");
            match r {
                Ok(Some(v)) => {
                    assert_eq!(v, 2, "round {round}");
                    passed.push(rec);
                }
                Ok(None) => {
                    let stored = store.load_session(rec.id).await.expect("load");
                    assert_eq!(stored.version, 1, "round {round}: refused, unchanged");
                    assert!(stored.value.files.is_empty(), "round {round}");
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(passed.len(), CAP as usize, "round {round}");
        if round > 0 {
            continue;
        }
        // At the cap, a write that adds no file passes.
        let mut same = passed[0].clone();
        same.allow_multiple_studies = true;
        assert_eq!(
            store
                .update_file_scope_capped(&same, 2, CAP)
                .await
                .expect("no new file"),
            Some(3)
        );
        // A new file is refused; once a session with a file is no longer
        // open, it passes.
        // A session whose file was refused (the last and the first may
        // both have passed).
        let more = sessions
            .iter()
            .find(|s| !passed.iter().any(|p| p.id == s.id))
            .expect("a refused session");
        let mut more = store.load_session(more.id).await.expect("load").value;
        let f = sample_session()
            .files
            .into_values()
            .next()
            .expect("one file");
        more.files.insert(f.id, f);
        assert!(
            store
                .update_file_scope_capped(&more, 1, CAP)
                .await
                .expect("at the cap")
                .is_none()
        );
        let mut done = passed[1].clone();
        done.state = SessionState::Forwarding;
        store.update_session(&done, 2).await.expect("complete");
        assert_eq!(
            store
                .update_file_scope_capped(&more, 1, CAP)
                .await
                .expect("below the cap again"),
            Some(2)
        );
    }
}

/// Compare-and-set: the right version wins, a stale one fails and changes nothing.
pub async fn compare_and_set(store: &dyn SessionStore) {
    let s = sample_session();
    let v1 = store.create_session(&s).await.expect("create").version;
    let mut a = s.clone();
    a.state = SessionState::Forwarding;
    let v2 = store
        .update_session(&a, v1)
        .await
        .expect("update at current version");
    assert_ne!(v1, v2);
    let mut b = s.clone();
    b.owner = "mallory".into();
    assert!(matches!(
        store.update_session(&b, v1).await,
        Err(Error::Precondition { .. })
    ));
    let loaded = store.load_session(s.id).await.expect("load");
    assert_eq!(loaded.value, a);
    assert_eq!(loaded.version, v2);
    let missing = sample_session();
    assert!(matches!(
        store.update_session(&missing, 1).await,
        Err(Error::NotFound { .. })
    ));
}

/// A scoped update with no file writes the session head only: every
/// stored file and the totals stay as they are, and it is the same
/// compare-and-set (the delivery worker's lease and outcome go this way).
pub async fn head_only_updates(store: &dyn SessionStore) {
    let mut s = sample_session();
    for i in 0..3u64 {
        let f = FileRecord {
            id: FileId::random(),
            name: format!("ct-{i}.dcm"),
            size: 100 + i,
            sha256: None,
            data_set_sha256: None,
            state: FileState::Uploading,
        };
        s.files.insert(f.id, f);
    }
    let v1 = store.create_session(&s).await.expect("create").version;
    let mut head = store
        .load_file_scope(s.id, None)
        .await
        .expect("head")
        .session
        .value;
    assert!(head.files.is_empty());
    head.state = SessionState::Forwarding;
    head.delivery.attempts = 1;
    head.delivery.lease_owner = Some("worker-a".into());
    let v2 = store
        .update_file_scope(&head, v1)
        .await
        .expect("head update");
    assert!(v2 > v1);
    let whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v2);
    assert_eq!(whole.value.files, s.files, "every file kept as it was");
    assert_eq!(whole.value.state, SessionState::Forwarding);
    assert_eq!(
        whole.value.delivery.lease_owner.as_deref(),
        Some("worker-a")
    );
    let scope = store.load_file_scope(s.id, None).await.expect("scope");
    assert_eq!(
        (scope.file_count, scope.declared_bytes),
        (4, s.declared_bytes())
    );
    // Stale: refused, nothing written.
    head.delivery.lease_owner = Some("worker-b".into());
    assert!(matches!(
        store.update_file_scope(&head, v1).await,
        Err(Error::Precondition { .. })
    ));
    let after = store.load_session(s.id).await.expect("load");
    assert_eq!(after.version, v2);
    assert_eq!(
        after.value.delivery.lease_owner.as_deref(),
        Some("worker-a")
    );
}

fn valid_as(f: &mut FileRecord, sop: &Uid) {
    f.state = FileState::Valid {
        dicom: crate::model::DicomSummary::new(
            Uid::parse("1.2.840.10008.5.1.4.1.1.7").expect("uid"),
            sop.clone(),
            Uid::parse("1.2.3").expect("uid"),
            Uid::parse("1.2.3.4").expect("uid"),
            "P1",
            Uid::parse("1.2.840.10008.1.2.1").expect("uid"),
        ),
    };
}

/// Two valid files of one session never share a SOP Instance UID: the
/// write that would make them is refused with `Conflict`
/// `RELAY_DUPLICATE_INSTANCE` and writes nothing (version, files and head
/// unchanged), by a scoped or a whole-record update; another session may
/// hold the UID (the index of accepted instances rules across sessions);
/// once the first file is removed the UID may be taken again.
pub async fn one_instance_per_session(store: &dyn SessionStore) {
    let mut s = sample_session();
    let second = FileRecord {
        id: FileId::random(),
        name: "ct-002.dcm".into(),
        size: 1000,
        sha256: None,
        data_set_sha256: None,
        state: FileState::Uploading,
    };
    // `a` is the sample's file, `b` the one added here (ids are random, so
    // their order in the map is not theirs).
    let a = *s.files.keys().next().expect("a");
    let b = second.id;
    s.files.insert(second.id, second.clone());
    let v1 = store.create_session(&s).await.expect("create").version;
    let sop = fresh_uid();
    let scope = store.load_file_scope(s.id, Some(a)).await.expect("scope");
    let mut rec = scope.session.value;
    valid_as(rec.files.get_mut(&a).expect("a"), &sop);
    let v2 = store.update_file_scope(&rec, v1).await.expect("a valid");
    let is_duplicate = |r: crate::error::Result<u64>| {
        matches!(
            r,
            Err(Error::Conflict {
                code: "RELAY_DUPLICATE_INSTANCE",
                ..
            })
        )
    };
    // File b with a's UID: refused, scoped or whole.
    let scope = store.load_file_scope(s.id, Some(b)).await.expect("scope");
    let mut rec = scope.session.value;
    rec.study_instance_uid = Some(Uid::parse("1.2.3").expect("uid"));
    valid_as(rec.files.get_mut(&b).expect("b"), &sop);
    assert!(is_duplicate(store.update_file_scope(&rec, v2).await));
    let mut whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v2, "nothing written");
    assert_eq!(whole.value.files[&b], second);
    assert_eq!(whole.value.study_instance_uid, None);
    valid_as(whole.value.files.get_mut(&b).expect("b"), &sop);
    assert!(is_duplicate(store.update_session(&whole.value, v2).await));
    let after = store.load_session(s.id).await.expect("load");
    assert_eq!(after.version, v2, "nothing written");
    assert_eq!(after.value.files[&b], second);
    // Another session holds the same UID without a conflict.
    let mut other = sample_session();
    let o = *other.files.keys().next().expect("file");
    valid_as(other.files.get_mut(&o).expect("o"), &sop);
    store.create_session(&other).await.expect("another session");
    // Rewriting file a itself with its own UID is no duplicate.
    let mut again = store
        .load_file_scope(s.id, Some(a))
        .await
        .expect("scope")
        .session
        .value;
    again.files.get_mut(&a).expect("a").name = "renamed.dcm".into();
    let v3 = store.update_file_scope(&again, v2).await.expect("a again");
    // File a removed and b validated with its UID in one whole write.
    let mut whole = store.load_session(s.id).await.expect("load");
    assert_eq!(whole.version, v3);
    whole.value.files.remove(&a);
    valid_as(whole.value.files.get_mut(&b).expect("b"), &sop);
    store
        .update_session(&whole.value, v3)
        .await
        .expect("a removed, b takes its UID");
    assert_eq!(
        store.files_with_instance(s.id, &sop).await.expect("find"),
        vec![b]
    );
}

/// Of many concurrent updates from one version, exactly one succeeds.
pub async fn concurrent_cas_has_one_winner(store: Arc<dyn SessionStore>) {
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create").version;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let mut rec = s.clone();
            rec.owner = format!("writer-{i}");
            tokio::spawn(async move { store.update_session(&rec, v).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(Error::Precondition { .. }) => {}
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one compare-and-set must win");
}

fn claim_of(sop: &Uid, content: &[u8]) -> InstanceClaim {
    InstanceClaim::new(
        sop.clone(),
        Sha256Digest::of(content),
        Uid::parse("1.2.3.4").expect("valid UID"),
        SessionId::random(),
        FileId::random(),
    )
}

fn fresh_uid() -> Uid {
    let n = u128::from_le_bytes(rand::random());
    Uid::parse(&format!("2.25.{n}")).expect("valid UID")
}

/// The index of accepted instances: insert-if-absent by SOP Instance UID,
/// durable, readable, released only by its holder.
pub async fn instance_claims(store: &dyn SessionStore) {
    let sop = fresh_uid();
    assert_eq!(store.instance_claim(&sop).await.expect("lookup"), None);
    let first = claim_of(&sop, b"first");
    assert_eq!(store.claim_instance(&first).await.expect("claim"), first);
    // The holder claiming again is answered with its own claim.
    assert_eq!(store.claim_instance(&first).await.expect("again"), first);
    // Another file, other content: the earlier claim stands.
    let second = claim_of(&sop, b"second");
    assert_eq!(store.claim_instance(&second).await.expect("claim"), first);
    assert_eq!(
        store.instance_claim(&sop).await.expect("lookup"),
        Some(first.clone())
    );
    // Only the holder releases.
    store
        .release_instance(&sop, second.session, second.file)
        .await
        .expect("release by another");
    assert_eq!(
        store.instance_claim(&sop).await.expect("lookup"),
        Some(first.clone())
    );
    store
        .release_instance(&sop, first.session, first.file)
        .await
        .expect("release");
    assert_eq!(store.instance_claim(&sop).await.expect("lookup"), None);
    assert_eq!(store.claim_instance(&second).await.expect("claim"), second);
    // Other UIDs are independent.
    let other = claim_of(&fresh_uid(), b"first");
    assert_eq!(store.claim_instance(&other).await.expect("claim"), other);
}

/// Of many concurrent claims of one SOP Instance UID with different
/// content, exactly one is recorded and every caller is told which.
pub async fn concurrent_claims_have_one_winner(store: Arc<dyn SessionStore>) {
    for _round in 0..20 {
        let sop = fresh_uid();
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                let claim = claim_of(&sop, format!("content-{i}").as_bytes());
                tokio::spawn(async move {
                    let held = store.claim_instance(&claim).await.expect("claim");
                    (claim, held)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut answers = Vec::new();
        for t in tasks {
            let (claim, held) = t.await.expect("task");
            if held == claim {
                winners.push(claim);
            }
            answers.push(held);
        }
        assert_eq!(winners.len(), 1, "exactly one claim must win");
        assert!(
            answers.iter().all(|a| *a == winners[0]),
            "every caller learns the winner"
        );
    }
}

/// Chunk records: insert-if-absent, ordered listing, per-file deletion.
pub async fn chunk_records(store: &dyn SessionStore) {
    let s = sample_session();
    store.create_session(&s).await.expect("create");
    let file = *s.files.keys().next().expect("sample has a file");
    let other = FileId::random();
    for off in [3u64 << 20, 0, 1 << 20] {
        assert_eq!(
            store
                .record_chunk(s.id, file, &chunk(off, b"a"))
                .await
                .expect("record"),
            ChunkInsert::Inserted
        );
    }
    assert_eq!(
        store
            .record_chunk(s.id, file, &chunk(0, b"b"))
            .await
            .expect("record again"),
        ChunkInsert::Existing(chunk(0, b"a")),
        "an existing record is returned, not replaced"
    );
    store
        .record_chunk(s.id, other, &chunk(0, b"o"))
        .await
        .expect("other file");
    let list = store.chunks(s.id, file).await.expect("chunks");
    assert_eq!(
        list.iter().map(|c| c.offset).collect::<Vec<_>>(),
        vec![0, 1 << 20, 3 << 20]
    );
    assert_eq!(list[0], chunk(0, b"a"));
    store
        .delete_chunks(s.id, file)
        .await
        .expect("delete_chunks");
    assert!(store.chunks(s.id, file).await.expect("chunks").is_empty());
    assert_eq!(store.chunks(s.id, other).await.expect("chunks").len(), 1);
    assert!(matches!(
        store
            .record_chunk(SessionId::random(), file, &chunk(0, b"x"))
            .await,
        Err(Error::NotFound { .. })
    ));
}

/// A file enters its session with its chunk records in one call: both
/// are there after it; a different chunk already recorded at an offset
/// refuses the call and the file is not written; a stale version is a
/// `Precondition` and the file is not written either.
pub async fn file_with_chunks(store: &dyn SessionStore) {
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create").version;
    let mut rec = s.clone();
    let mut file = rec
        .files
        .values()
        .next()
        .expect("sample has a file")
        .clone();
    file.id = FileId::random();
    file.name = "ct-002.dcm".into();
    rec.files = [(file.id, file.clone())].into_iter().collect();
    let one = [(file.id, chunk(0, b"a"))];
    let v2 = store
        .update_file_scope_with_chunks(&rec, v, &one)
        .await
        .expect("file with its chunk");
    assert_eq!(v2, v + 1);
    let loaded = store.load_session(s.id).await.expect("load");
    assert_eq!(loaded.version, v2);
    assert_eq!(loaded.value.files.get(&file.id), Some(&file));
    assert_eq!(loaded.value.files.len(), 2, "the other file is kept");
    assert_eq!(
        store.chunks(s.id, file.id).await.expect("chunks"),
        vec![chunk(0, b"a")]
    );
    // The same chunk again is kept (a retry), the file rewritten.
    let v3 = store
        .update_file_scope_with_chunks(&rec, v2, &one)
        .await
        .expect("same chunk again");
    assert_eq!(v3, v2 + 1);
    // Another file whose offset 0 holds another chunk already.
    let mut other = file.clone();
    other.id = FileId::random();
    assert_eq!(
        store
            .record_chunk(s.id, other.id, &chunk(0, b"x"))
            .await
            .expect("record"),
        ChunkInsert::Inserted
    );
    let mut rec2 = rec.clone();
    rec2.files = [(other.id, other.clone())].into_iter().collect();
    let refused = store
        .update_file_scope_with_chunks(&rec2, v3, &[(other.id, chunk(0, b"y"))])
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::Conflict {
                code: "RELAY_CHUNK_CONFLICT",
                ..
            })
        ),
        "{refused:?}"
    );
    let after = store.load_session(s.id).await.expect("load");
    assert_eq!(after.version, v3, "a refused call writes nothing");
    assert!(!after.value.files.contains_key(&other.id));
    assert_eq!(
        store.chunks(s.id, other.id).await.expect("chunks"),
        vec![chunk(0, b"x")],
        "the recorded chunk is not replaced"
    );
    // A stale version.
    let mut third = file.clone();
    third.id = FileId::random();
    let mut rec3 = rec.clone();
    rec3.files = [(third.id, third.clone())].into_iter().collect();
    assert!(matches!(
        store
            .update_file_scope_with_chunks(&rec3, v2, &[(third.id, chunk(0, b"z"))])
            .await,
        Err(Error::Precondition { .. })
    ));
    let after = store.load_session(s.id).await.expect("load");
    assert_eq!(after.version, v3);
    assert!(!after.value.files.contains_key(&third.id));
    let missing = SessionRecord {
        id: SessionId::random(),
        ..rec3.clone()
    };
    assert!(matches!(
        store
            .update_file_scope_with_chunks(&missing, 1, &[(third.id, chunk(0, b"z"))])
            .await,
        Err(Error::NotFound { .. })
    ));
}

/// A file, its chunk and its instance claim in one call: written when the
/// UID is free (or already the file's), nothing written and the claim in
/// force returned when another file holds it.
pub async fn file_with_claim(store: &dyn SessionStore) {
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create").version;
    let mut rec = s.clone();
    let mut file = rec
        .files
        .values()
        .next()
        .expect("sample has a file")
        .clone();
    file.id = FileId::random();
    rec.files = [(file.id, file.clone())].into_iter().collect();
    let sop = fresh_uid();
    let mut mine = claim_of(&sop, b"content");
    mine.session = s.id;
    mine.file = file.id;
    let one = [(file.id, chunk(0, b"a"))];
    let written = store
        .update_file_scope_claiming(&rec, v, &one, &mine)
        .await
        .expect("free UID");
    assert_eq!(written, ClaimedWrite::Written(v + 1));
    let loaded = store.load_session(s.id).await.expect("load");
    assert_eq!(loaded.value.files.get(&file.id), Some(&file));
    assert_eq!(
        store.chunks(s.id, file.id).await.expect("chunks"),
        vec![chunk(0, b"a")]
    );
    let held = store
        .instance_claim(&sop)
        .await
        .expect("claim")
        .expect("claimed");
    assert!(held.held_by(s.id, file.id));
    // The same file again: its own claim, written again.
    assert_eq!(
        store
            .update_file_scope_claiming(&rec, v + 1, &one, &mine)
            .await
            .expect("again"),
        ClaimedWrite::Written(v + 2)
    );
    // Another file of the same UID: the first one's claim, nothing written.
    let mut other = file.clone();
    other.id = FileId::random();
    let mut rec2 = rec.clone();
    rec2.files = [(other.id, other.clone())].into_iter().collect();
    let mut theirs = mine.clone();
    theirs.file = other.id;
    match store
        .update_file_scope_claiming(&rec2, v + 2, &[(other.id, chunk(0, b"b"))], &theirs)
        .await
        .expect("held")
    {
        ClaimedWrite::Held(c) => assert!(c.held_by(s.id, file.id), "{c:?}"),
        w => panic!("written although the UID is held: {w:?}"),
    }
    let after = store.load_session(s.id).await.expect("load");
    assert_eq!(after.version, v + 2, "nothing written");
    assert!(!after.value.files.contains_key(&other.id));
    assert!(
        store
            .chunks(s.id, other.id)
            .await
            .expect("chunks")
            .is_empty()
    );
}

/// Of many concurrent inserts at one offset, exactly one is `Inserted`.
pub async fn concurrent_chunk_insert(store: Arc<dyn SessionStore>) {
    let s = sample_session();
    store.create_session(&s).await.expect("create");
    let file = FileId::random();
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.record_chunk(s.id, file, &chunk(0, &[i])).await })
        })
        .collect();
    let mut inserted = 0;
    for t in tasks {
        if t.await.expect("task").expect("record") == ChunkInsert::Inserted {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1);
    assert_eq!(store.chunks(s.id, file).await.expect("chunks").len(), 1);
}

/// Deletion is compare-and-set too, and removes chunk records.
pub async fn delete_session(store: &dyn SessionStore) {
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create").version;
    let file = *s.files.keys().next().expect("sample has a file");
    store
        .record_chunk(s.id, file, &chunk(0, b"a"))
        .await
        .expect("record");
    let v2 = store.update_session(&s, v).await.expect("update");
    assert!(matches!(
        store.delete_session(s.id, v).await,
        Err(Error::Precondition { .. })
    ));
    assert!(
        store.load_session(s.id).await.is_ok(),
        "a stale delete must not remove the session"
    );
    store.delete_session(s.id, v2).await.expect("delete");
    assert!(matches!(
        store.load_session(s.id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!store.list_sessions().await.expect("list").contains(&s.id));
    let recreated = store
        .create_session(&s)
        .await
        .expect("an id can be used again after deletion");
    assert!(
        store.chunks(s.id, file).await.expect("chunks").is_empty(),
        "chunk records outlived their session"
    );
    store
        .delete_session(s.id, recreated.version)
        .await
        .expect("delete");
}

/// Upload facts: recorded once per key (a second record with the key
/// changes nothing), kept after their session is deleted, counted and
/// timed per grouping and filter exactly as in memory
/// ([`FactCount::of`], [`durations_of`]), durations bounded by the limit.
pub async fn upload_facts(store: &dyn SessionStore) {
    use crate::analytics::{
        AnalyticsFilter, FactCount, FactKind, Grouping, UploadFact, durations_of,
    };
    // A day of its own (a store shared with other cases never has facts
    // there) and owners of its own.
    let base = time::Date::from_calendar_date(2090, time::Month::January, 1).expect("a valid date")
        + time::Duration::days(i64::from(rand::random::<u16>() % 3000));
    let at = |day: i64, secs: i64| {
        (base + time::Duration::days(day))
            .with_time(time::Time::MIDNIGHT)
            .assume_utc()
            + time::Duration::seconds(secs)
    };
    let tag = SessionId::random().to_string();
    let (u1, u2) = (format!("u1-{tag}"), format!("u2-{tag}"));
    let s = sample_session();
    let v = store.create_session(&s).await.expect("create");
    let mut facts = Vec::new();
    let mk =
        |session: SessionId, kind: FactKind, owner: &str, modality: &str, at: OffsetDateTime| {
            let mut f = UploadFact::new(session, kind, owner, at);
            f.modality = modality.into();
            f.files = 3;
            f.bytes = 3000;
            f
        };
    let mut d = mk(s.id, FactKind::Delivered, &u1, "CT", at(0, 100));
    d.started_at = Some(at(0, 40));
    facts.push(d);
    let mut d = mk(
        SessionId::random(),
        FactKind::Delivered,
        &u1,
        "MR",
        at(0, 86_399),
    );
    d.started_at = Some(at(0, 86_000));
    facts.push(d);
    let mut d = mk(
        SessionId::random(),
        FactKind::Delivered,
        &u2,
        "CT",
        at(1, 5),
    );
    d.started_at = Some(at(0, 5));
    facts.push(d);
    let mut r = mk(s.id, FactKind::Refused, &u1, "", at(0, 50));
    r.file = s.files.keys().next().copied();
    r.cause = "RELAY_DICOM_NOT_DICOM".into();
    r.files = 1;
    facts.push(r);
    let mut dl = mk(
        SessionId::random(),
        FactKind::DeadLettered,
        &u2,
        "CT",
        at(1, 9),
    );
    dl.cause = "RELAY_PACS_REJECTED".into();
    let mut again = dl.clone();
    again.kind = FactKind::Delivered;
    again.occurrence = 1;
    again.started_at = Some(at(1, 1));
    facts.push(dl);
    facts.push(again);
    facts.push(mk(
        SessionId::random(),
        FactKind::Expired,
        &u2,
        "",
        at(2, 0),
    ));
    facts.push(mk(
        SessionId::random(),
        FactKind::Aborted,
        &u1,
        "CT",
        at(3, 0),
    ));
    for f in &facts {
        store.record_upload_fact(f).await.expect("record fact");
    }
    // The same key again, other values: the first stays.
    let mut dup = facts[0].clone();
    dup.files = 99;
    dup.owner = u2.clone();
    store
        .record_upload_fact(&dup)
        .await
        .expect("record the same fact again");
    store
        .delete_session(s.id, v.version)
        .await
        .expect("delete session");

    let sorted = |mut v: Vec<FactCount>| {
        v.sort_by(|a, b| (&a.key, a.kind, &a.cause).cmp(&(&b.key, b.kind, &b.cause)));
        v
    };
    let whole = crate::analytics::AnalyticsFilter::days(base, base + time::Duration::days(3));
    let mut filters = vec![whole.clone()];
    let mut one = whole.clone();
    one.user = Some(u1.clone());
    filters.push(one.clone());
    one.modality = Some("CT".into());
    filters.push(one);
    let mut ct = whole.clone();
    ct.modality = Some("CT".into());
    filters.push(ct);
    filters.push(AnalyticsFilter::days(base, base));
    filters.push(AnalyticsFilter::days(
        base + time::Duration::days(1),
        base + time::Duration::days(2),
    ));
    for filter in &filters {
        for group in Grouping::ALL {
            let got = store
                .count_upload_facts(filter, group)
                .await
                .expect("count facts");
            assert_eq!(
                sorted(got),
                sorted(FactCount::of(&facts, filter, group)),
                "counts by {group:?} for {filter:?}"
            );
            let got = store
                .delivery_durations(filter, group, 100)
                .await
                .expect("durations");
            assert_eq!(
                got,
                durations_of(&facts, filter, group),
                "durations by {group:?}"
            );
        }
    }
    let all = store
        .count_upload_facts(&whole, Grouping::Summary)
        .await
        .expect("count");
    assert_eq!(
        all.iter().map(|c| c.facts).sum::<u64>(),
        facts.len() as u64,
        "one fact per key, kept after the session was deleted"
    );
    assert!(matches!(
        store.delivery_durations(&whole, Grouping::Day, 3).await,
        Err(Error::LimitExceeded { .. })
    ));
    assert_eq!(
        store
            .delivery_durations(&whole, Grouping::Summary, 4)
            .await
            .expect("durations at the limit")[""],
        vec![8_000, 60_000, 399_000, 86_400_000],
        "first byte to delivered, ascending"
    );
}

/// The facts an owner has on `day`, per kind (every cause).
async fn facts_by_kind(
    store: &dyn SessionStore,
    owner: &str,
    day: time::Date,
) -> std::collections::BTreeMap<crate::analytics::FactKind, u64> {
    let mut filter = crate::analytics::AnalyticsFilter::days(day, day);
    filter.user = Some(owner.to_owned());
    let mut out = std::collections::BTreeMap::new();
    for c in store
        .count_upload_facts(&filter, crate::analytics::Grouping::Summary)
        .await
        .expect("count facts")
    {
        *out.entry(c.kind).or_default() += c.facts;
    }
    out
}

/// One run of [`writes_with_facts`] on `store` (the adapter, or the
/// trait's defaults on top of it).
async fn check_writes_with_facts(store: &dyn SessionStore) {
    use crate::analytics::{FactKind, UploadFact};
    // A day and an owner of its own: no other fact is counted here.
    let day = time::Date::from_calendar_date(2095, time::Month::January, 1).expect("a valid date")
        + time::Duration::days(i64::from(rand::random::<u16>() % 3000));
    let at = day.with_time(time::Time::MIDNIGHT).assume_utc() + time::Duration::hours(12);
    let owner = format!("facts-{}", SessionId::random());
    let mut s = sample_session();
    s.owner = owner.clone();
    let file = *s.files.keys().next().expect("one file");
    let v1 = store.create_session(&s).await.expect("create").version;
    let o = owner.as_str();
    let count = move |kind| async move {
        facts_by_kind(store, o, day)
            .await
            .get(&kind)
            .copied()
            .unwrap_or(0)
    };
    let fact = |kind| {
        let mut f = UploadFact::new(s.id, kind, owner.as_str(), at);
        f.files = 1;
        f.bytes = 4 << 20;
        f
    };

    // A scoped (head) write with its fact: a wrong version writes nothing
    // of the session; the retry at the right one writes both, and the
    // fact is counted once whatever the failed call left.
    let mut head = s.clone();
    head.files.clear();
    head.delivery.last_error = Some("first outcome".into());
    let delivered = [fact(FactKind::Delivered)];
    assert!(matches!(
        store
            .update_file_scope_with_facts(&head, v1 + 7, &delivered)
            .await,
        Err(Error::Precondition { .. })
    ));
    assert_eq!(store.load_session(s.id).await.expect("load").version, v1);
    let v2 = store
        .update_file_scope_with_facts(&head, v1, &delivered)
        .await
        .expect("scoped write with its fact");
    let loaded = store.load_session(s.id).await.expect("load").value;
    assert_eq!(loaded.delivery.last_error.as_deref(), Some("first outcome"));
    assert!(
        loaded.files.contains_key(&file),
        "a scoped write keeps files"
    );
    assert_eq!(
        count(FactKind::Delivered).await,
        1,
        "written with its outcome"
    );
    // The same fact with a later write: still one (insert-if-absent
    // inside the write does not fail it).
    let v3 = store
        .update_file_scope_with_facts(&head, v2, &delivered)
        .await
        .expect("the same fact again");
    assert_eq!(count(FactKind::Delivered).await, 1, "one fact per key");

    // A fact the store cannot hold (or, if it can, one it holds): the
    // write and its fact are stored both or neither.
    let mut huge = fact(FactKind::DeadLettered);
    huge.bytes = u64::MAX;
    head.delivery.last_error = Some("huge".into());
    match store.update_file_scope_with_facts(&head, v3, &[huge]).await {
        Ok(v) => {
            assert_eq!(v, v3 + 1);
            assert_eq!(count(FactKind::DeadLettered).await, 1);
        }
        Err(_) => {
            let now = store.load_session(s.id).await.expect("load");
            assert_eq!(now.version, v3, "a failed fact leaves the write undone");
            assert_eq!(
                now.value.delivery.last_error.as_deref(),
                Some("first outcome")
            );
            assert_eq!(count(FactKind::DeadLettered).await, 0);
        }
    }
    let v4 = store.load_session(s.id).await.expect("load").version;

    // A whole-record write with its fact (a file refused and removed).
    let mut refused = fact(FactKind::Refused);
    refused.file = Some(file);
    refused.cause = "RELAY_DICOM_NOT_DICOM".into();
    let mut whole = store.load_session(s.id).await.expect("load").value;
    whole.files.remove(&file);
    let refused = [refused];
    assert!(matches!(
        store
            .update_session_with_facts(&whole, v4 + 7, &refused)
            .await,
        Err(Error::Precondition { .. })
    ));
    assert!(
        store
            .load_session(s.id)
            .await
            .expect("load")
            .value
            .files
            .contains_key(&file),
        "a wrong version removes nothing"
    );
    let v5 = store
        .update_session_with_facts(&whole, v4, &refused)
        .await
        .expect("whole write with its fact");
    assert!(
        store
            .load_session(s.id)
            .await
            .expect("load")
            .value
            .files
            .is_empty()
    );
    assert_eq!(count(FactKind::Refused).await, 1);

    // A deletion with its fact; the fact outlives the session.
    let aborted = [fact(FactKind::Aborted)];
    assert!(matches!(
        store
            .delete_session_with_facts(s.id, v5 + 7, &aborted)
            .await,
        Err(Error::Precondition { .. })
    ));
    assert_eq!(
        store.load_session(s.id).await.expect("still there").version,
        v5
    );
    store
        .delete_session_with_facts(s.id, v5, &aborted)
        .await
        .expect("delete with its fact");
    assert!(matches!(
        store.load_session(s.id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.delete_session_with_facts(s.id, v5, &aborted).await,
        Err(Error::NotFound { .. })
    ));
    let counts = facts_by_kind(store, &owner, day).await;
    assert_eq!(counts.get(&FactKind::Aborted), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&FactKind::Delivered), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&FactKind::Refused), Some(&1), "{counts:?}");

    // With no facts, the methods are the plain writes.
    let t = sample_session();
    let w1 = store.create_session(&t).await.expect("create").version;
    let mut th = t.clone();
    th.files.clear();
    let w2 = store
        .update_file_scope_with_facts(&th, w1, &[])
        .await
        .expect("scoped write");
    let w3 = store
        .update_session_with_facts(&t, w2, &[])
        .await
        .expect("whole write");
    store
        .delete_session_with_facts(t.id, w3, &[])
        .await
        .expect("delete");
}

/// The `…_with_facts` writes: each writes its record change and its
/// analytics facts; a `Precondition` writes nothing of the record, and
/// after it a retry at the right version leaves each fact counted exactly
/// once; a fact the store cannot hold leaves the write undone; facts
/// outlive a deleted session. Run on the adapter, then on the trait's
/// defaults over it (a decorator that does not forward them), once
/// plainly and once with the write after the facts failing and retried.
pub async fn writes_with_facts(store: Arc<dyn SessionStore>) {
    use crate::analytics::{FactKind, UploadFact};
    use crate::testing::faults::{Fault, FaultPlan, FaultySessionStore, Op};
    check_writes_with_facts(&*store).await;
    let defaults = FaultySessionStore::new(store.clone(), FaultPlan::counting());
    check_writes_with_facts(&defaults).await;

    // The defaults record the facts first: a write that then fails leaves
    // them, and the caller's retry counts them once.
    let plan = FaultPlan::watching([Op::UpdateSession, Op::DeleteSession]);
    let faulty = FaultySessionStore::new(store.clone(), plan.clone());
    let day = time::Date::from_calendar_date(2095, time::Month::January, 1).expect("a valid date")
        + time::Duration::days(i64::from(rand::random::<u16>() % 3000));
    let at = day.with_time(time::Time::MIDNIGHT).assume_utc() + time::Duration::hours(12);
    let owner = format!("facts-{}", SessionId::random());
    let mut s = sample_session();
    s.owner = owner.clone();
    let v1 = store.create_session(&s).await.expect("create").version;
    let mut head = s.clone();
    head.files.clear();
    let delivered = [UploadFact::new(
        s.id,
        FactKind::Delivered,
        owner.as_str(),
        at,
    )];
    plan.fail_nth(1, Fault::Io);
    assert!(
        faulty
            .update_file_scope_with_facts(&head, v1, &delivered)
            .await
            .is_err(),
        "the injected failure"
    );
    assert_eq!(store.load_session(s.id).await.expect("load").version, v1);
    let v2 = faulty
        .update_file_scope_with_facts(&head, v1, &delivered)
        .await
        .expect("retry");
    let aborted = [UploadFact::new(s.id, FactKind::Aborted, owner.as_str(), at)];
    plan.fail_nth(plan.calls() + 1, Fault::Io);
    assert!(
        faulty
            .delete_session_with_facts(s.id, v2, &aborted)
            .await
            .is_err(),
        "the injected failure"
    );
    faulty
        .delete_session_with_facts(s.id, v2, &aborted)
        .await
        .expect("retry");
    let counts = facts_by_kind(&*store, &owner, day).await;
    assert_eq!(counts.get(&FactKind::Delivered), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&FactKind::Aborted), Some(&1), "{counts:?}");
}

/// One run of [`head_writes`] on `store`.
async fn check_head_writes(store: &dyn SessionStore) {
    use crate::analytics::{FactKind, UploadFact};
    let day = time::Date::from_calendar_date(2095, time::Month::January, 1).expect("a valid date")
        + time::Duration::days(i64::from(rand::random::<u16>() % 3000));
    let at = day.with_time(time::Time::MIDNIGHT).assume_utc() + time::Duration::hours(12);
    let owner = format!("heads-{}", SessionId::random());
    let mut made = Vec::new();
    for _ in 0..3 {
        let mut s = sample_session();
        s.owner = owner.clone();
        let v = store.create_session(&s).await.expect("create").version;
        made.push((s, v));
    }
    made.sort_by_key(|(s, _)| s.id);
    let heads: Vec<(SessionRecord, Vec<UploadFact>)> = made
        .iter()
        .map(|(s, _)| {
            let mut h = s.clone();
            h.files.clear();
            h.delivery.attempts = 7;
            let facts = vec![UploadFact::new(
                s.id,
                FactKind::Delivered,
                owner.as_str(),
                at,
            )];
            (h, facts)
        })
        .collect();
    let mut missing = sample_session();
    missing.files.clear();
    let writes: Vec<HeadWrite<'_>> = heads
        .iter()
        .zip(&made)
        .enumerate()
        .map(|(i, ((h, facts), (_, v)))| HeadWrite {
            session: h,
            // The second write is at a stale version: refused alone.
            expected: if i == 1 { v + 5 } else { *v },
            facts,
            events: &[],
        })
        .chain(std::iter::once(HeadWrite {
            session: &missing,
            expected: 1,
            facts: &[],
            events: &[],
        }))
        .collect();
    let out = store.update_heads(&writes).await.expect("update heads");
    assert_eq!(out.len(), 4, "one answer per write");
    assert_eq!(*out[0].as_ref().expect("written"), made[0].1 + 1);
    assert!(
        matches!(out[1], Err(crate::Error::Precondition { .. })),
        "{:?}",
        out[1]
    );
    assert_eq!(*out[2].as_ref().expect("written"), made[2].1 + 1);
    assert!(
        matches!(out[3], Err(crate::Error::NotFound { .. })),
        "{:?}",
        out[3]
    );
    for (i, (s, v)) in made.iter().enumerate() {
        let now = store.load_session(s.id).await.expect("load");
        assert_eq!(now.value.files, s.files, "the files are untouched");
        if i == 1 {
            assert_eq!(now.version, *v, "a refused write leaves its session");
            assert_eq!(now.value.delivery.attempts, s.delivery.attempts);
        } else {
            assert_eq!(now.version, v + 1);
            assert_eq!(now.value.delivery.attempts, 7);
        }
    }
    let counts = facts_by_kind(store, &owner, day).await;
    assert_eq!(
        counts.get(&FactKind::Delivered),
        Some(&2),
        "the facts of the written heads only: {counts:?}"
    );
    assert!(store.update_heads(&[]).await.expect("nothing").is_empty());
}

/// [`SessionStore::update_heads`]: each head written at its version with
/// its facts, a stale or missing one refused alone, the files untouched;
/// the adapter's own method and the trait's default on top of it.
pub async fn head_writes(store: Arc<dyn SessionStore>) {
    use crate::testing::faults::{FaultPlan, FaultySessionStore};
    check_head_writes(&*store).await;
    let defaults = FaultySessionStore::new(store.clone(), FaultPlan::counting());
    check_head_writes(&defaults).await;
}

/// Generates a module `$name` with one `#[test]` per [`SessionStore`]
/// conformance case. `$factory` is an `async fn() -> (impl SessionStore,
/// impl Sized)`; the calling crate needs no tokio of its own.
///
/// ```text
/// relaypacs_core::session_store_conformance!(file_sessions, make_sessions);
/// ```
#[macro_export]
macro_rules! session_store_conformance {
    ($name:ident, $factory:path $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::session_store_conformance!(@ref $factory; create_load, compare_and_set, file_scopes, file_removal, head_only_updates, one_instance_per_session, range_reservations, chunk_records, delete_session, instance_claims, upload_facts, file_with_chunks, file_with_claim);
            $crate::session_store_conformance!(@arc $factory; concurrent_cas_has_one_winner, concurrent_chunk_insert, concurrent_claims_have_one_winner, concurrent_reservations_have_one_winner, concurrent_capped_creations_stop_at_the_cap, concurrent_capped_file_additions_stop_at_the_cap, writes_with_facts, head_writes);
        }
    };
    (@ref $factory:path; $($case:ident),*) => {$(
        #[test]
        fn $case() {
            $crate::testing::__rt::run(async {
                let (store, _guard) = $factory().await;
                $crate::testing::session_store::$case(&store).await;
            })
        }
    )*};
    (@arc $factory:path; $($case:ident),*) => {$(
        #[test]
        fn $case() {
            $crate::testing::__rt::run(async {
                let (store, _guard) = $factory().await;
                $crate::testing::session_store::$case(::std::sync::Arc::new(store)).await;
            })
        }
    )*};
}
