//! Password policy and argon2id hashing (OWASP parameters) in bounded
//! memory.
//!
//! Every hash runs in one of a fixed set of argon2 memory buffers owned by
//! the [`Hasher`]: at most `budget / per-hash memory` of them, each allocated
//! once on first need and then reused, on the blocking pool. No hash
//! allocates its own memory, so no number of parallel logins can grow the
//! process (freed argon2 memory used to stay with the allocator). A login
//! that finds every buffer busy waits a bounded time, then gets
//! [`HashBusy`] (429 at the route).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Default memory for all concurrent hashes together (MiB).
pub const DEFAULT_BUDGET_MIB: u32 = 64;
/// Default longest wait of a login for hashing memory.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(2);
/// Longest output this module verifies (the PHC format's own limit).
const MAX_OUTPUT: usize = Output::MAX_LENGTH;
/// Output length of new hashes (the crate's default, as before).
const NEW_OUTPUT: usize = 32;
/// Salt length of new hashes (bytes).
const NEW_SALT: usize = 16;

/// Every hashing buffer stayed busy for the whole allowed wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password hashing is at capacity; retry in {retry_after_secs} s")]
pub struct HashBusy {
    /// Seconds after which a retry is sensible.
    pub retry_after_secs: u64,
}

/// Why a hash could not be made or a stored hash could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HashError {
    /// The argon2 parameters or inputs were refused.
    #[error("argon2 refused the parameters or inputs")]
    Argon2(#[source] argon2::Error),
    /// The PHC string could not be parsed or built.
    #[error("malformed PHC string")]
    Phc(#[source] argon2::password_hash::Error),
    /// The stored hash is not argon2, or lacks its salt or output.
    #[error("the stored hash is not a complete argon2 PHC string")]
    NotArgon2,
    /// One hash needs more memory than the whole budget.
    #[error("one hash needs {needed_kib} KiB, more than the budget of {budget_kib} KiB")]
    OverBudget {
        /// Memory the hash needs.
        needed_kib: u64,
        /// Memory of the whole pool.
        budget_kib: u64,
    },
    /// The hashing task panicked or was cancelled.
    #[error("the hashing task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The pool's semaphore was closed (never done; kept typed).
    #[error("the hashing pool is closed")]
    Closed,
}

impl From<argon2::Error> for HashError {
    fn from(e: argon2::Error) -> Self {
        Self::Argon2(e)
    }
}

impl From<argon2::password_hash::Error> for HashError {
    fn from(e: argon2::password_hash::Error) -> Self {
        Self::Phc(e)
    }
}

/// How much memory and waiting password hashing may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashBudget {
    /// Memory for all concurrent hashes together, in MiB; must hold one hash.
    pub memory_mib: u32,
    /// Most hashes at once, whatever the memory would allow (CPU bound).
    pub max_parallel: usize,
    /// Longest wait for a buffer in [`Hasher::verify_bounded`].
    pub wait: Duration,
}

impl HashBudget {
    /// [`DEFAULT_BUDGET_MIB`] and [`DEFAULT_WAIT`], at most `max_parallel`.
    pub fn with_parallelism(max_parallel: usize) -> Self {
        Self {
            memory_mib: DEFAULT_BUDGET_MIB,
            max_parallel,
            wait: DEFAULT_WAIT,
        }
    }
}

