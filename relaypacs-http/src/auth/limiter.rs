//! Login throttling: a sliding window per client address and failure
//! counting with exponential lockout per account.
//!
//! Written by hand because rate-limit crates (governor and friends) count
//! requests, not *failures*, and have no notion of a lockout that grows
//! with consecutive failures and resets on success. State is in memory
//! (documented): a restart clears it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

#[derive(Debug, Default)]
struct Account {
    consecutive: u32,
    failures: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// The limiter.
#[derive(Debug)]
pub struct LoginLimiter {
    cfg: LimiterConfig,
    addresses: Mutex<HashMap<String, VecDeque<Instant>>>,
    accounts: Mutex<HashMap<String, Account>>,
}

/// A refusal: come back after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

use relaypacs_storage::fs::lock;

fn secs_until(t: Instant, now: Instant) -> u64 {
    t.saturating_duration_since(now).as_secs() + 1
}

impl LoginLimiter {
    /// A new limiter.
    pub fn new(cfg: LimiterConfig) -> Self {
        Self {
            cfg,
            addresses: Mutex::new(HashMap::new()),
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Count an attempt from `address`; refuse when over the per-minute limit.
    pub fn attempt_from(&self, address: &str) -> Result<(), RetryAfter> {
        let now = Instant::now();
        let mut m = lock(&self.addresses);
        if m.len() > 100_000 {
            // Bound memory under address spraying: forget idle entries.
            m.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
            });
        }
        let q = m.entry(address.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            q.pop_front();
        }
        if q.len() >= self.cfg.per_address_per_minute as usize {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(RetryAfter(secs_until(
                oldest + Duration::from_secs(60),
                now,
            )));
        }
        q.push_back(now);
        Ok(())
    }

    /// Whether `account` may try now.
    pub fn check_account(&self, account: &str) -> Result<(), RetryAfter> {
        let now = Instant::now();
        let mut m = lock(&self.accounts);
        let Some(a) = m.get_mut(account) else {
            return Ok(());
        };
        while a
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(3600))
        {
            a.failures.pop_front();
        }
        if let Some(until) = a.locked_until
            && until > now
        {
            return Err(RetryAfter(secs_until(until, now)));
        }
        if a.failures.len() >= self.cfg.max_failures_per_hour as usize {
            let oldest = a.failures.front().copied().unwrap_or(now);
            return Err(RetryAfter(secs_until(
                oldest + Duration::from_secs(3600),
                now,
            )));
        }
        Ok(())
    }

    /// Record a failure; returns `true` when this failure started a lockout.
    pub fn failed(&self, account: &str) -> bool {
        let now = Instant::now();
        let mut m = lock(&self.accounts);
        if m.len() > 100_000 {
            m.retain(|_, a| a.locked_until.is_some_and(|u| u > now) || !a.failures.is_empty());
        }
        let a = m.entry(account.to_string()).or_default();
        a.consecutive += 1;
        a.failures.push_back(now);
        if a.consecutive >= self.cfg.lockout_after {
            let exp = (a.consecutive - self.cfg.lockout_after).min(20);
            let backoff = Duration::from_secs(1u64 << exp).min(self.cfg.max_lockout);
            a.locked_until = Some(now + backoff);
            return true;
        }
        false
    }

    /// Record a success: consecutive failures and the lockout are cleared
    /// (the hourly failure budget is kept).
    pub fn succeeded(&self, account: &str) {
        if let Some(a) = lock(&self.accounts).get_mut(account) {
            a.consecutive = 0;
            a.locked_until = None;
        }
    }
}
