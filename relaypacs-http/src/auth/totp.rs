//! TOTP second factor (RFC 6238, SHA-1, 6 digits, 30 s; the current and
//! the previous step accepted, each step usable once). Secrets are stored
//! encrypted with ChaCha20-Poly1305 under a key derived from the server
//! secret.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use totp_rs::{Algorithm, Secret, TOTP};

/// Encrypts TOTP secrets and checks codes.
#[derive(Clone)]
pub struct TotpBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for TotpBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TotpBox")
    }
}

fn totp(secret: Vec<u8>, account: &str) -> Option<TOTP> {
    TOTP::new(
        Algorithm::SHA1,
        6,
        1,
        30,
        secret,
        Some("RelayPACS".into()),
        account.to_string(),
    )
    .ok()
}

impl TotpBox {
    /// Key derived from the server secret.
    pub fn new(secret: &SecretString) -> Self {
        let key = Sha256::new()
            .chain_update(b"relaypacs/totp/v1\0")
            .chain_update(secret.expose_secret().as_bytes())
            .finalize();
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        }
    }

    /// A new random secret: (encrypted form to store, base32 for the user,
    /// otpauth URL for a QR code).
    pub fn enroll(&self, account: &str) -> Option<(String, String, String)> {
        let mut raw = vec![0u8; 20];
        rand::rng().fill_bytes(&mut raw);
        let t = totp(raw.clone(), account)?;
        let b32 = Secret::Raw(raw.clone()).to_encoded().to_string();
        Some((self.seal(&raw)?, b32, t.get_url()))
    }

    fn seal(&self, raw: &[u8]) -> Option<String> {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self.cipher.encrypt(Nonce::from_slice(&nonce), raw).ok()?;
        let mut out = nonce.to_vec();
        out.extend(ct);
        Some(STANDARD.encode(out))
    }

    fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        let b = STANDARD.decode(sealed).ok()?;
        if b.len() < 12 {
            return None;
        }
        self.cipher
            .decrypt(Nonce::from_slice(&b[..12]), &b[12..])
            .ok()
    }

    /// Check `code` for the sealed secret: the time step it matched, if it
    /// is newer than `last_step` (a code is usable once).
    pub fn check(&self, sealed: &str, account: &str, code: &str, last_step: u64) -> Option<u64> {
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let t = totp(self.open(sealed)?, account)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let step = now / 30;
        [step, step.saturating_sub(1)]
            .into_iter()
            .find(|&s| s > last_step && t.generate(s * 30) == code)
    }

    /// The current code for a sealed secret (tests and enrolment checks).
    pub fn current(&self, sealed: &str, account: &str) -> Option<String> {
        totp(self.open(sealed)?, account)?.generate_current().ok()
    }
}
