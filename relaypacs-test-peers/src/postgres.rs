//! A throwaway PostgreSQL 15 cluster on loopback: `initdb`'s output copied
//! from a cached template into a temporary folder under `/tmp`, started with
//! `pg_ctl` on a free port, removed on drop. Nothing depends on a system
//! cluster (Debian's `main` on 5432 is never used).
//!
//! When this process is root, `initdb`, `pg_ctl` and the server run as the
//! `postgres` OS user (`initdb` refuses root) through `runuser`; otherwise
//! as this process's user. Clients (`psql`, the code under test) connect
//! over TCP as the `postgres` superuser with `trust` authentication.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

use super::{free_port, tools_dir, workspace_root};

/// Where Debian's `postgresql-15` puts its programs.
const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Bump when the `initdb` arguments below change (names the cached template).
const TEMPLATE_FORMAT: u32 = 1;

/// How long `pg_ctl` waits for a start or a stop.
const PG_CTL_TIMEOUT_SECS: &str = "30";

/// Path of a PostgreSQL 15 program (`initdb`, `pg_ctl`, `psql`, …). If
/// missing, runs `scripts/install-peers.sh apt` once (it installs
/// `postgresql-15`) and looks again; panics with a clear message if it is
/// still missing.
pub fn postgres_bin(name: &str) -> PathBuf {
    static INSTALL: Once = Once::new();
    let path = Path::new(BIN_DIR).join(name);
    if !path.is_file() {
        INSTALL.call_once(|| {
            let script = workspace_root().join("scripts/install-peers.sh");
            let _ = Command::new("bash").arg(script).arg("apt").status();
        });
    }
    assert!(
        path.is_file(),
        "{} is missing; scripts/install-peers.sh apt should install postgresql-15",
        path.display()
    );
    path
}

/// Whether this process runs as root (the owner of `/proc/self` is the
/// effective user).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command that runs `program` as the cluster's owner: `postgres` when
/// this process is root, else this process's user. Its working directory
/// is `cwd` (the `postgres` user may not reach ours).
fn as_owner(program: &Path, cwd: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// Run to completion; panic with its output unless it succeeded.
fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A new temporary folder under `/tmp` (every parent traversable) that the
/// cluster's owner can write to: chowned to `postgres` when we are root.
fn owned_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir under /tmp");
    if is_root() {
        static OWNER: OnceLock<(u32, u32)> = OnceLock::new();
        let (uid, gid) = *OWNER.get_or_init(|| {
            let id = |flag: &str| -> u32 {
                let out = run(Command::new("id").args([flag, "postgres"]), "id postgres");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("numeric id of postgres")
            };
            (id("-u"), id("-g"))
        });
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown to postgres");
    }
    dir
}

/// `initdb`'s output, made once per machine and PostgreSQL version under
/// the tools folder (`initdb` takes ~0.7 s; copying its output ~0.1 s).
/// Built in a scratch folder, copied into a staging folder beside the
/// destination, synced, then renamed into place: the template is either
/// complete or absent, and two processes building it at once both end
/// with the same one (the loser's rename fails on the winner's folder).
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let initdb = postgres_bin("initdb");
        let version = run(Command::new(&initdb).arg("--version"), "initdb --version");
        let key: String = String::from_utf8_lossy(&version.stdout)
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let tools = tools_dir();
        let dest = tools.join(format!("postgres-template-{TEMPLATE_FORMAT}-{key}"));
        if dest.join("PG_VERSION").is_file() {
            return dest;
        }
        std::fs::create_dir_all(&tools).expect("create the tools folder");
        let scratch = owned_tempdir("relaypacs-initdb-");
        let data = scratch.path().join("data");
        // `--no-sync`: the copy below is synced before it is renamed in.
        run(
            as_owner(&initdb, scratch.path())
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]),
            "initdb",
        );
        let staging = tempfile::Builder::new()
            .prefix(".postgres-template-")
            .tempdir_in(&tools)
            .expect("staging folder");
        let copy = staging.path().join("data");
        run(
            Command::new("cp").arg("-a").arg(&data).arg(&copy),
            "copy initdb's output",
        );
        run(
            Command::new("sync").arg("-f").arg(&copy),
            "sync the template",
        );
        if let Err(e) = std::fs::rename(&copy, &dest) {
            assert!(
                dest.join("PG_VERSION").is_file(),
                "cannot put the template at {}: {e}",
                dest.display()
            );
        }
        dest
    })
}

