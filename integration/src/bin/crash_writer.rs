//! Crash-test worker: uploads one file through the pipeline on the embedded
//! adapters, printing `ACK <offset>` after each acknowledged chunk. The
//! crash test SIGKILLs it at random points and starts it again; on start it
//! resumes the same upload (ids kept in `<data>/writer-state.json`).
//!
//! Usage: `crash_writer <data-dir> <source-file> <chunk-size> <seed> [complete]`
//!
//! Or `crash_writer <data-dir> ingest`: STOW-RS's path, one new session
//! with one new instance of 100 KiB at a time
//! (`Pipeline::ingest_first_file`, queued, the audit trail in the state
//! database as the server keeps it), printing `INGESTED <session> <file>
//! <sha256>` after each acknowledged one, until killed.
//!
//! State is in SQLite at `<data-dir>/state.db`, or in the PostgreSQL
//! database named by the environment variable `CRASH_WRITER_STATE_URL`
//! (`postgres://…`) when it is set.

use std::io::Write;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use relaypacs_core::{Actor, FileId, NewFile, PipelineConfig, SessionId, Sha256Digest};
use relaypacs_integration::{Embedded, StateDb, open_session, put};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct WriterState {
    session: SessionId,
    file: FileId,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("crash_writer: {msg}");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[2] == "ingest" {
        ingest_until_killed(PathBuf::from(&args[1])).await;
    }
    if args.len() < 5 {
        fail("usage: crash_writer <data-dir> <source-file> <chunk-size> <seed> [complete]");
    }
    let data = PathBuf::from(&args[1]);
    let source = std::fs::read(&args[2]).unwrap_or_else(|e| fail(e));
    let chunk: usize = args[3].parse().unwrap_or_else(|e| fail(e));
    let seed: u64 = args[4].parse().unwrap_or_else(|e| fail(e));
    let complete = args.get(5).is_some_and(|a| a == "complete");
    let db = state_db();
    let e = Embedded::open_on(&data, PipelineConfig::default(), &db)
        .await
        .unwrap_or_else(|e| fail(e));
    let p = &e.pipeline;
    let actor = Actor::user("crash");
    let state_path = data.join("writer-state.json");
    let st: WriterState = match std::fs::read(&state_path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| fail(e)),
        Err(_) => {
            let session = open_session(p, &actor).await.unwrap_or_else(|e| fail(e));
            let nf = NewFile {
                name: "crash.dcm".into(),
                size: source.len() as u64,
                sha256: Some(Sha256Digest::of(&source)),
            };
            let file = p
                .add_file(&actor, session, nf)
                .await
                .unwrap_or_else(|e| fail(e))
                .id;
            let st = WriterState { session, file };
            let bytes = serde_json::to_vec(&st).unwrap_or_else(|e| fail(e));
            relaypacs_storage::fs::write_atomic(&state_path, &bytes).unwrap_or_else(|e| fail(e));
            st
        }
    };
    let done = p
        .file_chunks(&actor, st.session, st.file)
        .await
        .unwrap_or_else(|e| fail(e));
    let mut offsets: Vec<usize> = (0..source.len())
        .step_by(chunk)
        .filter(|o| !done.iter().any(|c| c.offset == *o as u64))
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    offsets.shuffle(&mut rng);
    let mut out = std::io::stdout().lock();
    // A few chunks at a time in parallel, like a real client.
    for group in offsets.chunks(rng.random_range(1..4)) {
        let futs = group.iter().map(|&o| {
            let end = (o + chunk).min(source.len());
            put(p, &actor, st.session, st.file, o as u64, &source[o..end])
        });
        for (r, o) in futures::future::join_all(futs).await.into_iter().zip(group) {
            r.unwrap_or_else(|e| fail(e));
            let _ = writeln!(out, "ACK {o}");
            let _ = out.flush();
        }
    }
    if complete {
        let f = p
            .complete_file(&actor, st.session, st.file)
            .await
            .unwrap_or_else(|e| fail(e));
        let _ = writeln!(
            out,
            "COMPLETE {}",
            f.sha256.map(|d| d.to_hex()).unwrap_or_default()
        );
    }
    let _ = writeln!(out, "DONE");
}

/// The state database the writer uses (see the module's usage).
fn state_db() -> StateDb {
    match std::env::var("CRASH_WRITER_STATE_URL") {
        Ok(url) => StateDb::Postgres(url),
        Err(_) => StateDb::Sqlite,
    }
}

/// The `ingest` mode: one-instance sessions, each acknowledged on stdout,
/// until the process is killed.
async fn ingest_until_killed(data: PathBuf) -> ! {
    let e = Embedded::open_on(&data, PipelineConfig::default(), &state_db())
        .await
        .unwrap_or_else(|e| fail(e));
    // The server's arrangement: the audit trail is the state database's
    // chain, appended in each step's transaction.
    let audit = relaypacs_storage::SqlAuditSink::new(e.state.clone());
    let sessions = relaypacs_storage::SqlSessionStore::new(e.state.clone()).with_audit(&audit);
    let p = relaypacs_core::Pipeline::new(
        std::sync::Arc::new(e.chunks.clone()),
        std::sync::Arc::new(sessions),
        std::sync::Arc::new(e.archive.clone()),
        std::sync::Arc::new(audit),
        PipelineConfig::default(),
    );
    let actor = Actor::user("crash");
    let mut out = std::io::stdout().lock();
    loop {
        let data =
            relaypacs_integration::dicom_of_size(&relaypacs_integration::new_study(), 100 << 10);
        let digest = Sha256Digest::of(&data);
        let (session, r) = p
            .ingest_first_file(
                &actor,
                relaypacs_core::NewSession {
                    allow_multiple_studies: false,
                    request_scoped: true,
                },
                NewFile {
                    name: "part.dcm".into(),
                    size: data.len() as u64,
                    sha256: None,
                },
                relaypacs_core::bytes_stream(data),
                true,
            )
            .await
            .unwrap_or_else(|e| fail(e));
        let (file, queued) = r.unwrap_or_else(|e| fail(e));
        if !queued {
            fail("a one-instance session was not queued");
        }
        let _ = writeln!(out, "INGESTED {session} {} {}", file.id, digest.to_hex());
        let _ = out.flush();
    }
}
