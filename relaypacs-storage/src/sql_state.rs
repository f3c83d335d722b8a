//! [`SqlState`]: one connection pool to the gateway's SQL database, SQLite
//! (embedded, a file under the data folder) or PostgreSQL (shared by
//! several gateways), with the schema migrated at start.
//!
//! The stores built on it ([`SqlSessionStore`](crate::SqlSessionStore), …)
//! write the same SQL for both engines through sqlx's `Any` driver; where
//! the dialects differ, [`Engine`] tells which to speak. Every write is one
//! transaction, durable when it commits: SQLite runs in WAL mode with
//! `synchronous=FULL` (the commit fsyncs the log), PostgreSQL with its
//! default `synchronous_commit=on`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use relaypacs_core::{Error, StorageErrorKind};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Executor};

/// Which SQL engine a [`SqlState`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// SQLite, embedded in the process (one gateway per file).
    Sqlite,
    /// PostgreSQL, shared by several gateways.
    Postgres,
}

/// How to connect: pool size and timeouts.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqlOptions {
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long a request waits for a free connection.
    pub acquire_timeout: Duration,
    /// How long one statement may run (PostgreSQL `statement_timeout`;
    /// SQLite's `busy_timeout`, the wait for another writer's lock).
    pub statement_timeout: Duration,
    /// Run the embedded migrations at connect (default). `false`: only
    /// check that the schema is at this build's version (every embedded
    /// migration applied, none unknown), for a role that may not change the
    /// schema; the owner migrates with [`SqlState::migrate`].
    pub migrate: bool,
}

impl Default for SqlOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(30),
            migrate: true,
        }
    }
}

/// A migrated SQL database and its connection pool; cheap to clone.
#[derive(Clone)]
pub struct SqlState {
    pool: AnyPool,
    engine: Engine,
    /// The URL without credentials, for logs and `Display`.
    shown: String,
    /// This process's instance: a random key, and (PostgreSQL) the
    /// connection holding the session-level advisory lock on it for as
    /// long as the process lives, so other gateways can tell its leases
    /// from those of a dead one (see `SqlSessionStore::reserve_range`).
    instance: Arc<Instance>,
}

/// This process's turn to write to a SQLite database (see
/// [`SqlState::begin_write`]); ends when dropped.
#[derive(Debug)]
pub struct WriteTurn {
    _held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// See [`SqlState`]'s `instance`.
pub(crate) struct Instance {
    pub(crate) key: i64,
    _lock: tokio::sync::Mutex<Option<sqlx::AnyConnection>>,
    /// SQLite: whose turn it is to write (see [`SqlState::begin_write`]).
    writer: Arc<tokio::sync::Mutex<()>>,
    /// SQLite: the range reservations of this process (one gateway per
    /// SQLite file), by session and file.
    pub(crate) local_leases: std::sync::Mutex<LocalLeases>,
}

/// SQLite's in-process range reservations: by session and file, each
/// range with its holder and the end of its lease.
pub(crate) type LocalLeases = std::collections::HashMap<
    (relaypacs_core::SessionId, relaypacs_core::FileId),
    Vec<(std::ops::Range<u64>, String, time::OffsetDateTime)>,
>;

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlState")
            .field("engine", &self.engine)
            .field("url", &self.shown)
            .finish()
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A sqlx error as a storage error: lost connections and pool timeouts may
/// pass with a retry, everything else is an I/O error of the database.
pub(crate) fn db_err(op: &'static str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StorageErrorKind::Unavailable
        }
        sqlx::Error::Database(d) if d.message().contains("full") => StorageErrorKind::Full,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StorageErrorKind::Corrupt,
        _ => StorageErrorKind::Io,
    };
    Error::storage(kind, op, e)
}

