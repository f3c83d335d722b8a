//! Conformance suite for [`ChunkStore`] implementations.
//!
//! Run it with [`chunk_store_conformance!`](crate::chunk_store_conformance).

use crate::chunk_store::{ChunkPlacement, ChunkStore, FileKey};
use crate::digest::Sha256Digest;
use crate::error::{Error, ErrorKind};
use crate::ids::{FileId, SessionId};
use crate::model::ChunkRecord;
use crate::testing::{collect, failing, pattern, pieces};

fn key() -> FileKey {
    FileKey {
        session: SessionId::random(),
        file: FileId::random(),
    }
}

async fn put(
    store: &dyn ChunkStore,
    key: FileKey,
    data: &[u8],
    offset: u64,
    len: u64,
) -> ChunkRecord {
    let body = &data[offset as usize..(offset + len) as usize];
    let receipt = store
        .put_chunk(
            key,
            ChunkPlacement {
                offset,
                length: len,
            },
            pieces(body, 64 << 10),
        )
        .await
        .expect("put_chunk of a good body must succeed");
    ChunkRecord {
        offset,
        length: len,
        sha256: Sha256Digest::of(body),
        receipt,
    }
}

/// Chunks put out of order, sealed, read back whole and in sub-ranges.
pub async fn out_of_order_roundtrip(store: &dyn ChunkStore) {
    let k = key();
    let cs = 1u64 << 20;
    let size = 3 * cs + 12_345;
    let data = pattern(1, size as usize);
    store.create_file(k, size).await.expect("create_file");
    store
        .create_file(k, size)
        .await
        .expect("create_file is idempotent");
    let mut recs = Vec::new();
    for i in [3u64, 0, 2, 1] {
        let len = (size - i * cs).min(cs);
        recs.push(put(store, k, &data, i * cs, len).await);
    }
    recs.sort_by_key(|r| r.offset);
    store.seal_file(k, size, &recs).await.expect("seal_file");
    store
        .seal_file(k, size, &recs)
        .await
        .expect("seal_file twice is a no-op");
    assert_eq!(
        collect(store.read(k, 0..size).await.expect("read"))
            .await
            .expect("read stream"),
        data
    );
    let sub = collect(store.read(k, cs - 10..cs + 10).await.expect("read range"))
        .await
        .expect("range stream");
    assert_eq!(sub, &data[(cs - 10) as usize..(cs + 10) as usize]);
}

/// A body that fails midway is an error, and the same range can then be
/// stored correctly.
pub async fn failed_body_is_not_stored(store: &dyn ChunkStore) {
    let k = key();
    let data = pattern(2, 300_000);
    store
        .create_file(k, data.len() as u64)
        .await
        .expect("create_file");
    let err = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: data.len() as u64,
            },
            failing(&data[..1000]),
        )
        .await
        .expect_err("a failing body must fail the put");
    assert!(
        matches!(err.kind(), ErrorKind::Storage),
        "error passed through: {err:?}"
    );
    let rec = put(store, k, &data, 0, data.len() as u64).await;
    store
        .seal_file(k, data.len() as u64, &[rec])
        .await
        .expect("seal");
    assert_eq!(
        collect(store.read(k, 0..data.len() as u64).await.expect("read"))
            .await
            .expect("stream"),
        data
    );
}

/// Sizes of whole files the suite stores: a typical instance (stores may
/// take a short path for a body that fits one buffer) and one of several
/// MiB, not a multiple of any buffer size.
const WHOLE_FILE_SIZES: [usize; 2] = [700_000, (3 << 20) + 12_345];

/// `data` stored whole by `put_file` as file `k`, sealed as its one
/// chunk, and read back whole.
async fn put_whole(store: &dyn ChunkStore, k: FileKey, data: &[u8]) {
    let size = data.len() as u64;
    let receipt = store
        .put_file(k, size, pieces(data, 64 << 10))
        .await
        .expect("put_file of a good body");
    let rec = ChunkRecord {
        offset: 0,
        length: size,
        sha256: Sha256Digest::of(data),
        receipt,
    };
    store.seal_file(k, size, &[rec]).await.expect("seal");
    assert_eq!(
        collect(store.read(k, 0..size).await.expect("read"))
            .await
            .expect("stream"),
        data
    );
}

/// A file stored whole by `put_file` reads back and seals as one chunk;
/// a failing body is an error, and once the left-over is deleted the same
/// file can be stored again.
pub async fn whole_file_put(store: &dyn ChunkStore) {
    for len in WHOLE_FILE_SIZES {
        let data = pattern(7, len);
        put_whole(store, key(), &data).await;
        let k = key();
        let err = store
            .put_file(k, len as u64, failing(&data[..1000]))
            .await
            .expect_err("a failing body must fail the put");
        assert!(
            matches!(err.kind(), ErrorKind::Storage),
            "error passed through: {err:?}"
        );
        store.delete_file(k).await.expect("delete the left-over");
        put_whole(store, k, &data).await;
    }
}

