//! Access tokens (JWT, HS256 pinned, `iss`/`aud`/`exp`/`nbf` checked,
//! `typ: at+jwt`), opaque refresh tokens rotated in families with reuse
//! detection, and single-use event-stream tickets.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use relaypacs_core::{Error, Result};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

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

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Family {
    user: String,
    #[serde(with = "time::serde::rfc3339")]
    created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    last_used: OffsetDateTime,
    /// SHA-256 (hex) of the current refresh token.
    current: String,
    /// SHA-256 (hex) of rotated-out tokens of this family.
    previous: Vec<String>,
    revoked: bool,
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
    path: PathBuf,
    families: Mutex<BTreeMap<String, Family>>,
    tickets: Mutex<HashMap<String, (String, Instant)>>,
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

use relaypacs_storage::fs::lock;

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

impl Tokens {
    /// Keys derived from the server secret; families kept in `path`.
    pub fn new(secret: &SecretString, settings: TokenSettings, path: PathBuf) -> Result<Self> {
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
        let families = crate::json_file::read(&path, "read refresh tokens")?;
        Ok(Self {
            enc: EncodingKey::from_secret(&key),
            dec: DecodingKey::from_secret(&key),
            validation,
            issuer: settings.issuer,
            audience: settings.audience,
            access_ttl: settings.access_ttl_secs,
            refresh_idle: settings.refresh_idle_secs,
            refresh_absolute: settings.refresh_absolute_secs,
            path,
            families: Mutex::new(families),
            tickets: Mutex::new(HashMap::new()),
        })
    }

    fn persist(&self, f: &BTreeMap<String, Family>) -> Result<()> {
        crate::json_file::write(&self.path, f, "write refresh tokens")
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

    /// A new login: a new family with its first refresh token.
    pub fn login(&self, user: &str, role: Role) -> Result<TokenPair> {
        let family = random_token("");
        let refresh = random_token("rt_");
        let now = OffsetDateTime::now_utc();
        let mut g = lock(&self.families);
        let mut next = g.clone();
        // Drop families that can no longer be used, to keep the file small.
        let abs = time::Duration::seconds(i64::try_from(self.refresh_absolute).unwrap_or(i64::MAX));
        next.retain(|_, f| f.created + abs > now);
        next.insert(
            family.clone(),
            Family {
                user: user.to_string(),
                created: now,
                last_used: now,
                current: digest(&refresh),
                previous: Vec::new(),
                revoked: false,
            },
        );
        self.persist(&next)?;
        *g = next;
        drop(g);
        Ok(TokenPair {
            access_token: self.access(user, role, &family)?,
            refresh_token: refresh,
            token_type: "Bearer",
            expires_in: self.access_ttl,
        })
    }

    /// Rotate `refresh`: the old token stops working, a reused old token
    /// revokes the whole family. `role` is looked up by the caller from
    /// the user id returned through `user_of`.
    pub fn refresh(
        &self,
        refresh: &str,
        role_of: impl FnOnce(&str) -> Option<Role>,
    ) -> std::result::Result<(TokenPair, String), RefreshError> {
        let h = digest(refresh);
        let now = OffsetDateTime::now_utc();
        let mut g = lock(&self.families);
        let Some((id, fam)) = g
            .iter()
            .find(|(_, f)| f.current == h || f.previous.contains(&h))
            .map(|(k, f)| (k.clone(), f.clone()))
        else {
            return Err(RefreshError::Invalid);
        };
        if fam.revoked {
            return Err(RefreshError::Invalid);
        }
        let mut next = g.clone();
        if fam.current != h {
            if let Some(f) = next.get_mut(&id) {
                f.revoked = true;
            }
            self.persist(&next).map_err(|_| RefreshError::Invalid)?;
            *g = next;
            return Err(RefreshError::Reused { user: fam.user });
        }
        let idle = time::Duration::seconds(i64::try_from(self.refresh_idle).unwrap_or(i64::MAX));
        let abs = time::Duration::seconds(i64::try_from(self.refresh_absolute).unwrap_or(i64::MAX));
        if fam.last_used + idle < now || fam.created + abs < now {
            return Err(RefreshError::Invalid);
        }
        let Some(role) = role_of(&fam.user) else {
            return Err(RefreshError::Invalid);
        };
        let new_refresh = random_token("rt_");
        if let Some(f) = next.get_mut(&id) {
            f.previous.push(h);
            f.current = digest(&new_refresh);
            f.last_used = now;
        }
        self.persist(&next).map_err(|_| RefreshError::Invalid)?;
        *g = next;
        drop(g);
        let access = self
            .access(&fam.user, role, &id)
            .map_err(|_| RefreshError::Invalid)?;
        Ok((
            TokenPair {
                access_token: access,
                refresh_token: new_refresh,
                token_type: "Bearer",
                expires_in: self.access_ttl,
            },
            fam.user,
        ))
    }

    /// Revoke one family (logout).
    pub fn revoke(&self, family: &str) -> Result<()> {
        let mut g = lock(&self.families);
        let mut next = g.clone();
        if let Some(f) = next.get_mut(family) {
            f.revoked = true;
        }
        self.persist(&next)?;
        *g = next;
        Ok(())
    }

    /// Revoke every family of `user` (password change, disable).
    pub fn revoke_user(&self, user: &str) -> Result<()> {
        let mut g = lock(&self.families);
        let mut next = g.clone();
        for f in next.values_mut().filter(|f| f.user == user) {
            f.revoked = true;
        }
        self.persist(&next)?;
        *g = next;
        Ok(())
    }

    /// Verify an access token: signature with HS256 only, `typ: at+jwt`,
    /// `iss`, `aud`, `exp`, `nbf`, and its family not revoked.
    pub fn verify(&self, token: &str) -> Option<Claims> {
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).ok()?;
        let c = data.claims;
        let g = lock(&self.families);
        match g.get(&c.sid) {
            Some(f) if !f.revoked && f.user == c.sub => Some(c),
            _ => None,
        }
    }

    /// A single-use ticket for opening an event stream, valid for 30 s.
    pub fn ticket(&self, token: &str) -> String {
        let t = random_token("tk_");
        let now = Instant::now();
        let mut g = lock(&self.tickets);
        g.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(30));
        g.insert(digest(&t), (token.to_string(), now));
        t
    }

    /// Redeem a ticket (once): the access token it was issued for.
    pub fn redeem(&self, ticket: &str) -> Option<String> {
        let (token, at) = lock(&self.tickets).remove(&digest(ticket))?;
        (at.elapsed() < Duration::from_secs(30)).then_some(token)
    }
}
