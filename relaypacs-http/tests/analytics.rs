//! Upload analytics through the real server: studies delivered to the
//! local archive, a file refused by the validator, a study aborted, a
//! study dead-lettered by a real Orthanc (wrong credentials), counted by
//! `GET /api/v1/analytics/…` as JSON and CSV; ownership (an uploader sees
//! itself only, an admin everyone, a refusal is audited); the CSV parsed
//! back with the `csv` crate, formula cells neutralised; facts survive a
//! restart and the deletion of their sessions. A property test of the CSV
//! writer.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::time::{Duration, Instant};

use common::{TestServer, User, dicom, expect_error, stow_body};
use proptest::prelude::*;
use relaypacs_core::analytics::{neutralise_cell, write_csv};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, generate};
use relaypacs_http::auth::Role;
use relaypacs_http::config::{DicomWebSinkConfig, SinkConfig};
use relaypacs_test_peers::Orthanc;
use reqwest::Method;
use serde_json::Value;

async fn get(t: &TestServer, u: &User, path: &str) -> reqwest::Response {
    t.req(Method::GET, path, u).send().await.unwrap()
}

async fn json(t: &TestServer, u: &User, path: &str) -> Value {
    let r = get(t, u, path).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

async fn study_state(t: &TestServer, u: &User, id: &str) -> Value {
    json(t, u, &format!("/api/v1/studies/{id}")).await
}

async fn wait_state(t: &TestServer, u: &User, id: &str, state: &str) {
    let start = Instant::now();
    loop {
        let v = study_state(t, u, id).await;
        if v["state"]["state"] == state {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "waiting for {state}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn complete(t: &TestServer, u: &User, id: &str) {
    let r = t
        .req(Method::POST, &format!("/api/v1/studies/{id}/complete"), u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
}

/// A CT file of `study` (a new study when `None`).
fn ct(study: Option<&str>) -> Vec<u8> {
    generate(&DicomSpec {
        study_uid: study.map_or_else(relaypacs_core::testing::dicom_gen::new_uid, str::to_owned),
        sop_class: SopClass::Ct,
        rows: 16,
        cols: 16,
        ..DicomSpec::default()
    })
    .unwrap()
}

fn study_uid(f: &[u8]) -> String {
    relaypacs_core::dicom::validate_dicom(f, f.len() as u64, &Default::default())
        .unwrap()
        .study_instance_uid
        .to_string()
}

/// Parse a CSV body (RFC 4180) into its rows, header first.
fn parse_csv(body: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(body)
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

fn column(rows: &[Vec<String>], name: &str) -> usize {
    rows[0].iter().position(|c| c == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_count_outcomes_by_owner_as_json_and_csv() {
    // The day the uploads may fall on starts here (a run can cross midnight).
    let first_day = relaypacs_core::analytics::day_text(time::OffsetDateTime::now_utc().date());
    let orthanc = tokio::task::spawn_blocking(Orthanc::start).await.unwrap();
    let mut t = TestServer::start_with(|c| {
        c.outbox.base_delay = Duration::from_millis(200);
        c.outbox.rescan_interval = Duration::from_secs(2);
    })
    .await;
    let clinic = t.user("clinic", Role::Uploader).await;
    // A username a spreadsheet would take for a formula.
    let formula = t.user("=2+5", Role::Uploader).await;
    let admin = t.user("admin", Role::Admin).await;

    // clinic, study A: two CT files and a non-DICOM file (refused), delivered.
    let a = t.new_study(&clinic).await;
    let first = ct(None);
    let uid = study_uid(&first);
    let second = ct(Some(&uid));
    t.upload(&clinic, &a, &first).await;
    t.upload(&clinic, &a, &second).await;
    let junk = vec![7u8; 1000];
    let up = t.create_upload(&clinic, &a, 1000, None).await;
    let r = t.patch(&clinic, &up, 0, junk, None).await;
    expect_error(r, 422, "RELAY_DICOM_NOT_DICOM").await;
    // The same instance again in the study: refused as a duplicate.
    let up = t
        .create_upload(&clinic, &a, first.len() as u64, Some(&first))
        .await;
    let r = t
        .patch(
            &clinic,
            &up,
            0,
            first.clone(),
            Some(common::sha256_header(&first)),
        )
        .await;
    expect_error(r, 409, "RELAY_DUPLICATE_INSTANCE").await;
    complete(&t, &clinic, &a).await;
    // clinic, study D: one file, aborted (its session is deleted).
    let d = t.new_study(&clinic).await;
    t.upload(&clinic, &d, &dicom(None, 16)).await;
    let r = t
        .req(Method::DELETE, &format!("/api/v1/studies/{d}"), &clinic)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    // "=2+5", study C: one OT file, delivered.
    let c = t.new_study(&formula).await;
    let c_file = dicom(None, 16);
    t.upload(&formula, &c, &c_file).await;
    complete(&t, &formula, &c).await;
    wait_state(&t, &clinic, &a, "delivered").await;
    wait_state(&t, &formula, &c, "delivered").await;
    // "=2+5", STOW-RS: one instance stored (delivered), one part refused.
    let body = stow_body(&[&dicom(None, 16), &[0u8; 500]]);
    let r = t.stow(&formula, "/dicomweb/studies", body).await;
    assert_eq!(r.status(), 202, "one part stored, one refused");
    t.wait_notifications(&formula, 2).await;

    // The PACS refuses the credentials: study B is dead-lettered.
    let wrong = SinkConfig::StowRs(DicomWebSinkConfig {
        url: orthanc.dicomweb(),
        user: Some(orthanc.user.clone()),
        password: Some("a-wrong-password".to_owned().into()),
        ..DicomWebSinkConfig::default()
    });
    t.restart(|c| c.sinks = vec![wrong]).await;
    // Access tokens outlive the restart (same secret).
    let b = t.new_study(&clinic).await;
    let b_file = ct(None);
    t.upload(&clinic, &b, &b_file).await;
    complete(&t, &clinic, &b).await;
    wait_state(&t, &clinic, &b, "dead_letter").await;
    // clinic, study E: left open, expired by the sweep two days later (the
    // session is deleted; its fact stays).
    let e = t.new_study(&clinic).await;
    t.upload(&clinic, &e, &ct(None)).await;
    let expired = t
        .server()
        .state()
        .pipeline()
        .expire_sessions(time::OffsetDateTime::now_utc() + time::Duration::days(2))
        .await
        .unwrap();
    assert!(expired.iter().any(|id| id.to_string() == e), "{expired:?}");

    // The uploader's summary: its own outcomes only.
    let v = json(&t, &clinic, "/api/v1/analytics/summary").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v:#}");
    let s = &rows[0];
    assert_eq!(
        s["uploads"], 4,
        "A delivered, D aborted, B dead-lettered, E expired: {v:#}"
    );
    assert_eq!(s["delivered"], 1);
    assert_eq!(s["aborted"], 1);
    assert_eq!(s["dead_lettered"], 1);
    assert_eq!(s["refused"], 1);
    assert_eq!(s["duplicate"], 1);
    assert_eq!(s["expired"], 1);
    assert_eq!(s["files"], 2 + 1 + 1 + 1 + 1 + 1, "{v:#}");
    let bytes = first.len() + second.len() + 1000 + b_file.len();
    assert!(s["bytes"].as_u64().unwrap() > bytes as u64, "{v:#}");
    assert_eq!(s["failures"]["refused:RELAY_DICOM_NOT_DICOM"], 1, "{v:#}");
    assert_eq!(
        s["failures"]["dead_lettered:RELAY_PACS_REJECTED"], 1,
        "{v:#}"
    );
    assert_eq!(s["failures"]["aborted"], 1);
    assert_eq!(s["failures"]["duplicate"], 1);
    assert_eq!(s["failures"]["expired"], 1);
    let median = s["median_ms"].as_u64().expect("a delivery was timed");
    assert!(median > 0 && median < 120_000, "{median}");
    assert_eq!(s["p95_ms"].as_u64(), Some(median), "one delivery");

    // By user: the uploader sees one row, itself; the admin every uploader.
    let v = json(&t, &clinic, "/api/v1/analytics/by-user").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v:#}");
    assert_eq!(rows[0]["key"], clinic.id);
    assert_eq!(rows[0]["username"], "clinic");
    let v = json(&t, &admin, "/api/v1/analytics/by-user").await;
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v:#}");
    let of = |name: &str| rows.iter().find(|r| r["username"] == name).unwrap().clone();
    assert_eq!(of("clinic")["uploads"], 4);
    assert_eq!(of("=2+5")["uploads"], 2, "{v:#}");
    assert_eq!(of("=2+5")["delivered"], 2);
    assert_eq!(of("=2+5")["refused"], 1, "the STOW-RS part: {v:#}");
    let v = json(&t, &formula, "/api/v1/analytics/summary").await;
    assert_eq!(v["rows"][0]["uploads"], 2, "{v:#}");
    assert_eq!(v["rows"][0]["refused"], 1);
    assert_eq!(v["rows"][0]["duplicate"], 0);

    // Naming another user: the admin may, the uploader is refused (audited).
    let v = json(&t, &admin, "/api/v1/analytics/summary?user=clinic").await;
    assert_eq!(v["rows"][0]["uploads"], 4, "{v:#}");
    let r = get(&t, &clinic, "/api/v1/analytics/summary?user=%3D2%2B5").await;
    expect_error(r, 403, "RELAY_FORBIDDEN").await;
    let denied = t.audit().await.into_iter().any(|e| {
        e.user == clinic.id
            && e.action == relaypacs_core::AuditAction::DataAccessed
            && e.outcome != relaypacs_core::AuditOutcome::Success
            && e.detail.contains("RELAY_FORBIDDEN")
    });
    assert!(denied, "the refusal is in the audit trail");
    let granted = t.audit().await.into_iter().any(|e| {
        e.user == admin.id
            && e.action == relaypacs_core::AuditAction::DataAccessed
            && e.outcome == relaypacs_core::AuditOutcome::Success
            && e.detail.starts_with("analytics group=user")
    });
    assert!(granted, "the admin's read is audited");

    // By modality, and the modality filter.
    let v = json(&t, &admin, "/api/v1/analytics/by-modality").await;
    let rows = v["rows"].as_array().unwrap();
    let ct_row = rows.iter().find(|r| r["key"] == "CT").expect("a CT row");
    assert_eq!(ct_row["delivered"], 1, "{v:#}");
    assert_eq!(ct_row["dead_lettered"], 1, "{v:#}");
    let ot_row = rows.iter().find(|r| r["key"] == "OT").expect("an OT row");
    assert_eq!(ot_row["delivered"], 2, "{v:#}");
    let v = json(&t, &admin, "/api/v1/analytics/summary?modality=OT").await;
    assert_eq!(v["rows"][0]["delivered"], 2, "{v:#}");
    assert_eq!(v["rows"][0]["dead_lettered"], 0, "{v:#}");

    // By day: today, in the default range; an earlier range is empty.
    let today = relaypacs_core::analytics::day_text(time::OffsetDateTime::now_utc().date());
    let v = json(&t, &admin, "/api/v1/analytics/by-day").await;
    let rows = v["rows"].as_array().unwrap();
    if first_day == today {
        assert_eq!(rows.len(), 1, "{v:#}");
        assert_eq!(rows[0]["key"], today);
        assert_eq!(rows[0]["uploads"], 6);
    } else {
        // The run crossed midnight UTC: the uploads fall on either day.
        assert!(
            rows.iter()
                .all(|r| r["key"] == first_day || r["key"] == today),
            "{v:#}"
        );
        let uploads: u64 = rows.iter().map(|r| r["uploads"].as_u64().unwrap()).sum();
        assert_eq!(uploads, 6, "{v:#}");
    }
    let v = json(
        &t,
        &admin,
        "/api/v1/analytics/by-day?from=2020-01-01&to=2020-12-31",
    )
    .await;
    assert!(v["rows"].as_array().unwrap().is_empty(), "{v:#}");

    // CSV: by `format=csv` and by `Accept: text/csv`; parsed back.
    let r = get(&t, &admin, "/api/v1/analytics/by-user?format=csv").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.starts_with("attachment; filename=\"relaypacs-analytics-user-"),
        "{disposition}"
    );
    let body = r.bytes().await.unwrap();
    assert!(body.ends_with(b"\r\n"), "CRLF line ends");
    let rows = parse_csv(&body);
    assert_eq!(rows[0][0], "user");
    assert_eq!(rows[0][1], "label");
    assert_eq!(rows.len(), 3, "header and two users: {rows:?}");
    let label = column(&rows, "label");
    let uploads = column(&rows, "uploads");
    let failures = column(&rows, "failures");
    let eq_row = rows.iter().find(|r| r[0] == formula.id).unwrap();
    assert_eq!(eq_row[label], "'=2+5", "the formula is neutralised");
    assert_eq!(eq_row[uploads], "2");
    let clinic_row = rows.iter().find(|r| r[0] == clinic.id).unwrap();
    assert_eq!(clinic_row[label], "clinic");
    assert_eq!(clinic_row[uploads], "4");
    assert!(
        clinic_row[failures].contains("refused:RELAY_DICOM_NOT_DICOM=1"),
        "{clinic_row:?}"
    );
    let r = t
        .req(Method::GET, "/api/v1/analytics/summary", &clinic)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let rows = parse_csv(&r.bytes().await.unwrap());
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1][column(&rows, "delivered")], "1");
    assert_eq!(rows[1][column(&rows, "dead_lettered")], "1");

    // Bad input: 400 naming the parameter, never 5xx.
    for (q, name) in [
        ("from=2026-02-30", "from"),
        ("to=tomorrow", "to"),
        ("from=2020-01-01&to=2026-01-01", "to"),
        ("modality=c%3Bt", "modality"),
        ("format=xlsx", "format"),
        ("sort=desc", "sort"),
    ] {
        let r = get(&t, &admin, &format!("/api/v1/analytics/by-day?{q}")).await;
        let v = expect_error(r, 400, "RELAY_BAD_QUERY").await;
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{name}:")), "{q}: {msg}");
    }
    let r = t
        .http
        .get(format!("{}/api/v1/analytics/summary", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    t.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the cells (quotes, commas, CR, LF, formula starts,
    /// non-ASCII), the CSV parses back to the cells with the formula
    /// neutralisation applied, one record per row, CRLF after each.
    #[test]
    fn csv_round_trips_with_formulas_neutralised(
        rows in proptest::collection::vec(
            proptest::collection::vec("[=+\\-@\t\r\n\",a-zé€ ']{0,12}", 3),
            0..8,
        )
    ) {
        let header = ["a", "=b", "c"];
        let out = write_csv(&header, rows.clone()).unwrap();
        prop_assert!(out.ends_with(b"\r\n"));
        let parsed = parse_csv(&out);
        let mut want = vec![header.iter().map(|c| neutralise_cell(c).into_owned()).collect::<Vec<_>>()];
        want.extend(rows.iter().map(|r| r.iter().map(|c| neutralise_cell(c).into_owned()).collect()));
        prop_assert_eq!(parsed, want);
    }
}
