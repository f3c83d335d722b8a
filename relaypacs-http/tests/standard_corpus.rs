//! A corpus made in the test run by other toolkits (dcmtk: dump2dcm,
//! img2dcm, dcmconv to explicit/implicit/big endian/deflated, dcmcrle,
//! dcmcjpeg, dcmcjpls) and by our generator's standard variants (empty and
//! absent Type 2 attributes, YBR_FULL_422, 1-bit, multi-frame, float pixel
//! data, SR without pixel data, an image without Pixel Data) goes through
//! STOW-RS and tus into a real Orthanc that already holds a conflicting
//! object for some of the UIDs:
//! - every file dcmtk reads (dcmftest, dcmdump -E) with the four Type 1
//!   UIDs is accepted;
//! - no study is called delivered whose PACS copy differs from what was
//!   sent (each delivered instance is read back from Orthanc and compared);
//! - every conflict is dead-lettered (planted at the PACS) or refused at
//!   upload (accepted by the gateway before), with the UID named.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestServer, User};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, generate, standard_variants};
use relaypacs_http::auth::Role;
use relaypacs_http::config::{DicomWebSinkConfig, SinkConfig};
use relaypacs_test_peers::{Orthanc, tool};
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One file of the corpus.
struct Item {
    name: String,
    bytes: Vec<u8>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether dcmtk reads the file: `dcmftest` says it is Part-10 and
/// `dcmdump -E` (errors to stderr, non-zero on a parse error) succeeds.
fn dcmtk_reads(path: &Path) -> bool {
    let ft = Command::new(tool("dcmftest")).arg(path).output().unwrap();
    let dump = Command::new(tool("dcmdump"))
        .arg("-E")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&ft.stdout).starts_with("yes") && dump.status.success()
}

fn base(dir: &Path, name: &str, spec: DicomSpec) -> PathBuf {
    let p = dir.join(format!("{name}.base.dcm"));
    std::fs::write(&p, generate(&spec).unwrap()).unwrap();
    p
}

fn gray16() -> DicomSpec {
    DicomSpec {
        rows: 64,
        cols: 64,
        sop_class: SopClass::Ct,
        ..DicomSpec::default()
    }
}

fn gray8() -> DicomSpec {
    DicomSpec {
        bits_allocated: Some(8),
        ..gray16()
    }
}

/// Files made by dcmtk's own tools, each from a fresh base (its own UIDs).
fn dcmtk_made(dir: &Path) -> Vec<Item> {
    let mut out = Vec::new();
    let mut convert = |name: &str, spec: DicomSpec, prog: &str, args: &[&str]| {
        let input = base(dir, name, spec);
        let output = dir.join(format!("{name}.dcm"));
        run(Command::new(tool(prog)).args(args).arg(&input).arg(&output));
        out.push(Item {
            name: name.into(),
            bytes: std::fs::read(&output).unwrap(),
        });
    };
    convert("dcmconv-explicit-le", gray16(), "dcmconv", &["+te"]);
    convert("dcmconv-implicit-le", gray16(), "dcmconv", &["+ti"]);
    convert("dcmconv-big-endian", gray16(), "dcmconv", &["+tb"]);
    convert("dcmconv-deflated", gray16(), "dcmconv", &["+td"]);
    convert("dcmcrle-rle", gray16(), "dcmcrle", &[]);
    convert("dcmcjpeg-lossless", gray16(), "dcmcjpeg", &["+e1"]);
    convert("dcmcjpeg-baseline", gray8(), "dcmcjpeg", &["+eb"]);
    convert("dcmcjpls-lossless", gray16(), "dcmcjpls", &[]);
    convert("dcmcjpls-near-lossless", gray8(), "dcmcjpls", &["+en"]);
    // img2dcm from a JPEG that dcmj2pnm made: JPEG Baseline, Secondary
    // Capture, UIDs of img2dcm's own.
    let src = base(dir, "img2dcm", gray8());
    let jpg = dir.join("img2dcm.jpg");
    run(Command::new(tool("dcmj2pnm"))
        .arg("+oj")
        .arg(&src)
        .arg(&jpg));
    let img = dir.join("img2dcm.dcm");
    run(Command::new(tool("img2dcm"))
        .args([
            "-i",
            "JPEG",
            "-k",
            "PatientID=IMG2DCM-1",
            "-k",
            "PatientName=Img^Test",
        ])
        .arg(&jpg)
        .arg(&img));
    out.push(Item {
        name: "img2dcm-jpeg".into(),
        bytes: std::fs::read(&img).unwrap(),
    });
    // dump2dcm from a text dump with raw pixels, as a site would script it.
    let raw = dir.join("pixel.raw");
    std::fs::write(&raw, relaypacs_core::testing::pattern(7, 32 * 32 * 2)).unwrap();
    let uid = relaypacs_core::testing::dicom_gen::new_uid;
    let dump = format!(
        "(0002,0010) UI =LittleEndianExplicit\n\
         (0008,0016) UI =SecondaryCaptureImageStorage\n\
         (0008,0018) UI [{sop}]\n\
         (0008,0060) CS [OT]\n\
         (0010,0010) PN [Dump^Test]\n\
         (0010,0020) LO [DUMP-1]\n\
         (0020,000d) UI [{study}]\n\
         (0020,000e) UI [{series}]\n\
         (0028,0002) US 1\n\
         (0028,0004) CS [MONOCHROME2]\n\
         (0028,0010) US 32\n\
         (0028,0011) US 32\n\
         (0028,0100) US 16\n\
         (0028,0101) US 16\n\
         (0028,0102) US 15\n\
         (0028,0103) US 0\n\
         (7fe0,0010) OW ={raw}\n",
        sop = uid(),
        study = uid(),
        series = uid(),
        raw = raw.display()
    );
    let dump_path = dir.join("sc.dump");
    std::fs::write(&dump_path, dump).unwrap();
    let made = dir.join("dump2dcm.dcm");
    run(Command::new(tool("dump2dcm"))
        .arg("+te")
        .arg(&dump_path)
        .arg(&made));
    out.push(Item {
        name: "dump2dcm".into(),
        bytes: std::fs::read(&made).unwrap(),
    });
    out
}

