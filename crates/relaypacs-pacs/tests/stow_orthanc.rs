//! STOW-RS sink against a real Orthanc: how each kind of failure is
//! classified, batching, recovery after the PACS comes back, and what
//! `verify` finds (QIDO-RS presence, WADO-RS content).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::Instant;

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::testing::pacs_sink::{MemorySource, study};
use relaypacs_core::testing::peers::{Orthanc, OrthancOptions};
use relaypacs_core::{Holding, Instance, InstanceOutcome, PacsSink, Verification, VerifyMode};
use relaypacs_pacs::{DicomWebAuth, DicomWebConfig, StowSink};

fn config(o: &Orthanc, password: &str) -> DicomWebConfig {
    let mut c = DicomWebConfig::new(o.dicomweb());
    c.auth = DicomWebAuth::Basic {
        user: o.user.clone(),
        password: password.to_owned().into(),
    };
    c
}

fn failed(o: &InstanceOutcome) -> Option<bool> {
    match o {
        InstanceOutcome::Failed { transient, .. } => Some(*transient),
        _ => None,
    }
}

/// Lua that makes Orthanc refuse every instance, as a PACS rule would.
pub const REFUSE_ALL: &str =
    "function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_permanent() {
    let o = Orthanc::start();
    let sink = StowSink::new(&config(&o, "not-the-password")).unwrap();
    let (src, insts) = study(2).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    for (_, out) in &r.outcomes {
        assert_eq!(failed(out), Some(false), "{out:?}");
        assert!(format!("{out:?}").contains("401"), "{out:?}");
    }
    assert_eq!(o.instance_count(), 0);
    assert!(
        sink.verify(&insts).await.is_err(),
        "an unauthorised query proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pacs_down_is_transient_and_a_retry_delivers() {
    let mut o = Orthanc::start();
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(3).unwrap();
    o.stop();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(
        r.outcomes.iter().all(|(_, out)| failed(out) == Some(true)),
        "{r:?}"
    );
    let e = sink.verify(&insts).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    o.start_again();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(r.all_delivered(), "{r:?}");
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![true; 3]);
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT; 3]);
}

/// Orthanc's DICOMweb plugin answers a STOW-RS of instances its filter
/// discarded with 200 and a ReferencedSOPSequence: the sink's "stored" is
/// only a claim, and `verify` (QIDO-RS) shows the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_store_that_did_not_happen_is_caught_by_verify() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(REFUSE_ALL.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(2).unwrap();
    sink.deliver(&insts, &src).await.unwrap();
    assert_eq!(o.instance_count(), 0, "the filter discarded them");
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_order_and_every_instance() {
    let o = Orthanc::start();
    let mut c = config(&o, &o.password.clone());
    c.batch_instances = 3;
    let sink = StowSink::new(&c).unwrap();
    let (src, insts) = study(10).unwrap();
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert_eq!(r.outcomes.len(), 10);
    for ((uid, out), i) in r.outcomes.iter().zip(&insts) {
        assert_eq!(uid, &i.dicom.sop_instance_uid);
        assert_eq!(out, &InstanceOutcome::Stored);
    }
    assert_eq!(o.instance_count(), 10);
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![true; 10]);
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT; 10]);
}

/// Which instances `verify` finds the same as sent.
fn held(h: Vec<relaypacs_core::Holding>) -> Vec<bool> {
    h.iter().map(relaypacs_core::Holding::is_same).collect()
}

const CONTENT: Holding = Holding::Same {
    verification: Verification::Content,
};

const PRESENCE_ONLY: Holding = Holding::Same {
    verification: Verification::PresenceOnly,
};

/// Another object under `inst`'s SOP Instance UID: other pixels (`seed`),
/// in `study` (its own if `None`).
fn other_object(inst: &Instance, seed: u64, study: Option<&str>) -> Vec<u8> {
    generate(&DicomSpec {
        study_uid: study.map_or_else(|| inst.dicom.study_instance_uid.to_string(), str::to_owned),
        series_uid: inst.dicom.series_instance_uid.to_string(),
        sop_instance_uid: inst.dicom.sop_instance_uid.to_string(),
        seed,
        ..DicomSpec::default()
    })
    .unwrap()
}

/// `h` is `Different` and its reason names every one of `words`.
fn assert_different(h: &Holding, words: &[&str]) {
    match h {
        Holding::Different { reason } => {
            for w in words {
                assert!(reason.contains(w), "{w} not in {reason:?}");
            }
        }
        other => panic!("expected Different naming {words:?}, got {other:?}"),
    }
}

/// (a) Delivered instances are verified by content: retrieved by WADO-RS
/// and compared, not only found by QIDO-RS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_instances_verify_by_content() {
    let o = Orthanc::start();
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(6).unwrap();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![Holding::Absent; 6]);
    let r = sink.deliver(&insts, &src).await.unwrap();
    assert!(r.all_delivered(), "{r:?}");
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT; 6]);
}

