//! STOW-RS parts are held in memory up to 1 MiB and spooled to disk
//! beyond: both kinds in one request are stored whole (the pipeline checks
//! every stored byte against the SHA-256 taken while the part arrived, so
//! a part cut or doubled where it spills to disk is refused), and no spool
//! file is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use relaypacs_core::testing::dicom_gen::new_uid;
use relaypacs_http::auth::Role;
use serde_json::Value;

#[tokio::test]
async fn small_parts_in_memory_and_large_ones_spooled_are_stored_whole() {
    let t = TestServer::start().await;
    let u = t.user("spooler", Role::Uploader).await;
    let study = new_uid();
    let small = dicom(Some(&study), 64);
    let large = dicom(Some(&study), 1024);
    let near = dicom(Some(&study), 700);
    assert!(small.len() < 1 << 20);
    assert!(large.len() > 1 << 20, "{} bytes", large.len());
    assert!(
        near.len() < 1 << 20 && near.len() > 900 << 10,
        "{} bytes",
        near.len()
    );
    let body = stow_body(&[&small, &large, &near]);
    let r = t.stow(&u, "/dicomweb/studies", body).await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["00081199"]["Value"].as_array().map(Vec::len),
        Some(3),
        "{v}"
    );
    assert!(v.get("00081198").is_none(), "{v}");
    let left: Vec<_> = std::fs::read_dir(t.data().join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "spool files left: {left:?}");
}