/// Another object under the same SOP Instance UID: the same file with
/// another Patient's Name (dcmodify keeps every UID).
fn other_version(dir: &Path, item: &Item) -> Vec<u8> {
    let p = dir.join(format!("{}.other.dcm", item.name));
    std::fs::write(&p, &item.bytes).unwrap();
    run(Command::new(tool("dcmodify"))
        .args(["-nb", "-i", "(0010,0010)=Other^Version"])
        .arg(&p));
    std::fs::read(&p).unwrap()
}

fn sop_of(bytes: &[u8]) -> String {
    relaypacs_core::dicom::identify(bytes, bytes.len() as u64, &Default::default())
        .sop_instance_uid
        .expect("the corpus file has a SOP Instance UID")
}

/// SHA-256 of the data set after the file meta group.
fn data_set_digest(bytes: &[u8]) -> String {
    let mut h = relaypacs_core::dicom::Part10Hasher::data_set_only(1 << 20);
    h.update(bytes);
    h.finish().data_set.expect("a Part-10 file").to_hex()
}

async fn stow(t: &TestServer, u: &User, bytes: &[u8]) -> (u16, Value) {
    let boundary = "corpus-boundary-7d3f";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = t
        .req(Method::POST, "/dicomweb/studies", u)
        .header(
            "content-type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .header("accept", "application/dicom+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Whether a STOW-RS answer references `sop` as stored.
fn stored(v: &Value, sop: &str) -> bool {
    v["00081199"]["Value"]
        .as_array()
        .is_some_and(|items| items.iter().any(|i| i["00081155"]["Value"][0] == sop))
}

/// The failed item for `sop`, if any.
fn failed_item<'a>(v: &'a Value, sop: &str) -> Option<&'a Value> {
    v["00081198"]["Value"]
        .as_array()?
        .iter()
        .find(|i| i["00081155"]["Value"][0] == sop)
}

/// Every study of `u`, page after page.
async fn studies(t: &TestServer, u: &User) -> Vec<Value> {
    let (mut all, mut path) = (Vec::new(), "/api/v1/studies".to_string());
    loop {
        let r = t.req(Method::GET, &path, u).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        all.extend(v["items"].as_array().cloned().unwrap());
        match v["next"].as_str() {
            Some(c) => path = format!("/api/v1/studies?cursor={c}"),
            None => return all,
        }
    }
}

