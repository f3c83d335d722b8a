//! A DICOM file above 100 MiB, created in this test run, goes through the
//! pipeline in 8 MiB chunks streamed from disk and lands in the archive
//! byte-identical, with bounded memory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::{Read, Seek, SeekFrom};

use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
use relaypacs_core::testing::pieces;
use relaypacs_core::{
    Actor, FileState, NewFile, PipelineConfig, PutChunk, SessionState, Sha256Digest,
};
use relaypacs_integration::{Embedded, open_session, peak_rss_bytes};
use sha2::{Digest, Sha256};

fn file_sha(path: &std::path::Path) -> Sha256Digest {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Sha256Digest(h.finalize().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_over_100_mib_round_trips_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("large.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        series_uid: new_uid(),
        sop_instance_uid: new_uid(),
        ..DicomSpec::default()
    };
    write_large_file(&src, &spec, 110 << 20).unwrap();
    let size = std::fs::metadata(&src).unwrap().len();
    assert!(size > 100 << 20);
    let digest = file_sha(&src);

    let e = Embedded::open(&dir.path().join("data"), PipelineConfig::default())
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("alice");
    let rss0 = peak_rss_bytes().unwrap();
    let s = open_session(p, &a).await.unwrap();
    let f = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "large.dcm".into(),
                size,
                sha256: Some(digest),
            },
        )
        .await
        .unwrap();
    let chunk = 8usize << 20;
    let mut buf = vec![0u8; chunk];
    let mut file = std::fs::File::open(&src).unwrap();
    // Out of order: odd chunks first, then even ones.
    let n = size.div_ceil(chunk as u64);
    for i in (1..n).step_by(2).chain((0..n).step_by(2)) {
        let off = i * chunk as u64;
        let len = (size - off).min(chunk as u64) as usize;
        file.seek(SeekFrom::Start(off)).unwrap();
        file.read_exact(&mut buf[..len]).unwrap();
        let spec = PutChunk {
            offset: off,
            length: len as u64,
            sha256: Some(Sha256Digest::of(&buf[..len])),
        };
        p.put_chunk(&a, s, f.id, spec, pieces(&buf[..len], 256 << 10))
            .await
            .unwrap();
    }
    let done = p.complete_file(&a, s, f.id).await.unwrap();
    let FileState::Valid { dicom } = done.state else {
        panic!("not valid")
    };
    let rec = p
        .complete_and_deliver(&a, s, &Default::default())
        .await
        .unwrap();
    assert!(matches!(rec.state, SessionState::Delivered { .. }));
    let archived = e.archive.instance_path(
        &dicom.study_instance_uid,
        &dicom.series_instance_uid,
        &dicom.sop_instance_uid,
    );
    assert_eq!(file_sha(&archived), digest, "archived file differs");
    let growth = peak_rss_bytes().unwrap().saturating_sub(rss0);
    eprintln!(
        "peak RSS growth during a {} MiB ingest: {:.1} MiB",
        size >> 20,
        growth as f64 / 1048576.0
    );
    assert!(growth < 64 << 20, "memory grew by {growth} bytes");
}