/// Options for a test [`Postgres`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// `true` (the default): PostgreSQL's own durable settings (`fsync`,
    /// `synchronous_commit`, `full_page_writes` on), for tests that count
    /// or rely on syncs. `false` adds `fsync=off`, `synchronous_commit=off`
    /// and `full_page_writes=off`: faster, and a crash of the machine (not
    /// of the server) may lose committed work.
    pub durable: bool,
    /// `max_connections` (default 100, PostgreSQL's own).
    pub max_connections: u32,
    /// More server settings, each passed as `-c name=value` (names are
    /// letters, digits, `_` and `.`; values hold no `'` or `\`).
    pub settings: Vec<(String, String)>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            durable: true,
            max_connections: 100,
            settings: Vec::new(),
        }
    }
}

/// A PostgreSQL 15 cluster of its own on `127.0.0.1:<port>` and a Unix
/// socket in its temporary folder, superuser `postgres` with `trust`
/// authentication. [`stop`](Self::stop) shuts it down cleanly,
/// [`kill9`](Self::kill9) crashes it, [`start_again`](Self::start_again)
/// brings it back on the same data and port. On drop: `pg_ctl -m
/// immediate stop`, then any process left is killed and the folder removed.
#[derive(Debug)]
pub struct Postgres {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    options: PostgresOptions,
    running: bool,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Start a fresh cluster with durable settings.
    pub fn start() -> Self {
        Self::start_with(PostgresOptions::default())
    }

