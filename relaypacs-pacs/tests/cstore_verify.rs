//! `CStoreSink::verify` against real peers: content by C-GET from an
//! Orthanc that lets us retrieve, presence by C-FIND from one that does not
//! (or when configured so), and the acknowledged C-STOREs of dcmtk's
//! storescp, which can be asked nothing. Also the cost of C-GET against
//! C-FIND.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use relaypacs_core::dicom::{data_set_offset, validate_dicom};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate, new_uid};
use relaypacs_core::testing::pieces;
use relaypacs_core::{
    ByteStream, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Result, Uid,
    Verification, VerifyMode,
};
use relaypacs_pacs::{CStoreConfig, CStoreSink};
use relaypacs_test_peers::{Orthanc, OrthancOptions, StoreScp};

const CONTENT: Holding = Holding::Same {
    verification: Verification::Content,
};
const PRESENCE: Holding = Holding::Same {
    verification: Verification::PresenceOnly,
};

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn sink(port: u16, called_ae: &str, verify: VerifyMode) -> CStoreSink {
    CStoreSink::new(CStoreConfig {
        address: format!("127.0.0.1:{port}"),
        called_ae: called_ae.into(),
        verify,
        ..CStoreConfig::default()
    })
    .expect("valid config")
}

fn orthanc_sink(o: &Orthanc, verify: VerifyMode) -> CStoreSink {
    sink(o.dicom_port, &o.aet, verify)
}

fn with_get() -> Orthanc {
    blocking(|| Orthanc::start_with_get(OrthancOptions::default()))
}

/// Files kept in memory, served in 64 KiB pieces.
#[derive(Debug, Default)]
struct Files(HashMap<Uid, Vec<u8>>);

impl Files {
    fn add(&mut self, spec: &DicomSpec) -> Instance {
        let bytes = generate(spec).unwrap();
        let summary = validate_dicom(&bytes, bytes.len() as u64, &Default::default()).unwrap();
        let inst = Instance::of_bytes(
            relaypacs_core::FileKey {
                session: relaypacs_core::SessionId::random(),
                file: relaypacs_core::FileId::random(),
            },
            &bytes,
            summary,
        );
        self.0.insert(inst.dicom.sop_instance_uid.clone(), bytes);
        inst
    }
}

#[async_trait]
impl InstanceSource for Files {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        Ok(pieces(&self.0[&instance.dicom.sop_instance_uid], 64 << 10))
    }
}

fn spec(study: &str, series: &str, sop_class: SopClass, ts: TransferSyntax) -> DicomSpec {
    DicomSpec {
        study_uid: study.into(),
        series_uid: series.into(),
        sop_instance_uid: new_uid(),
        sop_class,
        transfer_syntax: ts,
        ..DicomSpec::default()
    }
}

/// The same SOP Instance UID (and study, series, class, syntax) with other
/// pixels.
fn other_content(of: &DicomSpec) -> DicomSpec {
    DicomSpec {
        seed: of.seed + 1000,
        ..of.clone()
    }
}

fn data_set(part10: &[u8]) -> &[u8] {
    &part10[data_set_offset(part10).unwrap() as usize..]
}

fn assert_delivered(report: &relaypacs_core::DeliveryReport) {
    assert!(report.all_delivered(), "{report:?}");
}