fn sops_of_study(v: &Value) -> Vec<String> {
    v["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            f["dicom"]["sop_instance_uid"]
                .as_str()
                .or(f["sop_instance_uid"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_other_toolkits_reaches_orthanc_and_no_differing_copy_is_called_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut corpus: Vec<Item> = standard_variants()
        .into_iter()
        .map(|(name, bytes)| Item {
            name: name.to_owned(),
            bytes,
        })
        .collect();
    corpus.extend(dcmtk_made(dir.path()));
    // Only files dcmtk itself reads are in the promise; every one of them
    // carries the four Type 1 UIDs here.
    for item in &corpus {
        let p = dir.path().join(format!("{}.check.dcm", item.name));
        std::fs::write(&p, &item.bytes).unwrap();
        assert!(dcmtk_reads(&p), "{}: dcmtk does not read it", item.name);
    }
    assert!(corpus.len() >= 20, "only {} files", corpus.len());

    let o = tokio::task::block_in_place(Orthanc::start);
    let sink = SinkConfig::StowRs(DicomWebSinkConfig {
        url: o.dicomweb(),
        user: Some(o.user.clone()),
        password: Some(o.password.clone().into()),
        ..DicomWebSinkConfig::default()
    });
    let t = TestServer::start_with(|c| {
        c.sinks = vec![sink];
        c.outbox.base_delay = Duration::from_millis(200);
        c.outbox.max_delay = Duration::from_millis(800);
        c.outbox.rescan_interval = Duration::from_secs(2);
    })
    .await;
    let u = t.user("clinician", Role::Uploader).await;

    // Orthanc already keeps another version of every third file.
    let mut planted = std::collections::BTreeMap::new();
    for item in corpus.iter().step_by(3) {
        let other = other_version(dir.path(), item);
        assert_ne!(data_set_digest(&other), data_set_digest(&item.bytes));
        tokio::task::block_in_place(|| o.upload(&other));
        planted.insert(sop_of(&item.bytes), (item.name.clone(), other));
    }

    // Half by STOW-RS (one file per request), half by tus (one file per
    // study session); every one is accepted at the gateway.
    for (i, item) in corpus.iter().enumerate() {
        let sop = sop_of(&item.bytes);
        if i % 2 == 0 {
            let (status, v) = stow(&t, &u, &item.bytes).await;
            assert!(
                (status == 200 || status == 202) && stored(&v, &sop),
                "{}: STOW-RS {status} {v:#}",
                item.name
            );
        } else {
            let sid = t.new_study(&u).await;
            t.upload(&u, &sid, &item.bytes).await;
            let r = t
                .req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), &u)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}: {:?}", item.name, r.text().await);
        }
    }

    // A later upload of an accepted UID with other bytes is refused at
    // upload, naming the UID (STOW-RS 0x0111), whichever way it comes.
    let reused = &corpus[1];
    let reused_sop = sop_of(&reused.bytes);
    let changed = other_version(dir.path(), reused);
    let (status, v) = stow(&t, &u, &changed).await;
    assert_eq!(status, 409, "{v:#}");
    let item = failed_item(&v, &reused_sop).unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(item["00081197"]["Value"][0], 0x0111, "{v:#}");

    // Every study ends delivered or dead-lettered.
    let start = Instant::now();
    let done = loop {
        let list = studies(&t, &u).await;
        let settled = list.iter().all(|s| {
            matches!(
                s["state"]["state"].as_str(),
                Some("delivered" | "dead_letter")
            )
        });
        if settled && list.len() == corpus.len() {
            break list;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not settled: {:#}",
            Value::Array(list)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let by_sop: std::collections::HashMap<String, &Item> =
        corpus.iter().map(|i| (sop_of(&i.bytes), i)).collect();
    let mut delivered = 0;
    for s in &done {
        let sops = sops_of_study(s);
        assert_eq!(sops.len(), 1, "{s:#}");
        let sop = &sops[0];
        let item = by_sop[sop];
        match s["state"]["state"].as_str() {
            Some("delivered") => {
                assert!(
                    !planted.contains_key(sop),
                    "{}: a conflict was called delivered",
                    item.name
                );
                assert_eq!(s["state"]["verified"], "content", "{s:#}");
                // What Orthanc holds is what was sent.
                let held = tokio::task::block_in_place(|| o.instance_file(sop))
                    .unwrap_or_else(|| panic!("{}: delivered but not in Orthanc", item.name));
                assert_eq!(
                    data_set_digest(&held),
                    data_set_digest(&item.bytes),
                    "{}: delivered, and the PACS copy differs",
                    item.name
                );
                delivered += 1;
            }
            Some("dead_letter") => {
                let (name, other) = planted
                    .get(sop)
                    .unwrap_or_else(|| panic!("{}: dead-lettered: {s:#}", item.name));
                let reason = s["state"]["reason"].as_str().unwrap_or_default();
                assert!(reason.contains(sop.as_str()), "{name}: {reason}");
                // The PACS kept its own version; nothing was overwritten.
                let held = tokio::task::block_in_place(|| o.instance_file(sop)).unwrap();
                assert_eq!(
                    Sha256::digest(&held),
                    Sha256::digest(other),
                    "{name}: the PACS copy changed"
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delivered + planted.len(), corpus.len());
    eprintln!(
        "{} files: {delivered} delivered and content-verified, {} conflicts dead-lettered",
        corpus.len(),
        planted.len()
    );
    t.stop().await;
}
