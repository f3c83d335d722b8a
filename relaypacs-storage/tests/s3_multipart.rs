//! `MultipartChunkStore`: the shared conformance suite (in-memory and a
//! real S3-compatible server, s3s-fs, on loopback) and the multipart
//! behaviour on s3s-fs: parts, staged pieces, completion without reading
//! the bytes, abort on delete and cleanup, a restarted instance.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use relaypacs_core::testing::{collect, failing, pattern, pieces};
use relaypacs_core::{
    ChunkPlacement, ChunkRecord, ChunkStore, Error, ErrorKind, FileId, FileKey, SessionId,
    Sha256Digest,
};
use relaypacs_storage::MultipartChunkStore;
use relaypacs_test_peers::S3Server;

const MIB: u64 = 1 << 20;

fn s3(server: &S3Server) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_bucket_name(&server.bucket)
        .with_access_key_id(&server.access_key)
        .with_secret_access_key(&server.secret_key)
        .build()
        .unwrap()
}

async fn start() -> S3Server {
    tokio::task::spawn_blocking(S3Server::start).await.unwrap()
}

mod memory {
    use super::*;
    async fn make() -> (MultipartChunkStore<object_store::memory::InMemory>, ()) {
        let store = Arc::new(object_store::memory::InMemory::new());
        (MultipartChunkStore::new(store, "relay"), ())
    }
    relaypacs_core::chunk_store_conformance!(conformance, make);
}

mod s3s {
    use super::*;
    async fn make() -> (MultipartChunkStore<AmazonS3>, S3Server) {
        let server = start().await;
        let store = MultipartChunkStore::new(Arc::new(s3(&server)), "relay");
        (store, server)
    }
    relaypacs_core::chunk_store_conformance!(conformance, make);
}

/// An object store that counts the bytes of every GET (not HEAD) it
/// serves, forwarding everything to `inner`.
#[derive(Debug)]
struct Counting<S> {
    inner: S,
    get_bytes: AtomicU64,
    gets: AtomicU64,
    /// Multipart uploads created, minus those completed or aborted.
    open_uploads: AtomicI64,
    /// Hold each `create_multipart` this long: two instances creating one
    /// file then both find no marker, and both race to write theirs.
    slow_create: Duration,
}

impl<S> Counting<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            get_bytes: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            open_uploads: AtomicI64::new(0),
            slow_create: Duration::ZERO,
        }
    }

    /// (GET requests, bytes) so far.
    fn reads(&self) -> (u64, u64) {
        (
            self.gets.load(Ordering::SeqCst),
            self.get_bytes.load(Ordering::SeqCst),
        )
    }
}

impl<S: fmt::Display> fmt::Display for Counting<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "counting({})", self.inner)
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Counting<S> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        let got = self.inner.get_opts(location, options).await?;
        if !head {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.get_bytes
                .fetch_add(got.range.end - got.range.start, Ordering::SeqCst);
        }
        Ok(got)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let got = self.inner.get_ranges(location, ranges).await?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        let n: usize = got.iter().map(Bytes::len).sum();
        self.get_bytes.fetch_add(n as u64, Ordering::SeqCst);
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[async_trait]
impl<S: MultipartStore> MultipartStore for Counting<S> {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        tokio::time::sleep(self.slow_create).await;
        let id = self.inner.create_multipart(path).await?;
        self.open_uploads.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let done = self.inner.complete_multipart(path, id, parts).await?;
        self.open_uploads.fetch_sub(1, Ordering::SeqCst);
        Ok(done)
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.inner.abort_multipart(path, id).await?;
        self.open_uploads.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn key() -> FileKey {
    FileKey {
        session: SessionId::random(),
        file: FileId::random(),
    }
}

async fn put(
    store: &dyn ChunkStore,
    k: FileKey,
    data: &[u8],
    range: Range<u64>,
) -> relaypacs_core::Result<ChunkRecord> {
    let body = &data[range.start as usize..range.end as usize];
    let receipt = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: range.start,
                length: range.end - range.start,
            },
            pieces(body, 64 << 10),
        )
        .await?;
    Ok(ChunkRecord::new(
        range.start,
        range.end - range.start,
        Sha256Digest::of(body),
        receipt,
    ))
}

/// Every object in the bucket.
async fn objects(raw: &dyn ObjectStore) -> Vec<String> {
    let mut all: Vec<String> = raw
        .list(None)
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    all.sort();
    all
}

