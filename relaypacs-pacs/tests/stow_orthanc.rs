//! STOW-RS sink against a real Orthanc: how each kind of failure is
//! classified, batching, recovery after the PACS comes back, and what
//! `verify` finds (QIDO-RS presence, WADO-RS content).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::time::Instant;

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::testing::pacs_sink::{MemorySource, study};
use relaypacs_core::{Holding, Instance, InstanceOutcome, PacsSink, Verification, VerifyMode};
use relaypacs_pacs::{DicomWebAuth, DicomWebConfig, StowSink};
use relaypacs_test_peers::{Orthanc, OrthancOptions};

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

/// Requests Orthanc has logged so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Requests {
    /// QIDO-RS of a study's instances.
    study_qido: usize,
    /// QIDO-RS across studies (UID lists).
    any_qido: usize,
    /// WADO-RS of a whole series.
    series_wado: usize,
    /// WADO-RS of one instance.
    instance_wado: usize,
}

impl std::ops::Sub for Requests {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            study_qido: self.study_qido - o.study_qido,
            any_qido: self.any_qido - o.any_qido,
            series_wado: self.series_wado - o.series_wado,
            instance_wado: self.instance_wado - o.instance_wado,
        }
    }
}

fn reqs(study_qido: usize, any_qido: usize, series_wado: usize, instance_wado: usize) -> Requests {
    Requests {
        study_qido,
        any_qido,
        series_wado,
        instance_wado,
    }
}

fn requests(o: &Orthanc) -> Requests {
    let log = o.log();
    let uris: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("RELAYPACS-REQ GET ").nth(1))
        .map(str::trim_end)
        .collect();
    let count = |f: &dyn Fn(&str) -> bool| uris.iter().filter(|u| f(u)).count();
    let wado = |u: &str| u.starts_with("/dicom-web/studies/") && u.contains("/series/");
    Requests {
        study_qido: count(&|u| u.starts_with("/dicom-web/studies/") && u.ends_with("/instances")),
        any_qido: count(&|u| u == "/dicom-web/instances"),
        series_wado: count(&|u| wado(u) && !u.contains("/instances")),
        instance_wado: count(&|u| wado(u) && u.contains("/instances/")),
    }
}

/// [`requests`] once they are `want` (Orthanc's log may lag a little), or
/// after two seconds.
fn requests_reach(o: &Orthanc, want: Requests) -> Requests {
    for _ in 0..40 {
        let got = requests(o);
        if got == want {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    requests(o)
}

/// The requests of one `verify` of `insts`, which must answer `want`,
/// once they are `expect` (checked by the caller).
async fn verify_counting(
    o: &Orthanc,
    sink: &StowSink,
    insts: &[Instance],
    want: &[Holding],
    expect: Requests,
) -> (Requests, std::time::Duration) {
    let r0 = requests(o);
    let t = Instant::now();
    assert_eq!(sink.verify(insts).await.unwrap(), want);
    let took = t.elapsed();
    let r1 = requests_reach(o, add(r0, expect));
    (r1 - r0, took)
}

fn add(a: Requests, b: Requests) -> Requests {
    Requests {
        study_qido: a.study_qido + b.study_qido,
        any_qido: a.any_qido + b.any_qido,
        series_wado: a.series_wado + b.series_wado,
        instance_wado: a.instance_wado + b.instance_wado,
    }
}

/// What `verify` costs, measured at Orthanc: before a delivery one
/// QIDO-RS per study plus one UID-list query per 64 instances not found;
/// after it one QIDO-RS per study plus one WADO-RS per series that holds
/// exactly the instances verified, and one per instance otherwise (a
/// series holding others too, a single instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_costs_one_query_per_study_and_one_retrieval_per_series_or_instance() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(COUNT_REQUESTS.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let n = 100;
    let (src, insts) = study(n).unwrap();
    let t = Instant::now();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![Holding::Absent; n]);
    let before = t.elapsed();
    let r0 = requests_reach(&o, reqs(1, n.div_ceil(64), 0, 0));
    assert_eq!(r0, reqs(1, n.div_ceil(64), 0, 0), "before delivery");
    sink.deliver(&insts, &src).await.unwrap();

    // The series holds exactly these: one retrieval of the series.
    let (all, after) = verify_counting(&o, &sink, &insts, &[CONTENT; 100], reqs(1, 0, 1, 0)).await;
    assert_eq!(all, reqs(1, 0, 1, 0), "the whole series");
    // The series holds others too: one retrieval per instance.
    let part = 60;
    let (some, part_took) = verify_counting(
        &o,
        &sink,
        &insts[..part],
        &[CONTENT; 60],
        reqs(1, 0, 0, part),
    )
    .await;
    assert_eq!(some, reqs(1, 0, 0, part), "part of the series");
    // A single instance.
    let (one, _) = verify_counting(&o, &sink, &insts[7..8], &[CONTENT], reqs(1, 0, 0, 1)).await;
    assert_eq!(one, reqs(1, 0, 0, 1), "one instance");
    eprintln!(
        "verify of {n} instances ({} bytes each): before delivery {before:?} \
         ({} requests), after {after:?} (2 requests: QIDO-RS, WADO-RS of the series); \
         {part} of them {part_took:?} ({} requests, one WADO-RS per instance)",
        insts[0].size,
        r0.study_qido + r0.any_qido,
        part + 1,
    );
}

