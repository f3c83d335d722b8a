//! End-to-end behaviour of the pipeline on the embedded adapters: the happy
//! path, and each kind of bad input giving its typed error without changing
//! anything stored.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use futures::StreamExt;
use relaypacs_core::testing::{collect, pieces};
use relaypacs_core::{
    Actor, AuditAction, AuditOutcome, AuditSink, Error, FileState, IntegrityError, NewFile,
    PipelineConfig, PutChunk, PutOutcome, SessionState, Sha256Digest,
};
use relaypacs_core::{ChunkStore as _, SessionStore as _};
use relaypacs_integration::{Embedded, dicom, new_study, open_session, put, upload_file};

async fn setup() -> (Embedded, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Embedded::open(dir.path(), PipelineConfig::default())
            .await
            .unwrap(),
        dir,
    )
}

fn alice() -> Actor {
    Actor::user("alice")
}

#[tokio::test]
async fn study_flows_to_archive_byte_exact_and_is_audited() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let study = new_study();
    let s = open_session(p, &alice()).await.unwrap();
    let files: Vec<Vec<u8>> = (0..3).map(|i| dicom(&study, i)).collect();
    for (i, f) in files.iter().enumerate() {
        let rec = upload_file(p, &alice(), s, &format!("f{i}.dcm"), f, 100_000)
            .await
            .unwrap();
        assert!(matches!(rec.state, FileState::Valid { .. }));
    }
    let done = p
        .complete_and_deliver(&alice(), s, &Default::default())
        .await
        .unwrap();
    assert!(
        matches!(done.state, SessionState::Delivered { .. }),
        "{:?}",
        done.state
    );
    for f in &files {
        let rec = done
            .files
            .values()
            .find(|r| r.sha256 == Some(Sha256Digest::of(f)))
            .unwrap();
        let FileState::Valid { dicom } = &rec.state else {
            panic!()
        };
        let path = e.archive.instance_path(
            &dicom.study_instance_uid,
            &dicom.series_instance_uid,
            &dicom.sop_instance_uid,
        );
        assert_eq!(std::fs::read(&path).unwrap(), *f, "archived bytes differ");
        // The archive is on the chunks' filesystem: it holds the chunk
        // store's verified file under a second name, not a copy.
        let data = e
            .chunks
            .local_file(relaypacs_core::FileKey {
                session: s,
                file: rec.id,
            })
            .unwrap();
        let (a, c) = (
            std::fs::metadata(&path).unwrap(),
            std::fs::metadata(&data).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (c.dev(), c.ino()), "{data:?}");
    }
    let events = e.audit.events().await.unwrap();
    for action in [
        AuditAction::SessionCreated,
        AuditAction::FileAdded,
        AuditAction::ChunkStored,
        AuditAction::FileCompleted,
        AuditAction::ForwardStarted,
        AuditAction::Forwarded,
    ] {
        assert!(
            events
                .iter()
                .any(|ev| ev.action == action && ev.outcome == AuditOutcome::Success),
            "no {action:?} event"
        );
    }
    let fwd = events
        .iter()
        .find(|ev| ev.action == AuditAction::Forwarded)
        .unwrap();
    assert_eq!(fwd.event_id, 110104);
    assert_eq!(fwd.study.as_ref().unwrap().as_str(), study);
    relaypacs_storage::verify_chain(e.audit.path()).unwrap();
}

/// Snapshot of everything stored for a session, to prove refusals change nothing.
async fn snapshot(
    e: &Embedded,
    s: relaypacs_core::SessionId,
) -> (
    serde_json::Value,
    Vec<Vec<relaypacs_core::ChunkRecord>>,
    Vec<Vec<u8>>,
) {
    let rec = e.sessions.load_session(s).await.unwrap().value;
    let mut chunks = Vec::new();
    let mut bytes = Vec::new();
    for f in rec.files.values() {
        let c = e.sessions.chunks(s, f.id).await.unwrap();
        for r in &c {
            let key = relaypacs_core::FileKey {
                session: s,
                file: f.id,
            };
            bytes.push(
                collect(e.chunks.read(key, r.offset..r.end()).await.unwrap())
                    .await
                    .unwrap(),
            );
        }
        chunks.push(c);
    }
    let mut v = serde_json::to_value(&rec).unwrap();
    v.as_object_mut().unwrap().remove("updated_at");
    (v, chunks, bytes)
}

