//! Property test: the pipeline against a simple model, with random chunk
//! orders, duplicates, corruptions, truncations and two interleaved sessions.
//! Every completed file is byte-identical to its source, every corrupted or
//! truncated chunk is rejected, and nothing rejected changes stored state.
//! On both state engines: SQLite and PostgreSQL (each case on a fresh
//! database of one cluster), 24 cases each.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::collections::BTreeSet;

use proptest::prelude::*;
use relaypacs_core::SessionStore as _;
use relaypacs_core::testing::{collect, pieces};
use relaypacs_core::{
    Actor, Error, FileId, Limits, NewFile, PipelineConfig, PutChunk, PutOutcome, SessionId,
    Sha256Digest,
};
use relaypacs_integration::{Embedded, PgCluster, StateDb, dicom_sized, new_study};

const CHUNK: usize = 4096;
/// Cases per engine.
const CASES: u32 = 24;

#[derive(Clone, Debug)]
enum Damage {
    None,
    Flip(usize),
    Truncate(usize),
    Extend,
    WrongDigest,
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        file: usize,
        chunk: usize,
        damage: Damage,
    },
    Complete {
        file: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let damage = prop_oneof![
        4 => Just(Damage::None),
        1 => (0..CHUNK).prop_map(Damage::Flip),
        1 => (0..CHUNK).prop_map(Damage::Truncate),
        1 => Just(Damage::Extend),
        1 => Just(Damage::WrongDigest),
    ];
    prop_oneof![
        8 => (0..4usize, 0..16usize, damage).prop_map(|(file, chunk, damage)| Op::Put { file, chunk, damage }),
        1 => (0..4usize).prop_map(|file| Op::Complete { file }),
    ]
}

struct FileModel {
    session: SessionId,
    id: FileId,
    data: Vec<u8>,
    stored: BTreeSet<usize>,
    complete: bool,
}

impl FileModel {
    fn chunks(&self) -> usize {
        self.data.len().div_ceil(CHUNK)
    }
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        i * CHUNK..((i + 1) * CHUNK).min(self.data.len())
    }
}

async fn stored_state(e: &Embedded, files: &[FileModel]) -> Vec<Vec<relaypacs_core::ChunkRecord>> {
    let mut out = Vec::new();
    for f in files {
        out.push(e.sessions.chunks(f.session, f.id).await.unwrap());
    }
    out
}

