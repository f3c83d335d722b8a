//! The pipeline is the only door: a whole file put through the chunk rules
//! by `ingest_stream`, and the queries a server needs (`list_sessions`,
//! `file_offsets`, `check_ready`) under the same ownership rule.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::SessionStore as _;
use relaypacs_core::testing::{failing, pieces};
use relaypacs_core::{
    Actor, Error, FileState, INGEST_CHUNK_SIZE, NewFile, PipelineConfig, Sha256Digest,
};
use relaypacs_integration::{Embedded, dicom, new_study, open_session, put};

async fn setup() -> (Embedded, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Embedded::open(dir.path(), PipelineConfig::default())
            .await
            .unwrap(),
        dir,
    )
}

fn declared(name: &str, data: &[u8]) -> NewFile {
    NewFile {
        name: name.into(),
        size: data.len() as u64,
        sha256: Some(Sha256Digest::of(data)),
    }
}

#[tokio::test]
async fn ingest_stream_cuts_declares_digests_and_completes() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom(&new_study(), 1);
    let f = p.add_file(&a, s, declared("a.dcm", &data)).await.unwrap();
    // Pieces that do not line up with the chunks.
    let rec = p
        .ingest_stream_chunked(&a, s, f.id, 100_000, pieces(&data, 7_777))
        .await
        .unwrap();
    assert!(matches!(rec.state, FileState::Valid { .. }), "{rec:?}");
    let chunks = e.sessions.chunks(s, f.id).await.unwrap();
    let want = (data.len() as u64).div_ceil(100_000);
    assert_eq!(chunks.len() as u64, want);
    for c in &chunks {
        let range = c.offset as usize..c.end() as usize;
        assert!(c.length <= 100_000);
        assert_eq!(
            c.sha256,
            Sha256Digest::of(&data[range]),
            "chunk {}",
            c.offset
        );
    }
    // The default cut is INGEST_CHUNK_SIZE: a small file is one chunk.
    let data2 = dicom(&new_study(), 2);
    let s2 = open_session(p, &a).await.unwrap();
    let f2 = p.add_file(&a, s2, declared("b.dcm", &data2)).await.unwrap();
    p.ingest_stream(&a, s2, f2.id, pieces(&data2, 4096))
        .await
        .unwrap();
    assert!(data2.len() as u64 <= INGEST_CHUNK_SIZE);
    assert_eq!(e.sessions.chunks(s2, f2.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn ingest_stream_resumes_over_stored_chunks() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom(&new_study(), 3);
    let f = p.add_file(&a, s, declared("a.dcm", &data)).await.unwrap();
    // The first chunk came earlier (a client's PATCH, an interrupted run).
    put(p, &a, s, f.id, 0, &data[..100_000]).await.unwrap();
    let rec = p
        .ingest_stream_chunked(&a, s, f.id, 100_000, pieces(&data, 65_536))
        .await
        .unwrap();
    assert!(matches!(rec.state, FileState::Valid { .. }));
}

#[tokio::test]
async fn ingest_stream_refuses_a_stream_of_the_wrong_length() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let data = dicom(&new_study(), 4);
    // Shorter than declared: the missing chunk is never stored.
    let s = open_session(p, &a).await.unwrap();
    let f = p
        .add_file(&a, s, declared("short.dcm", &data))
        .await
        .unwrap();
    let short = &data[..data.len() - 10];
    let err = p
        .ingest_stream_chunked(&a, s, f.id, 100_000, pieces(short, 65_536))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_LENGTH_MISMATCH", "{err:?}");
    let st = p.file_status(&a, s, f.id).await.unwrap();
    assert_eq!(st.file.state, FileState::Uploading);
    assert!(st.offset < data.len() as u64);
    // Longer than declared: every byte is stored, but the file is not
    // completed.
    let mut long = data.clone();
    long.extend_from_slice(b"trailing");
    let f = p
        .add_file(&a, s, declared("long.dcm", &data))
        .await
        .unwrap();
    let err = p
        .ingest_stream_chunked(&a, s, f.id, 100_000, pieces(&long, 65_536))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_LENGTH_MISMATCH", "{err:?}");
    let st = p.file_status(&a, s, f.id).await.unwrap();
    assert_eq!(st.file.state, FileState::Uploading);
    // A stream that fails: its error is returned as it is.
    let f = p
        .add_file(&a, s, declared("broken.dcm", &data))
        .await
        .unwrap();
    let err = p
        .ingest_stream_chunked(&a, s, f.id, 100_000, failing(&data[..1000]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Storage { .. }), "{err:?}");
}

#[tokio::test]
async fn ingest_stream_follows_the_chunk_and_owner_rules() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom(&new_study(), 5);
    let f = p.add_file(&a, s, declared("a.dcm", &data)).await.unwrap();
    // Chunks below the session's minimum are refused by the core's rule.
    let err = p
        .ingest_stream_chunked(&a, s, f.id, 1000, pieces(&data, 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_TOO_SMALL", "{err:?}");
    // Someone else's session does not exist.
    let err = p
        .ingest_stream(&Actor::user("bob"), s, f.id, pieces(&data, 65_536))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn list_sessions_and_file_offsets_follow_ownership() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let (alice, bob) = (Actor::user("alice"), Actor::user("bob"));
    let sa = open_session(p, &alice).await.unwrap();
    let sb = open_session(p, &bob).await.unwrap();
    let mine: Vec<_> = p
        .list_sessions(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(mine, vec![sa]);
    let mut all: Vec<_> = p
        .list_sessions(&Actor::system())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    all.sort_by_key(|id| id.to_string());
    let mut want = vec![sa, sb];
    want.sort_by_key(|id| id.to_string());
    assert_eq!(all, want);

    let data = dicom(&new_study(), 6);
    let up = p
        .add_file(&alice, sa, declared("up.dcm", &data))
        .await
        .unwrap();
    put(p, &alice, sa, up.id, 0, &data[..100_000])
        .await
        .unwrap();
    let other = dicom(&new_study(), 7);
    let done = p
        .add_file(&alice, sa, declared("done.dcm", &other))
        .await
        .unwrap();
    let rec = p
        .ingest_stream(&alice, sa, done.id, pieces(&other, 65_536))
        .await
        .unwrap();
    assert!(matches!(rec.state, FileState::Valid { .. }));
    let offsets = p.file_offsets(&alice, sa).await.unwrap();
    assert_eq!(offsets.get(&up.id), Some(&100_000));
    assert_eq!(offsets.get(&done.id), Some(&(other.len() as u64)));
    let err = p.file_offsets(&bob, sa).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    p.check_ready().await.unwrap();
}
