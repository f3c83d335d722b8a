//! The C-STORE sink against a real Orthanc: rejection, outage and retry,
//! mixed SOP classes and transfer syntaxes, verification (content by C-GET
//! where Orthanc lets us retrieve), large instances, rejected contexts and
//! late source failures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;

use async_trait::async_trait;
use relaypacs_core::dicom::{data_set_offset, validate_dicom};
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, TransferSyntax, generate, new_uid};
use relaypacs_core::testing::pacs_sink::{MemorySource, study};
use relaypacs_core::testing::{failing, pieces};
use relaypacs_core::{
    ByteStream, ErrorKind, Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Result,
    Uid, Verification,
};
use relaypacs_pacs::{CStoreConfig, CStoreSink};
use relaypacs_test_peers::{Orthanc, OrthancOptions};

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// An Orthanc that lets any AE retrieve by C-GET, so `verify` compares
/// content.
fn orthanc_with_get() -> Orthanc {
    blocking(|| Orthanc::start_with_get(OrthancOptions::default()))
}

fn sink_for(o: &Orthanc, called_ae: &str) -> CStoreSink {
    CStoreSink::new(CStoreConfig {
        address: format!("127.0.0.1:{}", o.dicom_port),
        called_ae: called_ae.into(),
        ..CStoreConfig::default()
    })
    .expect("valid config")
}

/// The data set (after the file meta group) of a Part-10 file.
fn data_set(part10: &[u8]) -> &[u8] {
    &part10[data_set_offset(part10).expect("Part-10") as usize..]
}

/// A source serving files in pieces of a chosen size, keeping the bytes for
/// comparison.
#[derive(Debug)]
struct Files {
    piece: usize,
    files: HashMap<Uid, Vec<u8>>,
    inner: MemorySource,
}

impl Files {
    fn new(piece: usize) -> Self {
        Self {
            piece,
            files: HashMap::new(),
            inner: MemorySource::default(),
        }
    }

    fn add(&mut self, spec: &DicomSpec) -> Instance {
        let bytes = generate(spec).unwrap();
        let summary = validate_dicom(&bytes, bytes.len() as u64, &Default::default()).unwrap();
        let inst = self.inner.add(bytes.clone(), summary);
        self.files
            .insert(inst.dicom.sop_instance_uid.clone(), bytes);
        inst
    }

    fn bytes(&self, inst: &Instance) -> &[u8] {
        &self.files[&inst.dicom.sop_instance_uid]
    }
}

#[async_trait]
impl InstanceSource for Files {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        Ok(pieces(self.bytes(instance), self.piece))
    }
}

