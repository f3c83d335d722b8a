//! [`SqlUserStore`]: accounts in the state database's `users` table
//! (SQLite or PostgreSQL), shared by every gateway on that database.

use std::fmt;

use async_trait::async_trait;
use relaypacs_core::{Error, Result, StorageErrorKind};
use relaypacs_storage::SqlState;
use sqlx::Row;
use sqlx::any::AnyRow;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::users::{Role, UserRecord, UserStore};

/// A [`UserStore`] on a [`SqlState`] database.
///
/// One row per account. The username's lowercase form (computed here, as
/// Rust lowercases Unicode and SQLite's `lower()` only ASCII) has a unique
/// index, so [`create`](UserStore::create) of a taken name fails with
/// [`Error::AlreadyExists`] atomically, whichever gateway tries. Every call
/// is one statement, durable when it returns (see [`SqlState`]).
/// `totp_last_step` only ever rises: [`update`](UserStore::update) keeps the
/// stored step when it is newer, and
/// [`accept_totp_step`](UserStore::accept_totp_step) is a conditional
/// update, so a TOTP code accepted by one gateway is refused by all. The
/// API's account changes (password, TOTP enrolment) are conditional
/// UPDATEs of their own columns, so changes on two gateways both hold.
#[derive(Clone, Debug)]
pub struct SqlUserStore {
    db: SqlState,
}

impl fmt::Display for SqlUserStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sql users ({})", self.db)
    }
}

/// A database error as a storage error (lost connections and pool timeouts
/// may pass with a retry).
pub(crate) fn db_err(op: &'static str, e: sqlx::Error) -> Error {
    let kind = match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StorageErrorKind::Unavailable
        }
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StorageErrorKind::Corrupt,
        _ => StorageErrorKind::Io,
    };
    Error::storage(kind, op, e)
}

fn corrupt(op: &'static str, what: impl fmt::Display) -> Error {
    Error::storage(StorageErrorKind::Corrupt, op, what.to_string())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Uploader => "uploader",
        Role::Radiologist => "radiologist",
        Role::Admin => "admin",
    }
}

fn time_text(t: OffsetDateTime) -> Result<String> {
    t.format(&Rfc3339)
        .map_err(|e| corrupt("encode user time", e))
}

fn step_i64(step: u64) -> Result<i64> {
    i64::try_from(step).map_err(|_| Error::invalid("RELAY_TOTP", "TOTP step beyond 2^63"))
}

const COLUMNS: &str = "id, username, role, password_hash, totp, totp_pending, totp_last_step, \
                       disabled, tokens_valid_after, created_at";

fn from_row(r: &AnyRow) -> Result<UserRecord> {
    const OP: &str = "load user";
    let get = |i: usize| r.try_get::<String, _>(i).map_err(|e| db_err(OP, e));
    let opt = |i: usize| r.try_get::<Option<String>, _>(i).map_err(|e| db_err(OP, e));
    let int = |i: usize| r.try_get::<i64, _>(i).map_err(|e| db_err(OP, e));
    let when = |i: usize| {
        OffsetDateTime::parse(&get(i)?, &Rfc3339).map_err(|e| corrupt(OP, format!("time: {e}")))
    };
    Ok(UserRecord {
        id: get(0)?,
        username: get(1)?,
        role: get(2)?.parse().map_err(|e: String| corrupt(OP, e))?,
        password_hash: get(3)?,
        totp: opt(4)?,
        totp_pending: opt(5)?,
        totp_last_step: u64::try_from(int(6)?).map_err(|_| corrupt(OP, "negative TOTP step"))?,
        disabled: int(7)? != 0,
        tokens_valid_after: when(8)?,
        created_at: when(9)?,
    })
}

impl SqlUserStore {
    /// A user store on `db` (already migrated by [`SqlState::connect`]).
    pub fn new(db: SqlState) -> Self {
        Self { db }
    }

    async fn one(&self, column: &str, value: &str) -> Result<Option<UserRecord>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE {column} = $1"))
            .bind(value)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| db_err("load user", e))?;
        row.as_ref().map(from_row).transpose()
    }
}