/// (a) Content verification by C-GET over several SOP classes and transfer
/// syntaxes, including one SOP class in two syntaxes (two associations,
/// each proposing only the syntax the instances were sent in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_get_verifies_content_across_sop_classes_and_transfer_syntaxes() {
    let o = with_get();
    let sink = orthanc_sink(&o, VerifyMode::Content);
    let mut files = Files::default();
    let st = new_uid();
    let (ct, sc, mr) = (new_uid(), new_uid(), new_uid());
    let insts = vec![
        files.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ExplicitLe)),
        files.add(&spec(
            &st,
            &sc,
            SopClass::SecondaryCapture,
            TransferSyntax::ImplicitLe,
        )),
        files.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ImplicitLe)),
        files.add(&spec(&st, &mr, SopClass::Mr, TransferSyntax::ExplicitBe)),
        files.add(&spec(
            &st,
            &sc,
            SopClass::SecondaryCapture,
            TransferSyntax::ExplicitLe,
        )),
        files.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ExplicitLe)),
    ];
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![Holding::Absent; insts.len()]
    );
    assert_delivered(&sink.deliver(&insts, &files).await.unwrap());
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![CONTENT; insts.len()],
        "{}",
        blocking(|| o.log())
    );
    // Only part of the batch delivered: exactly those are held.
    let mut more = vec![files.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ExplicitLe))];
    more.push(insts[3].clone());
    assert_eq!(
        sink.verify(&more).await.unwrap(),
        vec![Holding::Absent, CONTENT]
    );
}

/// (b) Orthanc already holds another object under the SOP Instance UID
/// (stored through its REST API): `Different`, naming the UID, before our
/// C-STORE and after it. Orthanc 1.10 ("OverwriteInstances": false, its
/// default) answers our C-STORE with success but keeps its own copy, so
/// the C-STORE "stored" claim is exactly what verify catches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_content_under_the_uid_is_different_before_and_after_our_c_store() {
    let o = with_get();
    let sink = orthanc_sink(&o, VerifyMode::Content);
    let (st, se) = (new_uid(), new_uid());
    let ours = spec(&st, &se, SopClass::Ct, TransferSyntax::ExplicitLe);
    let theirs = generate(&other_content(&ours)).unwrap();
    blocking(|| o.upload(&theirs));
    let mut files = Files::default();
    let inst = files.add(&ours);
    let uid = inst.dicom.sop_instance_uid.as_str();
    let different = |h: &Holding| match h {
        Holding::Different { reason } => {
            assert!(reason.contains(uid), "names the UID: {reason}");
            assert!(reason.contains("different object"), "{reason}");
        }
        other => panic!("other content called {other:?}"),
    };
    different(&sink.verify(std::slice::from_ref(&inst)).await.unwrap()[0]);
    let report = sink
        .deliver(std::slice::from_ref(&inst), &files)
        .await
        .unwrap();
    assert_eq!(
        report.outcomes[0].1,
        InstanceOutcome::Stored,
        "Orthanc's claim"
    );
    different(&sink.verify(std::slice::from_ref(&inst)).await.unwrap()[0]);
    let held = blocking(|| o.instance_file(uid)).unwrap();
    assert!(
        data_set(&held) == data_set(&theirs),
        "Orthanc kept its own copy"
    );
    // Presence mode cannot tell.
    let presence = orthanc_sink(&o, VerifyMode::Presence);
    assert_eq!(presence.verify(&[inst]).await.unwrap(), vec![PRESENCE]);
}

/// An object returned far larger than what was sent is not hashed to the
/// end: it is another object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_object_much_larger_than_sent_is_different() {
    let o = with_get();
    let sink = orthanc_sink(&o, VerifyMode::Content);
    let (st, se) = (new_uid(), new_uid());
    let ours = spec(
        &st,
        &se,
        SopClass::SecondaryCapture,
        TransferSyntax::ExplicitLe,
    );
    // 1024 x 1024 x 16 bit: 2 MiB under the same UID.
    let theirs = DicomSpec {
        rows: 1024,
        cols: 1024,
        ..other_content(&ours)
    };
    blocking(|| o.upload(&generate(&theirs).unwrap()));
    let mut files = Files::default();
    let inst = files.add(&ours);
    match &sink.verify(std::slice::from_ref(&inst)).await.unwrap()[0] {
        Holding::Different { reason } => {
            assert!(reason.contains("more than"), "{reason}");
            assert!(reason.contains(inst.dicom.sop_instance_uid.as_str()));
        }
        other => panic!("{other:?}"),
    }
    // The association stayed usable: a second instance is verified on it.
    let good = files.add(&spec(
        &st,
        &se,
        SopClass::SecondaryCapture,
        TransferSyntax::ExplicitLe,
    ));
    assert_delivered(
        &sink
            .deliver(std::slice::from_ref(&good), &files)
            .await
            .unwrap(),
    );
    let held = sink.verify(&[inst, good]).await.unwrap();
    assert!(matches!(held[0], Holding::Different { .. }), "{held:?}");
    assert_eq!(held[1], CONTENT);
}

