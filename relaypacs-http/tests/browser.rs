//! The web app end to end in Debian's Chromium (issue 13, "Done when"):
//! the real `relaypacs` binary with a STOW-RS destination (a real Orthanc),
//! two users (one with TOTP), a generated folder of three studies with a
//! non-DICOM file and two hostile ones, driven by playwright-core
//! (`clients/browser/upload.test.mjs`): login with TOTP, folder picker,
//! grouping, upload, offline mid-upload, reload, online again, every file
//! delivered, `delivered` and `report ready` notifications, the report, the
//! CSV export, a second upload cut by closing the browser and resumed after
//! it starts again, and a second user who sees none of it. Afterwards every
//! uploaded instance is fetched back from Orthanc and compared byte for
//! byte. Screenshots land in `target/browser-artifacts/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::binary;
use relaypacs_core::testing::dicom_gen::{
    DicomSpec, SopClass, generate, huge_declared_length, new_uid, pdf_report, write_large_file,
};
use relaypacs_test_peers::{Orthanc, free_port, tool};
use serde_json::json;
use sha2::{Digest, Sha256};

const PASSWORD_1: &str = "Harbor-Violet-Meadow-4417";
const PASSWORD_2: &str = "Copper-Thistle-Beacon-9082";

/// A minimal one-page PDF, as a radiologist's system would attach.
const REPORT_PDF: &[u8] = b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 100]>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The generated folder: what the browser should show and send.
struct Folder {
    root: PathBuf,
    /// Study Instance UID -> files the app should group under it.
    groups: Vec<(String, usize)>,
    /// SOP Instance UID and bytes of every file that must reach the PACS.
    delivered: Vec<(String, Vec<u8>)>,
    /// Study A: the one the reports are added to.
    study_a: String,
    patient_a: String,
    /// Files the app must list as skipped.
    skipped: Vec<String>,
    /// The file the server must refuse (its UID is not a UID).
    refused: String,
    /// Its size.
    refused_bytes: usize,
}

fn spec(study: &str, patient: &str, seed: u64) -> DicomSpec {
    DicomSpec {
        study_uid: study.to_owned(),
        series_uid: new_uid(),
        sop_instance_uid: new_uid(),
        patient_id: patient.to_owned(),
        seed,
        ..DicomSpec::default()
    }
}

/// Three studies (A: 4 small files; B: 3; C: 2 small and one of 200 MiB
/// so that going offline lands mid-upload), a text file, a file with a
/// 4 GiB declared length (refused in the browser) and one whose SOP
/// Instance UID is a path (read by the browser, refused by the server).
fn make_folder(dir: &Path) -> Folder {
    let root = dir.join("clinic-export");
    let mut delivered = Vec::new();
    let mut groups = Vec::new();
    let studies = [("A", "PAT-A", 4usize), ("B", "PAT-B", 3), ("C", "PAT-C", 2)];
    let mut uids = Vec::new();
    for (name, patient, n) in studies {
        let study = new_uid();
        let sub = root.join(format!("study-{name}"));
        std::fs::create_dir_all(&sub).unwrap();
        for i in 0..n {
            let s = spec(&study, patient, i as u64 + 1);
            let bytes = generate(&s).unwrap();
            std::fs::write(sub.join(format!("IM{i:04}.dcm")), &bytes).unwrap();
            delivered.push((s.sop_instance_uid.clone(), bytes));
        }
        uids.push((study, patient, n, sub));
    }
    // The large file of study C.
    let (study_c, patient_c, _, sub_c) = &uids[2];
    let big = spec(study_c, patient_c, 99);
    let big_path = sub_c.join("IM_LARGE.dcm");
    write_large_file(&big_path, &big, 200 << 20).unwrap();
    delivered.push((
        big.sop_instance_uid.clone(),
        std::fs::read(&big_path).unwrap(),
    ));
    // Study A gets a file the server refuses: a path for a SOP Instance UID.
    let (study_a, patient_a, _, sub_a) = &uids[0];
    let mut bad = spec(study_a, patient_a, 7);
    bad.sop_instance_uid = "../../etc/passwd".into();
    let bad = generate(&bad).unwrap();
    std::fs::write(sub_a.join("IM_BADUID.dcm"), &bad).unwrap();
    std::fs::write(
        root.join("README.txt"),
        "Exported by the clinic workstation.
"
        .repeat(10),
    )
    .unwrap();
    std::fs::write(
        root.join("study-B").join("corrupt.dcm"),
        huge_declared_length(),
    )
    .unwrap();
    for (study, _, n, _) in &uids {
        let extra = usize::from(study == study_a) + usize::from(study == study_c);
        groups.push((study.clone(), n + extra));
    }
    Folder {
        root,
        groups,
        delivered,
        study_a: study_a.clone(),
        patient_a: patient_a.to_string(),
        skipped: vec!["README.txt".into(), "corrupt.dcm".into()],
        refused: "IM_BADUID.dcm".into(),
        refused_bytes: bad.len(),
    }
}