#[tokio::test]
async fn bad_input_gives_typed_errors_and_changes_nothing() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = alice();
    let study = new_study();
    let s = open_session(p, &a).await.unwrap();
    let good = dicom(&study, 1);
    upload_file(p, &a, s, "good.dcm", &good, 70_000)
        .await
        .unwrap();
    // A second file, half uploaded.
    let second = dicom(&study, 2);
    let f2 = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "b".into(),
                size: second.len() as u64,
                sha256: Some(Sha256Digest::of(&second)),
            },
        )
        .await
        .unwrap();
    put(p, &a, s, f2.id, 0, &second[..65_536]).await.unwrap();
    let before = snapshot(&e, s).await;

    // Bad chunk: bytes that do not match the declared digest.
    let mut bad = second[65_536..131_072].to_vec();
    bad[100] ^= 1;
    let spec = PutChunk {
        offset: 65_536,
        length: 65_536,
        sha256: Some(Sha256Digest::of(&second[65_536..131_072])),
    };
    let err = p
        .put_chunk(&a, s, f2.id, spec, pieces(&bad, 4096))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Integrity(IntegrityError::ChunkHash { .. })),
        "{err:?}"
    );
    assert_eq!(err.code(), "RELAY_CHUNK_HASH_MISMATCH");
    // Truncated chunk: fewer bytes than declared.
    let err = p
        .put_chunk(&a, s, f2.id, spec, pieces(&second[65_536..100_000], 4096))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Integrity(IntegrityError::ChunkLength { .. })),
        "{err:?}"
    );
    // Stored chunk again with other bytes: conflict; with the same bytes: no-op.
    let other = PutChunk {
        offset: 0,
        length: 65_536,
        sha256: Some(Sha256Digest::of(&bad)),
    };
    let err = p
        .put_chunk(&a, s, f2.id, other, pieces(&bad, 4096))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_CONFLICT");
    let undeclared = PutChunk {
        offset: 0,
        length: 65_536,
        sha256: None,
    };
    let err = p
        .put_chunk(&a, s, f2.id, undeclared, pieces(&bad, 4096))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        "RELAY_CHUNK_CONFLICT",
        "undeclared digest: bytes are compared"
    );
    assert!(matches!(
        put(p, &a, s, f2.id, 0, &second[..65_536]).await.unwrap(),
        PutOutcome::AlreadyStored { .. }
    ));
    // Overlapping range.
    let err = put(p, &a, s, f2.id, 1000, &second[1000..70_000])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_OVERLAP");
    // Range past the end, and a too-small middle chunk.
    let err = put(p, &a, s, f2.id, second.len() as u64 - 10, &[0u8; 20])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_BAD_RANGE");
    let err = put(p, &a, s, f2.id, 65_536, &second[65_536..66_000])
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_TOO_SMALL");
    // Oversize declarations.
    let err = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "huge".into(),
                size: (2 << 30) + 1,
                sha256: None,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded {
                what: "file size",
                ..
            }
        ),
        "{err:?}"
    );
    let err = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "zero".into(),
                size: 0,
                sha256: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_EMPTY_FILE");
    // Completing an incomplete file.
    let err = p.complete_file(&a, s, f2.id).await.unwrap_err();
    assert_eq!(err.code(), "RELAY_FILE_INCOMPLETE");
    assert_eq!(
        snapshot(&e, s).await,
        before,
        "refused requests changed stored state"
    );

    // Files refused for their content leave the session with their bytes
    // (issue: a refused file must not keep a session from completing);
    // everything else stored is exactly as before the file was added.
    async fn refused_leaves_no_trace(
        e: &Embedded,
        a: &Actor,
        s: relaypacs_core::SessionId,
        name: &str,
        data: &[u8],
        declared: Sha256Digest,
    ) -> Error {
        let p = &e.pipeline;
        let before = snapshot(e, s).await;
        let f = p
            .add_file(
                a,
                s,
                NewFile {
                    name: name.into(),
                    size: data.len() as u64,
                    sha256: Some(declared),
                },
            )
            .await
            .unwrap();
        put(p, a, s, f.id, 0, data).await.unwrap();
        let err = p.complete_file(a, s, f.id).await.unwrap_err();
        assert!(matches!(err, Error::FileRefused { .. }), "{err:?}");
        assert_eq!(snapshot(e, s).await, before, "{name}: refusal left a trace");
        let key = relaypacs_core::FileKey {
            session: s,
            file: f.id,
        };
        let gone = match e.chunks.read(key, 0..data.len() as u64).await {
            Err(_) => true,
            Ok(stream) => collect(stream).await.is_err(),
        };
        assert!(gone, "{name}: the refused file's bytes are still stored");
        err
    }
    // Wrong whole-file hash.
    let f3data = dicom(&study, 3);
    let err = refused_leaves_no_trace(&e, &a, s, "c", &f3data, Sha256Digest::of(b"not it")).await;
    assert!(
        matches!(
            err.root(),
            Error::Integrity(IntegrityError::FileHash { .. })
        ),
        "{err:?}"
    );
    // Non-DICOM bytes.
    let junk = relaypacs_core::testing::pattern(9, 200_000);
    let err = refused_leaves_no_trace(&e, &a, s, "d", &junk, Sha256Digest::of(&junk)).await;
    assert!(
        matches!(
            err.root(),
            Error::Dicom(relaypacs_core::dicom::DicomError::NotDicom { .. })
        ),
        "{err:?}"
    );
    // A DICOM file of another study.
    let foreign = dicom(&new_study(), 4);
    let err = refused_leaves_no_trace(&e, &a, s, "e", &foreign, Sha256Digest::of(&foreign)).await;
    assert!(matches!(err.root(), Error::StudyMismatch { .. }), "{err:?}");
    // Every refusal was audited as a minor failure.
    let events = e.audit.events().await.unwrap();
    let refused = events
        .iter()
        .filter(|ev| ev.outcome == AuditOutcome::MinorFailure)
        .count();
    assert!(refused >= 12, "only {refused} refusals audited");
    assert!(
        events
            .iter()
            .any(|ev| ev.detail.starts_with("RELAY_STUDY_MISMATCH"))
    );
}