/// Orthanc holds the UID in another transfer syntax than the one we sent.
/// We propose only ours, so Orthanc transcodes its copy into it on the way
/// out, and the bytes returned are what is compared: the same data
/// (Explicit to Implicit VR Little Endian is lossless, and here reproduces
/// our encoding byte for byte) is `Same { Content }`, other data in another
/// syntax is `Different`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_held_in_another_transfer_syntax_is_compared_as_returned() {
    let o = with_get();
    let sink = orthanc_sink(&o, VerifyMode::Content);
    let (st, se) = (new_uid(), new_uid());
    let mut files = Files::default();
    let ours = spec(&st, &se, SopClass::Ct, TransferSyntax::ImplicitLe);
    let same_in_explicit = DicomSpec {
        transfer_syntax: TransferSyntax::ExplicitLe,
        ..ours.clone()
    };
    let ours_too = spec(&st, &se, SopClass::Ct, TransferSyntax::ImplicitLe);
    let other_in_explicit = DicomSpec {
        transfer_syntax: TransferSyntax::ExplicitLe,
        ..other_content(&ours_too)
    };
    for s in [&same_in_explicit, &other_in_explicit] {
        blocking(|| o.upload(&generate(s).unwrap()));
    }
    let insts = [files.add(&ours), files.add(&ours_too)];
    let held = sink.verify(&insts).await.unwrap();
    assert_eq!(held[0], CONTENT);
    match &held[1] {
        Holding::Different { reason } => {
            assert!(
                reason.contains(insts[1].dicom.sop_instance_uid.as_str()),
                "{reason}"
            )
        }
        other => panic!("other content called {other:?}"),
    }
    // Orthanc still holds its Explicit VR copies.
    for inst in &insts {
        let file = blocking(|| o.instance_file(inst.dicom.sop_instance_uid.as_str())).unwrap();
        let summary = validate_dicom(&file, file.len() as u64, &Default::default()).unwrap();
        assert_eq!(
            summary.transfer_syntax.as_str(),
            TransferSyntax::ExplicitLe.uid()
        );
    }
}

/// (c) storescp accepts neither C-GET nor C-FIND: verify answers from the
/// C-STOREs it acknowledged to this sink, presence only; an instance never
/// delivered is absent, and so is everything for a new sink (a restart),
/// which then sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storescp_is_verified_by_its_acknowledgements_only() {
    let scp = blocking(StoreScp::start);
    let sink = sink(scp.port, &scp.aet, VerifyMode::Content);
    let mut files = Files::default();
    let (st, se) = (new_uid(), new_uid());
    let insts: Vec<_> = (0..3)
        .map(|_| files.add(&spec(&st, &se, SopClass::Ct, TransferSyntax::ExplicitLe)))
        .collect();
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![Holding::Absent; 3]);
    assert_delivered(&sink.deliver(&insts[..2], &files).await.unwrap());
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![PRESENCE, PRESENCE, Holding::Absent]
    );
    // The same in presence mode; a clone shares the record.
    let presence = CStoreSink::new(CStoreConfig {
        verify: VerifyMode::Presence,
        ..sink.config().clone()
    })
    .unwrap();
    assert_eq!(
        presence.verify(&insts).await.unwrap(),
        vec![Holding::Absent; 3],
        "another sink has seen nothing acknowledged"
    );
    assert_eq!(
        sink.clone().verify(&insts).await.unwrap(),
        vec![PRESENCE, PRESENCE, Holding::Absent]
    );
    // Other content under a delivered UID: not the same.
    let other = files.add(&DicomSpec {
        sop_instance_uid: insts[0].dicom.sop_instance_uid.to_string(),
        seed: 77,
        ..spec(&st, &se, SopClass::Ct, TransferSyntax::ExplicitLe)
    });
    assert!(matches!(
        sink.verify(&[other]).await.unwrap()[0],
        Holding::Different { .. }
    ));
    // storescp is still up: the record is used, not a stale error.
    assert_eq!(scp.count(), 2);
}

