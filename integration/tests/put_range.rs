//! `Pipeline::put_range`: a client's streamed range under one reservation,
//! cut into durable segments that each go through the chunk rules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use relaypacs_core::AuditSink as _;
use relaypacs_core::SessionStore as _;
use relaypacs_core::testing::pieces;
use relaypacs_core::{
    Actor, ByteStream, Error, FileState, NewFile, PipelineConfig, RangeWrite, Sha256Digest,
    plan_segments,
};
use relaypacs_integration::{Embedded, dicom, new_study, open_session};

const MIN: u64 = 64 << 10;

async fn setup() -> (Embedded, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (
        Embedded::open(dir.path(), PipelineConfig::default())
            .await
            .unwrap(),
        dir,
    )
}

fn declared(data: &[u8]) -> NewFile {
    NewFile {
        name: "a.dcm".into(),
        size: data.len() as u64,
        sha256: Some(Sha256Digest::of(data)),
    }
}

/// `data` in pieces, then an error of the body itself.
fn then_error(data: &[u8], piece: usize) -> ByteStream {
    let err = futures::stream::once(async {
        Err(Error::io(
            "client body",
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset"),
        ))
    });
    Box::pin(pieces(data, piece).chain(err))
}

/// A body fed through a channel; `started` fires when it is first read.
fn fed() -> (
    ByteStream,
    futures::channel::mpsc::UnboundedSender<relaypacs_core::Result<Bytes>>,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let (started, on_start) = tokio::sync::oneshot::channel::<()>();
    let mut started = Some(started);
    let body = rx.map(move |item| {
        if let Some(s) = started.take() {
            let _ = s.send(());
        }
        item
    });
    (Box::pin(body), tx, on_start)
}

#[test]
fn plan_cuts_segments_and_joins_a_short_tail() {
    assert_eq!(
        plan_segments(0, 300_000, 100_000, MIN),
        [(0, 100_000), (100_000, 100_000), (200_000, 100_000)]
    );
    // A tail shorter than the smallest chunk joins the previous segment.
    assert_eq!(
        plan_segments(10, 300_000, 131_072, MIN),
        [(10, 131_072), (131_082, 168_928)]
    );
    // One short range is one segment; a segment of 0 counts as 1.
    assert_eq!(plan_segments(5, 100, 1 << 20, MIN), [(5, 100)]);
    assert_eq!(plan_segments(0, 3, 0, 0), [(0, 1), (1, 1), (2, 1)]);
    assert!(plan_segments(7, 0, 10, 0).is_empty());
}

