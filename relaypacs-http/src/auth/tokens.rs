//! Access tokens (JWT, HS256 pinned, `iss`/`aud`/`exp`/`nbf` checked,
//! `typ: at+jwt`), opaque refresh tokens rotated in families with reuse
//! detection, and single-use event-stream tickets.
//!
//! Event-stream tickets are in the database too (`event_tickets`): issued
//! on one gateway, redeemed once on any.
//!
//! Refresh families live in the state database (`refresh_families`, and
//! `refresh_rotated` for rotated-out token digests), so a rotation, a
//! reuse and a revocation hold on every gateway sharing it. [`Tokens`]
//! speaks SQL on [`SqlState`] directly rather than through a store trait:
//! the atomicity it needs (rotate only if the presented token is still
//! current; revoke once) is the conditional UPDATE itself, and the SQL
//! database is the one place families are kept.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use relaypacs_core::{Error, Result};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use relaypacs_storage::SqlState;
use sqlx::Row;

use super::sql_users::db_err;
use super::users::Role;

/// Claims of an access token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Role at issue time.
    pub role: Role,
    /// Refresh family (login) this token belongs to; revoked with it.
    pub sid: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Issued at (seconds).
    pub iat: i64,
    /// Not before (seconds).
    pub nbf: i64,
    /// Expiry (seconds).
    pub exp: i64,
    /// Token id.
    pub jti: String,
}

/// Why a refresh failed.
#[derive(Debug, PartialEq, Eq)]
pub enum RefreshError {
    /// Unknown, expired or revoked token.
    Invalid,
    /// A rotated-out token came back: the family is now revoked.
    Reused {
        /// The revoked family's user.
        user: String,
    },
}

/// Issues and checks tokens.
pub struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    access_ttl: u64,
    refresh_idle: u64,
    refresh_absolute: u64,
    db: SqlState,
}

/// One login's tokens.
#[derive(Clone, Debug, Serialize)]
pub struct TokenPair {
    /// JWT access token.
    pub access_token: String,
    /// Opaque refresh token (rotated at every use).
    pub refresh_token: String,
    /// Always "Bearer".
    pub token_type: &'static str,
    /// Access token lifetime in seconds.
    pub expires_in: u64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys and token digests stay out of debug output.
        f.debug_struct("Tokens")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn random_token(prefix: &str) -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(raw))
}

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Settings for [`Tokens::new`].
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Access token lifetime.
    pub access_ttl_secs: u64,
    /// Refresh idle timeout.
    pub refresh_idle_secs: u64,
    /// Refresh absolute lifetime.
    pub refresh_absolute_secs: u64,
    /// `iss`.
    pub issuer: String,
    /// `aud`.
    pub audience: String,
}

/// Seconds as a signed duration, saturating (settings are u64).
fn secs(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX)
}

impl Tokens {
    /// Keys derived from the server secret; families kept in `db`.
    pub fn new(secret: &SecretString, settings: TokenSettings, db: SqlState) -> Result<Self> {
        // Domain-separated key: the secret also keys TOTP encryption.
        let key = Sha256::new()
            .chain_update(b"relaypacs/jwt/v1\0")
            .chain_update(secret.expose_secret().as_bytes())
            .finalize();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_issuer(&[settings.issuer.as_str()]);
        validation.set_audience(&[settings.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        Ok(Self {
            enc: EncodingKey::from_secret(&key),
            dec: DecodingKey::from_secret(&key),
            validation,
            issuer: settings.issuer,
            audience: settings.audience,
            access_ttl: settings.access_ttl_secs,
            refresh_idle: settings.refresh_idle_secs,
            refresh_absolute: settings.refresh_absolute_secs,
            db,
        })
    }

    fn access(&self, user: &str, role: Role, family: &str) -> Result<String> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            sub: user.to_string(),
            role,
            sid: family.to_string(),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + i64::try_from(self.access_ttl).unwrap_or(900),
            jti: random_token(""),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, &claims, &self.enc).map_err(|e| Error::Invalid {
            code: "RELAY_TOKEN",
            message: e.to_string(),
        })
    }

