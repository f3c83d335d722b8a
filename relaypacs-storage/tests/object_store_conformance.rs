//! The shared chunk-store conformance suite on `ObjectStoreChunkStore`
//! over three backends: in-memory, local files, and a real S3-compatible
//! server (s3s-fs, which checks signatures and checksums) on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use relaypacs_core::testing::{collect, failing, pattern, pieces};
use relaypacs_core::{
    ChunkPlacement, ChunkRecord, ChunkStore, ErrorKind, FileId, FileKey, SessionId, Sha256Digest,
};
use relaypacs_storage::ObjectStoreChunkStore;
use relaypacs_test_peers::S3Server;

fn s3(server: &S3Server, secret: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&server.endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_region("us-east-1")
            .with_bucket_name(&server.bucket)
            .with_access_key_id(&server.access_key)
            .with_secret_access_key(secret)
            .build()
            .unwrap(),
    )
}

mod memory {
    use super::*;
    async fn make() -> (ObjectStoreChunkStore, ()) {
        (
            ObjectStoreChunkStore::new(Arc::new(object_store::memory::InMemory::new()), "relay"),
            (),
        )
    }
    relaypacs_core::chunk_store_conformance!(conformance, make);
}

mod local {
    use super::*;
    async fn make() -> (ObjectStoreChunkStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        (ObjectStoreChunkStore::new(Arc::new(fs), "relay"), dir)
    }
    relaypacs_core::chunk_store_conformance!(conformance, make);
}

mod s3 {
    use super::*;
    async fn make() -> (ObjectStoreChunkStore, S3Server) {
        let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
        let store = ObjectStoreChunkStore::new(s3(&server, &server.secret_key.clone()), "relay");
        (store, server)
    }
    relaypacs_core::chunk_store_conformance!(conformance, make);
}

fn key() -> FileKey {
    FileKey {
        session: SessionId::random(),
        file: FileId::random(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_large_chunk_goes_multipart_and_round_trips() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let raw = s3(&server, &server.secret_key.clone());
    let store = ObjectStoreChunkStore::new(raw.clone(), "relay");
    let k = key();
    let data = pattern(21, 20 << 20);
    let len = data.len() as u64;
    store.create_file(k, len).await.unwrap();
    let receipt = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: len,
            },
            pieces(&data, 64 << 10),
        )
        .await
        .unwrap();
    let rec = ChunkRecord::new(0, len, Sha256Digest::of(&data), receipt);
    store.seal_file(k, len, &[rec]).await.unwrap();
    let back = collect(store.read(k, 0..len).await.unwrap()).await.unwrap();
    assert!(back == data, "multipart round trip differs");
    // Chunk objects are gone after sealing; only the data object remains.
    let left: Vec<_> = raw.list(None).try_collect().await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_failed_body_leaves_no_object() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let raw = s3(&server, &server.secret_key.clone());
    let store = ObjectStoreChunkStore::new(raw.clone(), "relay");
    let k = key();
    let data = pattern(22, 20 << 20);
    store.create_file(k, data.len() as u64).await.unwrap();
    // Fails after 17 MiB: two parts may already be uploaded; none may be assembled.
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: data.len() as u64,
            },
            failing(&data[..17 << 20]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage);
    let left: Vec<_> = raw.list(None).try_collect().await.unwrap();
    assert!(left.is_empty(), "a failed chunk left objects: {left:?}");
    // A short small body is refused too.
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: 1000,
            },
            pieces(&data[..999], 100),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(
        raw.list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_secret_is_refused_by_the_server() {
    let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let store = ObjectStoreChunkStore::new(s3(&server, "not-the-secret"), "relay");
    let k = key();
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: 4,
            },
            pieces(b"abcd", 4),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage, "{err:?}");
}
