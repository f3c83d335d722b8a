//! Completion of one large file (default 1 GiB, 8 MiB chunks) on a real
//! S3-compatible server (s3s-fs on loopback): `ObjectStoreChunkStore`
//! (each chunk its own object; sealing streams them into a new object)
//! against `MultipartChunkStore` (the file is one multipart upload;
//! sealing is one `CompleteMultipartUpload`). Prints, per store and
//! round, the time to put the chunks, the time to seal, and the bytes
//! read back from the store while sealing; every sealed file is read
//! back whole and checked against its SHA-256 (untimed).
//!
//! s3s-fs is a file system behind an S3 API: its own completion
//! concatenates the part files on its disk, which AWS S3 does not, so the
//! multipart figure here is an upper bound.
//!
//! Usage: `s3_seal_bench [size-MiB] [chunk-MiB] [rounds]`

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use relaypacs_benches::{Res, mbps, median};
use relaypacs_core::testing::pattern;
use relaypacs_core::{
    ChunkPlacement, ChunkRecord, ChunkStore, FileId, FileKey, SessionId, Sha256Digest, bytes_stream,
};
use relaypacs_storage::object_store::aws::{AmazonS3, AmazonS3Builder};
use relaypacs_storage::object_store::multipart::{MultipartStore, PartId};
use relaypacs_storage::object_store::path::Path;
use relaypacs_storage::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use relaypacs_storage::{MultipartChunkStore, ObjectStoreChunkStore};
use relaypacs_test_peers::S3Server;
use sha2::{Digest, Sha256};

/// S3 through a counter of the bytes GETs return.
#[derive(Debug)]
struct Counted {
    inner: AmazonS3,
    get_bytes: AtomicU64,
}

impl fmt::Display for Counted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
impl ObjectStore for Counted {
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
            self.get_bytes
                .fetch_add(got.range.end - got.range.start, Ordering::Relaxed);
        }
        Ok(got)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let got = self.inner.get_ranges(location, ranges).await?;
        let n: usize = got.iter().map(Bytes::len).sum();
        self.get_bytes.fetch_add(n as u64, Ordering::Relaxed);
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
impl MultipartStore for Counted {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.inner.create_multipart(path).await
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
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

/// One round's figures.
struct Round {
    put_secs: f64,
    seal_secs: f64,
    seal_read_bytes: u64,
}

/// Put `size` bytes in chunks of `chunk`, seal, check, delete.
async fn round(store: &dyn ChunkStore, counted: &Counted, size: u64, chunk: u64) -> Res<Round> {
    let key = FileKey {
        session: SessionId::random(),
        file: FileId::random(),
    };
    store.create_file(key, size).await?;
    let mut whole = Sha256::new();
    let mut records = Vec::new();
    let t = Instant::now();
    let mut offset = 0;
    while offset < size {
        let length = chunk.min(size - offset);
        // A different pattern per chunk, made on the fly: no 1 GiB buffer.
        let data = Bytes::from(pattern(offset / chunk, length as usize));
        whole.update(&data);
        let sha256 = Sha256Digest::of(&data);
        let receipt = store
            .put_chunk(key, ChunkPlacement { offset, length }, bytes_stream(data))
            .await?;
        records.push(ChunkRecord::new(offset, length, sha256, receipt));
        offset += length;
    }
    let put_secs = t.elapsed().as_secs_f64();
    let read_before = counted.get_bytes.load(Ordering::Relaxed);
    let t = Instant::now();
    store.seal_file(key, size, &records).await?;
    let seal_secs = t.elapsed().as_secs_f64();
    let seal_read_bytes = counted.get_bytes.load(Ordering::Relaxed) - read_before;
    // Untimed: the sealed object is exactly the bytes put.
    let mut back = Sha256::new();
    let mut stream = store.read(key, 0..size).await?;
    while let Some(b) = stream.next().await {
        back.update(&b?);
    }
    if back.finalize() != whole.finalize() {
        return Err(format!("{store}: the sealed file differs from the bytes put").into());
    }
    store.delete_file(key).await?;
    Ok(Round {
        put_secs,
        seal_secs,
        seal_read_bytes,
    })
}

fn counted_s3(server: &S3Server) -> Res<Arc<Counted>> {
    let inner = AmazonS3Builder::new()
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_region("us-east-1")
        .with_bucket_name(&server.bucket)
        .with_access_key_id(&server.access_key)
        .with_secret_access_key(&server.secret_key)
        .build()?;
    Ok(Arc::new(Counted {
        inner,
        get_bytes: AtomicU64::new(0),
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let size_mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let chunk_mib: u64 = args.next().map_or(Ok(8), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let (size, chunk) = (size_mib << 20, chunk_mib << 20);
    let server = tokio::task::spawn_blocking(S3Server::start).await?;
    let counted = counted_s3(&server)?;
    let copy = ObjectStoreChunkStore::new(counted.clone(), "copy");
    let multipart = MultipartChunkStore::new(counted.clone(), "multipart");
    println!(
        "s3_seal_bench: {size_mib} MiB file, {chunk_mib} MiB chunks, s3s-fs on loopback, \
         {rounds} rounds alternating"
    );
    let mut figures: [(&str, Vec<Round>); 2] = [
        ("ObjectStoreChunkStore", Vec::new()),
        ("MultipartChunkStore", Vec::new()),
    ];
    for r in 0..rounds {
        for (i, (name, out)) in figures.iter_mut().enumerate() {
            let store: &dyn ChunkStore = if i == 0 { &copy } else { &multipart };
            let f = round(store, &counted, size, chunk).await?;
            println!(
                "round {r} {name:<22} put {:7.2} s ({:6.1} MB/s)  seal {:8.3} s  \
                 read while sealing {:>6} MiB",
                f.put_secs,
                mbps(size, f.put_secs),
                f.seal_secs,
                f.seal_read_bytes >> 20
            );
            out.push(f);
        }
    }
    for (name, out) in &figures {
        let seal: Vec<f64> = out.iter().map(|f| f.seal_secs).collect();
        let put: Vec<f64> = out.iter().map(|f| f.put_secs).collect();
        println!(
            "median {name:<22} put {:7.2} s  seal {:8.3} s",
            median(&put),
            median(&seal)
        );
    }
    Ok(())
}
