//! STOW-RS ingest (PS3.18 §10.5): statuses and the DICOM JSON response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use relaypacs_core::testing::dicom_gen::new_uid;
use relaypacs_http::auth::Role;
use reqwest::Method;
use serde_json::Value;

fn multipart(parts: &[(&str, Vec<u8>)], boundary: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (ct, body) in parts {
        out.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

async fn stow(t: &TestServer, u: &User, path: &str, body: Vec<u8>) -> reqwest::Response {
    t.req(Method::POST, path, u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=XyZ",
        )
        .header("accept", "application/dicom+json")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn seq_len(v: &Value, tag: &str) -> usize {
    v[tag]["Value"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn stow_statuses_and_response() {
    let t = TestServer::start().await;
    let u = t.user("zed", Role::Uploader).await;
    let study = new_uid();
    let a = dicom(Some(&study), 64);
    let b = dicom(Some(&study), 80);
    // All stored: 200 with ReferencedSOPSequence.
    let r = stow(
        &t,
        &u,
        "/dicomweb/studies",
        multipart(
            &[
                ("application/dicom", a.clone()),
                ("application/dicom", b.clone()),
            ],
            "XyZ",
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/dicom+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 2);
    assert_eq!(v["00081199"]["Value"][0]["00081155"]["vr"], "UI");
    // Accepted durably; delivered (to the archive sink) by the worker.
    t.wait_notifications(&u, 1).await;
    let archived = snapshot(&t.data().join("archive").join(&study));
    assert_eq!(archived.len(), 2, "both instances archived");
    // Some stored: 202 with FailedSOPSequence and a reason.
    let c = dicom(None, 64);
    let r = stow(
        &t,
        &u,
        "/dicomweb/studies",
        multipart(
            &[
                ("application/dicom", c),
                ("application/dicom", vec![0u8; 500]),
            ],
            "XyZ",
        ),
    )
    .await;
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 1);
    assert_eq!(seq_len(&v, "00081198"), 1);
    assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xC000);
    // None stored: 409.
    let r = stow(
        &t,
        &u,
        "/dicomweb/studies",
        multipart(&[("application/dicom", vec![1u8; 300])], "XyZ"),
    )
    .await;
    assert_eq!(r.status(), 409);
    // Target study mismatch: A900 for that instance.
    let other = dicom(None, 64);
    let r = stow(
        &t,
        &u,
        &format!("/dicomweb/studies/{study}"),
        multipart(&[("application/dicom", other)], "XyZ"),
    )
    .await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["00081198"]["Value"][0]["00081197"]["Value"][0], 0xA900);
    // Duplicate SOP instance in one request: 0111 for the second.
    let r = stow(
        &t,
        &u,
        "/dicomweb/studies",
        multipart(
            &[
                ("application/dicom", a.clone()),
                ("application/dicom", a.clone()),
            ],
            "XyZ",
        ),
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(seq_len(&v, "00081199"), 1, "{v}");
    // Wrong media type: 415.
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom+xml\"; boundary=XyZ",
        )
        .body(multipart(
            &[("application/dicom+xml", b"<x/>".to_vec())],
            "XyZ",
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_UNSUPPORTED_MEDIA_TYPE").await;
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header("content-type", "application/dicom")
        .body(a)
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "RELAY_UNSUPPORTED_MEDIA_TYPE").await;
    // Malformed multipart: 400 and nothing kept. (First let the worker
    // deliver the two accepted requests.)
    t.wait_notifications(&u, 2).await;
    let before = snapshot(&t.data().join("archive"));
    let r = t
        .req(Method::POST, "/dicomweb/studies", &u)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=XyZ",
        )
        .body(format!(
            "--XyZ\r\nContent-Type: application/dicom\r\n\r\n{}",
            "x".repeat(100)
        ))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "RELAY_BAD_MULTIPART").await;
    assert_eq!(snapshot(&t.data().join("archive")), before);
    // Unauthenticated: 401.
    let r = t
        .http
        .post(format!("{}/dicomweb/studies", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    t.stop().await;
}
