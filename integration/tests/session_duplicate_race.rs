//! One SOP Instance UID twice in ONE session, the two files completed at
//! once on two gateways sharing one state database (PostgreSQL; SQLite two
//! pools on one file) and one bucket: the database's partial unique index
//! on `session_files (session_id, sop_instance_uid)` (migration 0009) is
//! the only guard left, inside the write's own transaction. Each round:
//! exactly one file valid, the other refused with
//! `RELAY_DUPLICATE_INSTANCE` and gone from the session, which holds one
//! file of that UID. `ROUNDS` rounds per engine.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;
use std::time::Instant;

use object_store::aws::AmazonS3Builder;
use relaypacs_core::{
    Actor, ChunkStore, Error, FileState, NewFile, PipelineConfig, SessionStore as _, Sha256Digest,
    Uid,
};
use relaypacs_integration::{
    Gateway, PgCluster, StateDb, dicom_with_sop, new_study, open_session, put,
};
use relaypacs_pacs::LocalArchiveSink;
use relaypacs_storage::MultipartChunkStore;
use relaypacs_test_peers::S3Server;
use tokio::sync::Barrier;

/// Rounds per engine.
const ROUNDS: usize = 100;

async fn race(db: &StateDb) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let url = db.url(dir.path()).unwrap();
    let s3s = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let sink = Arc::new(LocalArchiveSink::open(dir.path().join("archive")).unwrap());
    let config = PipelineConfig {
        max_open_sessions_per_user: 10_000,
        ..PipelineConfig::default()
    };
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let s3 = AmazonS3Builder::new()
            .with_endpoint(&s3s.endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_bucket_name(&s3s.bucket)
            .with_access_key_id(&s3s.access_key)
            .with_secret_access_key(&s3s.secret_key)
            .build()
            .unwrap();
        let chunks: Arc<dyn ChunkStore> = Arc::new(MultipartChunkStore::new(Arc::new(s3), "relay"));
        gateways.push(
            Gateway::open_shared(&url, chunks, sink.clone(), config.clone())
                .await
                .unwrap(),
        );
    }
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let study = new_study();
        let sop = format!("{study}.1.1");
        let actor = Actor::user(format!("u{round}"));
        let p = &gateways[0].pipeline;
        let sid = open_session(p, &actor).await.unwrap();
        // The same bytes twice: the index of accepted instances calls the
        // second an idempotent repeat, so only the session rule decides.
        let data = dicom_with_sop(&study, &sop, round as u64, 8);
        let mut files = Vec::new();
        for _ in 0..2 {
            let f = p
                .add_file(
                    &actor,
                    sid,
                    NewFile {
                        name: "x.dcm".into(),
                        size: data.len() as u64,
                        sha256: Some(Sha256Digest::of(&data)),
                    },
                )
                .await
                .unwrap();
            put(p, &actor, sid, f.id, 0, &data).await.unwrap();
            files.push(f.id);
        }
        let barrier = Arc::new(Barrier::new(2));
        let tasks: Vec<_> = gateways
            .iter()
            .zip(&files)
            .map(|(g, &fid)| {
                let (p, actor, barrier) = (g.pipeline.clone(), actor.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    p.complete_file(&actor, sid, fid).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let valid: Vec<usize> = (0..2)
            .filter(|&i| matches!(&results[i], Ok(f) if matches!(f.state, FileState::Valid { .. })))
            .collect();
        assert_eq!(
            valid.len(),
            1,
            "round {round}: one file valid, got {results:?}"
        );
        let w = valid[0];
        let loser = &results[1 - w];
        assert!(
            loser.as_ref().is_err_and(|e| matches!(e, Error::FileRefused { .. })
                && matches!(e.root(), Error::Conflict { code, .. } if *code == "RELAY_DUPLICATE_INSTANCE")),
            "round {round}: the other refused with RELAY_DUPLICATE_INSTANCE, got {loser:?}"
        );
        wins[w] += 1;
        let uid = Uid::parse(&sop).unwrap();
        let claim = gateways[0].sessions.instance_claim(&uid).await.unwrap();
        assert!(
            claim.as_ref().is_some_and(|c| c.held_by(sid, files[w])),
            "round {round}: the index names the accepted file, got {claim:?}"
        );
        for g in &gateways {
            let rec = g.sessions.load_session(sid).await.unwrap().value;
            assert_eq!(
                rec.files.len(),
                1,
                "round {round}: the refused file is gone"
            );
            assert!(rec.files.contains_key(&files[w]), "round {round}");
            assert_eq!(
                g.sessions.files_with_instance(sid, &uid).await.unwrap(),
                vec![files[w]],
                "round {round}"
            );
        }
    }
    for g in &gateways {
        g.close().await;
    }
    eprintln!(
        "one-session duplicate race on {}: {ROUNDS} rounds, gateway A won {}, B won {}, {:.1} s",
        db.engine_name(),
        wins[0],
        wins[1],
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_session_two_files_one_sop_instance_uid() {
    let cluster = PgCluster::start();
    race(&cluster.fresh_db()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_session_two_files_one_sop_instance_uid() {
    race(&StateDb::Sqlite).await;
}
