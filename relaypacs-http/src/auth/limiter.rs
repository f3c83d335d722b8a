//! Login throttling: a sliding window per client address and failure
//! counting with exponential lockout per account.
//!
//! Written by hand because rate-limit crates (governor and friends) count
//! requests, not *failures*, and have no notion of a lockout that grows
//! with consecutive failures and resets on success.
//!
//! State lives in the state database (tables of migration `0007_guards`),
//! so a lockout holds on every gateway sharing it and survives a restart.
//! Every count that decides is atomic across gateways: an attempt upserts
//! its address's row first (PostgreSQL row lock, SQLite write lock) and
//! only then counts the window and inserts; a failure increments the
//! account's counter in one upsert (`consecutive = consecutive + 1`), so two
//! gateways counting failures at once both count. Rows past their window
//! are deleted by [`LoginLimiter::sweep`], run at most once a minute per
//! gateway from [`LoginLimiter::attempt_from`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use relaypacs_core::Result;
use relaypacs_storage::{Engine, SqlState};
use sqlx::Row;
use time::OffsetDateTime;

use super::sql_users::db_err;

/// Limits (see [`crate::config::AuthConfig`]).
#[derive(Clone, Copy, Debug)]
pub struct LimiterConfig {
    /// Attempts per address per minute.
    pub per_address_per_minute: u32,
    /// Consecutive failures before lockout.
    pub lockout_after: u32,
    /// Failures per account per hour.
    pub max_failures_per_hour: u32,
    /// Longest lockout.
    pub max_lockout: Duration,
}

/// The limiter, on the state database.
#[derive(Debug)]
pub struct LoginLimiter {
    cfg: LimiterConfig,
    db: SqlState,
    /// When this gateway last swept expired rows (Unix ms).
    last_sweep: AtomicI64,
}

/// A refusal: come back after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

/// The per-address window.
const MINUTE_MS: i64 = 60_000;
/// The per-account failure budget's window.
const HOUR_MS: i64 = 3_600_000;
/// How long an account's consecutive-failure count is kept after its last
/// failure, once no lockout is in force: a day, so waiting out an hour
/// does not reset the exponential growth.
const ACCOUNT_KEPT_MS: i64 = 24 * HOUR_MS;

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Whole seconds until `t`, plus one (as `Retry-After`).
fn secs_until(t: i64, now: i64) -> u64 {
    u64::try_from(t.saturating_sub(now).max(0) / 1000).unwrap_or(0) + 1
}

/// The lockout after `consecutive` failures (at least `lockout_after`):
/// 1 s doubling with each further failure, at most `max_lockout`.
fn backoff_ms(cfg: &LimiterConfig, consecutive: i64) -> i64 {
    let over = consecutive.saturating_sub(i64::from(cfg.lockout_after));
    let exp = u32::try_from(over.clamp(0, 20)).unwrap_or(20);
    let backoff = Duration::from_secs(1u64 << exp).min(cfg.max_lockout);
    i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX)
}

impl LoginLimiter {
    /// A limiter keeping its counts in `db` (already migrated).
    pub fn new(cfg: LimiterConfig, db: SqlState) -> Self {
        Self {
            cfg,
            db,
            last_sweep: AtomicI64::new(0),
        }
    }

