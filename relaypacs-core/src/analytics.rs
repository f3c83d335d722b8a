//! Upload analytics: durable facts about upload outcomes, their
//! aggregation (by day, modality or user) and a CSV writer safe to open in
//! a spreadsheet.
//!
//! A session record does not last: an aborted or expired session is
//! deleted, a refused file is removed from its session. So the pipeline
//! records one [`UploadFact`] per outcome where the outcome happens
//! ([`SessionStore::record_upload_fact`](crate::SessionStore::record_upload_fact)),
//! and the analytics read only those facts.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime, Time};

use crate::error::{Error, Result};
use crate::ids::{FileId, SessionId};

/// What happened to a study or a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    /// The PACS holds every instance of the study (verified).
    Delivered,
    /// The study's delivery was given up; it waits in dead letters.
    DeadLettered,
    /// A file was refused at completion (invalid DICOM, a wrong study, a
    /// digest mismatch, a duplicate or conflicting instance).
    Refused,
    /// The study was aborted by its owner.
    Aborted,
    /// The study expired (or was ended by the system) while open.
    Expired,
}

impl FactKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FactKind; 5] = [
        Self::Delivered,
        Self::DeadLettered,
        Self::Refused,
        Self::Aborted,
        Self::Expired,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::DeadLettered => "dead_lettered",
            Self::Refused => "refused",
            Self::Aborted => "aborted",
            Self::Expired => "expired",
        }
    }

    /// The kind stored as `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether the fact is about a whole study (else one file).
    pub fn is_study(self) -> bool {
        !matches!(self, Self::Refused)
    }
}

impl fmt::Display for FactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One outcome of an upload, kept after its session is gone.
///
/// Key: `(session, file, kind, occurrence)`; recording the same key twice
/// keeps the first (a retried step records nothing new).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UploadFact {
    /// The session (study) the outcome belongs to.
    pub session: SessionId,
    /// The file, for a file outcome ([`FactKind::Refused`]).
    pub file: Option<FileId>,
    /// What happened.
    pub kind: FactKind,
    /// Which occurrence for the session: the number of replays from dead
    /// letters before it (a study dead-lettered, replayed and delivered
    /// has a dead letter at 0 and a delivery at 1); 0 otherwise.
    pub occurrence: u32,
    /// The reason class: the stable error code of a refusal
    /// (`RELAY_DICOM_NOT_DICOM`, `RELAY_DUPLICATE_INSTANCE`, …) or of a
    /// dead letter (`RELAY_PACS_REJECTED`, `RELAY_PACS_CONFLICT`,
    /// `RELAY_PACS_GAVE_UP`, `RELAY_PACS_MISSING`); empty otherwise.
    pub cause: String,
    /// The uploader (user id).
    pub owner: String,
    /// (0008,0060) Modality: the most frequent among the study's files
    /// (ties: the first in order), or of the refused file; empty when
    /// unknown.
    pub modality: String,
    /// When the outcome happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Files concerned (the study's files at its outcome; 1 for a file).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the upload started: the session's creation, which a client does
    /// right before sending its first byte (and a STOW-RS request does in
    /// the same request). `None` when unknown.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
}

impl UploadFact {
    /// A fact of `kind` for `session` by `owner`, at `at`, with no file,
    /// cause, modality or sizes yet (set the public fields).
    pub fn new(
        session: SessionId,
        kind: FactKind,
        owner: impl Into<String>,
        at: OffsetDateTime,
    ) -> Self {
        Self {
            session,
            file: None,
            kind,
            occurrence: 0,
            cause: String::new(),
            owner: owner.into(),
            modality: String::new(),
            at,
            files: 0,
            bytes: 0,
            started_at: None,
        }
    }

    /// The UTC day of the outcome.
    pub fn day(&self) -> Date {
        self.at.to_offset(time::UtcOffset::UTC).date()
    }

    /// Milliseconds from the start to the outcome, when the start is known
    /// and not after it.
    pub fn duration_ms(&self) -> Option<u64> {
        let d = self.at - self.started_at?;
        u64::try_from(d.whole_milliseconds()).ok()
    }
}