    /// A new login: a new family with its first refresh token, durable
    /// when this returns. Families past their absolute lifetime are
    /// dropped in the same transaction (they can no longer be used).
    pub async fn login(&self, user: &str, role: Role) -> Result<TokenPair> {
        const OP: &str = "store refresh family";
        let family = random_token("");
        let refresh = random_token("rt_");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let cut = now.saturating_sub(secs(self.refresh_absolute));
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        sqlx::query(
            "INSERT INTO refresh_families (id, user_id, current_hash, created_at, last_used, \
             revoked) VALUES ($1, $2, $3, $4, $4, 0)",
        )
        .bind(&family)
        .bind(user)
        .bind(digest(&refresh))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        sqlx::query(
            "DELETE FROM refresh_rotated WHERE family_id IN \
             (SELECT id FROM refresh_families WHERE created_at < $1)",
        )
        .bind(cut)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err(OP, e))?;
        sqlx::query("DELETE FROM refresh_families WHERE created_at < $1")
            .bind(cut)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(TokenPair {
            access_token: self.access(user, role, &family)?,
            refresh_token: refresh,
            token_type: "Bearer",
            expires_in: self.access_ttl,
        })
    }

    /// Rotate `refresh`: the old token stops working, a reused old token
    /// revokes the whole family. `role_of` gives the role of the family's
    /// user (`None`: unknown or disabled, the refresh fails).
    ///
    /// Atomic across gateways: the new token replaces the old only if the
    /// old is still the family's current one and the family is not revoked
    /// (a conditional UPDATE); of two rotations of one token, one succeeds
    /// and the other finds a rotated-out token, which revokes the family,
    /// as a second use does on one gateway. A database failure is
    /// [`RefreshError::Invalid`] (fail closed) and is logged here.
    pub async fn refresh(
        &self,
        refresh: &str,
        role_of: impl FnOnce(&str) -> Option<Role>,
    ) -> std::result::Result<(TokenPair, String), RefreshError> {
        match self.try_refresh(refresh, role_of).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "refresh token check failed");
                Err(RefreshError::Invalid)
            }
        }
    }

    async fn try_refresh(
        &self,
        refresh: &str,
        role_of: impl FnOnce(&str) -> Option<Role>,
    ) -> Result<std::result::Result<(TokenPair, String), RefreshError>> {
        const OP: &str = "rotate refresh token";
        let h = digest(refresh);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let row = sqlx::query(
            "SELECT id, user_id, created_at, last_used, revoked FROM refresh_families \
             WHERE current_hash = $1",
        )
        .bind(&h)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        if let Some(row) = row {
            let get = |e| db_err(OP, e);
            let id: String = row.try_get(0).map_err(get)?;
            let user: String = row.try_get(1).map_err(get)?;
            let created: i64 = row.try_get(2).map_err(get)?;
            let last_used: i64 = row.try_get(3).map_err(get)?;
            let revoked: i64 = row.try_get(4).map_err(get)?;
            if revoked != 0
                || last_used.saturating_add(secs(self.refresh_idle)) < now
                || created.saturating_add(secs(self.refresh_absolute)) < now
            {
                return Ok(Err(RefreshError::Invalid));
            }
            let Some(role) = role_of(&user) else {
                return Ok(Err(RefreshError::Invalid));
            };
            let new_refresh = random_token("rt_");
            // The UPDATE comes first in the transaction: it takes the write
            // lock at once (SQLite) or the row lock (PostgreSQL), so the
            // check "still current, not revoked" and the swap are one step.
            let (_turn, mut tx) = self.db.begin_write(OP).await?;
            let done = sqlx::query(
                "UPDATE refresh_families SET current_hash = $1, last_used = $2 \
                 WHERE id = $3 AND current_hash = $4 AND revoked = 0",
            )
            .bind(digest(&new_refresh))
            .bind(now)
            .bind(&id)
            .bind(&h)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
            if done.rows_affected() == 1 {
                sqlx::query("INSERT INTO refresh_rotated (token_hash, family_id) VALUES ($1, $2)")
                    .bind(&h)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| db_err(OP, e))?;
                tx.commit().await.map_err(|e| db_err(OP, e))?;
                let access = self.access(&user, role, &id)?;
                return Ok(Ok((
                    TokenPair {
                        access_token: access,
                        refresh_token: new_refresh,
                        token_type: "Bearer",
                        expires_in: self.access_ttl,
                    },
                    user,
                )));
            }
            // Rotated or revoked by someone else meanwhile: nothing to
            // write here; look at what the token is now.
            tx.rollback().await.map_err(|e| db_err(OP, e))?;
        }
        self.reused(&h).await
    }

    /// `h` is not (or no longer) a current token: if it is a rotated-out
    /// one of a live family, revoke that family (once) and say so.
    async fn reused(
        &self,
        h: &str,
    ) -> Result<std::result::Result<(TokenPair, String), RefreshError>> {
        const OP: &str = "revoke reused refresh family";
        let row = sqlx::query(
            "SELECT f.id, f.user_id FROM refresh_rotated r \
             JOIN refresh_families f ON f.id = r.family_id WHERE r.token_hash = $1",
        )
        .bind(h)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        let Some(row) = row else {
            return Ok(Err(RefreshError::Invalid));
        };
        let id: String = row.try_get(0).map_err(|e| db_err(OP, e))?;
        let user: String = row.try_get(1).map_err(|e| db_err(OP, e))?;
        let done =
            sqlx::query("UPDATE refresh_families SET revoked = 1 WHERE id = $1 AND revoked = 0")
                .bind(&id)
                .execute(self.db.pool())
                .await
                .map_err(|e| db_err(OP, e))?;
        Ok(Err(if done.rows_affected() == 1 {
            RefreshError::Reused { user }
        } else {
            RefreshError::Invalid
        }))
    }

    /// Revoke one family (logout), durable when this returns.
    pub async fn revoke(&self, family: &str) -> Result<()> {
        sqlx::query("UPDATE refresh_families SET revoked = 1 WHERE id = $1")
            .bind(family)
            .execute(self.db.pool())
            .await
            .map_err(|e| db_err("revoke refresh family", e))?;
        Ok(())
    }

    /// Revoke every family of `user` (password change, disable), durable
    /// when this returns.
    pub async fn revoke_user(&self, user: &str) -> Result<()> {
        sqlx::query("UPDATE refresh_families SET revoked = 1 WHERE user_id = $1")
            .bind(user)
            .execute(self.db.pool())
            .await
            .map_err(|e| db_err("revoke refresh families", e))?;
        Ok(())
    }

    /// Verify an access token: signature with HS256 only, `typ: at+jwt`,
    /// `iss`, `aud`, `exp`, `nbf`, and its family not revoked (read from
    /// the database, so a logout on one gateway holds on all). `Ok(None)`:
    /// refused; `Err`: the database could not be asked.
    pub async fn verify(&self, token: &str) -> Result<Option<Claims>> {
        let Some(c) = self.decode(token) else {
            return Ok(None);
        };
        let live = sqlx::query(
            "SELECT 1 FROM refresh_families WHERE id = $1 AND user_id = $2 AND revoked = 0",
        )
        .bind(&c.sid)
        .bind(&c.sub)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err("check refresh family", e))?;
        Ok(live.map(|_| c))
    }

    /// The claims of an access token whose signature and claims check out
    /// (as [`verify`](Self::verify)) **without** the revocation check: the
    /// caller must still check that the family `sid` of user `sub` is live,
    /// as [`UserStore::by_id_in_live_family`](super::UserStore::by_id_in_live_family)
    /// does with the user's record in one read.
    pub fn decode(&self, token: &str) -> Option<Claims> {
        if token.len() > 4096 {
            return None;
        }
        let header = jsonwebtoken::decode_header(token).ok()?;
        if header.alg != Algorithm::HS256
            || header.typ.as_deref() != Some("at+jwt")
            || header.jku.is_some()
            || header.jwk.is_some()
            || header.x5u.is_some()
        {
            return None;
        }
        jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation)
            .ok()
            .map(|data| data.claims)
    }

    /// A single-use ticket for opening an event stream, valid for
    /// [`TICKET_TTL_MS`], for the access token `token` (already verified by
    /// the caller). Stored in the state database, durable when this
    /// returns, so any gateway sharing it can redeem it: its SHA-256 and
    /// the token without its signature (`header.payload`, not a
    /// credential). Expired tickets are deleted in the same transaction.
    pub async fn ticket(&self, token: &str) -> Result<String> {
        const OP: &str = "store an event-stream ticket";
        let Some((unsigned, _signature)) = token.rsplit_once('.') else {
            return Err(Error::invalid("RELAY_TOKEN", "not a signed token"));
        };
        let t = random_token("tk_");
        let now = now_ms();
        let (_turn, mut tx) = self.db.begin_write(OP).await?;
        sqlx::query("DELETE FROM event_tickets WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        sqlx::query("INSERT INTO event_tickets (digest, unsigned, expires_at) VALUES ($1, $2, $3)")
            .bind(digest(&t))
            .bind(unsigned)
            .bind(now.saturating_add(TICKET_TTL_MS))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_err(OP, e))?;
        // Crash-safe point: the commit.
        tx.commit().await.map_err(|e| db_err(OP, e))?;
        Ok(t)
    }

    /// Redeem a ticket, once on all gateways: the access token it was
    /// issued for (signed again with the shared key), or `Ok(None)` for an
    /// unknown, used or expired ticket. The ticket's row is taken by one
    /// `DELETE ... RETURNING`: of two redemptions, on any gateways, one
    /// gets it. `Err`: the database could not be asked.
    pub async fn redeem(&self, ticket: &str) -> Result<Option<String>> {
        const OP: &str = "redeem an event-stream ticket";
        if ticket.len() > 128 {
            return Ok(None);
        }
        let row = sqlx::query(
            "DELETE FROM event_tickets WHERE digest = $1 RETURNING unsigned, expires_at",
        )
        .bind(digest(ticket))
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| db_err(OP, e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let unsigned: String = row.try_get(0).map_err(|e| db_err(OP, e))?;
        let expires_at: i64 = row.try_get(1).map_err(|e| db_err(OP, e))?;
        if expires_at <= now_ms() {
            return Ok(None);
        }
        let signature =
            jsonwebtoken::crypto::sign(unsigned.as_bytes(), &self.enc, Algorithm::HS256)
                .map_err(|e| Error::invalid("RELAY_TOKEN", e.to_string()))?;
        Ok(Some(format!("{unsigned}.{signature}")))
    }
}

/// How long an event-stream ticket is valid.
pub const TICKET_TTL_MS: i64 = 30_000;

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}