/// The fixed set of argon2 memory buffers.
struct Pool {
    /// Buffers not in use; `buffers - allocated` more may still be made.
    free: Mutex<Vec<Box<[Block]>>>,
    /// One permit per buffer: holding `k` permits entitles to `k` buffers.
    permits: Arc<Semaphore>,
    /// Number of buffers (and permits).
    buffers: usize,
    /// Blocks (KiB) per buffer.
    blocks: usize,
    /// Buffers allocated over the pool's life (each allocation counted).
    allocations: AtomicUsize,
    /// Blocks currently allocated (free or in use).
    live_blocks: AtomicUsize,
    /// Highest value `live_blocks` ever had.
    peak_blocks: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("buffers", &self.buffers)
            .field("blocks", &self.blocks)
            .field("allocations", &self.allocations.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Pool {
    fn new(buffers: usize, blocks: usize) -> Self {
        Self {
            free: Mutex::new(Vec::with_capacity(buffers)),
            permits: Arc::new(Semaphore::new(buffers)),
            buffers,
            blocks,
            allocations: AtomicUsize::new(0),
            live_blocks: AtomicUsize::new(0),
            peak_blocks: AtomicUsize::new(0),
        }
    }

    /// Permits (buffers) a hash of `needed` blocks takes.
    fn permits_for(&self, needed: usize) -> Result<u32, HashError> {
        let k = needed.div_ceil(self.blocks.max(1)).max(1);
        if k > self.buffers {
            return Err(HashError::OverBudget {
                needed_kib: needed as u64,
                budget_kib: (self.buffers * self.blocks) as u64,
            });
        }
        u32::try_from(k).map_err(|_| HashError::OverBudget {
            needed_kib: needed as u64,
            budget_kib: (self.buffers * self.blocks) as u64,
        })
    }

    /// A zeroed buffer of `blocks` blocks, counted against the budget. Only
    /// called by a holder of the permits that cover it.
    fn allocate(&self, blocks: usize) -> Box<[Block]> {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        let live = self.live_blocks.fetch_add(blocks, Ordering::Relaxed) + blocks;
        self.peak_blocks.fetch_max(live, Ordering::Relaxed);
        vec![Block::default(); blocks].into_boxed_slice()
    }

    fn release(&self, buf: Box<[Block]>) {
        self.live_blocks.fetch_sub(buf.len(), Ordering::Relaxed);
        drop(buf);
    }

    /// Takes `permit.num_permits()` buffers for a hash of `needed` blocks.
    fn lease(self: &Arc<Self>, permit: OwnedSemaphorePermit, needed: usize) -> Lease {
        let k = permit.num_permits();
        let mut taken = Vec::with_capacity(k);
        {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            while taken.len() < k {
                match free.pop() {
                    Some(b) => taken.push(b),
                    None => break,
                }
            }
        }
        let big = if k > 1 {
            // A stored hash made with more memory than one buffer (the
            // configured cost was lowered since): its permits' buffers are
            // given back to the allocator and one buffer of the needed size
            // is made, so the total stays within the budget.
            for b in taken.drain(..) {
                self.release(b);
            }
            Some(self.allocate(needed))
        } else {
            None
        };
        if big.is_none() && taken.is_empty() {
            // First use of this permit's buffer.
            taken.push(self.allocate(self.blocks));
        }
        Lease {
            pool: self.clone(),
            taken,
            big,
            permits: k,
            _permit: permit,
        }
    }
}

/// Buffers held for one hash; given back (before the permits) on drop.
struct Lease {
    pool: Arc<Pool>,
    taken: Vec<Box<[Block]>>,
    big: Option<Box<[Block]>>,
    permits: usize,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    fn memory(&mut self) -> &mut [Block] {
        match (&mut self.big, self.taken.first_mut()) {
            (Some(b), _) => b,
            (None, Some(b)) => b,
            (None, None) => &mut [],
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut back = std::mem::take(&mut self.taken);
        if let Some(big) = self.big.take() {
            self.pool.release(big);
            back = (0..self.permits)
                .map(|_| self.pool.allocate(self.pool.blocks))
                .collect();
        }
        self.pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(back);
        // `_permit` is dropped after this body: the buffers are back first.
    }
}

/// A stored PHC string, parsed into owned parts.
#[derive(Clone, Debug)]
struct Stored {
    algorithm: Algorithm,
    version: Version,
    params: Params,
    salt: Vec<u8>,
    expected: Output,
}

/// Parse a PHC string as the argon2 crate's verifier does (algorithm,
/// version, `m`/`t`/`p`/`keyid`/`data`, output length from the hash).
fn parse_phc(phc: &str) -> Result<Stored, HashError> {
    let parsed = PasswordHash::new(phc)?;
    let algorithm = Algorithm::try_from(parsed.algorithm)?;
    let version = parsed
        .version
        .map(Version::try_from)
        .transpose()?
        .unwrap_or_default();
    let params = Params::try_from(&parsed)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(HashError::NotArgon2);
    };
    let mut buf = [0u8; 64];
    let salt = salt.decode_b64(&mut buf)?.to_vec();
    Ok(Stored {
        algorithm,
        version,
        params,
        salt,
        expected,
    })
}

impl Stored {
    /// Whether `password` matches, computed in `memory` (constant-time
    /// comparison of the outputs).
    fn matches(&self, password: &[u8], memory: &mut [Block]) -> Result<bool, HashError> {
        let len = self.expected.len();
        let mut out = [0u8; MAX_OUTPUT];
        let out = out.get_mut(..len).ok_or(HashError::NotArgon2)?;
        Argon2::new(self.algorithm, self.version, self.params.clone())
            .hash_password_into_with_memory(password, &self.salt, out, memory)?;
        Ok(Output::new(out)? == self.expected)
    }

    /// Weaker than `current` (less memory or fewer passes, or not argon2id).
    fn weaker_than(&self, current: &Params) -> bool {
        self.params.m_cost() < current.m_cost()
            || self.params.t_cost() < current.t_cost()
            || self.algorithm != Algorithm::Argon2id
    }
}

/// A new argon2id PHC string for `password` with `params`, in `memory`.
fn new_phc(params: &Params, password: &[u8], memory: &mut [Block]) -> Result<String, HashError> {
    let mut salt = [0u8; NEW_SALT];
    rand::rng().fill_bytes(&mut salt);
    let salt_string = SaltString::encode_b64(&salt)?;
    let mut out = [0u8; MAX_OUTPUT];
    let len = params.output_len().unwrap_or(NEW_OUTPUT);
    let out = out.get_mut(..len).ok_or(HashError::NotArgon2)?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password, &salt, out, memory)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params)?,
        salt: Some(salt_string.as_salt()),
        hash: Some(Output::new(out)?),
    };
    Ok(phc.to_string())
}

