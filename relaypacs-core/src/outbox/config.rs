//! Retry, lease, grouping and report-watch settings of the delivery worker.

use super::*;

/// Retry, lease and report-watch settings of the delivery worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// First retry delay; doubles per attempt (plus up to 100% jitter).
    #[serde(with = "secs")]
    pub base_delay: Duration,
    /// Largest delay between attempts (before jitter).
    #[serde(with = "secs")]
    pub max_delay: Duration,
    /// Attempts before an entry goes to dead letters.
    pub max_attempts: u32,
    /// Age (since queued) after which a failing entry goes to dead letters.
    #[serde(with = "secs")]
    pub max_age: Duration,
    /// How long one attempt may hold an entry (longer than any sink timeout).
    #[serde(with = "secs")]
    pub lease: Duration,
    /// Entries delivered at once.
    pub parallel: usize,
    /// Most due entries taken in one batch (default 32): their leases are
    /// taken in one store write and their outcomes recorded in another
    /// (one commit each instead of one per entry); their sends still run
    /// `parallel` at a time. 1 = one entry at a time.
    pub batch: usize,
    /// How long the worker waits for a batch to fill once an entry is due
    /// (default 0.05 s; 0: never): entries queued meanwhile share its
    /// leases', outcomes' and notifications' commits. A full batch goes at
    /// once; no entry waits longer than this for others.
    #[serde(with = "secs")]
    pub linger: Duration,
    /// How often the whole store is rescanned for entries (e.g. queued by
    /// another process sharing the session store).
    #[serde(with = "secs")]
    pub rescan_interval: Duration,
    /// How often a delivered study is checked for reports.
    #[serde(with = "secs")]
    pub report_poll_interval: Duration,
    /// How long after delivery reports are looked for.
    #[serde(with = "secs")]
    pub report_window: Duration,
    /// Instances are handed to the sink in groups of at most this many
    /// bytes (or `group_instances`), each verified while the next is sent
    /// (default 32 MiB, the STOW-RS sink's default request size).
    pub group_bytes: u64,
    /// Most instances in one group (default 64).
    pub group_instances: usize,
    /// Groups sent at once (default 2; 1 = one request at a time). A PACS
    /// ingests several requests faster than one.
    pub groups_in_flight: usize,
    /// How far below the requests' CPU priority the worker runs, as a nice
    /// increment (default 10; 0: the same). Core runs the worker wherever
    /// [`Outbox::run`](super::Outbox::run) is polled; the reference server
    /// runs it on a thread of its own at this value when the worker shares
    /// no socket with requests (SQLite state, local chunks), so
    /// acknowledging uploads comes first when the cores are busy and
    /// delivery gets every idle cycle.
    pub nice: i32,
    /// Whether this worker is the only one on its session store (the
    /// reference server holds a lock on its data folder). Leases left by
    /// an earlier, crashed process are then taken over at once instead of
    /// after they run out.
    pub exclusive: bool,
}

impl Default for OutboxConfig {
    /// 1 s doubling to 15 min, at most 50 attempts or 24 h, 15 min lease,
    /// 2 at once, rescan every 5 min, reports polled every minute for 30 days.
    fn default() -> Self {
        Self {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            max_attempts: 50,
            max_age: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(15 * 60),
            parallel: 2,
            batch: 32,
            linger: Duration::from_millis(50),
            rescan_interval: Duration::from_secs(300),
            report_poll_interval: Duration::from_secs(60),
            report_window: Duration::from_secs(30 * 24 * 3600),
            group_bytes: 16 << 20,
            group_instances: 32,
            groups_in_flight: 2,
            nice: 10,
            exclusive: true,
        }
    }
}

/// Durations in configuration files are (fractional) seconds.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl OutboxConfig {
    /// The delay before attempt `attempts + 1`: exponential from
    /// `base_delay`, capped at `max_delay`, plus jitter (backon), and never
    /// shorter than the PACS's `Retry-After`.
    pub fn backoff(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let d = backon::ExponentialBuilder::default()
            .with_min_delay(self.base_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay);
        d.max(retry_after.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let c = OutboxConfig {
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            ..OutboxConfig::default()
        };
        // Jitter adds up to 100%: attempt n waits in [d, 2d], d = min(2^(n-1), cap).
        for (attempt, d) in [(1u32, 1u64), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)] {
            let w = c.backoff(attempt, None);
            assert!(w >= Duration::from_secs(d), "attempt {attempt}: {w:?}");
            assert!(w <= Duration::from_secs(2 * d), "attempt {attempt}: {w:?}");
        }
        let w = c.backoff(1, Some(Duration::from_secs(120)));
        assert!(
            w >= Duration::from_secs(120),
            "Retry-After is a floor: {w:?}"
        );
    }

    #[test]
    fn configuration_round_trips_in_seconds() {
        let c = OutboxConfig::default();
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["base_delay"], 1.0);
        let back: OutboxConfig = serde_json::from_value(j).unwrap();
        assert_eq!(back, c);
    }
}