/// (d) `VerifyMode::Presence` asks C-FIND even where C-GET is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_mode_finds_without_retrieving() {
    let o = with_get();
    let sink = orthanc_sink(&o, VerifyMode::Presence);
    let mut files = Files::default();
    let (st, se) = (new_uid(), new_uid());
    let insts: Vec<_> = (0..3)
        .map(|_| {
            files.add(&spec(
                &st,
                &se,
                SopClass::SecondaryCapture,
                TransferSyntax::ExplicitLe,
            ))
        })
        .collect();
    assert_delivered(&sink.deliver(&insts[..2], &files).await.unwrap());
    assert_eq!(
        sink.verify(&insts).await.unwrap(),
        vec![PRESENCE, PRESENCE, Holding::Absent]
    );
}

/// Orthanc's default refuses C-GET from an AE it does not know by aborting
/// the association on the request: the sink falls back to C-FIND, presence
/// only, and remembers it (the next verify does not try C-GET again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orthanc_refusing_c_get_falls_back_to_c_find_and_is_remembered() {
    let o = blocking(Orthanc::start);
    let sink = orthanc_sink(&o, VerifyMode::Content);
    let mut files = Files::default();
    let (st, se) = (new_uid(), new_uid());
    let insts: Vec<_> = (0..2)
        .map(|_| files.add(&spec(&st, &se, SopClass::Ct, TransferSyntax::ImplicitLe)))
        .collect();
    assert_delivered(&sink.deliver(&insts[..1], &files).await.unwrap());
    for _ in 0..3 {
        assert_eq!(
            sink.verify(&insts).await.unwrap(),
            vec![PRESENCE, Holding::Absent]
        );
    }
    let refusals = blocking(|| o.log()).matches("Rejected Get request").count();
    assert_eq!(refusals, 1, "{}", blocking(|| o.log()));
}

/// The cost of verifying N instances against Orthanc on loopback: C-GET
/// (retrieving and hashing each) against C-FIND (one query per series).
/// Printed, not asserted beyond the answers (run with --nocapture).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_cost_c_get_against_c_find() {
    let o = with_get();
    let content = orthanc_sink(&o, VerifyMode::Content);
    let presence = orthanc_sink(&o, VerifyMode::Presence);
    for (n, rows) in [(100usize, 64u16), (20, 512)] {
        let mut files = Files::default();
        let (st, se) = (new_uid(), new_uid());
        let insts: Vec<_> = (0..n)
            .map(|i| {
                files.add(&DicomSpec {
                    rows,
                    cols: rows,
                    seed: i as u64,
                    ..spec(&st, &se, SopClass::Ct, TransferSyntax::ExplicitLe)
                })
            })
            .collect();
        let bytes: u64 = insts.iter().map(|i| i.size).sum();
        assert_delivered(&content.deliver(&insts, &files).await.unwrap());
        let time = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let mut runs = Vec::new();
        for (name, sink, want) in [
            ("C-GET", &content, CONTENT),
            ("C-FIND", &presence, PRESENCE),
        ] {
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                let held = sink.verify(&insts).await.unwrap();
                best = best.min(t.elapsed());
                assert_eq!(held, vec![want.clone(); n]);
            }
            runs.push(format!(
                "{name} {} ({:.2} ms/instance)",
                time(best),
                best.as_secs_f64() * 1e3 / n as f64
            ));
        }
        println!(
            "verify {n} instances of {rows}x{rows} ({:.1} MiB) against Orthanc: {}",
            bytes as f64 / (1 << 20) as f64,
            runs.join(", ")
        );
    }
}
