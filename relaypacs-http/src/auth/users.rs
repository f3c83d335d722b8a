//! Users: the [`UserStore`] trait (its implementation on the state
//! database is [`SqlUserStore`](super::SqlUserStore)).

use std::fmt::Debug;

use async_trait::async_trait;
use relaypacs_core::Result;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What a user may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Uploads studies and sees their own.
    Uploader,
    /// Reads reports and studies shared with them (issue 4); uploads too.
    Radiologist,
    /// Everything, including user management and other users' sessions.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uploader" => Ok(Self::Uploader),
            "radiologist" => Ok(Self::Radiologist),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?} (uploader, radiologist, admin)"
            )),
        }
    }
}

/// One account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Stable random id (what sessions and audit records name).
    pub id: String,
    /// Login name (unique, case-insensitive).
    pub username: String,
    /// Role.
    pub role: Role,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// Encrypted TOTP secret, once enrolled and confirmed.
    #[serde(default)]
    pub totp: Option<String>,
    /// Encrypted TOTP secret awaiting confirmation.
    #[serde(default)]
    pub totp_pending: Option<String>,
    /// Last TOTP time step accepted (a code is usable once).
    #[serde(default)]
    pub totp_last_step: u64,
    /// A disabled account cannot log in and its tokens stop working.
    #[serde(default)]
    pub disabled: bool,
    /// Tokens issued before this instant are refused (password change,
    /// logout everywhere).
    #[serde(with = "time::serde::rfc3339")]
    pub tokens_valid_after: OffsetDateTime,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Durable user accounts.
///
/// # Contract
/// `create` fails with [`Error::AlreadyExists`](relaypacs_core::Error::AlreadyExists)
/// for a taken username (case-insensitive), atomically: of two creations of
/// one name, even on two gateways sharing the store, exactly one succeeds.
/// `update` replaces a record by id ([`Error::NotFound`](relaypacs_core::Error::NotFound)
/// if there is none), except that `totp_last_step` never goes down.
/// `accept_totp_step` raises `totp_last_step` only if the stored step is
/// lower, and `rehash_password` replaces the hash only if unchanged, each
/// atomically. The account changes of the API (`change_password`,
/// `begin_totp`, `confirm_totp`) are conditional updates of the columns
/// they change, each one atomic step: two gateways changing one account
/// at once never lose a change (`update` writes the whole record and is
/// for a caller that holds the account alone, e.g. the command line).
/// Every change is durable when it returns `Ok`.
#[async_trait]
pub trait UserStore: Debug + Send + Sync + 'static {
    /// Add a user.
    async fn create(&self, user: UserRecord) -> Result<()>;
    /// Find by login name (case-insensitive).
    async fn by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    /// Find by id.
    async fn by_id(&self, id: &str) -> Result<Option<UserRecord>>;
    /// User `id`, if their login (refresh-token family) `family` is live,
    /// i.e. not revoked on any gateway: an access token's check in one
    /// read (the families are [`Tokens`](super::Tokens)' table in the same
    /// state database). `None` for an unknown user or a revoked or unknown
    /// family.
    async fn by_id_in_live_family(&self, id: &str, family: &str) -> Result<Option<UserRecord>>;
    /// Replace a user's record (keeping a newer stored `totp_last_step`).
    async fn update(&self, user: UserRecord) -> Result<()>;
    /// Record TOTP time step `step` as used by user `id`: `true` if it is
    /// newer than the last one accepted (and is now the last), `false` if
    /// it was used already or the user does not exist. A code is usable
    /// once across every gateway sharing the store.
    async fn accept_totp_step(&self, id: &str, step: u64) -> Result<bool>;
    /// Replace user `id`'s password hash by `new` if it is still `old`
    /// (the rehash at login when the hashing parameters changed): `true` if
    /// replaced. Nothing else of the record is written, so a change made
    /// meanwhile (by any gateway) is kept.
    async fn rehash_password(&self, id: &str, old: &str, new: &str) -> Result<bool>;
    /// Every user.
    async fn list(&self) -> Result<Vec<UserRecord>>;
    /// Replace user `id`'s password hash `old` by `new` and refuse the
    /// tokens issued before `tokens_valid_after`, if the stored hash is
    /// still `old` (the one the caller's current password was checked
    /// against): `true` if changed. Nothing else of the record is written.
    /// Of two changes from one hash, on any gateways, one wins.
    async fn change_password(
        &self,
        id: &str,
        old: &str,
        new: &str,
        tokens_valid_after: OffsetDateTime,
    ) -> Result<bool>;
    /// Set user `id`'s pending TOTP secret to `sealed` if no second factor
    /// is enrolled: `true` if set, `false` if one is (or no such user).
    async fn begin_totp(&self, id: &str, sealed: &str) -> Result<bool>;
    /// Make user `id`'s pending TOTP secret `sealed` the enrolled one if it
    /// is still the pending one (a new enrolment meanwhile replaced it):
    /// `true` if done. The step of the confirming code is recorded apart,
    /// by [`accept_totp_step`](Self::accept_totp_step).
    async fn confirm_totp(&self, id: &str, sealed: &str) -> Result<bool>;
    /// Disable (`true`) or enable user `id`, if it is not that already;
    /// disabling also refuses the tokens issued before
    /// `tokens_valid_after`. `true` if changed, `false` if it was already
    /// so (or no such user). Nothing else of the record is written.
    async fn set_disabled(
        &self,
        id: &str,
        disabled: bool,
        tokens_valid_after: OffsetDateTime,
    ) -> Result<bool>;
    /// Remove user `id`'s second factor (enrolled and pending) and refuse
    /// the tokens issued before `tokens_valid_after`: `true` if the user
    /// exists. The next login needs no code; the user enrols again.
    async fn reset_totp(&self, id: &str, tokens_valid_after: OffsetDateTime) -> Result<bool>;
}