#[tokio::test]
async fn put_range_stores_segments_reports_progress_and_completes() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom(&new_study(), 11);
    let size = data.len() as u64;
    assert!(size > 3 * MIN, "{size}");
    let f = p.add_file(&a, s, declared(&data)).await.unwrap();
    let mut seen = Vec::new();
    let end = p
        .put_range(
            &a,
            s,
            f.id,
            RangeWrite::new(0, size, MIN),
            pieces(&data, 7_777),
            |at, _| seen.push(at),
        )
        .await
        .unwrap();
    assert_eq!((end.end, end.size), (size, size));
    let plan = plan_segments(0, size, MIN, MIN);
    assert_eq!(
        seen,
        plan.iter().map(|(o, l)| o + l).collect::<Vec<_>>(),
        "progress after each durable segment"
    );
    let chunks = e.sessions.chunks(s, f.id).await.unwrap();
    assert_eq!(chunks.len(), plan.len());
    for c in &chunks {
        assert!(c.length >= MIN && c.length < 2 * MIN, "{c:?}");
        assert_eq!(
            c.sha256,
            Sha256Digest::of(&data[c.offset as usize..c.end() as usize])
        );
    }
    // The same range again is a no-op per segment.
    let again = p
        .put_range(
            &a,
            s,
            f.id,
            RangeWrite::new(0, size, MIN),
            pieces(&data, 50_000),
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(again.end, size);
    assert_eq!(e.sessions.chunks(s, f.id).await.unwrap().len(), plan.len());
    let rec = p.complete_file(&a, s, f.id).await.unwrap();
    assert!(matches!(rec.state, FileState::Valid { .. }), "{rec:?}");

    // With a declared SHA-256 the whole range is one chunk, verified whole.
    let data2 = dicom(&new_study(), 12);
    let s2 = open_session(p, &a).await.unwrap();
    let f2 = p.add_file(&a, s2, declared(&data2)).await.unwrap();
    let mut calls = 0;
    let range = RangeWrite {
        sha256: Some(Sha256Digest::of(&data2)),
        ..RangeWrite::new(0, data2.len() as u64, MIN)
    };
    p.put_range(&a, s2, f2.id, range, pieces(&data2, 4096), |_, _| {
        calls += 1
    })
    .await
    .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(e.sessions.chunks(s2, f2.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_second_writer_of_the_range_is_busy_until_the_first_ends() {
    let (e, _d) = setup().await;
    let p = e.pipeline.clone();
    let a = Actor::user("alice");
    let s = open_session(&p, &a).await.unwrap();
    let data = dicom(&new_study(), 13);
    let size = data.len() as u64;
    let f = p.add_file(&a, s, declared(&data)).await.unwrap();
    let (body, tx, started) = fed();
    let first = tokio::spawn({
        let (p, a) = (p.clone(), a.clone());
        async move {
            p.put_range(&a, s, f.id, RangeWrite::new(0, size, MIN), body, |_, _| {})
                .await
        }
    });
    tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[..1000])))
        .unwrap();
    started.await.unwrap();
    // The whole range is reserved: the same range, a range inside it and
    // a single chunk inside it are all refused as busy, and read nothing.
    for (offset, length) in [(0, size), (MIN, size - MIN), (2 * MIN, 10)] {
        let err = p
            .put_range(
                &a,
                s,
                f.id,
                RangeWrite::new(offset, length, MIN),
                pieces(&data[offset as usize..(offset + length) as usize], 4096),
                |_, _| panic!("a busy range stores nothing"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Busy { .. }), "{err:?}");
        assert_eq!(err.code(), "RELAY_BUSY");
    }
    let err = relaypacs_integration::put(&p, &a, s, f.id, 0, &data[..MIN as usize])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    // The first writer finishes undisturbed.
    tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[1000..])))
        .unwrap();
    drop(tx);
    assert_eq!(first.await.unwrap().unwrap().end, size);
    assert_eq!(p.file_status(&a, s, f.id).await.unwrap().offset, size);
    // The refusals were audited.
    let busy = e
        .audit
        .events()
        .await
        .unwrap()
        .into_iter()
        .filter(|ev| ev.detail.contains("RELAY_BUSY"))
        .count();
    assert_eq!(busy, 4);
}