/// Every instance is `Stored` and Orthanc holds its data set unchanged.
async fn assert_stored_exact(
    o: &Orthanc,
    src: &Files,
    insts: &[Instance],
    outcomes: &[(Uid, InstanceOutcome)],
) {
    assert_eq!(outcomes.len(), insts.len());
    for ((uid, outcome), inst) in outcomes.iter().zip(insts) {
        assert_eq!(uid, &inst.dicom.sop_instance_uid);
        assert_eq!(outcome, &InstanceOutcome::Stored, "{uid}");
        let held = blocking(|| o.instance_file(uid.as_str())).expect("Orthanc holds it");
        assert!(
            data_set(&held) == data_set(src.bytes(inst)),
            "data set of {uid} differs ({} vs {} bytes)",
            data_set(&held).len(),
            data_set(src.bytes(inst)).len()
        );
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

#[test]
fn config_is_validated() {
    let ok = CStoreConfig {
        address: "127.0.0.1:104".into(),
        ..CStoreConfig::default()
    };
    assert!(CStoreSink::new(ok.clone()).is_ok());
    for bad_ae in ["", "SEVENTEEN-CHARS-X", "A\\B", "    ", "ÄE", "TAB\t"] {
        let e = CStoreSink::new(CStoreConfig {
            called_ae: bad_ae.into(),
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(e.code(), "RELAY_CSTORE_BAD_AE_TITLE", "{bad_ae:?}");
        let e = CStoreSink::new(CStoreConfig {
            calling_ae: bad_ae.into(),
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(e.code(), "RELAY_CSTORE_BAD_AE_TITLE", "{bad_ae:?}");
    }
    for bad in ["", "host", "host:", ":104", "host:0", "host:70000"] {
        let e = CStoreSink::new(CStoreConfig {
            address: bad.into(),
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(e.code(), "RELAY_CSTORE_BAD_ADDRESS", "{bad:?}");
    }
    let e = CStoreSink::new(CStoreConfig {
        max_pdu: 100,
        ..ok.clone()
    })
    .unwrap_err();
    assert_eq!(e.code(), "RELAY_CSTORE_BAD_MAX_PDU");
    assert_eq!(CStoreConfig::default().associations, 2);
    for bad in [0, 9] {
        let e = CStoreSink::new(CStoreConfig {
            associations: bad,
            ..ok.clone()
        })
        .unwrap_err();
        assert_eq!(e.code(), "RELAY_CSTORE_BAD_ASSOCIATIONS", "{bad}");
    }
    for good in [1, 8] {
        assert!(
            CStoreSink::new(CStoreConfig {
                associations: good,
                ..ok.clone()
            })
            .is_ok()
        );
    }
    let s = CStoreSink::new(CStoreConfig {
        called_ae: "PACS1".into(),
        ..ok
    })
    .unwrap();
    assert_eq!(s.to_string(), "c-store:PACS1@127.0.0.1:104");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_called_ae_is_a_permanent_error() {
    let o = blocking(Orthanc::start);
    let sink = sink_for(&o, "WRONG");
    let (src, insts) = study(2).unwrap();
    let err = sink.deliver(&insts, &src).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pacs, "{err}");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(blocking(|| o.instance_count()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orthanc_down_is_transient_and_a_retry_delivers() {
    let mut o = orthanc_with_get();
    let sink = sink_for(&o, &o.aet);
    let mut src = Files::new(64 << 10);
    let (st, se) = (new_uid(), new_uid());
    let insts: Vec<_> = (0..3)
        .map(|_| {
            src.add(&spec(
                &st,
                &se,
                SopClass::SecondaryCapture,
                TransferSyntax::ExplicitLe,
            ))
        })
        .collect();
    blocking(|| o.stop());
    let err = sink.deliver(&insts, &src).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pacs, "{err}");
    assert!(err.is_retryable(), "{err}");
    let err = sink.verify(&insts).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    blocking(|| o.start_again());
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_stored_exact(&o, &src, &insts, &report.outcomes).await;
    let verified = sink.verify(&insts).await.unwrap();
    assert_eq!(held(verified.clone()), vec![true; 3]);
    assert_eq!(verified, vec![CONTENT; 3]);
}

/// A source that counts the instances in flight (opened, stream not yet
/// dropped); each open waits 20 ms so the associations overlap for sure.
#[derive(Debug)]
struct Concurrency {
    files: Files,
    open: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

/// Counts one open instance until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl InstanceSource for Concurrency {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let guard = InFlight(self.open.clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stream = pieces(self.files.bytes(instance), 64 << 10);
        Ok(Box::pin(stream.map(move |piece| {
            let _held = &guard;
            piece
        })))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_associations_store_all_byte_exact_in_input_order() {
    let o = orthanc_with_get();
    let sink = CStoreSink::new(CStoreConfig {
        associations: 3,
        ..sink_for(&o, &o.aet).config().clone()
    })
    .unwrap();
    let mut files = Files::new(64 << 10);
    let (st, se) = (new_uid(), new_uid());
    // Two SOP classes and transfer syntaxes, sizes varying, so the groups
    // differ in contexts and bytes.
    let insts: Vec<_> = (0..12u16)
        .map(|i| {
            let (class, ts) = if i % 3 == 0 {
                (SopClass::Ct, TransferSyntax::ImplicitLe)
            } else {
                (SopClass::SecondaryCapture, TransferSyntax::ExplicitLe)
            };
            files.add(&DicomSpec {
                rows: 64 + 32 * (i % 4),
                cols: 64,
                seed: u64::from(i),
                ..spec(&st, &se, class, ts)
            })
        })
        .collect();
    let src = Concurrency {
        files,
        open: Arc::default(),
        most: Arc::default(),
    };
    let report = sink.deliver(&insts, &src).await.unwrap();
    // In input order, one outcome each, every data set unchanged.
    let uids: Vec<_> = report.outcomes.iter().map(|(u, _)| u).collect();
    let expected: Vec<_> = insts.iter().map(|i| &i.dicom.sop_instance_uid).collect();
    assert_eq!(uids, expected);
    assert_stored_exact(&o, &src.files, &insts, &report.outcomes).await;
    assert_eq!(blocking(|| o.instance_count()), 12);
    let verified = sink.verify(&insts).await.unwrap();
    assert_eq!(held(verified.clone()), vec![true; 12]);
    assert_eq!(verified, vec![CONTENT; 12], "two SOP classes, two syntaxes");
    // Three instances were in flight at once: one per association.
    assert_eq!(src.most.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_sop_classes_and_transfer_syntaxes_are_byte_exact() {
    let o = orthanc_with_get();
    let sink = sink_for(&o, &o.aet);
    let mut src = Files::new(64 << 10);
    let st = new_uid();
    let (ct, sc) = (new_uid(), new_uid());
    let insts = vec![
        src.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ExplicitLe)),
        src.add(&spec(
            &st,
            &sc,
            SopClass::SecondaryCapture,
            TransferSyntax::ImplicitLe,
        )),
        src.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ImplicitLe)),
        src.add(&spec(
            &st,
            &sc,
            SopClass::SecondaryCapture,
            TransferSyntax::ExplicitLe,
        )),
        src.add(&spec(&st, &ct, SopClass::Ct, TransferSyntax::ExplicitLe)),
    ];
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_stored_exact(&o, &src, &insts, &report.outcomes).await;
    // Orthanc kept each file's own transfer syntax (no transcoding).
    for inst in &insts {
        let held = blocking(|| o.instance_file(inst.dicom.sop_instance_uid.as_str())).unwrap();
        let summary = validate_dicom(&held, held.len() as u64, &Default::default()).unwrap();
        assert_eq!(summary.transfer_syntax, inst.dicom.transfer_syntax);
        assert_eq!(summary.sop_class_uid, inst.dicom.sop_class_uid);
    }
    // Retrieved by C-GET in the syntax each was sent in: the same content.
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_exactly_the_delivered_ones() {
    let o = orthanc_with_get();
    let sink = sink_for(&o, &o.aet);
    assert_eq!(held(sink.verify(&[]).await.unwrap()), Vec::<bool>::new());
    let mut src = Files::new(64 << 10);
    let st = new_uid();
    let (a, b) = (new_uid(), new_uid());
    let insts: Vec<_> = [&a, &a, &b, &a, &b]
        .iter()
        .map(|se| {
            src.add(&spec(
                &st,
                se,
                SopClass::SecondaryCapture,
                TransferSyntax::ExplicitLe,
            ))
        })
        .collect();
    assert_eq!(held(sink.verify(&insts).await.unwrap()), vec![false; 5]);
    let chosen = [insts[0].clone(), insts[2].clone(), insts[3].clone()];
    let report = sink.deliver(&chosen, &src).await.unwrap();
    assert!(report.all_delivered(), "{report:?}");
    let verified = sink.verify(&insts).await.unwrap();
    assert_eq!(held(verified.clone()), vec![true, false, true, true, false]);
    let (c, no) = (CONTENT, Holding::Absent);
    assert_eq!(verified, vec![c.clone(), no.clone(), c.clone(), c, no]);
    // Another study's instance with the same series layout is not confused.
    let other = Files::new(64 << 10).add(&spec(
        &new_uid(),
        &a,
        SopClass::Ct,
        TransferSyntax::ExplicitLe,
    ));
    assert_eq!(held(sink.verify(&[other]).await.unwrap()), vec![false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_instance_spans_many_pdus_byte_exact() {
    let o = orthanc_with_get();
    let sink = sink_for(&o, &o.aet);
    // 1536 x 1536 x 16 bit: 4.7 MB, about 290 PDUs at Orthanc's 16 KiB.
    let mut src = Files::new(100_003);
    let st = new_uid();
    let big = DicomSpec {
        rows: 1536,
        cols: 1536,
        seed: 42,
        ..spec(
            &st,
            &new_uid(),
            SopClass::SecondaryCapture,
            TransferSyntax::ExplicitLe,
        )
    };
    let insts = vec![src.add(&big)];
    assert!(insts[0].size > 4_500_000);
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_stored_exact(&o, &src, &insts, &report.outcomes).await;
    // Retrieved in as many PDUs, hashed as it streams in.
    assert_eq!(sink.verify(&insts).await.unwrap(), vec![CONTENT]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_source_pieces_are_reassembled() {
    // Pieces of 7 bytes split the Part-10 header and the meta group anywhere.
    let o = blocking(Orthanc::start);
    let sink = sink_for(&o, &o.aet);
    let mut src = Files::new(7);
    let st = new_uid();
    let se = new_uid();
    let insts: Vec<_> = (0..2)
        .map(|_| src.add(&spec(&st, &se, SopClass::Ct, TransferSyntax::ImplicitLe)))
        .collect();
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_stored_exact(&o, &src, &insts, &report.outcomes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_context_fails_only_its_instances() {
    let o = blocking(Orthanc::start);
    let sink = sink_for(&o, &o.aet);
    let mut src = Files::new(64 << 10);
    let (st, se) = (new_uid(), new_uid());
    let good = src.add(&spec(
        &st,
        &se,
        SopClass::SecondaryCapture,
        TransferSyntax::ExplicitLe,
    ));
    // A SOP class Orthanc does not know (UnknownSopClassAccepted: false).
    let mut odd = src.add(&spec(
        &st,
        &se,
        SopClass::SecondaryCapture,
        TransferSyntax::ExplicitLe,
    ));
    odd.dicom.sop_class_uid = Uid::parse("1.2.826.0.1.3680043.2.1143.999").unwrap();
    let report = sink
        .deliver(&[odd.clone(), good.clone()], &src)
        .await
        .unwrap();
    assert_eq!(report.outcomes[1].1, InstanceOutcome::Stored);
    match &report.outcomes[0].1 {
        InstanceOutcome::Failed { transient, reason } => {
            assert!(!transient);
            assert!(reason.contains("not accepted"), "{reason}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // Only rejected contexts: every instance fails, no error.
    let report = sink
        .deliver(std::slice::from_ref(&odd), &src)
        .await
        .unwrap();
    assert!(matches!(
        report.outcomes[0].1,
        InstanceOutcome::Failed {
            transient: false,
            ..
        }
    ));
    assert_eq!(blocking(|| o.instance_count()), 1);
}

/// A source whose stream fails after its last byte (as a whole-file digest
/// mismatch does) for one chosen instance.
#[derive(Debug)]
struct LateFailure {
    files: Files,
    bad: Uid,
}

#[async_trait]
impl InstanceSource for LateFailure {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        let bytes = self.files.bytes(instance);
        if instance.dicom.sop_instance_uid == self.bad {
            Ok(failing(bytes))
        } else {
            Ok(pieces(bytes, 64 << 10))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_last_byte_stores_nothing_of_that_instance() {
    let o = orthanc_with_get();
    // One association: what follows the failure on it is not sent either.
    // Two: the groups are [0, 1] and [2]; the other association finishes
    // its instance (it is confirmed by `verify`, not sent again), and the
    // call still fails as a whole.
    let mut total = 0;
    for (associations, expected) in [(1, [true, false, false]), (2, [true, false, true])] {
        let sink = CStoreSink::new(CStoreConfig {
            associations,
            ..sink_for(&o, &o.aet).config().clone()
        })
        .unwrap();
        let mut files = Files::new(64 << 10);
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
        let src = LateFailure {
            bad: insts[1].dicom.sop_instance_uid.clone(),
            files,
        };
        let err = sink.deliver(&insts, &src).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::Storage,
            "the source's error is passed through: {err}"
        );
        let verified = sink.verify(&insts).await.unwrap();
        let found = held(verified.clone());
        assert_eq!(found, expected, "{associations}: {}", blocking(|| o.log()));
        for (h, want) in verified.iter().zip(expected) {
            assert_eq!(h, if want { &CONTENT } else { &Holding::Absent });
        }
        total += expected.iter().filter(|h| **h).count();
        assert_eq!(blocking(|| o.instance_count()), total);
    }
}

/// Orthanc 1.10 answers C-STORE success (0x0000) even for an instance its
/// `ReceivedInstanceFilter` drops: a C-STORE "stored" is a claim, and
/// `verify` (C-GET: nothing returned, C-FIND: absent) is what catches the
/// difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_orthanc_drops_is_caught_by_verify() {
    let o = blocking(|| {
        Orthanc::start_with_get(OrthancOptions {
            lua: Some(
                "function ReceivedInstanceFilter(dicom, origin, info)\n  \
                 return dicom.Modality ~= 'CT'\nend\n"
                    .into(),
            ),
        })
    });
    let sink = sink_for(&o, &o.aet);
    let mut src = Files::new(64 << 10);
    let st = new_uid();
    let insts = vec![
        src.add(&spec(
            &st,
            &new_uid(),
            SopClass::Ct,
            TransferSyntax::ExplicitLe,
        )),
        src.add(&spec(
            &st,
            &new_uid(),
            SopClass::SecondaryCapture,
            TransferSyntax::ExplicitLe,
        )),
    ];
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_eq!(report.outcomes[1].1, InstanceOutcome::Stored);
    let verified = sink.verify(&insts).await.unwrap();
    assert_eq!(
        held(verified.clone()),
        vec![false, true],
        "{}",
        blocking(|| o.log())
    );
    assert_eq!(verified, vec![Holding::Absent, CONTENT]);
    assert_eq!(blocking(|| o.instance_count()), 1);
}

/// The instance retrieved and its content compared.
const CONTENT: Holding = Holding::Same {
    verification: Verification::Content,
};

/// Which instances `verify` finds the same as sent.
fn held(h: Vec<relaypacs_core::Holding>) -> Vec<bool> {
    h.iter().map(relaypacs_core::Holding::is_same).collect()
}