#[tokio::test]
async fn corruption_after_acknowledgement_is_caught_and_never_forwarded() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = alice();
    // With a declared whole-file digest (completion compares the whole
    // file, then looks for the chunk) and without (it checks each chunk);
    // then files of one chunk, a small one (read back on one thread) and
    // one of several MiB (read back streamed), where the flipped byte is in
    // chunk 0.
    let cases = [
        (5, true, 400, 65_536usize, 3 * 65_536 + 7),
        (7, false, 400, 65_536, 3 * 65_536 + 7),
        (8, false, 400, usize::MAX, 65_536 + 7),
        (9, true, 400, usize::MAX, 65_536 + 7),
        (10, false, 1200, usize::MAX, (2 << 20) + 7),
    ];
    for (n, declared, side, chunk, flip) in cases {
        let data = relaypacs_integration::dicom_sized(&new_study(), n, side);
        let chunk = chunk.min(data.len());
        let s = open_session(p, &a).await.unwrap();
        let f = p
            .add_file(
                &a,
                s,
                NewFile {
                    name: "x".into(),
                    size: data.len() as u64,
                    sha256: declared.then(|| Sha256Digest::of(&data)),
                },
            )
            .await
            .unwrap();
        for (i, c) in data.chunks(chunk).enumerate() {
            put(p, &a, s, f.id, (i * chunk) as u64, c).await.unwrap();
        }
        // Flip one byte on disk, behind the gateway's back.
        let path = e
            .root
            .join("chunks")
            .join(s.to_string())
            .join(format!("{}.data", f.id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[flip] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = p.complete_file(&a, s, f.id).await.unwrap_err();
        match err {
            Error::Integrity(IntegrityError::StoredChunkCorrupt { offset, .. }) => {
                assert_eq!(
                    offset as usize,
                    flip / chunk * chunk,
                    "declared: {declared}"
                )
            }
            other => panic!("expected StoredChunkCorrupt (declared: {declared}), got {other:?}"),
        }
        let err = p.complete_session(&a, s).await.unwrap_err();
        assert_eq!(err.code(), "RELAY_FILES_INCOMPLETE");
    }
    assert!(
        std::fs::read_dir(e.root.join("archive"))
            .unwrap()
            .next()
            .is_none(),
        "nothing may reach the archive"
    );
}

#[tokio::test]
async fn other_users_see_nothing() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let data = dicom(&new_study(), 6);
    let s = open_session(p, &alice()).await.unwrap();
    let f = upload_file(p, &alice(), s, "a", &data, 65_536)
        .await
        .unwrap();
    let bob = Actor::user("bob");
    assert!(matches!(
        p.session(&bob, s).await,
        Err(Error::NotFound { what: "session" })
    ));
    assert!(matches!(
        put(p, &bob, s, f.id, 0, &data[..10]).await,
        Err(Error::NotFound { what: "session" })
    ));
    assert!(matches!(
        p.complete_file(&bob, s, f.id).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        p.complete_session(&bob, s).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        p.abort_session(&bob, s).await,
        Err(Error::NotFound { .. })
    ));
    assert!(p.read_file(&bob, s, f.id).await.is_err());
    let admin = Actor {
        admin: true,
        ..Actor::user("root")
    };
    assert!(p.session(&admin, s).await.is_ok());
    assert_eq!(
        collect(p.read_file(&alice(), s, f.id).await.unwrap())
            .await
            .unwrap(),
        data
    );
}