/// Multipart uploads s3s-fs holds open (one `.upload-<id>.json` each) and
/// part files it keeps for them.
fn open_uploads(server: &S3Server) -> (usize, usize) {
    let mut uploads = 0;
    let mut parts = 0;
    for e in std::fs::read_dir(server.root()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with(".upload-") && name.ends_with(".json") {
            uploads += 1;
        }
        if name.starts_with(".upload_id-") {
            parts += 1;
        }
    }
    (uploads, parts)
}

async fn read_all(store: &dyn ChunkStore, k: FileKey, size: u64) -> Vec<u8> {
    collect(store.read(k, 0..size).await.unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_parts_and_a_small_tail_complete_without_reading_a_byte() {
    let server = start().await;
    let counting = Arc::new(Counting::new(s3(&server)));
    let store = MultipartChunkStore::new(counting.clone(), "relay");
    let k = key();
    let size = 3 * 8 * MIB + 1234;
    let data = pattern(31, size as usize);
    store.create_file(k, size).await.unwrap();
    // On the 8 MiB grid, out of order: an 8 MiB chunk (one part), the
    // short tail (the last part) and a 16 MiB chunk (two parts).
    let mut recs = Vec::new();
    for r in [16 * MIB..24 * MIB, 24 * MIB..size, 0..16 * MIB] {
        recs.push(put(&store, k, &data, r).await.unwrap());
    }
    recs.sort_by_key(|r| r.offset);
    let before = counting.reads();
    store.seal_file(k, size, &recs).await.unwrap();
    let after = counting.reads();
    assert_eq!(
        after.1 - before.1,
        0,
        "completion read chunk bytes: {before:?} -> {after:?}"
    );
    assert!(
        read_all(&store, k, size).await == data,
        "sealed bytes differ"
    );
    // Nothing but the data object remains, and no upload stays open.
    let left = objects(&*counting).await;
    assert_eq!(
        left,
        vec![format!("relay/{}/{}/data", k.session, k.file)],
        "{left:?}"
    );
    assert_eq!(open_uploads(&server), (0, 0));
    // Sealing again is a no-op, and so is creating the file again.
    store.seal_file(k, size, &recs).await.unwrap();
    store.create_file(k, size).await.unwrap();
    assert_eq!(
        open_uploads(&server),
        (0, 0),
        "a sealed file got a new upload"
    );
    assert!(read_all(&store, k, size).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_off_grid_chunks_are_coalesced_into_parts_at_seal() {
    let server = start().await;
    let counting = Arc::new(Counting::new(s3(&server)));
    let store = MultipartChunkStore::new(counting.clone(), "relay");
    let k = key();
    let size = 20 * MIB;
    let data = pattern(32, size as usize);
    store.create_file(k, size).await.unwrap();
    // Cells: [0, 8) [8, 16) [16, 20) MiB. Only the last is covered whole
    // by one chunk; the first two are built from staged pieces.
    let ranges = [13 * MIB..20 * MIB, 0..3 * MIB, 3 * MIB..13 * MIB];
    let mut recs = Vec::new();
    for r in ranges {
        recs.push(put(&store, k, &data, r).await.unwrap());
    }
    recs.sort_by_key(|r| r.offset);
    let staged = objects(&*counting)
        .await
        .into_iter()
        .filter(|p| p.contains("/staged/"))
        .count();
    assert_eq!(staged, 4, "[0,3) [3,8) [8,13) [13,16) are staged");
    let before = counting.reads();
    store.seal_file(k, size, &recs).await.unwrap();
    let after = counting.reads();
    assert_eq!(
        after.1 - before.1,
        16 * MIB,
        "seal reads the staged cells only"
    );
    assert!(
        read_all(&store, k, size).await == data,
        "sealed bytes differ"
    );
    let left = objects(&*counting).await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(open_uploads(&server), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_body_leaves_nothing_and_the_chunk_can_be_put_again() {
    let server = start().await;
    let raw = Arc::new(s3(&server));
    let store = MultipartChunkStore::new(raw.clone(), "relay");
    let k = key();
    let size = 30 * MIB;
    let data = pattern(33, size as usize);
    store.create_file(k, size).await.unwrap();
    let marker = vec![format!("relay/{}/{}/upload", k.session, k.file)];
    // Off the grid, failing after 21 MiB: the staged head [3, 8) and the
    // parts of [8, 16) and [16, 24) may be uploaded; none may count.
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 3 * MIB,
                length: 27 * MIB,
            },
            failing(&data[3 * MIB as usize..24 * MIB as usize]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage, "{err:?}");
    assert_eq!(objects(&*raw).await, marker, "a failed chunk left objects");
    // Too long a body is refused too, and leaves nothing.
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: MIB,
            },
            pieces(&data[..MIB as usize + 1], 4096),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    assert_eq!(objects(&*raw).await, marker);
    // The same ranges, now whole: the stale parts are replaced.
    let recs = vec![
        put(&store, k, &data, 0..3 * MIB).await.unwrap(),
        put(&store, k, &data, 3 * MIB..size).await.unwrap(),
    ];
    store.seal_file(k, size, &recs).await.unwrap();
    assert!(
        read_all(&store, k, size).await == data,
        "sealed bytes differ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_aborts_the_upload_and_removes_every_object() {
    let server = start().await;
    let raw = Arc::new(s3(&server));
    let store = MultipartChunkStore::new(raw.clone(), "relay");
    let session = SessionId::random();
    let a = FileKey {
        session,
        file: FileId::random(),
    };
    let b = FileKey {
        session,
        file: FileId::random(),
    };
    let size = 20 * MIB;
    let data = pattern(34, size as usize);
    for k in [a, b] {
        store.create_file(k, size).await.unwrap();
        put(&store, k, &data, 0..8 * MIB).await.unwrap(); // a part
        put(&store, k, &data, 8 * MIB..9 * MIB).await.unwrap(); // staged
    }
    assert_eq!(open_uploads(&server), (2, 2));
    let marker_a = raw
        .get(&Path::from(format!(
            "relay/{}/{}/upload",
            a.session, a.file
        )))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let id_a: serde_json::Value = serde_json::from_slice(&marker_a).unwrap();
    let id_a = id_a["upload_id"].as_str().unwrap().to_owned();

    store.delete_file(a).await.unwrap();
    store.delete_file(a).await.unwrap(); // twice is fine
    assert_eq!(open_uploads(&server), (1, 1), "a's upload still open");
    let data_a = Path::from(format!("relay/{}/{}/data", a.session, a.file));
    assert!(
        raw.put_part(&data_a, &id_a, 2, PutPayload::from_static(b"late"))
            .await
            .is_err(),
        "the aborted upload still takes parts"
    );
    assert!(
        objects(&*raw)
            .await
            .iter()
            .all(|p| !p.contains(&a.file.to_string())),
        "objects of a remain"
    );
    assert!(matches!(
        store
            .put_chunk(
                a,
                ChunkPlacement {
                    offset: 0,
                    length: 4
                },
                pieces(b"abcd", 4)
            )
            .await,
        Err(Error::NotFound { .. })
    ));

    store.delete_session(session).await.unwrap();
    store.delete_session(session).await.unwrap();
    assert_eq!(open_uploads(&server), (0, 0), "b's upload still open");
    assert!(objects(&*raw).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_continues_the_upload() {
    let server = start().await;
    let k = key();
    let size = 24 * MIB + 10;
    let data = pattern(35, size as usize);
    let first = {
        let a = MultipartChunkStore::new(Arc::new(s3(&server)), "relay");
        a.create_file(k, size).await.unwrap();
        vec![
            put(&a, k, &data, 8 * MIB..16 * MIB).await.unwrap(),
            put(&a, k, &data, 0..5 * MIB).await.unwrap(),
        ]
        // `a` is dropped: a restart, or another gateway, takes over.
    };
    let b = MultipartChunkStore::new(Arc::new(s3(&server)), "relay");
    // Creating again is idempotent: the same upload continues.
    b.create_file(k, size).await.unwrap();
    assert_eq!(
        open_uploads(&server).0,
        1,
        "create_file started a second upload"
    );
    let mut recs = first;
    recs.push(put(&b, k, &data, 16 * MIB..size).await.unwrap());
    recs.push(put(&b, k, &data, 5 * MIB..8 * MIB).await.unwrap());
    recs.sort_by_key(|r| r.offset);
    b.seal_file(k, size, &recs).await.unwrap();
    assert!(read_all(&b, k, size).await == data, "sealed bytes differ");
    assert_eq!(open_uploads(&server), (0, 0));
    // A size other than the one created with is refused.
    let other = key();
    b.create_file(other, 100).await.unwrap();
    assert_eq!(
        b.create_file(other, 101).await.unwrap_err().kind(),
        ErrorKind::Conflict
    );
}

/// Two instances creating one file at the same instant: exactly one
/// create-only PUT of the marker wins, the loser aborts its own upload.
/// On `InMemory`, whose create-only PUT is atomic as S3's is (s3s-fs
/// checks `If-None-Match` and writes in two steps, so a race there can let
/// both PUTs pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_racing_to_create_a_file_share_one_upload() {
    let shared = Arc::new(Counting {
        slow_create: Duration::from_millis(5),
        ..Counting::new(object_store::memory::InMemory::new())
    });
    let data = pattern(36, 9 * MIB as usize);
    for round in 0..100 {
        let k = key();
        let a = MultipartChunkStore::new(shared.clone(), "relay");
        let b = MultipartChunkStore::new(shared.clone(), "relay");
        let (ra, rb) = tokio::join!(
            tokio::spawn({
                let a = a.clone();
                async move { a.create_file(k, 9 * MIB).await }
            }),
            tokio::spawn({
                let b = b.clone();
                async move { b.create_file(k, 9 * MIB).await }
            })
        );
        ra.unwrap().unwrap();
        rb.unwrap().unwrap();
        assert_eq!(
            shared.open_uploads.load(Ordering::SeqCst),
            1,
            "round {round}: not exactly one upload open"
        );
        let recs = vec![
            put(&a, k, &data, 0..8 * MIB).await.unwrap(),
            put(&b, k, &data, 8 * MIB..9 * MIB).await.unwrap(),
        ];
        b.seal_file(k, 9 * MIB, &recs).await.unwrap();
        assert!(read_all(&a, k, 9 * MIB).await == data, "round {round}");
        assert_eq!(shared.open_uploads.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_abandoned_removes_old_uploads_only() {
    let server = start().await;
    let raw = Arc::new(s3(&server));
    let store = MultipartChunkStore::new(raw.clone(), "relay");
    let data = pattern(37, 9 * MIB as usize);
    let abandoned = key();
    store.create_file(abandoned, 9 * MIB).await.unwrap();
    put(&store, abandoned, &data, 0..8 * MIB).await.unwrap();
    put(&store, abandoned, &data, 8 * MIB..8 * MIB + 10)
        .await
        .unwrap();
    let sealed = key();
    store.create_file(sealed, 9 * MIB).await.unwrap();
    let recs = vec![put(&store, sealed, &data, 0..9 * MIB).await.unwrap()];
    store.seal_file(sealed, 9 * MIB, &recs).await.unwrap();
    // Nothing is old enough yet.
    assert_eq!(
        store
            .abort_abandoned(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(open_uploads(&server), (1, 1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other_instance = MultipartChunkStore::new(Arc::new(s3(&server)), "relay");
    assert_eq!(
        other_instance
            .abort_abandoned(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(open_uploads(&server), (0, 0));
    // The sealed file is untouched; the abandoned one has no objects left.
    assert_eq!(
        objects(&*raw).await,
        vec![format!("relay/{}/{}/data", sealed.session, sealed.file)]
    );
    assert!(read_all(&store, sealed, 9 * MIB).await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsealed_files_are_not_readable_and_part_sizes_are_checked() {
    let server = start().await;
    let store = MultipartChunkStore::new(Arc::new(s3(&server)), "relay");
    let k = key();
    let data = pattern(38, 8 * MIB as usize);
    store.create_file(k, 8 * MIB).await.unwrap();
    let good = put(&store, k, &data, 0..8 * MIB).await.unwrap();
    assert!(matches!(
        store.read(k, 0..10).await,
        Err(Error::NotFound { .. })
    ));
    // A record whose receipt does not name its part cannot be sealed.
    let mut bad = good.clone();
    bad.receipt = r#"{"v":1,"ps":8388608,"parts":[]}"#.to_owned();
    let err = store.seal_file(k, 8 * MIB, &[bad]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Storage, "{err:?}");
    store.seal_file(k, 8 * MIB, &[good]).await.unwrap();
    assert!(read_all(&store, k, 8 * MIB).await == data);
    assert!(
        MultipartChunkStore::new(Arc::new(s3(&server)), "relay")
            .with_part_size(4 * MIB)
            .is_err()
    );
    assert!(
        MultipartChunkStore::new(Arc::new(s3(&server)), "relay")
            .with_part_size(16 * MIB)
            .is_ok()
    );
}