/// Which facts to count: outcomes on the UTC days `from..=to`, of one
/// modality and one user when given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AnalyticsFilter {
    /// First day (UTC), included.
    pub from: Date,
    /// Last day (UTC), included.
    pub to: Date,
    /// Only this modality (exact, as stored).
    pub modality: Option<String>,
    /// Only this uploader (user id).
    pub user: Option<String>,
}

impl AnalyticsFilter {
    /// Outcomes on the days `from..=to`, every modality and user.
    pub fn days(from: Date, to: Date) -> Self {
        Self {
            from,
            to,
            modality: None,
            user: None,
        }
    }

    /// The first instant counted, in milliseconds since the Unix epoch.
    pub fn start_ms(&self) -> i64 {
        unix_ms(self.from.with_time(Time::MIDNIGHT).assume_utc())
    }

    /// The first instant no longer counted (midnight after `to`), in
    /// milliseconds since the Unix epoch.
    pub fn end_ms(&self) -> i64 {
        let next = self.to.next_day().unwrap_or(self.to);
        unix_ms(next.with_time(Time::MIDNIGHT).assume_utc())
    }

    /// Whether `fact` passes the filter.
    pub fn matches(&self, fact: &UploadFact) -> bool {
        let at = unix_ms(fact.at);
        at >= self.start_ms()
            && at < self.end_ms()
            && self.modality.as_ref().is_none_or(|m| *m == fact.modality)
            && self.user.as_ref().is_none_or(|u| *u == fact.owner)
    }
}

/// Milliseconds since the Unix epoch (saturating).
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// How rows are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// One row for the whole filter (key empty).
    Summary,
    /// One row per UTC day (key `YYYY-MM-DD`).
    Day,
    /// One row per modality (key the modality, empty when unknown).
    Modality,
    /// One row per uploader (key the user id).
    User,
}

impl Grouping {
    /// Every grouping.
    pub const ALL: [Grouping; 4] = [Self::Summary, Self::Day, Self::Modality, Self::User];

    /// The name used in URLs and CSV headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Day => "day",
            Self::Modality => "modality",
            Self::User => "user",
        }
    }

    /// The grouping named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == name)
    }

    /// The key of `fact` under this grouping.
    pub fn key_of(self, fact: &UploadFact) -> String {
        match self {
            Self::Summary => String::new(),
            Self::Day => day_text(fact.day()),
            Self::Modality => fact.modality.clone(),
            Self::User => fact.owner.clone(),
        }
    }
}