/// Hashes and verifies passwords in a fixed memory budget.
#[derive(Clone, Debug)]
pub struct Hasher {
    params: Params,
    pool: Arc<Pool>,
    wait: Duration,
    dummy: Arc<str>,
}

impl Hasher {
    /// argon2id with `memory_kib` and `iterations`, parallelism 1; at most
    /// `concurrency` hashes at once, within [`DEFAULT_BUDGET_MIB`] (at least
    /// one hash), logins waiting at most [`DEFAULT_WAIT`].
    pub fn new(memory_kib: u32, iterations: u32, concurrency: usize) -> Result<Self, String> {
        let mut budget = HashBudget::with_parallelism(concurrency);
        budget.memory_mib = budget.memory_mib.max(memory_kib.div_ceil(1024));
        Self::with_budget(memory_kib, iterations, budget)
    }

    /// argon2id with `memory_kib` and `iterations`, parallelism 1, hashing
    /// in at most `budget.memory_mib` MiB: `memory_mib × 1024 / memory_kib`
    /// buffers (capped by `budget.max_parallel`), each allocated on first
    /// use and reused. Fails when the budget cannot hold one hash.
    pub fn with_budget(
        memory_kib: u32,
        iterations: u32,
        budget: HashBudget,
    ) -> Result<Self, String> {
        let params =
            Params::new(memory_kib, iterations, 1, Some(NEW_OUTPUT)).map_err(|e| e.to_string())?;
        let blocks = params.block_count();
        let budget_blocks = budget.memory_mib as usize * 1024;
        let buffers = (budget_blocks / blocks.max(1)).min(budget.max_parallel.max(1));
        if buffers == 0 {
            return Err(HashError::OverBudget {
                needed_kib: blocks as u64,
                budget_kib: budget_blocks as u64,
            }
            .to_string());
        }
        let mut h = Self {
            params,
            pool: Arc::new(Pool::new(buffers, blocks)),
            wait: budget.wait,
            dummy: Arc::from(""),
        };
        // A hash of a random password, verified against for unknown users so
        // that their timing matches known ones (no user enumeration).
        let mut raw = [0u8; 24];
        rand::rng().fill_bytes(&mut raw);
        h.dummy = Arc::from(h.hash_blocking(&hex::encode(raw))?);
        Ok(h)
    }

    /// Number of hashing buffers (hashes that can run at once).
    pub fn buffers(&self) -> usize {
        self.pool.buffers
    }

    /// Buffers of `k` permits for `needed` blocks, waiting at most `wait`
    /// (forever when `None`).
    async fn lease(&self, needed: usize, wait: Option<Duration>) -> Result<Lease, LeaseError> {
        let k = self.pool.permits_for(needed)?;
        let acquire = self.pool.permits.clone().acquire_many_owned(k);
        let permit = match wait {
            Some(w) => tokio::time::timeout(w, acquire).await.map_err(|_| {
                LeaseError::Busy(HashBusy {
                    retry_after_secs: w.as_secs().max(1),
                })
            })?,
            None => acquire.await,
        }
        .map_err(|_| HashError::Closed)?;
        Ok(self.pool.lease(permit, needed))
    }

    /// Hash synchronously (CLI use; blocks the thread while buffers are busy).
    pub fn hash_blocking(&self, password: &str) -> Result<String, String> {
        let mut lease = futures::executor::block_on(self.lease(self.params.block_count(), None))
            .map_err(|e| e.to_string())?;
        new_phc(&self.params, password.as_bytes(), lease.memory()).map_err(|e| e.to_string())
    }

