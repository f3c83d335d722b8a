//! The cost of a session-head update (the delivery worker's lease and
//! outcome: `load_file_scope(id, None)` then `update_file_scope` with no
//! file) against the whole-record path it replaced (`load_session` then
//! `update_session`), on sessions of 1 and of N files (default 10,000),
//! on SQLite (a file in a temp dir) and PostgreSQL (a throwaway durable
//! cluster). Prints the medians of each; every round's update is read
//! back (untimed) so a lost write would show.
//!
//! Usage: `head_update_bench [files] [rounds]`

use std::time::Instant;

use relaypacs_benches::{Res, median};
use relaypacs_core::{FileId, FileRecord, FileState, SessionStore};
use relaypacs_storage::{SqlOptions, SqlSessionStore, SqlState};

async fn measure(store: &SqlSessionStore, engine: &str, files: usize, rounds: usize) -> Res<()> {
    let mut s = relaypacs_core::testing::session_store::sample_session();
    s.files.clear();
    for i in 0..files {
        let f = FileRecord {
            id: FileId::random(),
            name: format!("slice-{i:05}.dcm"),
            size: 600,
            sha256: None,
            data_set_sha256: None,
            state: FileState::Uploading,
        };
        s.files.insert(f.id, f);
    }
    store.create_session(&s).await?;
    let (mut head, mut whole) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let t = Instant::now();
        let scope = store.load_file_scope(s.id, None).await?;
        let mut rec = scope.session.value;
        rec.delivery.lease_owner = Some(format!("head-{i}"));
        store.update_file_scope(&rec, scope.session.version).await?;
        head.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let v = store.load_session(s.id).await?;
        let mut rec = v.value;
        rec.delivery.lease_owner = Some(format!("whole-{i}"));
        store.update_session(&rec, v.version).await?;
        whole.push(t.elapsed().as_secs_f64() * 1e3);
        let back = store.load_session(s.id).await?;
        if back.value.delivery.lease_owner.as_deref() != Some(&format!("whole-{i}"))
            || back.value.files.len() != files
        {
            return Err(format!("{engine}: round {i} lost an update or a file").into());
        }
    }
    let (h, w) = (median(&head), median(&whole));
    println!(
        "{engine:8} {files:>6} files: head-only {h:8.2} ms   whole-record {w:8.2} ms   \
         ratio {:6.1}x   (median of {rounds})",
        w / h
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let files: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(9);
    let dir = tempfile::TempDir::new()?;
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let sqlite = SqlSessionStore::new(SqlState::connect(&url, None, &SqlOptions::default()).await?);
    let pg = tokio::task::spawn_blocking(relaypacs_test_peers::Postgres::start).await?;
    let url = pg.create_database("relay");
    let postgres =
        SqlSessionStore::new(SqlState::connect(&url, None, &SqlOptions::default()).await?);
    for n in [1, files] {
        measure(&sqlite, "sqlite", n, rounds).await?;
        measure(&postgres, "postgres", n, rounds).await?;
    }
    Ok(())
}
