//! Reports a clinician can read, through the server and a real Orthanc:
//! a Structured Report made by dcmtk (`dump2dcm`) rendered as HTML and as
//! PDF, compared with dcmtk's own `dsr2html` (every text, code and
//! measurement it shows is in ours; `pdftotext` reads the same in the
//! PDF); an Encapsulated PDF made by dcmtk (`pdf2dcm`) served as exactly
//! the embedded PDF; hostile reports refused with a JSON 4xx; another
//! user sees nothing, and the attempt is audited.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, User, dicom, expect_error, fast_outbox, stow_sink};
use relaypacs_core::testing::dicom_gen::new_uid;
use relaypacs_core::{AuditAction, AuditOutcome};
use relaypacs_http::auth::Role;
use relaypacs_test_peers::{Orthanc, tool};
use reqwest::Method;
use serde_json::Value;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

async fn wait_for(t: &TestServer, u: &User, id: &str, what: &str, pred: impl Fn(&Value) -> bool) {
    let timing = (Duration::from_secs(90), Duration::from_millis(150));
    t.wait_study(u, id, what, timing, pred).await;
}

/// Run a dcmtk (or poppler) tool; panics with its output if it fails.
fn run(name: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(tool(name)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A dcmtk text dump of a Comprehensive SR of `study`: nested containers,
/// TEXT, CODE and NUM (with UCUM units), text that needs escaping.
fn sr_dump(study: &str, sop: &str) -> String {
    let code = |v: &str, s: &str, m: &str| {
        format!(
            "(fffe,e000) na\n(0008,0100) SH [{v}]\n(0008,0102) SH [{s}]\n(0008,0104) LO [{m}]\n(fffe,e00d) na\n"
        )
    };
    let seq = |tag: &str, items: &str| format!("({tag}) SQ\n{items}(fffe,e0dd) na\n");
    let item = |body: &str| format!("(fffe,e000) na\n{body}(fffe,e00d) na\n");
    let named = |vt: &str, v: &str, s: &str, m: &str| {
        format!(
            "(0040,a010) CS [CONTAINS]\n(0040,a040) CS [{vt}]\n{}",
            seq("0040,a043", &code(v, s, m))
        )
    };
    let text = |v: &str, m: &str, t: &str| {
        item(&format!(
            "{}(0040,a160) UT [{t}]\n",
            named("TEXT", v, "DCM", m)
        ))
    };
    let num = item(&format!(
        "{}{}",
        named("NUM", "410668003", "SCT", "Length"),
        seq(
            "0040,a300",
            &item(&format!(
                "{}(0040,a30a) DS [12.5]\n",
                seq("0040,08ea", &code("mm", "UCUM", "millimeter"))
            ))
        )
    ));
    let coded = item(&format!(
        "{}{}",
        named("CODE", "121071", "DCM", "Finding"),
        seq("0040,a168", &code("27925004", "SCT", "Nodule"))
    ));
    let findings = item(&format!(
        "{}(0040,a050) CS [SEPARATE]\n{}",
        named("CONTAINER", "121070", "DCM", "Findings"),
        seq(
            "0040,a730",
            &format!(
                "{}{num}{coded}",
                text("121071", "Finding", "Small nodule in the right upper lobe.")
            )
        )
    ));
    let measurements = item(&format!(
        "{}(0040,a050) CS [SEPARATE]\n{}",
        named("CONTAINER", "125007", "DCM", "Measurement Group"),
        seq(
            "0040,a730",
            &text(
                "121106",
                "Comment",
                "Second reader agrees; no change since 2025."
            )
        )
    ));
    let conclusions = item(&format!(
        "{}(0040,a050) CS [SEPARATE]\n{}",
        named("CONTAINER", "121076", "DCM", "Conclusions"),
        seq(
            "0040,a730",
            &format!(
                "{}{}",
                text(
                    "121077",
                    "Conclusion",
                    "Follow-up CT in 6 months <recommended> & advised."
                ),
                // A nested container three levels down.
                item(&format!(
                    "{}(0040,a050) CS [SEPARATE]\n{}",
                    named("CONTAINER", "111", "DCM", "Details"),
                    seq("0040,a730", &measurements)
                ))
            )
        )
    ));
    format!(
        "(0008,0005) CS [ISO_IR 100]\n\
         (0008,0016) UI =ComprehensiveSRStorage\n\
         (0008,0018) UI [{sop}]\n\
         (0008,0020) DA [20261122]\n\
         (0008,0023) DA [20261123]\n\
         (0008,0030) TM [101500]\n\
         (0008,0033) TM [120000]\n\
         (0008,0050) SH [ACC123]\n\
         (0008,0060) CS [SR]\n\
         (0008,0090) PN [Ref^Doctor]\n\
         (0008,1030) LO [CT chest]\n\
         (0010,0010) PN [Doe^Jane]\n\
         (0010,0020) LO [PAT0001]\n\
         (0010,0030) DA [19700101]\n\
         (0010,0040) CS [F]\n\
         (0020,000d) UI [{study}]\n\
         (0020,000e) UI [{series}]\n\
         (0020,0010) SH [1]\n\
         (0020,0011) IS [901]\n\
         (0020,0013) IS [1]\n\
         (0040,a040) CS [CONTAINER]\n\
         {title}\
         (0040,a050) CS [SEPARATE]\n\
         (0040,a491) CS [COMPLETE]\n\
         (0040,a493) CS [UNVERIFIED]\n\
         {content}",
        series = new_uid(),
        title = seq(
            "0040,a043",
            &code("18748-4", "LN", "Diagnostic imaging report")
        ),
        content = seq("0040,a730", &format!("{findings}{conclusions}")),
    )
}

/// A broken SR: a CODE item without its Concept Code.
fn broken_sr_dump(study: &str, sop: &str) -> String {
    format!(
        "(0008,0016) UI =ComprehensiveSRStorage\n(0008,0018) UI [{sop}]\n\
         (0010,0020) LO [PAT0001]\n(0020,000d) UI [{study}]\n(0020,000e) UI [{}]\n\
         (0040,a040) CS [CONTAINER]\n(0040,a730) SQ\n(fffe,e000) na\n\
         (0040,a010) CS [CONTAINS]\n(0040,a040) CS [CODE]\n(fffe,e00d) na\n(fffe,e0dd) na\n",
        new_uid()
    )
}

/// Not an SR inside: an SR class whose root is TEXT.
fn rootless_sr_dump(study: &str, sop: &str) -> String {
    format!(
        "(0008,0016) UI =BasicTextSRStorage\n(0008,0018) UI [{sop}]\n\
         (0010,0020) LO [PAT0001]\n(0020,000d) UI [{study}]\n(0020,000e) UI [{}]\n\
         (0040,a040) CS [TEXT]\n(0040,a160) UT [<script>alert(1)</script>]\n",
        new_uid()
    )
}

/// An Encapsulated PDF whose document is HTML.
fn html_pdf_dump(study: &str, sop: &str) -> String {
    format!(
        "(0008,0016) UI =EncapsulatedPDFStorage\n(0008,0018) UI [{sop}]\n\
         (0010,0020) LO [PAT0001]\n(0020,000d) UI [{study}]\n(0020,000e) UI [{}]\n\
         (0042,0011) OB 3c\\68\\74\\6d\\6c\\3e\n(0042,0012) LO [text/html]\n",
        new_uid()
    )
}

/// dump2dcm `dump` into `dir/name`, returning the file's bytes.
fn dump2dcm(dir: &Path, name: &str, dump: &str) -> Vec<u8> {
    let txt = dir.join(format!("{name}.dump"));
    let dcm = dir.join(format!("{name}.dcm"));
    std::fs::write(&txt, dump).unwrap();
    run(
        "dump2dcm",
        &["+te".as_ref(), txt.as_os_str(), dcm.as_os_str()],
    );
    std::fs::read(dcm).unwrap()
}

/// The text of an HTML fragment, one line per block, entities decoded.
fn text_lines(html: &str) -> Vec<String> {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push('\n');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split('\n')
        .map(|l| {
            l.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect()
}

fn collapsed(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn get(t: &TestServer, u: &User, path: &str) -> reqwest::Response {
    t.req(Method::GET, path, u).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_read_like_dcmtk_reads_them_and_only_by_their_owner() {
    let o = Arc::new(blocking(Orthanc::start).await);
    let t = TestServer::start_with(|c| fast_outbox(c, stow_sink(&o, &o.password))).await;
    let u = t.user("clinic", Role::Uploader).await;
    let other = t.user("elsewhere", Role::Uploader).await;
    let admin = t.user("root", Role::Admin).await;

    let sid = t.new_study(&u).await;
    let image = dicom(None, 16);
    let study_uid =
        relaypacs_core::dicom::validate_dicom(&image, image.len() as u64, &Default::default())
            .unwrap()
            .study_instance_uid
            .to_string();
    t.upload(&u, &sid, &image).await;
    let r = t
        .req(Method::POST, &format!("/api/v1/studies/{sid}/complete"), &u)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for(&t, &u, &sid, "delivered", |v| {
        v["state"]["state"] == "delivered"
    })
    .await;

    // The radiologist's system adds reports made by dcmtk.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path().to_path_buf();
    let (sr_sop, broken_sop, rootless_sop, html_sop) = (new_uid(), new_uid(), new_uid(), new_uid());
    let sr = dump2dcm(&d, "sr", &sr_dump(&study_uid, &sr_sop));
    let broken = dump2dcm(&d, "broken", &broken_sr_dump(&study_uid, &broken_sop));
    let rootless = dump2dcm(&d, "rootless", &rootless_sr_dump(&study_uid, &rootless_sop));
    let html_pdf = dump2dcm(&d, "htmlpdf", &html_pdf_dump(&study_uid, &html_sop));
    // An odd-length PDF: pdf2dcm pads it with one byte.
    let pdf =
        b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
            .to_vec();
    assert_eq!(pdf.len() % 2, 1);
    std::fs::write(d.join("image.dcm"), &image).unwrap();
    std::fs::write(d.join("report.pdf"), &pdf).unwrap();
    run(
        "pdf2dcm",
        &[
            "+st".as_ref(),
            d.join("image.dcm").as_os_str(),
            "+t".as_ref(),
            "Radiology report".as_ref(),
            d.join("report.pdf").as_os_str(),
            d.join("pdf.dcm").as_os_str(),
        ],
    );
    let pdf_dcm = std::fs::read(d.join("pdf.dcm")).unwrap();
    let pdf_sop =
        relaypacs_core::dicom::validate_dicom(&pdf_dcm, pdf_dcm.len() as u64, &Default::default())
            .unwrap()
            .sop_instance_uid
            .to_string();
    for f in [&sr, &broken, &rootless, &html_pdf, &pdf_dcm] {
        let (o, f) = (o.clone(), f.clone());
        blocking(move || o.upload(&f)).await;
    }
    wait_for(&t, &u, &sid, "five reports", |v| {
        v["delivery"]["reports"] == 5
    })
    .await;
    let base = |sop: &str| format!("/api/v1/studies/{sid}/reports/{sop}");

    // The SR as HTML.
    let r = get(&t, &u, &format!("{}/view", base(&sr_sop))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    assert_eq!(
        r.headers()["content-security-policy"],
        relaypacs_http::report_render::REPORT_CSP
    );
    let html = r.text().await.unwrap();
    for want in [
        "<h1>Diagnostic imaging report</h1>",
        "<h2>Findings</h2>",
        "<h2>Conclusions</h2>",
        "<h3>Details</h3>",
        "<h4>Measurement Group</h4>",
        "Small nodule in the right upper lobe.",
        "Nodule (27925004, SCT)",
        "12.5 mm",
        "Follow-up CT in 6 months &lt;recommended&gt; &amp; advised.",
        "Jane Doe (female, *1970-01-01, #PAT0001)",
    ] {
        assert!(html.contains(want), "{want:?} missing from {html}");
    }
    assert!(!html.to_lowercase().contains("<script"), "{html}");
    let ours = collapsed(&text_lines(&html).join(" "));

    // dcmtk's rendering of the same file: every line of its content (and
    // its patient line) is in ours.
    let dsr = run("dsr2html", &[d.join("sr.dcm").as_os_str()]);
    let dsr = String::from_utf8_lossy(&dsr).into_owned();
    let start = dsr.find("<hr>").expect("dsr2html header rule");
    let end = dsr.rfind("<hr>").expect("dsr2html footer rule");
    let content = text_lines(&dsr[start..end]);
    assert!(content.len() >= 12, "{content:?}");
    let patient_row = text_lines(&dsr[..start])
        .into_iter()
        .skip_while(|l| l != "Patient:")
        .nth(1)
        .unwrap();
    for line in content.iter().chain([&patient_row]) {
        assert!(
            ours.contains(line.as_str()),
            "dsr2html shows {line:?}; ours: {ours}"
        );
    }

    // The SR as PDF: pdftotext reads the same.
    let r = get(&t, &u, &format!("{}/pdf", base(&sr_sop))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    let cd = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cd.starts_with("attachment; filename=\"report-") && cd.ends_with(".pdf\""),
        "{cd}"
    );
    let rendered = r.bytes().await.unwrap();
    assert!(rendered.starts_with(b"%PDF-"));
    std::fs::write(d.join("sr.pdf"), &rendered).unwrap();
    let text = run("pdftotext", &[d.join("sr.pdf").as_os_str(), "-".as_ref()]);
    let text = collapsed(&String::from_utf8_lossy(&text));
    for line in content.iter().chain([&patient_row]) {
        assert!(
            text.contains(line.as_str()),
            "dsr2html shows {line:?}; the PDF: {text}"
        );
    }

    // The Encapsulated PDF: exactly the embedded document, inline and as
    // an attachment.
    for (route, disposition) in [("view", "inline"), ("pdf", "attachment")] {
        let r = get(&t, &u, &format!("{}/{route}", base(&pdf_sop))).await;
        assert_eq!(r.status(), 200, "{route}");
        assert_eq!(r.headers()["content-type"], "application/pdf");
        let cd = r.headers()["content-disposition"].to_str().unwrap();
        assert!(cd.starts_with(&format!("{disposition}; filename=")), "{cd}");
        assert_eq!(r.bytes().await.unwrap().as_ref(), &pdf[..], "{route}");
    }

    // Hostile or unsupported reports: a JSON 4xx naming the problem.
    for (sop, status, code) in [
        (&rootless_sop, 415, "RELAY_REPORT_NOT_SR"),
        (&html_sop, 415, "RELAY_REPORT_NOT_PDF"),
        (&broken_sop, 422, "RELAY_REPORT_MALFORMED"),
    ] {
        for route in ["view", "pdf"] {
            let r = get(&t, &u, &format!("{}/{route}", base(sop))).await;
            expect_error(r, status, code).await;
        }
    }
    // An unknown report: 404.
    let r = get(&t, &u, &format!("{}/view", base(&new_uid()))).await;
    expect_error(r, 404, "RELAY_NOT_FOUND").await;

    // An admin may read it; another user may not, and it is audited.
    let r = get(&t, &admin, &format!("{}/view", base(&sr_sop))).await;
    assert_eq!(r.status(), 200);
    for route in ["view", "pdf"] {
        let r = get(&t, &other, &format!("{}/{route}", base(&sr_sop))).await;
        expect_error(r, 404, "RELAY_NOT_FOUND").await;
    }
    let audit = t.audit().await;
    assert!(audit.iter().any(|e| e.action == AuditAction::DataAccessed
        && e.user == u.id
        && e.outcome == AuditOutcome::Success
        && e.detail.contains(&sr_sop)));
    assert!(
        audit.iter().any(|e| e.action == AuditAction::SecurityAlert
            && e.user == other.id
            && e.detail.contains("denied read_report")
            && e.detail.contains(&format!("session {sid}"))),
        "{audit:#?}"
    );
    assert!(!audit.iter().any(|e| e.user == other.id
        && e.outcome == AuditOutcome::Success
        && e.action == AuditAction::DataAccessed));
    t.stop().await;
}