/// `put_file_syncing`: the written file seals as one chunk and reads back
/// before its sync is awaited, and after it; two files of one new
/// session written side by side both become durable; a failing body or one
/// of another length is an error, and once the left-over is deleted the
/// file can be stored.
pub async fn whole_file_syncing(store: &dyn ChunkStore) {
    for len in WHOLE_FILE_SIZES {
        let data = pattern(10, len + 1);
        let size = len as u64;
        let session = SessionId::random();
        let keys = [FileId::random(), FileId::random()].map(|file| FileKey { session, file });
        let (a, b) = futures::join!(
            store.put_file_syncing(keys[0], size, pieces(&data[..len], 64 << 10)),
            store.put_file_syncing(keys[1], size, pieces(&data[1..], 64 << 10)),
        );
        let written = [
            a.expect("first file written"),
            b.expect("second file written"),
        ];
        for ((k, (receipt, syncing)), want) in keys
            .into_iter()
            .zip(written)
            .zip([&data[..len], &data[1..]])
        {
            let rec = ChunkRecord {
                offset: 0,
                length: size,
                sha256: Sha256Digest::of(want),
                receipt,
            };
            store
                .seal_file(k, size, &[rec])
                .await
                .expect("seal before the sync");
            let early = collect(store.read(k, 0..size).await.expect("read before the sync"))
                .await
                .expect("stream");
            assert_eq!(early, want, "{len} bytes read back before the sync");
            syncing.await.expect("sync");
            assert_eq!(
                collect(store.read(k, 0..size).await.expect("read"))
                    .await
                    .expect("stream"),
                want
            );
        }
        let k = key();
        let failed = store
            .put_file_syncing(k, size, failing(&data[..1000]))
            .await;
        assert!(failed.is_err(), "a failing body of {len} bytes was written");
        let short = store
            .put_file_syncing(k, size, pieces(&data[..len - 1], 64 << 10))
            .await;
        assert!(short.is_err(), "short body of {len} bytes accepted");
        store.delete_file(k).await.expect("delete the left-over");
        let long = store
            .put_file_syncing(k, size, pieces(&data, 64 << 10))
            .await;
        assert!(long.is_err(), "long body for {len} bytes accepted");
        store.delete_file(k).await.expect("delete the left-over");
        let (_, syncing) = store
            .put_file_syncing(k, size, pieces(&data[..len], 64 << 10))
            .await
            .expect("stored once the left-over is gone");
        syncing.await.expect("sync");
    }
}

/// A whole file whose body is shorter or longer than its size is
/// refused, and once the left-over is deleted the file can be stored.
pub async fn whole_file_wrong_length_is_refused(store: &dyn ChunkStore) {
    for len in WHOLE_FILE_SIZES {
        let data = pattern(8, len + 1);
        let size = len as u64;
        let k = key();
        let short = store
            .put_file(k, size, pieces(&data[..len - 1], 64 << 10))
            .await;
        assert!(short.is_err(), "short body of {len} bytes accepted");
        store.delete_file(k).await.expect("delete the left-over");
        let long = store.put_file(k, size, pieces(&data, 64 << 10)).await;
        assert!(long.is_err(), "long body for {len} bytes accepted");
        store.delete_file(k).await.expect("delete the left-over");
        put_whole(store, k, &data[..len]).await;
    }
}

/// A range reaching past the end of a stored file is refused (at once or
/// by its stream), short or long.
pub async fn read_outside_is_refused(store: &dyn ChunkStore) {
    for len in WHOLE_FILE_SIZES {
        let k = key();
        put_whole(store, k, &pattern(9, len)).await;
        let size = len as u64;
        for range in [size - 10..size + 1, 0..size + 1] {
            // Refused at once or by the stream, never read as data.
            if let Ok(s) = store.read(k, range.clone()).await {
                assert!(
                    collect(s).await.is_err(),
                    "range {range:?} of a {size}-byte file was read"
                );
            }
        }
    }
}

/// A body shorter or longer than its placement is refused.
pub async fn wrong_length_is_refused(store: &dyn ChunkStore) {
    let k = key();
    let data = pattern(3, 100_000);
    store
        .create_file(k, data.len() as u64)
        .await
        .expect("create_file");
    let short = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: 100_000,
            },
            pieces(&data[..99_999], 4096),
        )
        .await;
    assert!(short.is_err(), "short body accepted");
    let long = store
        .put_chunk(
            k,
            ChunkPlacement {
                offset: 0,
                length: 99_999,
            },
            pieces(&data, 4096),
        )
        .await;
    assert!(long.is_err(), "long body accepted");
}

/// Several chunks of one file written at the same time.
pub async fn parallel_chunks(store: &dyn ChunkStore) {
    let k = key();
    let cs = 256u64 << 10;
    let n = 8u64;
    let data = pattern(4, (cs * n) as usize);
    store.create_file(k, cs * n).await.expect("create_file");
    let futs = (0..n).map(|i| put(store, k, &data, i * cs, cs));
    let recs = futures::future::join_all(futs).await;
    store.seal_file(k, cs * n, &recs).await.expect("seal");
    assert_eq!(
        collect(store.read(k, 0..cs * n).await.expect("read"))
            .await
            .expect("stream"),
        data
    );
}