/// `YYYY-MM-DD`.
pub fn day_text(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Facts of one group, kind and cause, counted by the store (a SQL
/// `GROUP BY`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FactCount {
    /// The group key (see [`Grouping::key_of`]).
    pub key: String,
    /// The kind.
    pub kind: FactKind,
    /// The cause.
    pub cause: String,
    /// How many facts.
    pub facts: u64,
    /// The sum of their files.
    pub files: u64,
    /// The sum of their bytes.
    pub bytes: u64,
}

impl FactCount {
    /// A count.
    pub fn new(
        key: String,
        kind: FactKind,
        cause: String,
        facts: u64,
        files: u64,
        bytes: u64,
    ) -> Self {
        Self {
            key,
            kind,
            cause,
            facts,
            files,
            bytes,
        }
    }

    /// The counts of `facts` that pass `filter`, grouped by `group`: what a
    /// store answers for
    /// [`SessionStore::count_upload_facts`](crate::SessionStore::count_upload_facts),
    /// computed in memory (a store keeping facts in memory uses it; the
    /// conformance suite compares a store's answer with it).
    pub fn of(facts: &[UploadFact], filter: &AnalyticsFilter, group: Grouping) -> Vec<FactCount> {
        let mut map: BTreeMap<(String, FactKind, String), (u64, u64, u64)> = BTreeMap::new();
        for f in facts.iter().filter(|f| filter.matches(f)) {
            let e = map
                .entry((group.key_of(f), f.kind, f.cause.clone()))
                .or_default();
            e.0 += 1;
            e.1 = e.1.saturating_add(f.files);
            e.2 = e.2.saturating_add(f.bytes);
        }
        map.into_iter()
            .map(|((key, kind, cause), (n, files, bytes))| {
                FactCount::new(key, kind, cause, n, files, bytes)
            })
            .collect()
    }
}

/// The durations (first byte to delivered) of one group, as the store
/// returns them for [`SessionStore::delivery_durations`](crate::SessionStore::delivery_durations).
pub type GroupDurations = BTreeMap<String, Vec<u64>>;

/// The delivery durations of `facts` passing `filter`, by group, in memory
/// (see [`FactCount::of`]); each list sorted ascending.
pub fn durations_of(
    facts: &[UploadFact],
    filter: &AnalyticsFilter,
    group: Grouping,
) -> GroupDurations {
    let mut out = GroupDurations::new();
    for f in facts
        .iter()
        .filter(|f| f.kind == FactKind::Delivered && filter.matches(f))
    {
        if let Some(ms) = f.duration_ms() {
            out.entry(group.key_of(f)).or_default().push(ms);
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// One row of a report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AnalyticsRow {
    /// The group key (empty for the summary).
    pub key: String,
    /// Study outcomes: delivered, dead-lettered, aborted and expired
    /// studies (a study dead-lettered then delivered after a replay counts
    /// twice).
    pub uploads: u64,
    /// Studies delivered.
    pub delivered: u64,
    /// Files of those outcomes, and refused files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Files refused by the validator (invalid DICOM, wrong study, digest).
    pub refused: u64,
    /// Files refused as a second copy of an accepted instance.
    pub duplicate: u64,
    /// Files refused as other content under an accepted instance's UID.
    pub conflict: u64,
    /// Studies dead-lettered.
    pub dead_lettered: u64,
    /// Studies aborted by their owner.
    pub aborted: u64,
    /// Studies expired while open.
    pub expired: u64,
    /// Failures by cause: `refused:<code>`, `duplicate`, `conflict`,
    /// `dead_lettered:<class>`, `aborted`, `expired`.
    pub failures: BTreeMap<String, u64>,
    /// Median time from first byte to delivered, in milliseconds.
    pub median_ms: Option<u64>,
    /// 95th percentile of that time (nearest rank), in milliseconds.
    pub p95_ms: Option<u64>,
}

/// A report: rows of one grouping for one filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AnalyticsReport {
    /// How rows are grouped.
    pub group: Grouping,
    /// What was counted.
    pub filter: AnalyticsFilter,
    /// The rows, by key (the summary: exactly one row).
    pub rows: Vec<AnalyticsRow>,
}

/// Code of a file refused as a duplicate of an accepted instance.
const DUPLICATE: &str = "RELAY_DUPLICATE_INSTANCE";
/// Code of a file refused as a conflict with an accepted instance.
const CONFLICT: &str = "RELAY_INSTANCE_CONFLICT";

/// The nearest-rank percentile `p` (0 < p ≤ 100) of ascending `sorted`.
pub fn percentile(sorted: &[u64], p: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    // ceil(p/100 * n), at least 1.
    let rank = (u64::from(p.min(100)) * n).div_ceil(100).max(1);
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

/// Build report rows from the store's counts and durations. The summary
/// has one row even with nothing counted.
pub fn aggregate(
    group: Grouping,
    counts: &[FactCount],
    durations: &GroupDurations,
) -> Vec<AnalyticsRow> {
    let mut rows: BTreeMap<String, AnalyticsRow> = BTreeMap::new();
    if group == Grouping::Summary {
        rows.insert(String::new(), AnalyticsRow::default());
    }
    for c in counts {
        let r = rows.entry(c.key.clone()).or_insert_with(|| AnalyticsRow {
            key: c.key.clone(),
            ..AnalyticsRow::default()
        });
        r.files = r.files.saturating_add(c.files);
        r.bytes = r.bytes.saturating_add(c.bytes);
        if c.kind.is_study() {
            r.uploads += c.facts;
        }
        let cause = match c.kind {
            FactKind::Delivered => {
                r.delivered += c.facts;
                None
            }
            FactKind::Refused if c.cause == DUPLICATE => {
                r.duplicate += c.facts;
                Some("duplicate".to_owned())
            }
            FactKind::Refused if c.cause == CONFLICT => {
                r.conflict += c.facts;
                Some("conflict".to_owned())
            }
            FactKind::Refused => {
                r.refused += c.facts;
                Some(format!("refused:{}", c.cause))
            }
            FactKind::DeadLettered => {
                r.dead_lettered += c.facts;
                Some(format!("dead_lettered:{}", c.cause))
            }
            FactKind::Aborted => {
                r.aborted += c.facts;
                Some("aborted".to_owned())
            }
            FactKind::Expired => {
                r.expired += c.facts;
                Some("expired".to_owned())
            }
        };
        if let Some(cause) = cause {
            *r.failures.entry(cause).or_default() += c.facts;
        }
    }
    for (key, d) in durations {
        let r = rows.entry(key.clone()).or_insert_with(|| AnalyticsRow {
            key: key.clone(),
            ..AnalyticsRow::default()
        });
        r.median_ms = percentile(d, 50);
        r.p95_ms = percentile(d, 95);
    }
    rows.into_values().collect()
}

/// Checks a filter against what a report may span.
///
/// # Errors
/// [`Error::Invalid`] `RELAY_BAD_RANGE` when `to` is before `from` or the
/// range is longer than `max_days`.
pub fn check_range(filter: &AnalyticsFilter, max_days: u32) -> Result<()> {
    if filter.to < filter.from {
        return Err(Error::invalid("RELAY_BAD_RANGE", "`to` is before `from`"));
    }
    let days = (filter.to - filter.from).whole_days() + 1;
    if days > i64::from(max_days) {
        return Err(Error::invalid(
            "RELAY_BAD_RANGE",
            format!("the range spans {days} days; at most {max_days}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- CSV

/// A cell as written to CSV: one beginning with `=`, `+`, `-`, `@`, a tab
/// or a carriage return gets a single quote in front, so a spreadsheet
/// shows it as text instead of evaluating a formula (OWASP, CSV
/// injection). Quoting of `"`, `,`, CR and LF is the CSV writer's.
pub fn neutralise_cell(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// Write `header` and `rows` as CSV (RFC 4180: UTF-8, CRLF line ends,
/// fields with `"`, `,`, CR or LF quoted, quotes doubled), every cell
/// neutralised first (see [`neutralise_cell`]).
///
/// # Errors
/// [`Error::Invalid`] `RELAY_CSV` if a row's length differs from the
/// header's.
pub fn write_csv<R, C>(header: &[&str], rows: R) -> Result<Vec<u8>>
where
    R: IntoIterator<Item = Vec<C>>,
    C: AsRef<str>,
{
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .quote_style(csv::QuoteStyle::Necessary)
        .from_writer(Vec::new());
    let bad = |e: csv::Error| Error::invalid("RELAY_CSV", e.to_string());
    w.write_record(header.iter().map(|c| neutralise_cell(c).into_owned()))
        .map_err(bad)?;
    for row in rows {
        w.write_record(row.iter().map(|c| neutralise_cell(c.as_ref()).into_owned()))
            .map_err(bad)?;
    }
    w.into_inner()
        .map_err(|e| Error::invalid("RELAY_CSV", e.to_string()))
}

/// The CSV columns of a report; the first is the grouping's name (with
/// `label` for a user key, e.g. the username, as a second column).
pub const CSV_COLUMNS: [&str; 14] = [
    "uploads",
    "delivered",
    "files",
    "bytes",
    "refused",
    "duplicate",
    "conflict",
    "dead_lettered",
    "aborted",
    "expired",
    "failures",
    "median_ms",
    "p95_ms",
    "range",
];

/// A report as CSV: the key column (named by the grouping), a `label`
/// column when `label` is given (e.g. usernames of user ids), then
/// [`CSV_COLUMNS`]. `failures` is `cause=n` pairs joined by `; `.
///
/// # Errors
/// As [`write_csv`].
pub fn report_csv(
    report: &AnalyticsReport,
    label: Option<&dyn Fn(&str) -> String>,
) -> Result<Vec<u8>> {
    let mut header = vec![report.group.as_str()];
    if label.is_some() {
        header.push("label");
    }
    header.extend(CSV_COLUMNS);
    let range = format!(
        "{}/{}",
        day_text(report.filter.from),
        day_text(report.filter.to)
    );
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let rows = report.rows.iter().map(|r| {
        let mut cells = vec![r.key.clone()];
        if let Some(l) = label {
            cells.push(l(&r.key));
        }
        let failures: Vec<String> = r.failures.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cells.extend([
            r.uploads.to_string(),
            r.delivered.to_string(),
            r.files.to_string(),
            r.bytes.to_string(),
            r.refused.to_string(),
            r.duplicate.to_string(),
            r.conflict.to_string(),
            r.dead_lettered.to_string(),
            r.aborted.to_string(),
            r.expired.to_string(),
            failures.join("; "),
            opt(r.median_ms),
            opt(r.p95_ms),
            range.clone(),
        ]);
        cells
    });
    write_csv(&header, rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    fn fact(
        kind: FactKind,
        cause: &str,
        owner: &str,
        modality: &str,
        at: OffsetDateTime,
    ) -> UploadFact {
        let mut f = UploadFact::new(SessionId::random(), kind, owner, at);
        f.cause = cause.into();
        f.modality = modality.into();
        f.files = 2;
        f.bytes = 100;
        f.started_at = Some(at - time::Duration::seconds(10));
        f
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50), Some(10));
        assert_eq!(percentile(&v, 95), Some(19));
        assert_eq!(percentile(&[7], 95), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn aggregation_counts_kinds_and_causes_by_group() {
        let d1 = datetime!(2026-03-01 10:00 UTC);
        let d2 = datetime!(2026-03-02 23:59:59 UTC);
        let facts = vec![
            fact(FactKind::Delivered, "", "u1", "CT", d1),
            fact(FactKind::Delivered, "", "u2", "MR", d2),
            fact(FactKind::Refused, "RELAY_DICOM_NOT_DICOM", "u1", "", d1),
            fact(FactKind::Refused, DUPLICATE, "u1", "CT", d1),
            fact(
                FactKind::DeadLettered,
                "RELAY_PACS_REJECTED",
                "u2",
                "CT",
                d2,
            ),
            fact(
                FactKind::Expired,
                "",
                "u2",
                "",
                datetime!(2026-03-03 00:00 UTC),
            ),
        ];
        let filter = AnalyticsFilter::days(date!(2026 - 03 - 01), date!(2026 - 03 - 02));
        let rows = aggregate(
            Grouping::Day,
            &FactCount::of(&facts, &filter, Grouping::Day),
            &durations_of(&facts, &filter, Grouping::Day),
        );
        assert_eq!(rows.len(), 2, "the expiry on 03-03 is outside the range");
        assert_eq!(rows[0].key, "2026-03-01");
        assert_eq!((rows[0].uploads, rows[0].delivered), (1, 1));
        assert_eq!(
            (rows[0].refused, rows[0].duplicate, rows[0].files),
            (1, 1, 6)
        );
        assert_eq!(rows[0].median_ms, Some(10_000));
        assert_eq!(rows[1].dead_lettered, 1);
        assert_eq!(rows[1].failures["dead_lettered:RELAY_PACS_REJECTED"], 1);
        let mut only = filter.clone();
        only.user = Some("u1".into());
        only.modality = Some("CT".into());
        let rows = aggregate(
            Grouping::Summary,
            &FactCount::of(&facts, &only, Grouping::Summary),
            &GroupDurations::new(),
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].uploads, rows[0].duplicate, rows[0].refused),
            (1, 1, 0)
        );
    }

    #[test]
    fn ranges_are_checked() {
        let f = AnalyticsFilter::days(date!(2026 - 01 - 01), date!(2026 - 12 - 31));
        assert!(check_range(&f, 366).is_ok());
        assert!(check_range(&f, 364).is_err());
        let back = AnalyticsFilter::days(date!(2026 - 01 - 02), date!(2026 - 01 - 01));
        assert!(check_range(&back, 366).is_err());
    }

    #[test]
    fn csv_quotes_and_neutralises() {
        let out = write_csv(
            &["a", "b"],
            vec![vec!["=1+1", "x,\"y\"\r\nz"], vec!["-2", "@t"]],
        )
        .expect("csv");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text, "a,b\r\n'=1+1,\"x,\"\"y\"\"\r\nz\"\r\n'-2,'@t\r\n");
    }
}
