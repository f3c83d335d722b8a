//! Upload analytics: `GET /api/v1/analytics/{summary,by-day,by-modality,by-user}`
//! as JSON, or as CSV (`Accept: text/csv` or `format=csv`). The rules
//! (ownership, limits, aggregation, CSV) are the pipeline's
//! ([`Pipeline::analytics`], [`relaypacs_core::analytics`]); this module
//! parses the query and maps the answer.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use relaypacs_core::Pipeline;
use relaypacs_core::analytics::{AnalyticsFilter, AnalyticsReport, Grouping, day_text, report_csv};
use relaypacs_core::pipeline::AnalyticsLimits;
use serde::Serialize;
use time::Date;

use super::AuthUser;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Limits of the analytics query parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryLimits {
    /// The longest raw query string, in bytes.
    pub max_len: usize,
    /// The most parameters.
    pub max_params: usize,
    /// The longest decoded value, in bytes.
    pub max_value: usize,
    /// The longest date range, in days (both ends included).
    pub max_days: u32,
    /// The range when neither end is given, in days (ending today).
    pub default_days: u32,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_len: 2048,
            max_params: 8,
            max_value: 128,
            max_days: 366,
            default_days: 30,
        }
    }
}

/// Answer format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `text/csv; charset=utf-8` (RFC 4180).
    Csv,
}

/// A parsed analytics query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnalyticsQuery {
    /// First day (UTC), included.
    pub from: Date,
    /// Last day (UTC), included.
    pub to: Date,
    /// Modality filter (as in (0008,0060): upper-case letters, digits, `_`).
    pub modality: Option<String>,
    /// User filter: a username.
    pub user: Option<String>,
    /// `format=csv` / `format=json`, when given.
    pub format: Option<Format>,
}

/// A query that does not parse: the parameter at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {reason}")]
pub struct QueryError {
    /// The parameter at fault (`query` for the string as a whole).
    pub parameter: String,
    /// Why.
    pub reason: String,
}

fn qerr(parameter: &str, reason: impl Into<String>) -> QueryError {
    QueryError {
        parameter: parameter.chars().take(64).collect(),
        reason: reason.into(),
    }
}

/// `application/x-www-form-urlencoded` decoding of one component (`+` is
/// a space, `%XX` a byte); the result must be UTF-8.
fn decode(raw: &str, name: &str, max: usize) -> Result<String, QueryError> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len().min(max));
    let mut i = 0;
    while i < b.len() {
        let c = match b[i] {
            b'+' => b' ',
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| qerr(name, "bad percent-encoding"))?;
                i += 2;
                hex
            }
            c => c,
        };
        out.push(c);
        if out.len() > max {
            return Err(qerr(name, format!("longer than {max} bytes")));
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| qerr(name, "not UTF-8"))
}