    /// Hash on the blocking pool (waits for a buffer as long as it takes).
    pub async fn hash(&self, password: String) -> Result<String, String> {
        let mut lease = self
            .lease(self.params.block_count(), None)
            .await
            .map_err(|e| e.to_string())?;
        let params = self.params.clone();
        tokio::task::spawn_blocking(move || new_phc(&params, password.as_bytes(), lease.memory()))
            .await
            .map_err(|e| HashError::Task(e).to_string())?
            .map_err(|e| e.to_string())
    }

    /// Verify `password` against `phc` (or against a dummy hash when
    /// `phc` is `None`, which always fails but takes the same time).
    /// Also tells whether the stored hash uses weaker parameters than the
    /// current ones and should be replaced. Waits for a buffer as long as it
    /// takes (authenticated callers); logins use [`Hasher::verify_bounded`].
    pub async fn verify(&self, password: String, phc: Option<String>) -> (bool, bool) {
        self.verify_within(password, phc, None)
            .await
            .unwrap_or((false, false))
    }

    /// [`Hasher::verify`], waiting at most the budget's `wait` for a buffer.
    ///
    /// # Errors
    /// [`HashBusy`] when every buffer stayed busy for that long (the answer
    /// is then 429, and no hash was computed).
    pub async fn verify_bounded(
        &self,
        password: String,
        phc: Option<String>,
    ) -> Result<(bool, bool), HashBusy> {
        self.verify_within(password, phc, Some(self.wait)).await
    }

    async fn verify_within(
        &self,
        password: String,
        phc: Option<String>,
        wait: Option<Duration>,
    ) -> Result<(bool, bool), HashBusy> {
        let known = phc.is_some();
        let stored = match parse_phc(phc.as_deref().unwrap_or(&self.dummy)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "stored password hash unusable");
                return Ok((false, false));
            }
        };
        let mut lease = match self.lease(stored.params.block_count(), wait).await {
            Ok(l) => l,
            Err(LeaseError::Busy(b)) => return Err(b),
            Err(LeaseError::Hash(e)) => {
                tracing::warn!(error = %e, "stored password hash cannot be verified");
                return Ok((false, false));
            }
        };
        let current = self.params.clone();
        let verdict = tokio::task::spawn_blocking(move || {
            let ok = stored
                .matches(password.as_bytes(), lease.memory())
                .unwrap_or(false)
                && known;
            (ok, ok && stored.weaker_than(&current))
        })
        .await;
        Ok(verdict.unwrap_or((false, false)))
    }
}

/// Why no lease was obtained.
#[derive(Debug)]
enum LeaseError {
    Busy(HashBusy),
    Hash(HashError),
}

impl From<HashError> for LeaseError {
    fn from(e: HashError) -> Self {
        Self::Hash(e)
    }
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy(b) => b.fmt(f),
            Self::Hash(e) => e.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    /// Reference-implementation answers (argon2 crate's KAT, `password` /
    /// `somesalt`).
    const KAT_P1: &str =
        "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4";
    const KAT_P2: &str =
        "$argon2id$v=19$m=256,t=2,p=2$c29tZXNhbHQ$bQk8UB/VmZZF4Oo79iDXuL5/0ttZwg2f/5U52iv1cDc";