#[tokio::test]
async fn a_dropped_body_keeps_complete_segments_and_a_retry_resumes() {
    let (e, _d) = setup().await;
    let p = e.pipeline.clone();
    let a = Actor::user("alice");
    let s = open_session(&p, &a).await.unwrap();
    let data = dicom(&new_study(), 14);
    let size = data.len() as u64;
    let f = p.add_file(&a, s, declared(&data)).await.unwrap();
    // The connection breaks inside the third segment.
    let cut = (2 * MIN + 1000) as usize;
    let mut seen = Vec::new();
    let err = p
        .put_range(
            &a,
            s,
            f.id,
            RangeWrite::new(0, size, MIN),
            then_error(&data[..cut], 10_000),
            |at, _| seen.push(at),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_STORAGE_ERROR", "{err:?}");
    assert_eq!(seen, [MIN, 2 * MIN]);
    assert_eq!(p.file_status(&a, s, f.id).await.unwrap().offset, 2 * MIN);
    assert_eq!(e.sessions.chunks(s, f.id).await.unwrap().len(), 2);

    // A request dropped mid-segment (cancelled) releases its reservation
    // and keeps its complete segments too.
    let (body, tx, started) = fed();
    let second = tokio::spawn({
        let (p, a) = (p.clone(), a.clone());
        async move {
            p.put_range(
                &a,
                s,
                f.id,
                RangeWrite::new(2 * MIN, size - 2 * MIN, MIN),
                body,
                |_, _| {},
            )
            .await
        }
    });
    let from = 2 * MIN as usize;
    tx.unbounded_send(Ok(Bytes::copy_from_slice(
        &data[from..from + MIN as usize + 10],
    )))
    .unwrap();
    started.await.unwrap();
    // Wait for the first segment of this request to be durable.
    for _ in 0..200 {
        if p.file_status(&a, s, f.id).await.unwrap().offset == 3 * MIN {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.abort();
    assert!(second.await.unwrap_err().is_cancelled());
    drop(tx);
    assert_eq!(p.file_status(&a, s, f.id).await.unwrap().offset, 3 * MIN);

    // The retry is not busy and resumes at the durable offset.
    let at = 3 * MIN;
    let end = p
        .put_range(
            &a,
            s,
            f.id,
            RangeWrite::new(at, size - at, MIN),
            pieces(&data[at as usize..], 30_000),
            |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(end.end, size);
    let rec = p.complete_file(&a, s, f.id).await.unwrap();
    assert!(matches!(rec.state, FileState::Valid { .. }), "{rec:?}");
}

#[tokio::test]
async fn an_error_or_extra_byte_after_the_range_stores_nothing_of_its_last_segment() {
    let (e, _d) = setup().await;
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let s = open_session(p, &a).await.unwrap();
    let data = dicom(&new_study(), 15);
    let size = data.len() as u64;
    let f = p.add_file(&a, s, declared(&data)).await.unwrap();
    // One segment whose body fails after its last byte (a trailing
    // checksum that does not match, say): nothing is stored.
    let range = RangeWrite::new(0, size, size);
    let err = p
        .put_range(&a, s, f.id, range, then_error(&data, 8192), |_, _| {
            panic!("nothing is durable")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_STORAGE_ERROR", "{err:?}");
    assert!(e.sessions.chunks(s, f.id).await.unwrap().is_empty());
    // A body longer than the range: refused, nothing stored.
    let mut longer = data.clone();
    longer.push(0);
    let err = p
        .put_range(&a, s, f.id, range, pieces(&longer, 8192), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_LENGTH_MISMATCH", "{err:?}");
    assert!(e.sessions.chunks(s, f.id).await.unwrap().is_empty());
    // Shorter: the same.
    let err = p
        .put_range(&a, s, f.id, range, pieces(&data[1..], 8192), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), "RELAY_CHUNK_LENGTH_MISMATCH", "{err:?}");
    assert!(e.sessions.chunks(s, f.id).await.unwrap().is_empty());
    // An empty range or one past the file: refused before any byte.
    for (offset, length) in [(0, 0), (1, size)] {
        let err = p
            .put_range(
                &a,
                s,
                f.id,
                RangeWrite::new(offset, length, MIN),
                pieces(&data, 8192),
                |_, _| {},
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), "RELAY_BAD_RANGE", "{err:?}");
    }
    // A continuing range is checked for its offset first (tus answers a
    // stale offset before a body too long), then for its fit.
    for (offset, length, code) in [
        (1, size, "RELAY_OFFSET_MISMATCH"),
        (0, size + 1, "RELAY_BAD_RANGE"),
    ] {
        let range = RangeWrite {
            continues: true,
            ..RangeWrite::new(offset, length, MIN)
        };
        let err = p
            .put_range(&a, s, f.id, range, pieces(&data, 8192), |_, _| {
                panic!("nothing is stored")
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    assert!(e.sessions.chunks(s, f.id).await.unwrap().is_empty());
    // Another user's session is not found.
    let err = p
        .put_range(
            &Actor::user("mallory"),
            s,
            f.id,
            RangeWrite::new(0, size, MIN),
            pieces(&data, 8192),
            |_, _| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
}
