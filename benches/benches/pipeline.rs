//! Criterion benches: put one chunk (1, 8, 64 MiB) and complete a file of
//! that size (read-back verification + DICOM validation) on the embedded
//! local adapters.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use relaypacs_core::testing::pieces;
use relaypacs_core::{Actor, NewFile, PipelineConfig, PutChunk, Sha256Digest};
use relaypacs_integration::{Embedded, dicom_of_size, new_study, open_session};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let e = rt
        .block_on(Embedded::open(dir.path(), PipelineConfig::default()))
        .expect("open");
    let p = e.pipeline.clone();
    let actor = Actor::user("bench");
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for mib in [1usize, 8, 64] {
        let size = mib << 20;
        let data = dicom_of_size(&new_study(), size);
        let data = &data[..size.min(data.len())];
        let digest = Sha256Digest::of(data);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("put_chunk", format!("{mib}MiB")),
            &size,
            |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let s = open_session(&p, &actor).await.expect("session");
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let nf = NewFile {
                                name: "b".into(),
                                size: size as u64,
                                sha256: None,
                            };
                            let f = p.add_file(&actor, s, nf).await.expect("file");
                            let spec = PutChunk {
                                offset: 0,
                                length: size as u64,
                                sha256: Some(digest),
                            };
                            let t = Instant::now();
                            p.put_chunk(&actor, s, f.id, spec, pieces(data, 64 << 10))
                                .await
                                .expect("put");
                            total += t.elapsed();
                        }
                        p.abort_session(&actor, s).await.expect("abort");
                        total
                    })
                })
            },
        );
    }
    for mib in [1usize, 8, 64] {
        let size_hint = mib << 20;
        let data = dicom_of_size(&new_study(), size_hint);
        let size = data.len();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("complete_file", format!("{mib}MiB")),
            &size,
            |b, _| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let s = open_session(&p, &actor).await.expect("session");
                            let nf = NewFile {
                                name: "b".into(),
                                size: size as u64,
                                sha256: Some(Sha256Digest::of(&data)),
                            };
                            let f = p.add_file(&actor, s, nf).await.expect("file");
                            for (i, c) in data.chunks(8 << 20).enumerate() {
                                let spec = PutChunk {
                                    offset: (i * (8 << 20)) as u64,
                                    length: c.len() as u64,
                                    sha256: None,
                                };
                                p.put_chunk(&actor, s, f.id, spec, pieces(c, 64 << 10))
                                    .await
                                    .expect("put");
                            }
                            let t = Instant::now();
                            p.complete_file(&actor, s, f.id).await.expect("complete");
                            total += t.elapsed();
                            p.abort_session(&actor, s).await.expect("abort");
                        }
                        total
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
