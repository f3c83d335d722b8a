//! The whole pipeline with its chunks in a real S3-compatible server
//! (s3s-fs on loopback): out-of-order chunks, completion, delivery to the
//! archive byte-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use relaypacs_core::{
    Actor, FileState, NewFile, Pipeline, PipelineConfig, SessionState, Sha256Digest,
};
use relaypacs_integration::{Embedded, dicom_of_size, new_study, open_session, put};
use relaypacs_storage::ObjectStoreChunkStore;
use relaypacs_test_peers::S3Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_through_s3_chunk_store() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let s3 = AmazonS3Builder::new()
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_bucket_name(&server.bucket)
        .with_access_key_id(&server.access_key)
        .with_secret_access_key(&server.secret_key)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = Embedded::open(dir.path(), PipelineConfig::default())
        .await
        .unwrap();
    let p = Pipeline::new(
        Arc::new(ObjectStoreChunkStore::new(Arc::new(s3), "gateway")),
        Arc::new(local.sessions.clone()),
        Arc::new(local.archive.clone()),
        Arc::new(local.audit.clone()),
        PipelineConfig::default(),
    );
    let a = Actor::user("alice");
    let study = new_study();
    let s = open_session(&p, &a).await.unwrap();
    let data = dicom_of_size(&study, 21 << 20);
    let f = p
        .add_file(
            &a,
            s,
            NewFile {
                name: "big".into(),
                size: data.len() as u64,
                sha256: Some(Sha256Digest::of(&data)),
            },
        )
        .await
        .unwrap();
    let chunk = 6 << 20;
    let offsets: Vec<usize> = (0..data.len()).step_by(chunk).rev().collect();
    for off in offsets {
        let end = (off + chunk).min(data.len());
        put(&p, &a, s, f.id, off as u64, &data[off..end])
            .await
            .unwrap();
    }
    let rec = p.complete_file(&a, s, f.id).await.unwrap();
    let FileState::Valid { dicom } = rec.state else {
        panic!("not valid")
    };
    let done = p
        .complete_and_deliver(&a, s, &Default::default())
        .await
        .unwrap();
    assert!(matches!(done.state, SessionState::Delivered { .. }));
    let archived = local.archive.instance_path(
        &dicom.study_instance_uid,
        &dicom.series_instance_uid,
        &dicom.sop_instance_uid,
    );
    assert!(
        std::fs::read(archived).unwrap() == data,
        "archived bytes differ"
    );
}