/// (b) Orthanc already holds another object under the SOP Instance UID
/// (stored through its REST API for one instance, by an earlier STOW-RS
/// for the other). `verify` says `Different`; Orthanc answers our STOW-RS
/// with 200 and keeps its own, so after our delivery `verify` still says
/// `Different`: the gateway must not call this study delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pacs_that_keeps_its_own_object_is_caught() {
    let o = Orthanc::start();
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(3).unwrap();
    let planted = other_object(&insts[0], 1000, None);
    o.upload(&planted);
    let mut earlier = MemorySource::default();
    let earlier_inst = {
        let bytes = other_object(&insts[1], 1001, None);
        let summary =
            relaypacs_core::dicom::validate_dicom(&bytes, bytes.len() as u64, &Default::default())
                .unwrap();
        earlier.add(bytes, summary)
    };
    let first = sink
        .deliver(std::slice::from_ref(&earlier_inst), &earlier)
        .await
        .unwrap();
    assert!(first.all_delivered(), "{first:?}");

    let before = sink.verify(&insts).await.unwrap();
    assert_different(&before[0], &[insts[0].dicom.sop_instance_uid.as_str()]);
    assert_different(&before[1], &[insts[1].dicom.sop_instance_uid.as_str()]);
    assert_eq!(before[2], Holding::Absent);

    let r = sink.deliver(&insts, &src).await.unwrap();
    // Orthanc's word: all stored. Its storage: its own objects kept.
    assert!(r.all_delivered(), "{r:?}");
    assert_eq!(
        o.instance_file(insts[0].dicom.sop_instance_uid.as_str())
            .unwrap(),
        planted
    );
    let after = sink.verify(&insts).await.unwrap();
    assert_different(&after[0], &[insts[0].dicom.sop_instance_uid.as_str()]);
    assert_different(&after[1], &[insts[1].dicom.sop_instance_uid.as_str()]);
    assert_eq!(after[2], CONTENT);
    assert_eq!(held(after), vec![false, false, true]);
    // The earlier sender's own view is consistent: its object is held.
    assert_eq!(sink.verify(&[earlier_inst]).await.unwrap(), vec![CONTENT]);
}

/// (c) The SOP Instance UID is held under another study: found by the
/// QIDO-RS lookup across studies, `Different` naming both UIDs, whatever
/// the verify mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_uid_under_another_study_is_different() {
    let o = Orthanc::start();
    let mut c = config(&o, &o.password.clone());
    let content = StowSink::new(&c).unwrap();
    c.verify = VerifyMode::Presence;
    let presence = StowSink::new(&c).unwrap();
    let (_, insts) = study(3).unwrap();
    let elsewhere = new_uid();
    // The same file content apart from the Study Instance UID.
    o.upload(&other_object(&insts[1], 1, Some(&elsewhere)));
    for sink in [&content, &presence] {
        let h = sink.verify(&insts).await.unwrap();
        assert_eq!(h[0], Holding::Absent);
        assert_different(
            &h[1],
            &[insts[1].dicom.sop_instance_uid.as_str(), elsewhere.as_str()],
        );
        assert_eq!(h[2], Holding::Absent);
    }
}

/// (d) `verify = "presence"`: a found UID is `Same { PresenceOnly }`,
/// whatever its content (that is the setting's documented limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_mode_answers_presence_only() {
    let o = Orthanc::start();
    let mut c = config(&o, &o.password.clone());
    c.verify = VerifyMode::Presence;
    let sink = StowSink::new(&c).unwrap();
    let (src, insts) = study(3).unwrap();
    o.upload(&other_object(&insts[2], 1000, None));
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![Holding::Absent, Holding::Absent, PRESENCE_ONLY]
    );
    sink.deliver(&insts[..2], &src).await.unwrap();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![PRESENCE_ONLY; 3]);
}

/// Lua that logs every HTTP request Orthanc receives, to count them.
const COUNT_REQUESTS: &str = "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n  \
     print('RELAYPACS-REQ ' .. method .. ' ' .. uri)\n  return true\nend\n";

/// Requests Orthanc has logged so far: (QIDO-RS in a study, QIDO-RS across
/// studies, WADO-RS).
fn requests(o: &Orthanc) -> (usize, usize, usize) {
    let log = o.log();
    let uris: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("RELAYPACS-REQ GET ").nth(1))
        .collect();
    let study_qido = uris
        .iter()
        .filter(|u| u.starts_with("/dicom-web/studies/") && u.ends_with("/instances"))
        .count();
    let any_qido = uris
        .iter()
        .filter(|u| **u == "/dicom-web/instances")
        .count();
    let wado = uris
        .iter()
        .filter(|u| u.starts_with("/dicom-web/studies/") && u.contains("/series/"))
        .count();
    (study_qido, any_qido, wado)
}

/// [`requests`] once they are `want` (Orthanc's log may lag a little), or
/// after two seconds.
fn requests_reach(o: &Orthanc, want: (usize, usize, usize)) -> (usize, usize, usize) {
    for _ in 0..40 {
        let got = requests(o);
        if got == want {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    requests(o)
}

/// What `verify` costs, measured at Orthanc: before a delivery one
/// QIDO-RS per study plus one UID-list query per 64 instances not found;
/// after it one QIDO-RS per study plus one WADO-RS per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_costs_one_query_per_study_and_one_retrieval_per_instance() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(COUNT_REQUESTS.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let n = 100;
    let (src, insts) = study(n).unwrap();
    let t = Instant::now();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![Holding::Absent; n]);
    let before = t.elapsed();
    let r0 = requests_reach(&o, (1, n.div_ceil(64), 0));
    assert_eq!(r0, (1, n.div_ceil(64), 0), "before delivery");
    sink.deliver(&insts, &src).await.unwrap();
    let t = Instant::now();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT; n]);
    let after = t.elapsed();
    let r1 = requests_reach(&o, (r0.0 + 1, r0.1, r0.2 + n));
    assert_eq!(
        (r1.0 - r0.0, r1.1 - r0.1, r1.2 - r0.2),
        (1, 0, n),
        "after delivery"
    );
    eprintln!(
        "verify of {n} instances ({} bytes each): before delivery {before:?} \
         ({} requests), after {after:?} ({} requests, {:.2} per instance)",
        insts[0].size,
        r0.0 + r0.1,
        n + 1,
        (n + 1) as f64 / n as f64
    );
}