    /// Count an attempt from `address`; refuse when over the per-minute
    /// limit (a refused attempt is not counted). `Err`: the database could
    /// not be asked.
    pub async fn attempt_from(&self, address: &str) -> Result<std::result::Result<(), RetryAfter>> {
        const OP: &str = "count a login attempt";
        let now = now_ms();
        self.maybe_sweep(now).await?;
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        if self.db.engine() == Engine::Postgres {
            // A throttling counter, not acknowledged data: no wait for the
            // WAL flush (a crash forgets at most a minute's window).
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await
                .map_err(|e| db_err(OP, e))?;
        }
        // First statement, a write: the address's row lock (PostgreSQL) or
        // the database's write lock (SQLite) until the commit, so the count
        // below and the insert are one step on every gateway.
        sqlx::query(
            "INSERT INTO login_addresses (address, last_at) VALUES ($1, $2) \
             ON CONFLICT (address) DO UPDATE SET last_at = excluded.last_at",
        )
        .bind(address)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        sqlx::query("DELETE FROM login_attempts WHERE address = $1 AND at <= $2")
            .bind(address)
            .bind(now - MINUTE_MS)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(MIN(at), 0) FROM login_attempts WHERE address = $1",
        )
        .bind(address)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        let count: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
        let oldest: i64 = row.try_get(1).map_err(|e| db_err(OP, e))?;
        if count >= i64::from(self.cfg.per_address_per_minute) {
            tx.commit().await.map_err(|e| db_err(OP, e))?;
            return Ok(Err(RetryAfter(secs_until(oldest + MINUTE_MS, now))));
        }
        sqlx::query("INSERT INTO login_attempts (address, at) VALUES ($1, $2)")
            .bind(address)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(Ok(()))
    }

    /// Whether `account` may try now: not locked out, and under its hourly
    /// failure budget. `Err`: the database could not be asked.
    pub async fn check_account(
        &self,
        account: &str,
    ) -> Result<std::result::Result<(), RetryAfter>> {
        const OP: &str = "check a login lockout";
        let now = now_ms();
        let locked: Option<i64> =
            sqlx::query("SELECT locked_until FROM login_accounts WHERE account = $1")
                .bind(account)
                .fetch_optional(self.db.pool())
                .await
                .map_err(|e| db_err(OP, e))?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(|e| db_err(OP, e))?;
        if let Some(until) = locked
            && until > now
        {
            return Ok(Err(RetryAfter(secs_until(until, now))));
        }
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(MIN(at), 0) FROM login_failures \
             WHERE account = $1 AND at > $2",
        )
        .bind(account)
        .bind(now - HOUR_MS)
        .fetch_one(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        let count: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
        let oldest: i64 = row.try_get(1).map_err(|e| db_err(OP, e))?;
        if count >= i64::from(self.cfg.max_failures_per_hour) {
            return Ok(Err(RetryAfter(secs_until(oldest + HOUR_MS, now))));
        }
        Ok(Ok(()))
    }

    /// Record a failure, durable when this returns; `Ok(true)` when this
    /// failure reached the lockout threshold (a lockout starts or grows).
    pub async fn failed(&self, account: &str) -> Result<bool> {
        const OP: &str = "count a login failure";
        let now = now_ms();
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        // One upsert increments the counter under the row lock (PostgreSQL)
        // or the write lock (SQLite): concurrent failures on any gateways
        // are all counted, and the lockout below is set under that lock.
        let row = sqlx::query(
            "INSERT INTO login_accounts (account, consecutive, locked_until, last_failure) \
             VALUES ($1, 1, 0, $2) ON CONFLICT (account) DO UPDATE SET \
             consecutive = login_accounts.consecutive + 1, last_failure = excluded.last_failure \
             RETURNING consecutive",
        )
        .bind(account)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        let consecutive: i64 = row.try_get(0).map_err(|e| db_err(OP, e))?;
        let locked = consecutive >= i64::from(self.cfg.lockout_after);
        if locked {
            let until = now.saturating_add(backoff_ms(&self.cfg, consecutive));
            // Never shortens a lockout in force.
            sqlx::query(
                "UPDATE login_accounts SET locked_until = $1 \
                 WHERE account = $2 AND locked_until < $1",
            )
            .bind(until)
            .bind(account)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        }
        sqlx::query("INSERT INTO login_failures (account, at) VALUES ($1, $2)")
            .bind(account)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        sqlx::query("DELETE FROM login_failures WHERE account = $1 AND at <= $2")
            .bind(account)
            .bind(now - HOUR_MS)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        // Crash-safe point: the commit (a lockout survives a restart).
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(locked)
    }

    /// Record a success: consecutive failures and the lockout are cleared
    /// (the hourly failure budget is kept).
    pub async fn succeeded(&self, account: &str) -> Result<()> {
        sqlx::query(
            "UPDATE login_accounts SET consecutive = 0, locked_until = 0 WHERE account = $1",
        )
        .bind(account)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("clear login failures", e))?;
        Ok(())
    }

    /// Delete rows past their window: attempts older than a minute,
    /// failures older than an hour, accounts with no lockout in force and
    /// no failure for [`ACCOUNT_KEPT_MS`]. Plain DELETEs by time: safe on
    /// every gateway at once.
    pub async fn sweep(&self) -> Result<()> {
        const OP: &str = "sweep the login limiter";
        let now = now_ms();
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        for (sql, cut) in [
            ("DELETE FROM login_attempts WHERE at <= $1", now - MINUTE_MS),
            (
                "DELETE FROM login_addresses WHERE last_at <= $1",
                now - MINUTE_MS,
            ),
            ("DELETE FROM login_failures WHERE at <= $1", now - HOUR_MS),
            (
                "DELETE FROM login_accounts WHERE last_failure <= $1 AND locked_until <= $2",
                now - ACCOUNT_KEPT_MS,
            ),
        ] {
            let q = sqlx::query(sql).bind(cut);
            let q = if sql.contains("$2") { q.bind(now) } else { q };
            q.execute(&mut *tx).await.map_err(|e| db_err(OP, e))?;
        }
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(())
    }

    /// [`sweep`](Self::sweep) if this gateway has not for a minute (one
    /// caller wins the compare-and-swap; the others go on).
    async fn maybe_sweep(&self, now: i64) -> Result<()> {
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < MINUTE_MS
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        self.sweep().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

    use super::*;

    fn cfg() -> LimiterConfig {
        LimiterConfig {
            per_address_per_minute: 3,
            lockout_after: 2,
            max_failures_per_hour: 5,
            max_lockout: Duration::from_secs(600),
        }
    }

    async fn limiter(dir: &tempfile::TempDir) -> LoginLimiter {
        let url = format!("sqlite://{}", dir.path().join("state.db").display());
        let db = SqlState::connect(&url, None, &relaypacs_storage::SqlOptions::default())
            .await
            .unwrap();
        LoginLimiter::new(cfg(), db)
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let c = cfg();
        assert_eq!(backoff_ms(&c, 2), 1000);
        assert_eq!(backoff_ms(&c, 3), 2000);
        assert_eq!(backoff_ms(&c, 5), 8000);
        assert_eq!(backoff_ms(&c, 40), 600_000);
        assert_eq!(secs_until(1500, 1000), 1);
        assert_eq!(secs_until(0, 1000), 1);
    }

    #[tokio::test]
    async fn address_window_and_account_lockout() {
        let dir = tempfile::TempDir::new().unwrap();
        let l = limiter(&dir).await;
        for _ in 0..3 {
            assert_eq!(l.attempt_from("10.0.0.1").await.unwrap(), Ok(()));
        }
        let r = l.attempt_from("10.0.0.1").await.unwrap().unwrap_err();
        assert!((1..=61).contains(&r.0), "{r:?}");
        assert_eq!(l.attempt_from("10.0.0.2").await.unwrap(), Ok(()));

        assert_eq!(l.check_account("eve").await.unwrap(), Ok(()));
        assert!(!l.failed("eve").await.unwrap());
        assert_eq!(l.check_account("eve").await.unwrap(), Ok(()));
        assert!(l.failed("eve").await.unwrap());
        assert!(l.check_account("eve").await.unwrap().is_err());
        assert_eq!(l.check_account("bob").await.unwrap(), Ok(()));
        // A success clears the lockout, not the hourly budget.
        l.succeeded("eve").await.unwrap();
        assert_eq!(l.check_account("eve").await.unwrap(), Ok(()));
        for _ in 0..3 {
            l.failed("eve").await.unwrap();
            l.succeeded("eve").await.unwrap();
        }
        let r = l.check_account("eve").await.unwrap().unwrap_err();
        assert!(r.0 > 3000, "hourly budget spent: {r:?}");
        // The sweep keeps what is still in its window.
        l.sweep().await.unwrap();
        assert!(l.check_account("eve").await.unwrap().is_err());
        assert!(l.attempt_from("10.0.0.1").await.unwrap().is_err());
    }

    /// Rows past their window are swept; those inside are kept.
    #[tokio::test]
    async fn sweep_deletes_expired_rows() {
        let dir = tempfile::TempDir::new().unwrap();
        let l = limiter(&dir).await;
        let now = now_ms();
        let old = now - 2 * ACCOUNT_KEPT_MS;
        for sql in [
            "INSERT INTO login_addresses (address, last_at) VALUES ('old', $1)",
            "INSERT INTO login_attempts (address, at) VALUES ('old', $1)",
            "INSERT INTO login_failures (account, at) VALUES ('old', $1)",
            "INSERT INTO login_accounts (account, consecutive, locked_until, last_failure) \
             VALUES ('old', 9, 0, $1)",
        ] {
            sqlx::query(sql)
                .bind(old)
                .execute(l.db.pool())
                .await
                .unwrap();
        }
        l.attempt_from("new").await.unwrap().unwrap();
        l.failed("new").await.unwrap();
        l.sweep().await.unwrap();
        for table in [
            "login_addresses",
            "login_attempts",
            "login_failures",
            "login_accounts",
        ] {
            let rows = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
                .fetch_one(l.db.pool())
                .await
                .unwrap();
            assert_eq!(rows.try_get::<i64, _>(0).unwrap(), 1, "{table}");
        }
    }
}
