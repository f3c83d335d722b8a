//! Crash test: a process writing chunks is SIGKILLed at random points, at
//! least 50 times (state in SQLite) or 24 times (state in PostgreSQL, which
//! is itself SIGKILLed with the writer every third round and recovers from
//! its WAL). After each kill, every acknowledged chunk must be recorded and
//! its stored bytes must hash to the source; resuming completes the file
//! byte-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use relaypacs_core::testing::collect;
use relaypacs_core::{ChunkStore as _, SessionStore as _};
use relaypacs_core::{FileKey, PipelineConfig, Sha256Digest};
use relaypacs_integration::{Embedded, PgCluster, StateDb};

/// Writer kills with the state in SQLite.
const KILLS_SQLITE: usize = 60;
/// Writer kills with the state in PostgreSQL (each round also starts a
/// connection pool, and every third restarts the cluster).
const KILLS_POSTGRES: usize = 24;
/// On PostgreSQL, every this many rounds the cluster is SIGKILLed right
/// after the writer: a commit the writer acknowledged must be in the WAL,
/// not only in the server's memory.
const PG_CRASH_EVERY: usize = 3;
const CHUNK: usize = 256 << 10;

#[derive(serde::Deserialize)]
struct WriterState {
    session: relaypacs_core::SessionId,
    file: relaypacs_core::FileId,
}

fn check_acknowledged(data: &Path, db: &StateDb, source: &[u8], acked: &[u64]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Ok(b) = std::fs::read(data.join("writer-state.json")) else {
            assert!(acked.is_empty(), "chunks acknowledged but no upload state");
            return;
        };
        let st: WriterState = serde_json::from_slice(&b).unwrap();
        let e = Embedded::open_on(data, PipelineConfig::default(), db)
            .await
            .expect("stores reopen after SIGKILL");
        let chunks = e.sessions.chunks(st.session, st.file).await.unwrap();
        for off in acked {
            let c = chunks
                .iter()
                .find(|c| c.offset == *off)
                .unwrap_or_else(|| panic!("acknowledged chunk {off} lost"));
            let end = (*off as usize + CHUNK).min(source.len());
            assert_eq!(
                c.sha256,
                Sha256Digest::of(&source[*off as usize..end]),
                "recorded digest of {off}"
            );
            let key = FileKey {
                session: st.session,
                file: st.file,
            };
            let stored = collect(e.chunks.read(key, c.offset..c.end()).await.unwrap())
                .await
                .unwrap();
            assert_eq!(
                Sha256Digest::of(&stored),
                c.sha256,
                "stored bytes of acknowledged chunk {off} are wrong"
            );
        }
        // The audit trail reopens (torn tail cut) and verifies.
        relaypacs_storage::verify_chain(e.audit.path()).unwrap();
        e.close().await;
    });
}

#[test]
fn sigkill_loop_loses_no_acknowledged_chunk_on_sqlite() {
    sigkill_loop(&StateDb::Sqlite, None, KILLS_SQLITE);
}

#[test]
fn sigkill_loop_loses_no_acknowledged_chunk_on_postgres() {
    let mut cluster = PgCluster::start();
    let db = cluster.fresh_db();
    sigkill_loop(&db, Some(&mut cluster.pg), KILLS_POSTGRES);
}

/// The writer with the state in `db` (its URL passed to a PostgreSQL one).
fn writer(db: &StateDb) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crash_writer"));
    match db {
        StateDb::Postgres(url) => cmd.env("CRASH_WRITER_STATE_URL", url),
        StateDb::Sqlite => cmd.env_remove("CRASH_WRITER_STATE_URL"),
    };
    cmd
}

/// The random source of a crash loop: seeded from `CRASH_SEED` when set,
/// else at random, the seed printed so that a failing run can be replayed.
fn seeded_rng(what: &str, db: &StateDb) -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "{what} on {} seed {seed} (set CRASH_SEED to replay)",
        db.engine_name()
    );
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// `cmd` started with its stdout read line by line on a thread of its own
/// (lines reach the receiver as they are printed); the thread ends when the
/// process does.
fn spawn_reading(
    cmd: &mut Command,
) -> (
    std::process::Child,
    mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx, reader)
}