/// `YYYY-MM-DD`, strictly.
fn parse_day(v: &str, name: &str) -> Result<Date, QueryError> {
    let bad = || qerr(name, "not a date (YYYY-MM-DD)");
    let b = v.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let digits = |r: std::ops::Range<usize>| -> Result<u32, QueryError> {
        let s = v.get(r).ok_or_else(bad)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let month = u8::try_from(m)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or_else(bad)?;
    let y = i32::try_from(y).map_err(|_| bad())?;
    let d = u8::try_from(d).map_err(|_| bad())?;
    Date::from_calendar_date(y, month, d).map_err(|_| bad())
}

/// Parse the raw query string of an analytics route (`from`, `to`:
/// `YYYY-MM-DD` UTC days; `modality`; `user`: a username; `format`:
/// `json` or `csv`). `today` fills a missing end: `to` defaults to today
/// and `from` to `default_days` before `to`. A pure function over outside
/// input, bounded by `limits` (length, parameters, value length, range);
/// unknown or repeated parameters are refused.
///
/// # Errors
/// [`QueryError`] naming the parameter at fault.
pub fn parse_analytics_query(
    raw: Option<&str>,
    limits: &QueryLimits,
    today: Date,
) -> Result<AnalyticsQuery, QueryError> {
    let raw = raw.unwrap_or("");
    if raw.len() > limits.max_len {
        return Err(qerr(
            "query",
            format!("longer than {} bytes", limits.max_len),
        ));
    }
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (n, pair) in raw.split('&').filter(|p| !p.is_empty()).enumerate() {
        if n >= limits.max_params {
            return Err(qerr(
                "query",
                format!("more than {} parameters", limits.max_params),
            ));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k, "query", 32)?;
        if k.is_empty() {
            return Err(qerr("query", "a parameter without a name"));
        }
        let known = ["from", "to", "modality", "user", "format"];
        if !known.contains(&k.as_str()) {
            return Err(qerr(&k, "unknown parameter"));
        }
        let v = decode(v, &k, limits.max_value)?;
        if seen.insert(k.clone(), v).is_some() {
            return Err(qerr(&k, "given more than once"));
        }
    }
    let day = |name: &str| seen.get(name).map(|v| parse_day(v, name)).transpose();
    let to = day("to")?;
    let from = day("from")?;
    let span = time::Duration::days(i64::from(limits.default_days.max(1)) - 1);
    let (from, to) = match (from, to) {
        (Some(f), Some(t)) => (f, t),
        (Some(f), None) => (f, today.max(f)),
        (None, Some(t)) => (t.checked_sub(span).unwrap_or(t), t),
        (None, None) => (today.checked_sub(span).unwrap_or(today), today),
    };
    if to < from {
        return Err(qerr("to", "before `from`"));
    }
    let days = (to - from).whole_days() + 1;
    if days > i64::from(limits.max_days) {
        return Err(qerr(
            "to",
            format!("the range spans {days} days; at most {}", limits.max_days),
        ));
    }
    let modality = match seen.get("modality") {
        None => None,
        Some(m) if m.is_empty() => None,
        Some(m) => {
            if m.len() > 16
                || !m
                    .bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
            {
                return Err(qerr(
                    "modality",
                    "1-16 upper-case letters, digits or `_` (e.g. CT)",
                ));
            }
            Some(m.clone())
        }
    };
    let user = match seen.get("user") {
        None => None,
        Some(u) if u.is_empty() => None,
        Some(u) if u.chars().any(char::is_control) => {
            return Err(qerr("user", "control characters"));
        }
        Some(u) => Some(u.clone()),
    };
    let format = match seen.get("format").map(String::as_str) {
        None | Some("") => None,
        Some("json") => Some(Format::Json),
        Some("csv") => Some(Format::Csv),
        Some(_) => return Err(qerr("format", "`json` or `csv`")),
    };
    Ok(AnalyticsQuery {
        from,
        to,
        modality,
        user,
        format,
    })
}

/// Whether `Accept` asks for CSV (and not JSON first).
fn accepts_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .find(|m| m == "text/csv" || m == "application/json")
        .is_some_and(|m| m == "text/csv")
}

/// One row of the JSON answer.
#[derive(Debug, Serialize)]
struct RowOut {
    key: String,
    /// The username of a user row.
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(flatten)]
    row: relaypacs_core::analytics::AnalyticsRow,
}

/// The JSON answer.
#[derive(Debug, Serialize)]
struct ReportOut {
    group: Grouping,
    from: String,
    to: String,
    modality: Option<String>,
    user: Option<String>,
    rows: Vec<RowOut>,
}

/// The usernames of the user ids in `report` (an unknown id stays as is).
async fn usernames(
    state: &AppState,
    report: &AnalyticsReport,
) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if report.group != Grouping::User {
        return Ok(out);
    }
    for r in &report.rows {
        let name = state
            .users()
            .by_id(&r.key)
            .await
            .map_err(ApiError::from)?
            .map(|u| u.username)
            .unwrap_or_else(|| r.key.clone());
        out.insert(r.key.clone(), name);
    }
    Ok(out)
}