/// A stored value that does not parse: the database holds something this
/// gateway did not write.
pub(crate) fn corrupt(op: &'static str, what: impl fmt::Display) -> Error {
    Error::storage(StorageErrorKind::Corrupt, op, what.to_string())
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            // Setting a password only fails on URLs without a host, which
            // cannot carry one: the unredacted form then has none to show.
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

impl SqlState {
    /// Connect to `url` (`sqlite://PATH` or `postgres://…`), creating a
    /// SQLite file if missing, and migrate the schema. `password`, when
    /// given, replaces the URL's (so it can come from a file or the
    /// environment and never appear in a configuration file or a log).
    ///
    /// Migrations are embedded in the binary and run under a lock:
    /// PostgreSQL's advisory lock (several gateways starting at once run
    /// them once), SQLite's write lock.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        options: &SqlOptions,
    ) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Engine::Postgres
        } else {
            return Err(Error::invalid(
                "RELAY_STATE_URL",
                "the state URL must start with sqlite: or postgres:",
            ));
        };
        let mut parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid("RELAY_STATE_URL", format!("state URL: {e}")))?;
        if let Some(p) = password {
            parsed
                .set_password(Some(p))
                .map_err(|()| Error::invalid("RELAY_STATE_URL", "this URL takes no password"))?;
        }
        if engine == Engine::Sqlite && !parsed.query_pairs().any(|(k, _)| k == "mode") {
            parsed.query_pairs_mut().append_pair("mode", "rwc");
        }
        let shown = redact(url);
        let connect = AnyConnectOptions::from_url(&parsed)
            .map_err(|e| Error::invalid("RELAY_STATE_URL", format!("state URL: {e}")))?
            .disable_statement_logging();
        let timeout_ms = options.statement_timeout.as_millis();
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            // SQLite's connections are files of this process: a ping before
            // each lease costs a round trip to the connection's worker
            // thread per transaction (several per tus PATCH) and would find
            // nothing the transaction itself does not. A PostgreSQL
            // connection can die with the server or the network: pinged.
            .test_before_acquire(engine == Engine::Postgres)
            // SQLite: every connection is opened below, at start, and kept
            // (a connection of a file costs nothing idle). Each has a
            // worker thread, started by the task that opens it and
            // inheriting that thread's CPU priority: opened here, none can
            // be started later by a lower-priority thread (the reference
            // server's delivery worker) and slow every request that then
            // gets it.
            .min_connections(if engine == Engine::Sqlite {
                options.max_connections.max(1)
            } else {
                0
            })
            // PostgreSQL keeps sqlx's defaults (10 min idle, 30 min life).
            .idle_timeout((engine == Engine::Postgres).then_some(Duration::from_secs(600)))
            .max_lifetime((engine == Engine::Postgres).then_some(Duration::from_secs(1800)))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match engine {
                        // WAL: readers never block the writer; FULL: a
                        // commit is on disk when it returns (crash-safe
                        // point of every SQLite store).
                        Engine::Sqlite => {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute("PRAGMA synchronous = FULL").await?;
                            conn.execute(&*format!("PRAGMA busy_timeout = {timeout_ms}"))
                                .await?;
                        }
                        Engine::Postgres => {
                            conn.execute(&*format!("SET statement_timeout = {timeout_ms}"))
                                .await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_with(connect)
            .await
            .map_err(|e| db_err("connect to the state database", e))?;
        if engine == Engine::Sqlite {
            // Every connection opened now, from the caller's thread (see
            // `min_connections` above), then back in the pool.
            let mut held = Vec::new();
            for _ in 0..options.max_connections.max(1) {
                held.push(
                    pool.acquire()
                        .await
                        .map_err(|e| db_err("connect to the state database", e))?,
                );
            }
            drop(held);
        }
        let key = i64::from_le_bytes(rand::random::<[u8; 8]>());
        let lock = match engine {
            // Held on a connection of its own, outside the pool, until the
            // process ends (PostgreSQL then releases it at once).
            Engine::Postgres => {
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(|e| db_err("connect to the state database", e))?
                    .detach();
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| db_err("take the instance lock", e))?;
                Some(conn)
            }
            Engine::Sqlite => None,
        };
        let state = Self {
            pool,
            engine,
            shown,
            instance: Arc::new(Instance {
                key,
                _lock: tokio::sync::Mutex::new(lock),
                writer: Arc::new(tokio::sync::Mutex::new(())),
                local_leases: std::sync::Mutex::new(Default::default()),
            }),
        };
        if options.migrate {
            state.migrate().await?;
        } else {
            state.check_schema().await?;
        }
        Ok(state)
    }

    /// This engine's embedded migrations.
    fn migrator(&self) -> sqlx::migrate::Migrator {
        match self.engine {
            Engine::Sqlite => sqlx::migrate!("./migrations/sqlite"),
            Engine::Postgres => sqlx::migrate!("./migrations/postgres"),
        }
    }

    /// Run the embedded migrations not yet applied (under the engine's
    /// lock); what [`connect`](Self::connect) does unless
    /// [`SqlOptions::migrate`] is off. Returns the schema version.
    pub async fn migrate(&self) -> Result<i64, Error> {
        let migrator = self.migrator();
        let result = migrator.run(&self.pool).await;
        result.map_err(|e| {
            Error::storage(
                StorageErrorKind::Io,
                "migrate the state database",
                e.to_string(),
            )
        })?;
        Ok(Self::latest(&migrator))
    }

    fn latest(migrator: &sqlx::migrate::Migrator) -> i64 {
        migrator.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Check, without changing anything, that the schema is this build's:
    /// every embedded migration applied (same checksum) and none unknown.
    /// Returns the version; the error names what differs and what to run.
    pub async fn check_schema(&self) -> Result<i64, Error> {
        const OP: &str = "check the state database schema";
        let migrator = self.migrator();
        let expected = Self::latest(&migrator);
        let refuse = |why: String| {
            Error::storage(
                StorageErrorKind::Corrupt,
                OP,
                format!(
                    "{why}; this relaypacs expects schema version {expected}: run                      `relaypacs migrate` as the database owner (or set [state] migrate = true)"
                ),
            )
        };
        let rows = sqlx::query(
            "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| refuse(format!("the migrations table cannot be read ({e})")))?;
        let mut applied = std::collections::BTreeMap::new();
        for row in &rows {
            use sqlx::Row;
            let version: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
            let checksum: Vec<u8> = row.try_get(1).map_err(|e| db_err(OP, e))?;
            applied.insert(version, checksum);
        }
        for m in migrator.iter() {
            match applied.remove(&m.version) {
                None => {
                    return Err(refuse(format!(
                        "migration {} ({}) is not applied",
                        m.version, m.description
                    )));
                }
                Some(sum) if sum != *m.checksum => {
                    return Err(refuse(format!(
                        "migration {} ({}) was applied with other content",
                        m.version, m.description
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some((v, _)) = applied.pop_last() {
            return Err(refuse(format!(
                "the database holds migration {v}, unknown to this build (a newer relaypacs                  migrated it)"
            )));
        }
        Ok(expected)
    }

    /// A transaction that will write, and on SQLite this process's turn
    /// to write, held until both are dropped (after the commit).
    ///
    /// SQLite admits one writer at a time and makes the others wait in its
    /// busy handler, which polls by sleeping 1, 2, 5, 10 ms and longer:
    /// with ingest and delivery writing at once, each collision cost a
    /// request at least a millisecond of sleep after the lock was free
    /// again. Writers of this process (the only one on a SQLite file: the
    /// data folder is locked) queue here instead, first come first
    /// served, and each starts as soon as the previous one commits; the
    /// busy handler stays the guard against other processes (a CLI
    /// command) and for the few single-statement writes made outside a
    /// transaction (a login's counters, a claim's release), which take no
    /// turn. Hand-written: sqlx's pool has no writer queue. On
    /// PostgreSQL (row locks, many writers) there is no turn to take.
    ///
    /// A holder must not start another write transaction before dropping
    /// this one (the turn is not reentrant).
    pub async fn begin_write(
        &self,
        op: &'static str,
    ) -> Result<(WriteTurn, sqlx::Transaction<'static, sqlx::Any>), Error> {
        let turn = match self.engine {
            Engine::Sqlite => Some(self.instance.writer.clone().lock_owned().await),
            Engine::Postgres => None,
        };
        let tx = self.pool.begin().await.map_err(|e| db_err(op, e))?;
        Ok((WriteTurn { _held: turn }, tx))
    }

    /// The pool, for stores built on this database.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// This process's instance (leases, liveness).
    pub(crate) fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Which engine this is.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Close every connection (at shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