    fn small(memory_mib: u32, max_parallel: usize, wait: Duration) -> Hasher {
        Hasher::with_budget(
            1024,
            1,
            HashBudget {
                memory_mib,
                max_parallel,
                wait,
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_pool_never_allocates_beyond_its_budget() {
        // 4 MiB at 1 MiB per hash: 4 buffers, whatever the parallelism.
        let h = small(4, 64, Duration::from_secs(60));
        assert_eq!(h.buffers(), 4);
        let stored = h.hash("correct-horse-battery-1".into()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..48 {
            let h = h.clone();
            let stored = stored.clone();
            tasks.push(tokio::spawn(async move {
                match i % 3 {
                    0 => assert!(
                        h.hash(format!("pw-{i}"))
                            .await
                            .unwrap()
                            .starts_with("$argon2id$")
                    ),
                    1 => assert_eq!(
                        h.verify("correct-horse-battery-1".into(), Some(stored))
                            .await,
                        (true, false)
                    ),
                    _ => assert_eq!(
                        h.verify_bounded("anything".into(), None).await,
                        Ok((false, false))
                    ),
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let p = &h.pool;
        // Each buffer allocated once, then reused by 50 hashes.
        assert!(p.allocations.load(Ordering::Relaxed) <= 4, "{p:?}");
        assert!(p.peak_blocks.load(Ordering::Relaxed) <= 4 * 1024, "{p:?}");
        assert_eq!(
            p.free.lock().unwrap().len(),
            p.allocations.load(Ordering::Relaxed)
        );
        assert_eq!(p.permits.available_permits(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_budget_caps_buffers_and_refuses_one_hash_too_big() {
        assert_eq!(small(64, 2, DEFAULT_WAIT).buffers(), 2);
        assert_eq!(small(3, 64, DEFAULT_WAIT).buffers(), 3);
        let e = Hasher::with_budget(
            19456,
            2,
            HashBudget {
                memory_mib: 18,
                max_parallel: 4,
                wait: DEFAULT_WAIT,
            },
        )
        .unwrap_err();
        assert!(e.contains("19456 KiB"), "{e}");
        // The server's defaults: 64 MiB hold three 19 MiB hashes.
        let h = Hasher::with_budget(19456, 2, HashBudget::with_parallelism(8)).unwrap();
        assert_eq!(h.buffers(), 3);
        assert_eq!(Hasher::new(19456, 2, 1).unwrap().buffers(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_login_waits_a_bounded_time_then_is_busy() {
        let h = small(1, 4, Duration::from_millis(50));
        let held = h.lease(1024, None).await.unwrap();
        let start = std::time::Instant::now();
        let r = h.verify_bounded("x".repeat(12), None).await;
        assert_eq!(
            r,
            Err(HashBusy {
                retry_after_secs: 1
            })
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(held);
        assert_eq!(
            h.verify_bounded("x".repeat(12), None).await,
            Ok((false, false))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_stored_by_the_previous_code_still_verify() {
        let h = small(4, 4, DEFAULT_WAIT);
        for kat in [KAT_P1, KAT_P2] {
            assert_eq!(
                h.verify("password".into(), Some(kat.into())).await,
                (true, true)
            );
            assert_eq!(
                h.verify("passwore".into(), Some(kat.into())).await,
                (false, false)
            );
        }
        // Exactly the previous code's call, at the server's parameters.
        let params = Params::new(19456, 2, 1, Some(32)).unwrap();
        let old = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = old
            .hash_password(b"plum-orbit-Cascade-7731", &salt)
            .unwrap()
            .to_string();
        let h = Hasher::new(19456, 2, 2).unwrap();
        assert_eq!(
            h.verify("plum-orbit-Cascade-7731".into(), Some(phc.clone()))
                .await,
            (true, false)
        );
        assert_eq!(
            h.verify_bounded("plum-orbit-Cascade-7732".into(), Some(phc))
                .await,
            Ok((false, false))
        );
        // And the previous code verifies what this one makes.
        let new = h.hash("plum-orbit-Cascade-7731".into()).await.unwrap();
        assert!(new.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{new}");
        let parsed = PasswordHash::new(&new).unwrap();
        Argon2::default()
            .verify_password(b"plum-orbit-Cascade-7731", &parsed)
            .unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"plum-orbit-Cascade-7730", &parsed)
                .is_err()
        );
        assert_eq!(h.hash_blocking("a").unwrap().len(), new.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hash_made_with_more_memory_uses_several_buffers_within_budget() {
        let params = Params::new(2048, 1, 1, Some(32)).unwrap();
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"long-enough-password", &salt)
            .unwrap()
            .to_string();
        let h = small(3, 3, DEFAULT_WAIT);
        assert_eq!(
            h.verify("long-enough-password".into(), Some(phc.clone()))
                .await,
            (true, false)
        );
        assert!(h.pool.peak_blocks.load(Ordering::Relaxed) <= 3 * 1024);
        assert_eq!(h.pool.permits.available_permits(), 3);
        // More than the whole budget: refused, never allocated.
        let h = small(1, 1, DEFAULT_WAIT);
        assert_eq!(
            h.verify("long-enough-password".into(), Some(phc)).await,
            (false, false)
        );
        assert!(h.pool.peak_blocks.load(Ordering::Relaxed) <= 1024);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_users_cost_one_hash_from_the_pool() {
        let h = small(1, 1, DEFAULT_WAIT);
        let before = h.pool.allocations.load(Ordering::Relaxed);
        let held = h.lease(1024, None).await.unwrap();
        // The only buffer is held: an unknown-user login must wait for it.
        assert!(
            h.verify_bounded("whatever-password".into(), None)
                .await
                .is_err()
        );
        drop(held);
        assert_eq!(
            h.verify_bounded("whatever-password".into(), None).await,
            Ok((false, false))
        );
        assert_eq!(h.pool.allocations.load(Ordering::Relaxed), before);
        // A garbage stored hash is a failure, not a panic.
        assert_eq!(
            h.verify("x".into(), Some("$argon2id$nope".into())).await,
            (false, false)
        );
        assert_eq!(
            h.verify("x".into(), Some("$bcrypt$x".into())).await,
            (false, false)
        );
    }
}