/// Deleting files and sessions; reading a missing file is `NotFound`.
pub async fn delete_semantics(store: &dyn ChunkStore) {
    let session = SessionId::random();
    let a = FileKey {
        session,
        file: FileId::random(),
    };
    let b = FileKey {
        session,
        file: FileId::random(),
    };
    let data = pattern(5, 70_000);
    for k in [a, b] {
        store
            .create_file(k, data.len() as u64)
            .await
            .expect("create");
        let r = put(store, k, &data, 0, data.len() as u64).await;
        store
            .seal_file(k, data.len() as u64, &[r])
            .await
            .expect("seal");
    }
    store.delete_file(a).await.expect("delete_file");
    store.delete_file(a).await.expect("deleting twice is fine");
    match store.read(a, 0..10).await {
        Err(Error::NotFound { .. }) => {}
        Ok(s) => assert!(collect(s).await.is_err(), "deleted file still readable"),
        Err(e) => panic!("expected NotFound, got {e:?}"),
    }
    assert_eq!(
        collect(store.read(b, 0..10).await.expect("b intact"))
            .await
            .expect("stream"),
        &data[..10]
    );
    store.delete_session(session).await.expect("delete_session");
    store
        .delete_session(session)
        .await
        .expect("deleting a session twice is fine");
    assert!(
        matches!(store.read(b, 0..10).await, Err(Error::NotFound { .. })),
        "session delete left file b"
    );
    let missing = key();
    assert!(matches!(
        store.read(missing, 0..1).await,
        Err(Error::NotFound { .. })
    ));
}

/// Sealing needs every chunk: a store must not invent missing bytes.
pub async fn seal_requires_recorded_chunks(store: &dyn ChunkStore) {
    let k = key();
    let data = pattern(6, 200_000);
    store.create_file(k, 200_000).await.expect("create");
    let r = put(store, k, &data, 0, 100_000).await;
    let res = store.seal_file(k, 200_000, &[r]).await;
    assert!(res.is_err(), "sealing with a missing chunk must fail");
}

/// A store that names a sealed file's local path
/// ([`ChunkStore::local_file`]) holds exactly the file's bytes there, for
/// a file put in chunks and one put whole, and keeps them there as it
/// reads them; deleting the file removes only its own name (a hard link
/// made to it keeps the bytes). A store that names none passes as is.
pub async fn local_file_is_the_sealed_bytes(store: &dyn ChunkStore) {
    let (chunked, whole) = (key(), key());
    let data = pattern(7, 300_000);
    let size = data.len() as u64;
    store.create_file(chunked, size).await.expect("create");
    let recs = vec![
        put(store, chunked, &data, 0, 200_000).await,
        put(store, chunked, &data, 200_000, 100_000).await,
    ];
    store.seal_file(chunked, size, &recs).await.expect("seal");
    let receipt = store
        .put_file(whole, size, pieces(&data, 64 << 10))
        .await
        .expect("put_file");
    let rec = ChunkRecord {
        offset: 0,
        length: size,
        sha256: Sha256Digest::of(&data),
        receipt,
    };
    store
        .seal_file(whole, size, &[rec])
        .await
        .expect("seal whole");
    for k in [chunked, whole] {
        let Some(path) = store.local_file(k) else {
            continue;
        };
        assert_eq!(std::fs::read(&path).expect("read local file"), data);
        assert_eq!(
            collect(store.read(k, 0..size).await.expect("read"))
                .await
                .expect("stream"),
            data
        );
        let link = path.with_extension("conformance-link");
        std::fs::hard_link(&path, &link).expect("the local file can be linked");
        store.delete_file(k).await.expect("delete_file");
        assert!(!path.exists(), "deleted file still at its path");
        assert_eq!(std::fs::read(&link).expect("linked bytes kept"), data);
        std::fs::remove_file(&link).expect("remove the link");
    }
}

/// Generates a module `$name` with one `#[test]` per [`ChunkStore`]
/// conformance case. `$factory` is an `async fn() -> (impl ChunkStore,
/// impl Sized)`; the calling crate needs no tokio of its own.
///
/// ```text
/// relaypacs_core::chunk_store_conformance!(local_chunks, make_local_chunks);
/// ```
#[macro_export]
macro_rules! chunk_store_conformance {
    ($name:ident, $factory:path $(,)?) => {
        $crate::chunk_store_conformance!(@cases $name, $factory;
            out_of_order_roundtrip, failed_body_is_not_stored, wrong_length_is_refused,
            parallel_chunks, delete_semantics, seal_requires_recorded_chunks, whole_file_put,
            whole_file_wrong_length_is_refused, read_outside_is_refused, whole_file_syncing,
            local_file_is_the_sealed_bytes);
    };
    (@cases $name:ident, $factory:path; $($case:ident),*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    $crate::testing::__rt::run(async {
                        let (store, _guard) = $factory().await;
                        $crate::testing::chunk_store::$case(&store).await;
                    })
                }
            )*
        }
    };
}