async fn run(ops: Vec<Op>, db: &StateDb) {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        min_chunk_size: CHUNK as u64,
        ..Limits::default()
    };
    let e = Embedded::open_on(
        dir.path(),
        PipelineConfig {
            limits,
            ..Default::default()
        },
        db,
    )
    .await
    .unwrap();
    let p = &e.pipeline;
    let users = [Actor::user("alice"), Actor::user("bob")];
    let mut files = Vec::new();
    // Two sessions (two users, two studies), two files each, interleaved.
    for (u, actor) in users.iter().enumerate() {
        let study = new_study();
        let s = p
            .create_session(actor, Default::default())
            .await
            .unwrap()
            .id;
        for k in 0..2 {
            let data = dicom_sized(&study, (u * 2 + k) as u64, 96);
            let nf = NewFile {
                name: format!("{u}-{k}"),
                size: data.len() as u64,
                sha256: Some(Sha256Digest::of(&data)),
            };
            let id = p.add_file(actor, s, nf).await.unwrap().id;
            files.push(FileModel {
                session: s,
                id,
                data,
                stored: BTreeSet::new(),
                complete: false,
            });
        }
    }
    let owner = |i: usize| users[i / 2].clone();
    for op in ops {
        match op {
            Op::Put {
                file,
                chunk,
                damage,
            } => {
                let f = &files[file];
                let i = chunk % f.chunks();
                let r = f.range(i);
                let good = &f.data[r.clone()];
                let mut body = good.to_vec();
                let mut digest = Sha256Digest::of(good);
                match damage {
                    Damage::None => {}
                    Damage::Flip(at) => body[at % good.len()] ^= 0x5a,
                    Damage::Truncate(n) => body.truncate(n % good.len()),
                    Damage::Extend => body.push(0),
                    Damage::WrongDigest => digest = Sha256Digest::of(b"wrong"),
                }
                let spec = PutChunk {
                    offset: r.start as u64,
                    length: good.len() as u64,
                    sha256: Some(digest),
                };
                let before = stored_state(&e, &files).await;
                let res = p
                    .put_chunk(&owner(file), f.session, f.id, spec, pieces(&body, 1000))
                    .await;
                let f = &mut files[file];
                match (&damage, res) {
                    (_, Err(err)) if f.complete => assert_eq!(err.code(), "RELAY_FILE_COMPLETE"),
                    (Damage::None, Ok(PutOutcome::Stored { .. })) => {
                        assert!(f.stored.insert(i), "stored twice")
                    }
                    (Damage::None, Ok(PutOutcome::AlreadyStored { .. })) => {
                        assert!(f.stored.contains(&i))
                    }
                    (Damage::WrongDigest, Err(err)) if f.stored.contains(&i) => {
                        assert_eq!(err.code(), "RELAY_CHUNK_CONFLICT")
                    }
                    (Damage::WrongDigest, Err(err)) => {
                        assert_eq!(err.code(), "RELAY_CHUNK_HASH_MISMATCH")
                    }
                    (
                        Damage::Flip(_) | Damage::Truncate(_) | Damage::Extend,
                        Ok(PutOutcome::AlreadyStored { .. }),
                    ) => {
                        // Retry of a stored chunk with its true digest: not read, nothing changes.
                        assert!(f.stored.contains(&i));
                    }
                    (
                        Damage::Flip(_) | Damage::Truncate(_) | Damage::Extend,
                        Err(Error::Integrity(_)),
                    ) => {
                        assert!(!f.stored.contains(&i));
                    }
                    (d, r) => panic!("unexpected result for {d:?}: {r:?}"),
                }
                if !matches!(damage, Damage::None) {
                    assert_eq!(
                        stored_state(&e, &files).await,
                        before,
                        "a rejected chunk changed stored state"
                    );
                }
            }
            Op::Complete { file } => {
                let f = &files[file];
                let res = p.complete_file(&owner(file), f.session, f.id).await;
                let all = f.stored.len() == f.chunks();
                match res {
                    Ok(_) => assert!(all, "completed with missing chunks"),
                    Err(err) => {
                        assert!(!all, "complete failed with every chunk stored: {err:?}");
                        assert_eq!(err.code(), "RELAY_FILE_INCOMPLETE");
                    }
                }
                files[file].complete = all;
            }
        }
    }
    // Finish every file and compare bytes.
    for (k, f) in files.iter().enumerate() {
        let actor = owner(k);
        for i in 0..f.chunks() {
            let r = f.range(i);
            let spec = PutChunk {
                offset: r.start as u64,
                length: r.len() as u64,
                sha256: Some(Sha256Digest::of(&f.data[r.clone()])),
            };
            if !f.complete {
                p.put_chunk(&actor, f.session, f.id, spec, pieces(&f.data[r], 777))
                    .await
                    .unwrap();
            }
        }
        p.complete_file(&actor, f.session, f.id).await.unwrap();
        let got = collect(p.read_file(&actor, f.session, f.id).await.unwrap())
            .await
            .unwrap();
        assert!(got == f.data, "completed file {k} differs from its source");
    }
    e.close().await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op(), 1..60)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, max_shrink_iters: 64, ..ProptestConfig::default() })]
    #[test]
    fn pipeline_matches_model_on_sqlite(ops in ops()) {
        runtime().block_on(run(ops, &StateDb::Sqlite));
    }
}

/// The same property with the state in PostgreSQL: one cluster for the
/// test, a fresh database per case (and per shrinking step).
#[test]
fn pipeline_matches_model_on_postgres() {
    let cluster = PgCluster::start();
    let rt = runtime();
    let started = std::time::Instant::now();
    let config = ProptestConfig {
        cases: CASES,
        max_shrink_iters: 64,
        // A failure prints its shrunk ops (above): enough to replay it.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let result = runner.run(&ops(), |ops| {
        rt.block_on(run(ops, &cluster.fresh_db()));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
    eprintln!(
        "postgres: {CASES} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