#[tokio::test]
async fn concurrent_writes_of_one_range_never_interleave() {
    let (e, _d) = setup().await;
    let p = e.pipeline.clone();
    let a = alice();
    let data = dicom(&new_study(), 7);
    let s = open_session(&p, &a).await.unwrap();
    let f = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "x".into(),
                size: data.len() as u64,
                sha256: Some(Sha256Digest::of(&data)),
            },
        )
        .await
        .unwrap();
    let mut evil = data.clone();
    evil.iter_mut().for_each(|b| *b = !*b);
    // 8 writers race for the same range, half of them with wrong bytes.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (p, a) = (p.clone(), a.clone());
        let body = if i % 2 == 0 {
            data.clone()
        } else {
            evil.clone()
        };
        let spec = PutChunk {
            offset: 0,
            length: data.len() as u64,
            sha256: Some(Sha256Digest::of(&data)),
        };
        tasks.push(tokio::spawn(async move {
            p.put_chunk(&a, s, f.id, spec, pieces(&body, 1024)).await
        }));
    }
    let mut stored = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(PutOutcome::Stored { .. }) => stored += 1,
            Ok(PutOutcome::AlreadyStored { .. }) => {}
            Err(err) => assert!(
                matches!(err.code(), "RELAY_BUSY" | "RELAY_CHUNK_HASH_MISMATCH"),
                "{err:?}"
            ),
        }
    }
    assert!(stored <= 1);
    if stored == 0 {
        put(&p, &a, s, f.id, 0, &data).await.unwrap();
    }
    let done = p.complete_file(&a, s, f.id).await.unwrap();
    assert_eq!(done.sha256, Some(Sha256Digest::of(&data)));
}

/// The earlier implementation's expiry cleanup raced active uploads. Here a
/// session with a chunk in flight is never expired, and once idle it is.
#[tokio::test]
async fn expiry_never_removes_a_session_with_a_request_in_flight() {
    let (e, _d) = setup().await;
    let p = e.pipeline.clone();
    let a = alice();
    let data = dicom(&new_study(), 8);
    let s = open_session(&p, &a).await.unwrap();
    let f = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "x".into(),
                size: data.len() as u64,
                sha256: Some(Sha256Digest::of(&data)),
            },
        )
        .await
        .unwrap();
    // A body that stalls until released.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let first = bytes::Bytes::copy_from_slice(&data[..1000]);
    let rest = bytes::Bytes::copy_from_slice(&data[1000..]);
    let body = futures::stream::once(async move { Ok(first) })
        .chain(futures::stream::once(async move {
            let _ = rx.await;
            Ok(rest)
        }))
        .boxed();
    let spec = PutChunk {
        offset: 0,
        length: data.len() as u64,
        sha256: Some(Sha256Digest::of(&data)),
    };
    let (p2, a2) = (p.clone(), a.clone());
    let upload = tokio::spawn(async move { p2.put_chunk(&a2, s, f.id, spec, body).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let far_future = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    for _ in 0..50 {
        assert!(
            p.expire_sessions(far_future).await.unwrap().is_empty(),
            "expired a session with a request in flight"
        );
    }
    tx.send(()).unwrap();
    upload.await.unwrap().unwrap();
    // Recently active: not expired now.
    assert!(
        p.expire_sessions(time::OffsetDateTime::now_utc())
            .await
            .unwrap()
            .is_empty()
    );
    // Idle past the TTL: expired, bytes gone, audited.
    assert_eq!(p.expire_sessions(far_future).await.unwrap(), vec![s]);
    assert!(matches!(
        p.session(&a, s).await,
        Err(Error::NotFound { .. })
    ));
    assert!(!e.root.join("chunks").join(s.to_string()).exists());
    let events = e.audit.events().await.unwrap();
    assert!(
        events
            .iter()
            .any(|ev| ev.action == AuditAction::SessionExpired && ev.session == Some(s))
    );
}

/// Audit fails closed: when the trail cannot be written, the action is refused.
#[tokio::test]
async fn audit_failure_refuses_the_action() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    // Every audit record fails with EIO.
    use relaypacs_core::testing::faults::{Fault, FaultPlan, FaultyAuditSink, Op};
    let broken = FaultPlan::watching([Op::Record]);
    broken.fail_always(Fault::Io);
    let p = relaypacs_core::Pipeline::new(
        Arc::new(e.chunks.clone()),
        Arc::new(e.sessions.clone()),
        Arc::new(e.archive.clone()),
        Arc::new(FaultyAuditSink::new(Arc::new(e.audit.clone()), broken)),
        PipelineConfig::default(),
    );
    let err = p
        .create_session(&alice(), Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_AUDIT_UNAVAILABLE");
}