/// RFC 6238 code of `step` (SHA-1, 6 digits), with the crate the server uses.
fn totp_code(secret_b32: &str, step: u64) -> String {
    common::totp(secret_b32, "browser").generate(step * 30)
}

/// Enrol TOTP for `user` (JSON login without a code, enrol, confirm with
/// the previous step's code so that the browser can use the current one).
async fn enrol_totp(http: &reqwest::Client, url: &str, user: &str, password: &str) -> String {
    let access = binary::access_token(http, url, user, password).await;
    let e = common::json_of(
        http.post(format!("{url}/api/v1/auth/totp"))
            .bearer_auth(&access),
    )
    .await;
    let secret = e["secret"].as_str().unwrap().to_owned();
    // The server takes its own step or the one before. Computed in the last
    // seconds of a step, the previous step's code could reach the server in
    // the next step, two behind: wait for a fresh step first.
    let now = time::OffsetDateTime::now_utc();
    let into_step = (now.unix_timestamp() as u64 % 30) * 1000 + u64::from(now.millisecond());
    if into_step > 25_000 {
        tokio::time::sleep(std::time::Duration::from_millis(30_000 - into_step + 200)).await;
    }
    let step = time::OffsetDateTime::now_utc().unix_timestamp() as u64 / 30 - 1;
    let r = http
        .post(format!("{url}/api/v1/auth/totp/confirm"))
        .bearer_auth(&access)
        .json(&json!({"code": totp_code(&secret, step)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_app_in_chromium_uploads_resumes_offline_and_delivers() {
    let started = Instant::now();
    let chromium = tool("chromium");
    let browser_dir = workspace().join("clients/browser");
    if !browser_dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let st = Command::new("bash")
            .arg(workspace().join("scripts/install-peers.sh"))
            .arg("clients")
            .status()
            .unwrap();
        assert!(st.success(), "npm ci of clients/browser failed");
    }
    let o = std::sync::Arc::new(tokio::task::spawn_blocking(Orthanc::start).await.unwrap());
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let folder = make_folder(dir.path());
    // A second visit: one study with a 120 MiB file, for the browser restart.
    let second = dir.path().join("second-visit");
    std::fs::create_dir_all(&second).unwrap();
    let restart_study = new_uid();
    let restart = spec(&restart_study, "PAT-D", 77);
    write_large_file(&second.join("IM_RESTART.dcm"), &restart, 120 << 20).unwrap();
    let restart_file = (
        restart.sop_instance_uid.clone(),
        std::fs::read(second.join("IM_RESTART.dcm")).unwrap(),
    );
    let port = free_port();
    let config = dir.path().join("relaypacs.toml");
    let outbox = "base_delay = 0.2\nmax_delay = 0.5\nreport_poll_interval = 0.3\n";
    let toml = o.gateway_config(port, &dir.path().join("data"), outbox);
    std::fs::write(&config, toml).unwrap();
    let args = [OsStr::new("--config"), config.as_os_str()];
    binary::add_user(&args, &[], "dr-ines", "uploader", PASSWORD_1);
    binary::add_user(&args, &[], "dr-omar", "uploader", PASSWORD_2);
    let log = std::fs::File::create(dir.path().join("relaypacs.log")).unwrap();
    let _gw = binary::Gateway::start(&config, port, log.into());
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let secret = enrol_totp(&http, &url, "dr-ines", PASSWORD_1).await;

    let artifacts = workspace().join("target/browser-artifacts");
    // Only this run's screenshots.
    let _ = std::fs::remove_dir_all(&artifacts);
    std::fs::create_dir_all(&artifacts).unwrap();
    let expect = json!({
        "groups": folder.groups.iter().map(|(u, n)| json!({"uid": u, "files": n})).collect::<Vec<_>>(),
        "skipped": folder.skipped,
        "refused": folder.refused,
        "large": "IM_LARGE.dcm",
        // Analytics count delivered and refused files (and their bytes).
        "bytes": folder.delivered.iter().map(|(_, b)| b.len()).sum::<usize>() + folder.refused_bytes,
        "sr_text": "No acute findings.",
        "files": folder.delivered.len() + 1,
        "report_study": folder.study_a,
        "restart": {"uid": restart_study, "file": "IM_RESTART.dcm"},
        "patient_a": folder.patient_a,
    });
    let mut node = Command::new("node")
        .arg(browser_dir.join("upload.test.mjs"))
        .current_dir(&browser_dir)
        .env("RELAYPACS_URL", &url)
        .env("CHROMIUM", &chromium)
        .env("USER1", "dr-ines")
        .env("PASSWORD1", PASSWORD_1)
        .env("TOTP1", &secret)
        .env("USER2", "dr-omar")
        .env("PASSWORD2", PASSWORD_2)
        .env("FOLDER", &folder.root)
        .env("FOLDER2", &second)
        .env("EXPECT", expect.to_string())
        .env("ARTIFACTS", &artifacts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The script has its own overall deadline (it exits non-zero).
    let (study_a, patient_a) = (folder.study_a.clone(), folder.patient_a.clone());
    let o2 = o.clone();
    let (status, reports_added) = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut stdin = node.stdin.take().unwrap();
        let out = std::io::BufReader::new(node.stdout.take().unwrap());
        let mut reports_added = false;
        for line in out.lines() {
            let line = line.unwrap();
            println!("browser: {line}");
            // Once the app shows every study delivered, the radiologist's
            // system adds an SR and an Encapsulated PDF report to study A.
            if line == "STEP delivered" && !reports_added {
                reports_added = true;
                let sr = generate(&DicomSpec {
                    sop_class: SopClass::BasicTextSr,
                    ..spec(&study_a, &patient_a, 500)
                })
                .unwrap();
                o2.upload(&sr);
                let (_, pdf_dcm) = pdf_report(&study_a, &patient_a, REPORT_PDF);
                o2.upload(&pdf_dcm);
                writeln!(stdin, "reports added").unwrap();
            }
        }
        (node.wait().unwrap(), reports_added)
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the browser script failed ({status}); screenshots in {}; server log:\n{}",
        artifacts.display(),
        std::fs::read_to_string(dir.path().join("relaypacs.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        reports_added,
        "the script never reported the studies delivered"
    );
    // Every file the browser sent is in the PACS, byte for byte.
    let o2 = o.clone();
    let mut delivered = folder.delivered.clone();
    delivered.push(restart_file);
    tokio::task::spawn_blocking(move || {
        for (sop, bytes) in &delivered {
            let got = o2.instance_file(sop).unwrap_or_else(|| {
                panic!(
                    "{sop} is not in the PACS ({} instances there)",
                    o2.instance_count()
                )
            });
            assert_eq!(
                hex::encode(Sha256::digest(&got)),
                hex::encode(Sha256::digest(bytes)),
                "{sop} differs in the PACS"
            );
        }
        assert!(o2.instance_id("../../etc/passwd").is_none());
    })
    .await
    .unwrap();
    println!(
        "browser test: {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