async fn answer(
    state: AppState,
    user: AuthUser,
    headers: HeaderMap,
    raw: Option<String>,
    group: Grouping,
) -> ApiResult<Response> {
    let limits = QueryLimits::default();
    let today = time::OffsetDateTime::now_utc().date();
    let q = parse_analytics_query(raw.as_deref(), &limits, today)
        .map_err(|e| ApiError::bad_request("RELAY_BAD_QUERY", e.to_string()))?;
    // A username names the user; one that does not exist counts nothing
    // (an admin), or is another user (refused by the pipeline otherwise).
    let user_id = match &q.user {
        None => None,
        Some(name) if *name == user.username => Some(user.id.clone()),
        Some(name) => Some(
            state
                .users()
                .by_name(name)
                .await
                .map_err(ApiError::from)?
                .map(|u| u.id)
                .unwrap_or_else(|| format!("unknown:{name}")),
        ),
    };
    let mut filter = AnalyticsFilter::days(q.from, q.to);
    filter.modality = q.modality.clone();
    filter.user = user_id;
    let pipeline: &Pipeline = state.pipeline();
    let report = pipeline
        .analytics(
            &user.actor(),
            filter,
            group,
            AnalyticsLimits::new(limits.max_days, 1_000_000),
        )
        .await?;
    let names = usernames(&state, &report).await?;
    let csv = match q.format {
        Some(f) => f == Format::Csv,
        None => accepts_csv(&headers),
    };
    if csv {
        let label = |k: &str| names.get(k).cloned().unwrap_or_default();
        let body = report_csv(
            &report,
            (group == Grouping::User).then_some(&label as &dyn Fn(&str) -> String),
        )?;
        let name = format!(
            "attachment; filename=\"relaypacs-analytics-{}-{}-{}.csv\"",
            group.as_str(),
            day_text(report.filter.from),
            day_text(report.filter.to)
        );
        let mut r = body.into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        if let Ok(v) = HeaderValue::from_str(&name) {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        h.insert(header::VARY, HeaderValue::from_static("accept"));
        return Ok(r);
    }
    let out = ReportOut {
        group,
        from: day_text(report.filter.from),
        to: day_text(report.filter.to),
        modality: report.filter.modality.clone(),
        user: q.user.clone(),
        rows: report
            .rows
            .into_iter()
            .map(|row| RowOut {
                key: row.key.clone(),
                username: names.get(&row.key).cloned(),
                row,
            })
            .collect(),
    };
    let mut r = axum::Json(out).into_response();
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept"));
    Ok(r)
}

/// `GET /api/v1/analytics/summary`: one row for the filter.
pub async fn summary(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    answer(state, user, headers, raw, Grouping::Summary).await
}

/// `GET /api/v1/analytics/by-day`: one row per UTC day with outcomes.
pub async fn by_day(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    answer(state, user, headers, raw, Grouping::Day).await
}

/// `GET /api/v1/analytics/by-modality`: one row per modality.
pub async fn by_modality(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    answer(state, user, headers, raw, Grouping::Modality).await
}

/// `GET /api/v1/analytics/by-user`: one row per uploader (a non-admin:
/// itself only).
pub async fn by_user(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    answer(state, user, headers, raw, Grouping::User).await
}

/// The routes, to merge into the API router.
pub fn routes() -> axum::Router<AppState> {
    use axum::routing::get;
    axum::Router::new()
        .route("/api/v1/analytics/summary", get(summary))
        .route("/api/v1/analytics/by-day", get(by_day))
        .route("/api/v1/analytics/by-modality", get(by_modality))
        .route("/api/v1/analytics/by-user", get(by_user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn parse(q: &str) -> Result<AnalyticsQuery, QueryError> {
        parse_analytics_query(Some(q), &QueryLimits::default(), date!(2026 - 11 - 30))
    }

    #[test]
    fn defaults_and_filters() {
        let q = parse("").expect("empty");
        assert_eq!(
            (q.from, q.to),
            (date!(2026 - 11 - 01), date!(2026 - 11 - 30))
        );
        let q = parse("from=2026-01-01&to=2026-01-31&modality=CT&user=al%20ice&format=csv")
            .expect("full");
        assert_eq!(q.modality.as_deref(), Some("CT"));
        assert_eq!(q.user.as_deref(), Some("al ice"));
        assert_eq!(q.format, Some(Format::Csv));
    }

    #[test]
    fn bad_input_names_the_parameter() {
        for (q, p) in [
            ("from=2026-13-01", "from"),
            ("to=yesterday", "to"),
            ("from=2026-02-30", "from"),
            ("from=2025-01-01&to=2026-06-01", "to"),
            ("from=2026-02-01&to=2026-01-01", "to"),
            ("modality=ct", "modality"),
            ("format=xml", "format"),
            ("colour=red", "colour"),
            ("user=a&user=b", "user"),
            ("user=%zz", "user"),
            ("user=%ff", "user"),
            // Found by the fuzz target: a nameless parameter was reported
            // with an empty name.
            ("from=2026-01-01&=%zz%to=2026-01mat=csv", "query"),
            ("=1", "query"),
        ] {
            assert_eq!(parse(q).expect_err(q).parameter, p, "{q}");
        }
        let long = "a=".to_string() + &"b".repeat(3000);
        assert_eq!(parse(&long).expect_err("long").parameter, "query");
    }
}
