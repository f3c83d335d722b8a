//! The PostgreSQL test peer: a real cluster of its own per test, on a free
//! loopback port; data survives a clean restart and a SIGKILL crash;
//! clusters run side by side; drop leaves no process, folder or shared
//! memory behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::path::Path;
use std::time::Instant;

use relaypacs_test_peers::{Postgres, PostgresOptions};

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn answers(port: u16) -> bool {
    relaypacs_test_peers::listening(port)
}

/// System V shared memory ids in use (`/proc/sysvipc/shm`, column 2).
fn shm_ids() -> Vec<String> {
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn starts_durable_creates_a_database_and_answers_select_1() {
    let t = Instant::now();
    let pg = Postgres::start();
    eprintln!("Postgres::start took {:?}", t.elapsed());
    assert!(answers(pg.port));
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port)
    );
    let t = Instant::now();
    let url = pg.create_database("relay");
    eprintln!("create_database took {:?}", t.elapsed());
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/relay", pg.port)
    );
    assert_eq!(pg.psql(&url, "select 1"), "1");
    assert_eq!(pg.psql(&url, "select current_database()"), "relay");
    assert_eq!(pg.psql(&url, "select current_user"), "postgres");
    // Durable by default: PostgreSQL's own settings, loopback only.
    assert_eq!(pg.psql(&url, "show fsync"), "on");
    assert_eq!(pg.psql(&url, "show synchronous_commit"), "on");
    assert_eq!(pg.psql(&url, "show full_page_writes"), "on");
    assert_eq!(pg.psql(&url, "show max_connections"), "100");
    assert_eq!(pg.psql(&url, "show listen_addresses"), "127.0.0.1");
    assert_eq!(pg.psql(&url, "show server_encoding"), "UTF8");
    assert!(
        pg.psql(&url, "select version()")
            .starts_with("PostgreSQL 15.")
    );
    // A fresh database is empty.
    assert_eq!(
        pg.psql(
            &url,
            "select count(*) from pg_tables where schemaname = 'public'"
        ),
        "0"
    );
}

#[test]
fn data_survives_a_clean_restart_on_the_same_port() {
    let mut pg = Postgres::start();
    let url = pg.create_database("restart");
    pg.psql(
        &url,
        "create table t (id int primary key, v text); \
         insert into t select g, 'row ' || g from generate_series(1, 1000) g",
    );
    let port = pg.port;
    let t = Instant::now();
    pg.stop();
    eprintln!("stop took {:?}", t.elapsed());
    assert!(!answers(port), "still answering after stop");
    assert!(pg.processes().is_empty(), "{:?}", pg.processes());
    let t = Instant::now();
    pg.start_again();
    eprintln!("start_again took {:?}", t.elapsed());
    assert_eq!(pg.port, port);
    assert_eq!(
        pg.psql(&url, "select count(*), sum(id) from t"),
        "1000|500500"
    );
    assert_eq!(pg.psql(&url, "select v from t where id = 7"), "row 7");
    assert!(pg.log().contains("database system is shut down"));
}

#[test]
fn kill9_then_start_again_recovers_every_committed_row() {
    let mut pg = Postgres::start();
    let url = pg.create_database("crash");
    pg.psql(&url, "create table t (round int, n int)");
    for round in 1..=3 {
        pg.psql(
            &url,
            &format!("insert into t select {round}, g from generate_series(1, 500) g"),
        );
        let pids = pg.processes();
        assert!(pids.len() >= 5, "postmaster and its workers: {pids:?}");
        let t = Instant::now();
        pg.kill9();
        eprintln!("kill9 took {:?}", t.elapsed());
        assert!(
            pids.iter().all(|&p| !alive(p)),
            "alive after kill9: {:?}",
            pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        assert!(!answers(pg.port));
        let t = Instant::now();
        pg.start_again();
        eprintln!("start_again after kill9 took {:?}", t.elapsed());
        assert_eq!(
            pg.psql(&url, "select count(*) from t"),
            (round * 500).to_string()
        );
    }
    // Each start after a kill replayed the WAL (a crash, not a clean stop).
    let log = pg.log();
    assert_eq!(
        log.matches("automatic recovery in progress").count(),
        3,
        "{log}"
    );
    assert!(!log.contains("database system is shut down"), "{log}");
}

#[test]
fn two_clusters_side_by_side() {
    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(Postgres::start);
        let b = s.spawn(|| {
            Postgres::start_with(PostgresOptions {
                durable: false,
                max_connections: 20,
                settings: vec![("work_mem".into(), "7MB".into())],
            })
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("two clusters started in parallel in {:?}", t.elapsed());
    assert_ne!(a.port, b.port);
    assert_ne!(a.dir(), b.dir());
    let (ua, ub) = (a.create_database("side"), b.create_database("side"));
    a.psql(
        &ua,
        "create table only_in_a (x int); insert into only_in_a values (1)",
    );
    assert_eq!(
        a.psql(&ua, "select to_regclass('only_in_a') is not null"),
        "t"
    );
    assert_eq!(
        b.psql(&ub, "select to_regclass('only_in_a') is not null"),
        "f"
    );
    // The non-durable one runs without syncs, with its own settings.
    assert_eq!(a.psql(&ua, "show fsync"), "on");
    assert_eq!(b.psql(&ub, "show fsync"), "off");
    assert_eq!(b.psql(&ub, "show synchronous_commit"), "off");
    assert_eq!(b.psql(&ub, "show full_page_writes"), "off");
    assert_eq!(b.psql(&ub, "show max_connections"), "20");
    assert_eq!(b.psql(&ub, "show work_mem"), "7MB");
    assert_eq!(a.psql(&ua, "show work_mem"), "4MB");
    // Stopping one leaves the other up.
    drop(a);
    assert_eq!(b.psql(&ub, "select 1"), "1");
}

#[test]
fn drop_leaves_no_process_folder_or_shared_memory() {
    for crashed in [false, true] {
        let mut pg = Postgres::start();
        let pids = pg.processes();
        assert!(!pids.is_empty());
        let shm_id = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))
            .unwrap()
            .lines()
            .nth(6)
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .unwrap();
        assert!(shm_ids().contains(&shm_id), "segment {shm_id} in use");
        if crashed {
            pg.kill9();
        }
        let (dir, port) = (pg.dir().to_owned(), pg.port);
        drop(pg);
        assert!(!Path::new(&dir).exists(), "{} left behind", dir.display());
        assert!(!answers(port));
        assert!(pids.iter().all(|&p| !alive(p)), "crashed={crashed}");
        assert!(
            !shm_ids().contains(&shm_id),
            "crashed={crashed}: shared memory {shm_id} left behind"
        );
    }
}