    /// Start a fresh cluster with options. Several may start at once (in
    /// threads or processes): each has its own folder and port, and a port
    /// taken by someone else between [`free_port`] and the server's bind is
    /// replaced by a fresh one (up to 5 tries).
    pub fn start_with(options: PostgresOptions) -> Self {
        for (name, value) in &options.settings {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
                "bad setting name {name:?}"
            );
            assert!(
                !value.contains(['\'', '\\']),
                "setting {name}: value {value:?} holds ' or \\"
            );
        }
        let template = template();
        let dir = owned_tempdir("relaypacs-pg-");
        // `cp -a` keeps the owner (`postgres`) and initdb's 0700 mode.
        run(
            Command::new("cp")
                .arg("-a")
                .arg(template)
                .arg(dir.path().join("data")),
            "copy the cluster template",
        );
        let mut pg = Self {
            port: free_port(),
            options,
            running: false,
            dir,
        };
        for _ in 0..5 {
            match pg.pg_ctl_start() {
                Ok(()) => return pg,
                Err(log) if port_taken(&log) => pg.port = free_port(),
                Err(log) => panic!("PostgreSQL did not start on port {}:\n{log}", pg.port),
            }
        }
        panic!("PostgreSQL found no free port in 5 tries:\n{}", pg.log());
    }

    /// Start again on the same data folder and port (after [`stop`](Self::stop)
    /// or [`kill9`](Self::kill9); after a crash the server replays its WAL
    /// first). Panics if it does not come back.
    pub fn start_again(&mut self) {
        assert!(!self.running, "PostgreSQL is already running");
        self.clear_stale_lock();
        if let Err(log) = self.pg_ctl_start() {
            panic!(
                "PostgreSQL did not start again on port {}:\n{log}",
                self.port
            );
        }
    }

    /// After [`kill9`](Self::kill9) the postmaster is dead but may stay a
    /// zombie until PID 1 reaps it (some container inits take seconds or
    /// never do), and PostgreSQL takes a `postmaster.pid` naming a zombie
    /// for a live server (so does the socket's lock file,
    /// `.s.PGSQL.<port>.lock`). When no process of the cluster is left and the
    /// PID it names is not alive, the locks are stale: remove them, as the
    /// server itself would for a gone PID. (The old shared memory segment
    /// is checked and removed by the server at start.)
    fn clear_stale_lock(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if self.processes().is_empty() && !alive(pid) {
            let _ = std::fs::remove_file(self.data_dir().join("postmaster.pid"));
            let socket_lock = format!(".s.PGSQL.{}.lock", self.port);
            let _ = std::fs::remove_file(self.dir.path().join(socket_lock));
        }
    }

    /// `pg_ctl -w start`: returns once the server accepts connections, or
    /// the log if it did not come up (whatever it left running is killed).
    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let d = self.dir.path();
        let mut opts = format!(
            "-p {} -k '{}' -c listen_addresses=127.0.0.1 -c max_connections={}",
            self.port,
            d.display(),
            self.options.max_connections
        );
        if !self.options.durable {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        for (name, value) in &self.options.settings {
            opts.push_str(&format!(" -c '{name}={value}'"));
        }
        let log_len_before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
        let out = as_owner(&postgres_bin("pg_ctl"), d)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args(["-o", &opts, "-t", PG_CTL_TIMEOUT_SECS, "-w", "start"])
            .output()
            .expect("run pg_ctl start");
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        let _ = self.kill_remaining(&[]);
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let tail = log.get(log_len_before as usize..).unwrap_or(&log);
        Err(format!(
            "{}{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(tail)
        ))
    }

    /// Shut down cleanly (`pg_ctl -m fast stop`: sessions are ended, a
    /// checkpoint is written). The data stays.
    pub fn stop(&mut self) {
        assert!(self.running, "PostgreSQL is not running");
        run(
            as_owner(&postgres_bin("pg_ctl"), self.dir.path())
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "fast", "-t", PG_CTL_TIMEOUT_SECS, "-w", "stop"]),
            "pg_ctl stop",
        );
        self.running = false;
    }

    /// Crash it: SIGKILL to the postmaster, then to every other process
    /// of the cluster (as when a whole service is killed or the machine
    /// dies with its page cache intact: no process gets to finish anything),
    /// and wait until none is left. The data stays as the crash left it;
    /// [`start_again`](Self::start_again) recovers from the WAL.
    pub fn kill9(&mut self) {
        assert!(self.running, "PostgreSQL is not running");
        let postmaster = self
            .postmaster_pid()
            .expect("postmaster.pid of a running cluster");
        // Every process seen before the kill is waited for (see
        // `kill_remaining`): one already exiting can no longer be found.
        let mut before = self.processes();
        before.push(postmaster);
        sigkill(&[postmaster]);
        let survivors = self.kill_remaining(&before);
        assert!(
            survivors.is_empty(),
            "PostgreSQL processes {survivors:?} survive SIGKILL"
        );
        self.running = false;
    }

    /// SIGKILL every process of the cluster (and `also`) until none is
    /// alive (gone or a zombie): a process that is exiting can no longer
    /// be found by its working directory yet still be running, so every
    /// PID seen is waited for. Returns the PIDs still alive after 10 s
    /// (none, in practice).
    fn kill_remaining(&self, also: &[u32]) -> Vec<u32> {
        let start = Instant::now();
        let mut seen: std::collections::BTreeSet<u32> = also.iter().copied().collect();
        loop {
            seen.extend(self.processes());
            seen.retain(|&pid| alive(pid));
            if seen.is_empty() || start.elapsed() > Duration::from_secs(10) {
                return seen.into_iter().collect();
            }
            sigkill(&seen.iter().copied().collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The PIDs of the cluster's live processes (postmaster and children):
    /// every process whose working directory is the data folder, where
    /// the postmaster moves at start and its children stay.
    pub fn processes(&self) -> Vec<u32> {
        let Ok(data) = self.data_dir().canonicalize() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            // A zombie's (or a gone process's) cwd cannot be read.
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == data))
            .collect()
    }

    /// The postmaster's PID, from the first line of `postmaster.pid`.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`: the superuser on the
    /// `postgres` database.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Create a fresh, empty database and return the superuser's URL to
    /// it. `name`: lower-case ASCII letters, digits and `_`, not starting
    /// with a digit, at most 63 bytes (PostgreSQL's limit), so it needs no
    /// quoting in SQL or in the URL.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name.len() <= 63
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "bad database name {name:?}"
        );
        self.psql(&self.url(), &format!("create database {name}"));
        self.database_url(name)
    }

    /// Run `sql` with `psql` on the database at `url` (from
    /// [`url`](Self::url) or [`create_database`](Self::create_database)):
    /// unaligned, tuples only (`-At`), stopping at the first error.
    /// Returns its output without the last newline; panics with psql's
    /// message and the server log on an error.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Command::new(postgres_bin("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} on {url} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.ends_with('\n') {
            text.pop();
        }
        text
    }

    /// The cluster's folder: `data/` (the data directory), `pg.log` and
    /// the Unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pg.log")
    }

    /// The server's log, every start appended (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// Whether `pid` is a live process: it exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Whether a failed start's log says the port was taken.
fn port_taken(log: &str) -> bool {
    log.contains("could not bind") || log.contains("could not create any TCP/IP sockets")
}

/// SIGKILL to `pids` through the shell's `kill` (this crate forbids the
/// `unsafe` a direct `kill(2)` needs); errors (already gone) are ignored.
fn sigkill(pids: &[u32]) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg("kill -KILL \"$@\" 2>/dev/null")
        .arg("sh")
        .args(pids.iter().map(u32::to_string))
        .status();
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = as_owner(&postgres_bin("pg_ctl"), self.dir.path())
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-t", PG_CTL_TIMEOUT_SECS, "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Whatever survived (a failed stop) dies here, not in the next test.
        let _ = self.kill_remaining(&[]);
        // A crashed cluster leaves its System V shared memory segment
        // (line 7 of postmaster.pid: key, id) for the next start to find;
        // there is none, so remove it.
        if let Ok(text) = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            && let Some(id) = text
                .lines()
                .nth(6)
                .and_then(|l| l.split_whitespace().nth(1))
        {
            let _ = Command::new("ipcrm")
                .args(["-m", id])
                .stderr(Stdio::null())
                .status();
        }
    }
}
