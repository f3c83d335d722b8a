//! The audit trail on the state database, with the real `relaypacs` binary
//! (issue 12, part 3): a server's chain verifies with `relaypacs audit
//! verify` while the server runs and after it stops; with `[audit] jsonl =
//! true` the JSON-lines trail holds the same records; a record changed by
//! the database's owner (triggers dropped) makes verify exit 1 naming it; a
//! cut tail with `audit_head` rewritten is caught by the anchor the server
//! wrote at stop (and the server refuses to start on it). On PostgreSQL, a
//! gateway role with the grants documented in README (no UPDATE or DELETE
//! on `audit_events`, no right to change the schema) runs the server with
//! `[state] migrate = false` once the owner ran `relaypacs migrate`, and
//! cannot change the audit table.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::binary;
use relaypacs_core::AuditEvent;
use relaypacs_test_peers::Postgres;

const PASSWORD: &str = "Amber-Quiver-Lattice-8842";

/// A server process, killed on drop if still running.
struct Gateway(Option<Child>);

impl Gateway {
    fn start(config: &Path, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
            .arg("--config")
            .arg(config)
            .env_remove("RELAYPACS_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut gw = Self(Some(child));
        // Up, or exited (its stderr then says why).
        for _ in 0..400 {
            if relaypacs_test_peers::listening(port) {
                return gw;
            }
            if let Some(status) = gw.0.as_mut().unwrap().try_wait().unwrap() {
                let out = gw.0.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "the server exited ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not listen on {port}");
    }

    /// SIGTERM, as an operator stops it; waits for the exit.
    fn stop(mut self) {
        let mut child = self.0.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = child.wait().unwrap();
        assert!(status.success(), "stopped with {status}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `relaypacs --config CONFIG ARGS`.
fn relaypacs(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RELAYPACS_CONFIG")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{:?}: {}{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A configuration file in `dir`: the server on `port`, data in
/// `dir/data`, plus `extra` TOML.
fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let config = dir.join("relaypacs.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n\n[http]\nmin_free_bytes = 0\n\n{extra}",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    config
}

/// A user, a login, a study and `files` tus uploads into it.
async fn uploads(url: &str, files: usize) {
    let http = reqwest::Client::new();
    let token = binary::login(&http, url, "uma", PASSWORD).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let sid = binary::new_study(&http, url, &token).await;
    let study = relaypacs_core::testing::dicom_gen::new_uid();
    for _ in 0..files {
        binary::tus_upload(&http, url, &token, &sid, &common::dicom(Some(&study), 16)).await;
    }
}

/// The events `audit export --format jsonl ARGS` writes, as JSON text,
/// sorted (each trail keeps its own order of concurrent records).
fn exported(config: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["audit", "export", "--format", "jsonl"];
    all.extend_from_slice(args);
    let mut v: Vec<String> = ok(&relaypacs(config, &all))
        .lines()
        .map(|l| {
            let e: AuditEvent = serde_json::from_str(l).unwrap();
            serde_json::to_string(&e).unwrap()
        })
        .collect();
    v.sort();
    v
}

/// "N records verified" of a verify's output.
fn verified_count(stdout: &str) -> u64 {
    let at = stdout.find(" records verified").unwrap();
    stdout[..at].rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_sql_chain_verifies_while_it_runs_and_tampering_is_named() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = relaypacs_test_peers::free_port();
    let config = write_config(dir.path(), port, "[audit]\njsonl = true\n");
    let data = dir.path().join("data");
    let cfg = [OsStr::new("--config"), config.as_os_str()];
    binary::add_user(&cfg, &[], "uma", "uploader", PASSWORD);
    let gw = Gateway::start(&config, port);
    let url = format!("http://127.0.0.1:{port}");
    uploads(&url, 3).await;

    // While the server runs: the chain verifies against the anchor the
    // server wrote at start, and exports.
    let out = ok(&relaypacs(&config, &["audit", "verify"]));
    let running = verified_count(&out);
    assert!(running >= 6, "start, login, study, 3 uploads: {out}");
    assert!(out.contains("sql-chain.anchor"), "{out}");
    assert!(exported(&config, &[]).len() as u64 >= running);

    gw.stop();
    let out = ok(&relaypacs(&config, &["audit", "verify"]));
    let count = verified_count(&out);
    assert!(count > running, "the stop is recorded: {out}");
    let anchor =
        relaypacs_storage::audit_anchor::read_anchor(&data.join("audit").join("sql-chain.anchor"))
            .unwrap()
            .unwrap();
    assert_eq!(anchor.head.count, count, "anchored at stop");

    // The JSON-lines trail: its own chain, verified, the same records.
    let jsonl = data.join("audit").join("audit.jsonl");
    let out = ok(&relaypacs(
        &config,
        &["audit", "verify", "--trail", jsonl.to_str().unwrap()],
    ));
    assert_eq!(verified_count(&out), count, "{out}");
    let sql_events = exported(&config, &[]);
    assert_eq!(sql_events.len() as u64, count);
    assert_eq!(
        exported(&config, &["--trail", jsonl.to_str().unwrap()]),
        sql_events
    );
    assert!(
        sql_events
            .iter()
            .any(|e| e.contains("\"application_stop\"")),
        "the stop is in both trails"
    );

    // The owner changes one record (triggers dropped): named.
    use sqlx::Row;
    let db = sqlite_owner(&data).await;
    let seq: i64 = 2;
    let event = |db: &relaypacs_storage::SqlState| {
        let db = db.clone();
        async move {
            sqlx::query("SELECT event FROM audit_events WHERE seq = 2")
                .fetch_one(db.pool())
                .await
                .unwrap()
                .get::<String, _>(0)
        }
    };
    let before = event(&db).await;
    sqlx::query("DROP TRIGGER audit_events_no_update")
        .execute(db.pool())
        .await
        .unwrap();
    // Still valid JSON, one byte more.
    sqlx::query(
        "UPDATE audit_events SET event = replace(event, '\"action\":', '\"action\": ') WHERE seq = 2",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let after = event(&db).await;
    assert_eq!(after.len(), before.len() + 1, "{before} -> {after}");
    let out = relaypacs(&config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("record {seq} (line {}, seq {seq})", seq + 1))
            && err.contains("does not match its hash"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    db.close().await;
}

async fn sqlite_owner(data: &Path) -> relaypacs_storage::SqlState {
    let url = format!("sqlite://{}", data.join("state.db").display());
    relaypacs_storage::SqlState::connect(&url, None, &Default::default())
        .await
        .unwrap()
}

/// A truncation of the table (rows cut, `audit_head` rewritten to match, so
/// the table is consistent on its own) after the server stopped: the
/// anchor it wrote at stop catches it, and the server does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anchor_written_at_stop_catches_a_truncated_table() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = relaypacs_test_peers::free_port();
    let config = write_config(dir.path(), port, "");
    let data = dir.path().join("data");
    binary::add_user(
        &[OsStr::new("--config"), config.as_os_str()],
        &[],
        "uma",
        "uploader",
        PASSWORD,
    );
    let gw = Gateway::start(&config, port);
    uploads(&format!("http://127.0.0.1:{port}"), 2).await;
    gw.stop();
    let count = verified_count(&ok(&relaypacs(&config, &["audit", "verify"])));
    let db = sqlite_owner(&data).await;
    let keep = count - 2;
    for s in [
        "DROP TRIGGER audit_events_no_delete".to_owned(),
        format!("DELETE FROM audit_events WHERE seq >= {keep}"),
        format!(
            "UPDATE audit_head SET records = {keep}, \
             last_hash = (SELECT hash FROM audit_events WHERE seq = {})",
            keep - 1
        ),
    ] {
        sqlx::query(&s).execute(db.pool()).await.unwrap();
    }
    db.close().await;
    let out = ok(&relaypacs(&config, &["audit", "verify", "--no-anchor"]));
    assert_eq!(verified_count(&out), keep, "consistent on its own");
    let out = relaypacs(&config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("record {keep}")) && err.contains("the last 2 records were cut"),
        "{err}"
    );
    // The server refuses to start on it, naming the cut.
    let start = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .arg("--config")
        .arg(&config)
        .env_remove("RELAYPACS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(start.status.code(), Some(2));
    assert!(
        text(&start.stderr).contains("tail was cut"),
        "{}",
        text(&start.stderr)
    );
}

/// The grants README documents for a gateway role (the ```sql block after
/// the line naming this test), with `relaypacs` as the role.
fn documented_grants() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let marker = readme
        .find("tests/sql_audit_server.rs")
        .expect("README names this test by its grants");
    let rest = &readme[marker..];
    let start = rest.find("```sql\n").expect("a sql block") + "```sql\n".len();
    let end = rest[start..].find("```").unwrap();
    rest[start..start + end].to_owned()
}

/// On PostgreSQL: a gateway role holding only the documented grants and
/// `[state] migrate = false` is refused before the owner migrates (naming
/// `relaypacs migrate`), then runs the server (uploads, audit verify), and
/// can neither change nor remove an audit record, nor the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_postgres_role_runs_the_server_and_cannot_change_the_audit() {
    let pg = tokio::task::spawn_blocking(Postgres::start).await.unwrap();
    let owner_url = pg.create_database("relay");
    // The gateway role exists before the schema; it may connect, no more.
    pg.psql(&owner_url, "CREATE ROLE relaypacs LOGIN");
    pg.psql(&owner_url, "REVOKE CREATE ON SCHEMA public FROM PUBLIC");
    let gateway_url = owner_url.replacen("postgres@", "relaypacs@", 1);

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = relaypacs_test_peers::free_port();
    let config = write_config(
        dir.path(),
        port,
        &format!("[state]\nurl = {gateway_url:?}\nmigrate = false\n"),
    );
    // Not migrated yet: the gateway refuses to start, naming what to run.
    let start = Command::new(env!("CARGO_BIN_EXE_relaypacs"))
        .arg("--config")
        .arg(&config)
        .env_remove("RELAYPACS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(start.status.code(), Some(2));
    let err = text(&start.stderr);
    assert!(
        err.contains("relaypacs migrate") && err.contains("schema version"),
        "{err}"
    );

    // The owner migrates (its own configuration), then grants.
    let owner_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let owner_config = write_config(
        owner_dir.path(),
        relaypacs_test_peers::free_port(),
        &format!("[state]\nurl = {owner_url:?}\n"),
    );
    let out = ok(&relaypacs(&owner_config, &["migrate"]));
    assert!(out.contains("schema at version"), "{out}");
    pg.psql(&owner_url, &documented_grants());

    let cfg = [OsStr::new("--config"), config.as_os_str()];
    binary::add_user(&cfg, &[], "uma", "uploader", PASSWORD);
    let gw = Gateway::start(&config, port);
    uploads(&format!("http://127.0.0.1:{port}"), 2).await;
    let out = ok(&relaypacs(&config, &["audit", "verify"]));
    assert!(verified_count(&out) >= 5, "{out}");

    // As the gateway role: the audit table only grows.
    let psql_as_gateway = |sql: &str| {
        Command::new(relaypacs_test_peers::postgres_bin("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &gateway_url,
            ])
            .args(["-c", sql])
            .output()
            .unwrap()
    };
    for sql in [
        "UPDATE audit_events SET event = event WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "TRUNCATE audit_events",
        "DROP TRIGGER audit_events_append_only ON audit_events",
        "CREATE TABLE intruder (x int)",
    ] {
        let out = psql_as_gateway(sql);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{sql} was allowed");
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{sql}: {err}"
        );
    }
    gw.stop();
    let out = ok(&relaypacs(&config, &["audit", "verify"]));
    assert!(out.contains("records verified"), "{out}");
}
