//! The hostile-DICOM set, generated here, uploaded through the whole
//! pipeline: every file is refused with a typed DICOM error at completion,
//! the process survives, memory stays bounded, nothing reaches the archive,
//! and every refusal is audited.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use relaypacs_core::testing::dicom_gen::hostile_set;
use relaypacs_core::{
    Actor, AuditAction, AuditOutcome, AuditSink, Error, NewFile, PipelineConfig, PutChunk,
    Sha256Digest,
};
use relaypacs_integration::{Embedded, open_session, peak_rss_bytes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_are_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let p = &e.pipeline;
    let a = Actor::user("mallory");
    let s = open_session(p, &a).await.unwrap();
    let mut refused = 0;
    for (name, bytes) in hostile_set() {
        let nf = NewFile {
            name: name.into(),
            size: bytes.len() as u64,
            sha256: Some(Sha256Digest::of(&bytes)),
        };
        let f = p.add_file(&a, s, nf).await.unwrap();
        let chunk = 32usize << 20;
        for (i, c) in bytes.chunks(chunk).enumerate() {
            let spec = PutChunk {
                offset: (i * chunk) as u64,
                length: c.len() as u64,
                sha256: Some(Sha256Digest::of(c)),
            };
            p.put_chunk(
                &a,
                s,
                f.id,
                spec,
                relaypacs_core::testing::pieces(c, 1 << 20),
            )
            .await
            .unwrap();
        }
        match p.complete_file(&a, s, f.id).await {
            Err(e @ Error::FileRefused { .. }) => match e.root() {
                Error::Dicom(d) => {
                    refused += 1;
                    eprintln!("{name}: {} {d}", d.code());
                }
                other => panic!("{name}: expected a DICOM error, got {other:?}"),
            },
            Err(other) => panic!("{name}: expected a DICOM error, got {other:?}"),
            Ok(_) => panic!("{name}: hostile file accepted"),
        }
        // A refused file leaves the session with its bytes.
        assert!(
            !p.session(&a, s).await.unwrap().files.contains_key(&f.id),
            "{name}: the refused file is still in the session"
        );
        assert!(matches!(
            p.remove_file(&a, s, f.id).await,
            Err(Error::NotFound { .. })
        ));
    }
    assert!(refused >= 10, "only {refused} hostile files in the set");
    assert!(
        std::fs::read_dir(e.root.join("archive"))
            .unwrap()
            .next()
            .is_none()
    );
    let events = e.audit.events().await.unwrap();
    let audited = events
        .iter()
        .filter(|ev| {
            ev.action == AuditAction::FileCompleted && ev.outcome == AuditOutcome::MinorFailure
        })
        .count();
    assert_eq!(audited, refused);
    let peak = peak_rss_bytes().unwrap();
    eprintln!("peak RSS {:.1} MiB", peak as f64 / 1048576.0);
    assert!(peak < 256 << 20, "peak RSS {peak}");
}