/// A study of two series, each decided on its own: both hold exactly the
/// instances verified (two series retrievals), then one series whole and
/// one instance of the other (one series retrieval, one instance
/// retrieval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_series_is_retrieved_whole_only_when_it_holds_exactly_the_instances() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(COUNT_REQUESTS.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let study_uid = new_uid();
    let mut src = MemorySource::default();
    let mut insts = Vec::new();
    for series in [new_uid(), new_uid()] {
        for seed in 0..4 {
            let bytes = generate(&DicomSpec {
                study_uid: study_uid.clone(),
                series_uid: series.clone(),
                seed,
                ..DicomSpec::default()
            })
            .unwrap();
            let summary = relaypacs_core::dicom::validate_dicom(
                &bytes,
                bytes.len() as u64,
                &Default::default(),
            )
            .unwrap();
            insts.push(src.add(bytes, summary));
        }
    }
    assert!(sink.deliver(&insts, &src).await.unwrap().all_delivered());
    let (both, _) = verify_counting(&o, &sink, &insts, &[CONTENT; 8], reqs(1, 0, 2, 0)).await;
    assert_eq!(both, reqs(1, 0, 2, 0));
    let (mixed, _) = verify_counting(&o, &sink, &insts[..5], &[CONTENT; 5], reqs(1, 0, 1, 1)).await;
    assert_eq!(mixed, reqs(1, 0, 1, 1));
}

/// A series holding ours and, under one of our UIDs, an object Orthanc
/// had before (it keeps it over our STOW-RS): the one retrieval of the
/// series finds that one `Different` and the others the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_object_in_a_series_is_caught_by_the_series_retrieval() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(COUNT_REQUESTS.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(6).unwrap();
    let planted = other_object(&insts[3], 1000, None);
    o.upload(&planted);
    assert!(sink.deliver(&insts, &src).await.unwrap().all_delivered());
    assert_eq!(
        o.instance_file(insts[3].dicom.sop_instance_uid.as_str())
            .unwrap(),
        planted
    );
    let r0 = requests(&o);
    let h = sink.verify(&insts).await.unwrap();
    assert_different(&h[3], &[insts[3].dicom.sop_instance_uid.as_str()]);
    for (k, h) in h.iter().enumerate().filter(|(k, _)| *k != 3) {
        assert_eq!(*h, CONTENT, "instance {k}");
    }
    let r1 = requests_reach(&o, add(r0, reqs(1, 0, 1, 0)));
    assert_eq!(r1 - r0, reqs(1, 0, 1, 0), "one retrieval of the series");
}

/// Lua that counts requests (as [`COUNT_REQUESTS`]) and refuses every
/// WADO-RS of a whole series (Orthanc answers 403).
const REFUSE_SERIES: &str = "function IncomingHttpRequestFilter(method, uri, ip, username, headers)\n  \
     print('RELAYPACS-REQ ' .. method .. ' ' .. uri)\n  \
     if string.match(uri, '/series/[^/]+$') then return false end\n  return true\nend\n";

/// A PACS that refuses the retrieval of a series (403) is asked instance
/// by instance: the verdicts are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_series_retrieval_falls_back_to_one_per_instance() {
    let o = Orthanc::start_with(OrthancOptions {
        lua: Some(REFUSE_SERIES.into()),
    });
    let sink = StowSink::new(&config(&o, &o.password.clone())).unwrap();
    let (src, insts) = study(5).unwrap();
    o.upload(&other_object(&insts[1], 1000, None));
    assert!(sink.deliver(&insts, &src).await.unwrap().all_delivered());
    let r0 = requests(&o);
    let h = sink.verify(&insts).await.unwrap();
    assert_different(&h[1], &[insts[1].dicom.sop_instance_uid.as_str()]);
    assert_eq!(held(h), vec![true, false, true, true, true]);
    let r1 = requests_reach(&o, add(r0, reqs(1, 0, 1, 5)));
    assert_eq!(r1 - r0, reqs(1, 0, 1, 5));
}