#[async_trait]
impl UserStore for SqlUserStore {
    async fn create(&self, user: UserRecord) -> Result<()> {
        // DO NOTHING on any unique conflict (id or name): one statement,
        // so two gateways creating one name at once see one insert.
        let done = sqlx::query(
            "INSERT INTO users (id, username, name_key, role, password_hash, totp, \
             totp_pending, totp_last_step, disabled, tokens_valid_after, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(user.username.to_lowercase())
        .bind(role_name(user.role))
        .bind(&user.password_hash)
        .bind(user.totp.clone())
        .bind(user.totp_pending.clone())
        .bind(step_i64(user.totp_last_step)?)
        .bind(i64::from(user.disabled))
        .bind(time_text(user.tokens_valid_after)?)
        .bind(time_text(user.created_at)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("create user", e))?;
        if done.rows_affected() == 0 {
            return Err(Error::AlreadyExists { what: "user" });
        }
        Ok(())
    }

    async fn by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        self.one("name_key", &username.to_lowercase()).await
    }

    async fn by_id(&self, id: &str) -> Result<Option<UserRecord>> {
        self.one("id", id).await
    }

    async fn by_id_in_live_family(&self, id: &str, family: &str) -> Result<Option<UserRecord>> {
        // Every column is the user's: the family only filters.
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM users WHERE id = $1 AND EXISTS \
             (SELECT 1 FROM refresh_families f WHERE f.id = $2 AND f.user_id = $1 \
             AND f.revoked = 0)"
        ))
        .bind(id)
        .bind(family)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err("load user", e))?;
        row.as_ref().map(from_row).transpose()
    }

    async fn update(&self, user: UserRecord) -> Result<()> {
        let done = sqlx::query(
            "UPDATE users SET username = $2, name_key = $3, role = $4, password_hash = $5, \
             totp = $6, totp_pending = $7, \
             totp_last_step = CASE WHEN totp_last_step > $8 THEN totp_last_step ELSE $8 END, \
             disabled = $9, tokens_valid_after = $10 WHERE id = $1",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(user.username.to_lowercase())
        .bind(role_name(user.role))
        .bind(&user.password_hash)
        .bind(user.totp.clone())
        .bind(user.totp_pending.clone())
        .bind(step_i64(user.totp_last_step)?)
        .bind(i64::from(user.disabled))
        .bind(time_text(user.tokens_valid_after)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                Error::AlreadyExists { what: "user" }
            } else {
                db_err("update user", e)
            }
        })?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound { what: "user" });
        }
        Ok(())
    }

    async fn accept_totp_step(&self, id: &str, step: u64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $2 WHERE id = $1 AND totp_last_step < $2",
        )
        .bind(id)
        .bind(step_i64(step)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("accept TOTP step", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn rehash_password(&self, id: &str, old: &str, new: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2")
                .bind(id)
                .bind(old)
                .bind(new)
                .execute(self.db.pool())
                .await
                .map_err(|e| db_err("rehash password", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn change_password(
        &self,
        id: &str,
        old: &str,
        new: &str,
        tokens_valid_after: OffsetDateTime,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET password_hash = $3, tokens_valid_after = $4 \
             WHERE id = $1 AND password_hash = $2",
        )
        .bind(id)
        .bind(old)
        .bind(new)
        .bind(time_text(tokens_valid_after)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("change password", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn begin_totp(&self, id: &str, sealed: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE users SET totp_pending = $2 WHERE id = $1 AND totp IS NULL")
            .bind(id)
            .bind(sealed)
            .execute(self.db.pool())
            .await
            .map_err(|e| db_err("begin TOTP enrolment", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn confirm_totp(&self, id: &str, sealed: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET totp = $2, totp_pending = NULL \
             WHERE id = $1 AND totp_pending = $2",
        )
        .bind(id)
        .bind(sealed)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("confirm TOTP enrolment", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_disabled(
        &self,
        id: &str,
        disabled: bool,
        tokens_valid_after: OffsetDateTime,
    ) -> Result<bool> {
        // Disabling moves tokens_valid_after; enabling leaves it.
        let done = sqlx::query(
            "UPDATE users SET disabled = $2, \
             tokens_valid_after = CASE WHEN $2 = 1 THEN $3 ELSE tokens_valid_after END \
             WHERE id = $1 AND disabled <> $2",
        )
        .bind(id)
        .bind(i64::from(disabled))
        .bind(time_text(tokens_valid_after)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("disable or enable user", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn reset_totp(&self, id: &str, tokens_valid_after: OffsetDateTime) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET totp = NULL, totp_pending = NULL, tokens_valid_after = $2 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(time_text(tokens_valid_after)?)
        .execute(self.db.pool())
        .await
        .map_err(|e| db_err("reset TOTP", e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn list(&self) -> Result<Vec<UserRecord>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM users ORDER BY id"))
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| db_err("list users", e))?;
        rows.iter().map(from_row).collect()
    }
}
