//! Password policy and argon2id hashing (OWASP parameters), run on the
//! blocking pool behind a semaphore so parallel logins cannot exhaust memory.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use tokio::sync::Semaphore;

/// Shortest accepted password.
pub const MIN_LEN: usize = 12;
/// Longest accepted password (bytes); longer ones are refused, never truncated.
pub const MAX_LEN: usize = 1024;

/// Why a password was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Fewer than [`MIN_LEN`] characters.
    #[error("the password must have at least {MIN_LEN} characters")]
    TooShort,
    /// More than [`MAX_LEN`] bytes.
    #[error("the password must have at most {MAX_LEN} bytes")]
    TooLong,
    /// Found in a common-password list or trivially guessable.
    #[error("the password is too common or too easy to guess")]
    Common,
}

/// Check a new password: length, and zxcvbn's estimate, whose dictionaries
/// include the common-password lists (a score below 3 means the password
/// is in those lists or a simple variation of them).
pub fn check_policy(password: &str, username: &str) -> Result<(), PolicyError> {
    if password.chars().count() < MIN_LEN {
        return Err(PolicyError::TooShort);
    }
    if password.len() > MAX_LEN {
        return Err(PolicyError::TooLong);
    }
    let estimate = zxcvbn::zxcvbn(password, &[username, "relaypacs", "pacs", "dicom"]);
    if (estimate.score() as u8) < 3 {
        return Err(PolicyError::Common);
    }
    Ok(())
}

/// Hashes and verifies passwords.
#[derive(Clone, Debug)]
pub struct Hasher {
    params: Params,
    permits: Arc<Semaphore>,
    dummy: Arc<str>,
}

impl Hasher {
    /// argon2id with `memory_kib` and `iterations`, parallelism 1; at most
    /// `concurrency` hashes at once.
    pub fn new(memory_kib: u32, iterations: u32, concurrency: usize) -> Result<Self, String> {
        let params = Params::new(memory_kib, iterations, 1, Some(32)).map_err(|e| e.to_string())?;
        let mut h = Self {
            params,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy: Arc::from(""),
        };
        // A hash of a random password, verified against for unknown users so
        // that their timing matches known ones (no user enumeration).
        let mut raw = [0u8; 24];
        rand::rng().fill_bytes(&mut raw);
        h.dummy = Arc::from(h.hash_blocking(&hex::encode(raw))?);
        Ok(h)
    }

    fn argon(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Hash synchronously (CLI use).
    pub fn hash_blocking(&self, password: &str) -> Result<String, String> {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        self.argon()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }

    /// Hash on the blocking pool.
    pub async fn hash(&self, password: String) -> Result<String, String> {
        let _p = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.hash_blocking(&password))
            .await
            .map_err(|e| e.to_string())?
    }

    /// Verify `password` against `phc` (or against a dummy hash when
    /// `phc` is `None`, which always fails but takes the same time).
    /// Also tells whether the stored hash uses weaker parameters than the
    /// current ones and should be replaced.
    pub async fn verify(&self, password: String, phc: Option<String>) -> (bool, bool) {
        let Ok(_p) = self.permits.clone().acquire_owned().await else {
            return (false, false);
        };
        let me = self.clone();
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| me.dummy.to_string());
        tokio::task::spawn_blocking(move || {
            let Ok(parsed) = PasswordHash::new(&phc) else {
                return (false, false);
            };
            let ok = Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
                && known;
            let weaker = match Params::try_from(&parsed) {
                Ok(p) => p.m_cost() < me.params.m_cost() || p.t_cost() < me.params.t_cost(),
                Err(_) => true,
            } || parsed.algorithm.as_str() != "argon2id";
            (ok, ok && weaker)
        })
        .await
        .unwrap_or((false, false))
    }
}