/// `kills_wanted` rounds of: start the writer, let it run 20–400 ms, SIGKILL it
/// (and, on PostgreSQL every [`PG_CRASH_EVERY`] rounds, the cluster too),
/// check every acknowledged chunk. Then resume to the end, byte-exact.
fn sigkill_loop(
    db: &StateDb,
    mut pg: Option<&mut relaypacs_test_peers::Postgres>,
    kills_wanted: usize,
) {
    let started = Instant::now();
    let mut rng = seeded_rng("crash test", db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let src_path = dir.path().join("source.dcm");
    let source =
        relaypacs_integration::dicom_of_size(&relaypacs_integration::new_study(), 24 << 20);
    std::fs::write(&src_path, &source).unwrap();
    let mut acked: Vec<u64> = Vec::new();
    let mut kills = 0;
    let mut checked = 0usize;
    let mut kills_mid_upload = 0usize;
    let mut finished = false;
    let mut db_crashes = 0usize;
    while kills < kills_wanted {
        let (mut child, rx, reader) = spawn_reading(writer(db).args([
            data.to_str().unwrap(),
            src_path.to_str().unwrap(),
            &CHUNK.to_string(),
            &rng.random::<u64>().to_string(),
        ]));
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(20..400));
        let mut done = false;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(l) if l == "DONE" => done = true,
                Ok(l) => acked.push(l.trim_start_matches("ACK ").parse().unwrap()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // SIGKILL: no destructor, no flush, exactly like a crash.
        let _ = child.kill();
        let status = child.wait().unwrap();
        // The database server dies right after: what it acknowledged must
        // be in its WAL, not in its memory.
        let crash_db = !done && (kills + 1) % PG_CRASH_EVERY == 0;
        if let Some(pg) = pg.as_deref_mut().filter(|_| crash_db) {
            pg.kill9();
            pg.start_again();
            db_crashes += 1;
        }
        reader.join().unwrap();
        // Lines already printed were acknowledged before the kill.
        acked.extend(
            rx.try_iter()
                .filter(|l| l.starts_with("ACK "))
                .map(|l| l[4..].parse::<u64>().unwrap()),
        );
        if done {
            finished = true;
            // Start over with a fresh upload so every round has chunks to kill.
            check_acknowledged(&data, db, &source, &acked);
            std::fs::remove_dir_all(&data).unwrap();
            acked.clear();
            continue;
        }
        assert!(
            status.code().is_none() || status.code() == Some(0),
            "writer failed on its own: {status:?}"
        );
        kills += 1;
        if !acked.is_empty() {
            kills_mid_upload += 1;
        }
        checked += acked.len();
        check_acknowledged(&data, db, &source, &acked);
    }
    // Resume to the end and complete: byte-exact.
    let out = writer(db)
        .args([
            data.to_str().unwrap(),
            src_path.to_str().unwrap(),
            &CHUNK.to_string(),
            "1",
            "complete",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("COMPLETE {}", Sha256Digest::of(&source).to_hex());
    assert!(text.contains(&want), "completed file differs: {text}");
    let st: WriterState =
        serde_json::from_slice(&std::fs::read(data.join("writer-state.json")).unwrap()).unwrap();
    let stored = std::fs::read(
        data.join("chunks")
            .join(st.session.to_string())
            .join(format!("{}.data", st.file)),
    )
    .unwrap();
    assert!(stored == source, "stored file is not byte-identical");
    eprintln!(
        "{}: {kills} kills ({kills_mid_upload} with chunks acknowledged, {db_crashes} with the database server), {checked} acknowledged-chunk checks, a full upload finished in between: {finished}, {:.1} s",
        db.engine_name(),
        started.elapsed().as_secs_f64()
    );
    if pg.is_some() {
        assert!(
            db_crashes >= kills_wanted / PG_CRASH_EVERY / 2,
            "too few database crashes ({db_crashes})"
        );
    }
    assert!(
        kills_mid_upload >= kills_wanted / 2,
        "too few kills landed mid-upload ({kills_mid_upload}); the test would prove little"
    );
}

/// Rounds of the STOW-RS ingest writer killed, state in SQLite.
const INGEST_KILLS_SQLITE: usize = 30;
/// The same with the state in PostgreSQL (every third round the cluster
/// dies with the writer).
const INGEST_KILLS_POSTGRES: usize = 12;

#[test]
fn sigkill_during_stow_ingest_loses_no_acknowledged_instance_on_sqlite() {
    ingest_kill_loop(&StateDb::Sqlite, None, INGEST_KILLS_SQLITE);
}

#[test]
fn sigkill_during_stow_ingest_loses_no_acknowledged_instance_on_postgres() {
    let mut cluster = PgCluster::start();
    let db = cluster.fresh_db();
    ingest_kill_loop(&db, Some(&mut cluster.pg), INGEST_KILLS_POSTGRES);
}

/// An instance the ingest writer acknowledged: its session, its file and
/// the SHA-256 of the bytes it sent.
type Ingested = (relaypacs_core::SessionId, relaypacs_core::FileId, String);

/// Every acknowledged instance is in its session, valid, with the digest
/// of the bytes sent, its session queued (or further on), and its stored
/// bytes hash to that digest; the state database's audit chain verifies.
fn check_ingested(data: &Path, db: &StateDb, acked: &[Ingested]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = Embedded::open_on(data, PipelineConfig::default(), db)
            .await
            .expect("stores reopen after SIGKILL");
        for (s, f, sha) in acked {
            let rec = e
                .sessions
                .load_session(*s)
                .await
                .unwrap_or_else(|err| panic!("acknowledged session {s} lost: {err:?}"))
                .value;
            assert_ne!(
                rec.state,
                relaypacs_core::SessionState::Open,
                "session {s} not queued"
            );
            let file = rec
                .files
                .get(f)
                .unwrap_or_else(|| panic!("acknowledged file {f} of {s} lost"));
            assert!(
                matches!(file.state, relaypacs_core::FileState::Valid { .. }),
                "file {f} not valid"
            );
            assert_eq!(
                file.sha256.map(|d| d.to_hex()).as_deref(),
                Some(sha.as_str())
            );
            let key = FileKey {
                session: *s,
                file: *f,
            };
            let stored = collect(e.chunks.read(key, 0..file.size).await.unwrap())
                .await
                .unwrap();
            assert_eq!(
                Sha256Digest::of(&stored).to_hex(),
                *sha,
                "stored bytes of acknowledged instance {f} are wrong"
            );
        }
        relaypacs_storage::verify_sql_chain(&e.state)
            .await
            .expect("the audit chain verifies after SIGKILL");
        e.close().await;
    });
}

/// `kills_wanted` rounds of: start the ingest writer, let it run 20–300 ms,
/// SIGKILL it (and, on PostgreSQL every [`PG_CRASH_EVERY`] rounds, the
/// cluster too), check every instance acknowledged so far.
fn ingest_kill_loop(
    db: &StateDb,
    mut pg: Option<&mut relaypacs_test_peers::Postgres>,
    kills_wanted: usize,
) {
    let started = Instant::now();
    let mut rng = seeded_rng("ingest crash test", db);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut acked: Vec<Ingested> = Vec::new();
    let mut kills_mid = 0usize;
    let mut db_crashes = 0usize;
    for round in 0..kills_wanted {
        let (mut child, rx, reader) =
            spawn_reading(writer(db).args([data.to_str().unwrap(), "ingest"]));
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        // SIGKILL: no destructor, no flush, exactly like a crash.
        let _ = child.kill();
        let status = child.wait().unwrap();
        if let Some(pg) = pg
            .as_deref_mut()
            .filter(|_| (round + 1) % PG_CRASH_EVERY == 0)
        {
            pg.kill9();
            pg.start_again();
            db_crashes += 1;
        }
        reader.join().unwrap();
        assert!(
            status.code().is_none(),
            "the ingest writer ended on its own: {status:?}"
        );
        // Lines printed were acknowledged before the kill.
        let before = acked.len();
        for line in rx.try_iter() {
            let mut w = line.split_whitespace();
            assert_eq!(w.next(), Some("INGESTED"), "unexpected line {line}");
            let s = relaypacs_core::SessionId::parse(w.next().unwrap()).unwrap();
            let f = relaypacs_core::FileId::parse(w.next().unwrap()).unwrap();
            acked.push((s, f, w.next().unwrap().to_owned()));
        }
        if acked.len() > before {
            kills_mid += 1;
        }
        check_ingested(&data, db, &acked);
    }
    eprintln!(
        "{}: {kills_wanted} kills of the ingest writer ({kills_mid} after acknowledgements, {db_crashes} with the database server), {} instances checked after every kill, {:.1} s",
        db.engine_name(),
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        kills_mid >= kills_wanted / 2,
        "too few rounds acknowledged instances ({kills_mid}); the test would prove little"
    );
}
