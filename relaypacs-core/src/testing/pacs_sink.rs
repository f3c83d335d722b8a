//! Conformance suite for [`PacsSink`] implementations.
//!
//! Run it with [`pacs_sink_conformance!`](crate::pacs_sink_conformance).
//! The factory also returns a [`SinkProbe`] that reads back what the
//! destination holds, so byte-exactness is checked at the destination.

use std::collections::HashMap;

use async_trait::async_trait;

use crate::chunk_store::FileKey;
use crate::digest::{ByteStream, Sha256Digest};
use crate::error::{Error, Result};
use crate::ids::{FileId, SessionId, Uid};
use crate::model::DicomSummary;
use crate::pacs_sink::{
    Holding, Instance, InstanceOutcome, InstanceSource, PacsSink, Verification,
};
use crate::testing::{dicom_gen, pieces};

/// Reads back what a destination holds, for the conformance suite.
#[async_trait]
pub trait SinkProbe: Send + Sync {
    /// The stored bytes of an instance as a Part-10 file, if the destination
    /// holds it. A destination that rewrites the file meta group (C-STORE)
    /// returns the bytes the sink sent, reassembled, or fails the case.
    async fn fetch(&self, sop_instance_uid: &Uid) -> Result<Option<Vec<u8>>>;

    /// Whether the destination keeps the sender's file meta group. A
    /// C-STORE receiver writes its own, so only the data set after it is
    /// compared.
    fn preserves_file_meta(&self) -> bool {
        true
    }
}

/// The part of a Part-10 file that every destination must hold unchanged:
/// the whole file, or the data set after the file meta group.
fn held_part(bytes: &[u8], whole: bool) -> &[u8] {
    if whole {
        return bytes;
    }
    let off = crate::dicom::data_set_offset(bytes).expect("a Part-10 file") as usize;
    &bytes[off..]
}

/// An in-memory [`InstanceSource`] for tests.
#[derive(Debug, Default)]
pub struct MemorySource {
    files: HashMap<FileKey, Vec<u8>>,
}

impl MemorySource {
    /// Add a file's bytes and return the [`Instance`] describing it.
    pub fn add(&mut self, bytes: Vec<u8>, dicom: DicomSummary) -> Instance {
        let key = FileKey {
            session: SessionId::random(),
            file: FileId::random(),
        };
        let inst = Instance::of_bytes(key, &bytes, dicom);
        self.files.insert(key, bytes);
        inst
    }
}

#[async_trait]
impl InstanceSource for MemorySource {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        let b = self
            .files
            .get(&instance.key)
            .ok_or(Error::NotFound { what: "file" })?;
        Ok(pieces(b, 64 << 10))
    }
}

/// Generate `n` valid instances of one study into a [`MemorySource`].
pub fn study(n: usize) -> Result<(MemorySource, Vec<Instance>)> {
    let mut src = MemorySource::default();
    let study = dicom_gen::new_uid();
    let series = dicom_gen::new_uid();
    let mut out = Vec::new();
    for i in 0..n {
        let spec = dicom_gen::DicomSpec {
            study_uid: study.clone(),
            series_uid: series.clone(),
            sop_instance_uid: dicom_gen::new_uid(),
            seed: i as u64,
            ..dicom_gen::DicomSpec::default()
        };
        let bytes =
            dicom_gen::generate(&spec).map_err(|e| Error::invalid("TEST_GEN", e.to_string()))?;
        let summary =
            crate::dicom::validate_dicom(&bytes, bytes.len() as u64, &Default::default())?;
        out.push(src.add(bytes, summary));
    }
    Ok((src, out))
}

/// A study is delivered and the destination holds every instance byte-exact.
pub async fn delivers_byte_exact(sink: &dyn PacsSink, probe: &dyn SinkProbe) {
    let (src, insts) = study(3).expect("generate study");
    let report = sink.deliver(&insts, &src).await.expect("deliver");
    assert_eq!(report.outcomes.len(), insts.len());
    for ((uid, outcome), inst) in report.outcomes.iter().zip(&insts) {
        assert_eq!(
            uid, &inst.dicom.sop_instance_uid,
            "outcomes are in input order"
        );
        assert!(
            matches!(
                outcome,
                InstanceOutcome::Stored | InstanceOutcome::Warning { .. }
            ),
            "{outcome:?}"
        );
        let held = probe
            .fetch(uid)
            .await
            .expect("probe")
            .expect("destination holds the instance");
        let sent = src.files.get(&inst.key).expect("source bytes");
        let whole = probe.preserves_file_meta();
        assert_eq!(
            Sha256Digest::of(held_part(&held, whole)),
            Sha256Digest::of(held_part(sent, whole)),
            "destination bytes differ"
        );
    }
}

/// Delivering again is harmless: every instance reported delivered, nothing duplicated.
pub async fn redelivery_is_idempotent(sink: &dyn PacsSink, probe: &dyn SinkProbe) {
    let (src, insts) = study(2).expect("generate study");
    sink.deliver(&insts, &src).await.expect("first deliver");
    let again = sink.deliver(&insts, &src).await.expect("second deliver");
    assert!(again.all_delivered(), "{again:?}");
    for i in &insts {
        assert!(
            probe
                .fetch(&i.dicom.sop_instance_uid)
                .await
                .expect("probe")
                .is_some()
        );
    }
}

/// A source that fails mid-instance never leaves a partial instance behind.
pub async fn source_failure_leaves_nothing(sink: &dyn PacsSink, probe: &dyn SinkProbe) {
    #[derive(Debug)]
    struct Broken(MemorySource);
    #[async_trait]
    impl InstanceSource for Broken {
        async fn open(&self, instance: &Instance) -> Result<ByteStream> {
            let b = self
                .0
                .files
                .get(&instance.key)
                .ok_or(Error::NotFound { what: "file" })?;
            Ok(crate::testing::failing(&b[..b.len() / 2]))
        }
    }
    let (src, insts) = study(1).expect("generate study");
    let res = sink.deliver(&insts, &Broken(src)).await;
    match res {
        Err(_) => {}
        Ok(r) => assert!(!r.all_delivered(), "a broken source was reported delivered"),
    }
    let held = probe
        .fetch(&insts[0].dicom.sop_instance_uid)
        .await
        .expect("probe");
    assert!(held.is_none(), "a partial instance was stored");
}

/// `verify` says "absent" before a delivery and "the same" after it, per
/// instance and in order.
pub async fn verify_reports_what_is_held(sink: &dyn PacsSink, _probe: &dyn SinkProbe) {
    let (src, insts) = study(3).expect("generate study");
    let before = sink.verify(&insts).await.expect("verify before");
    assert_eq!(before, vec![Holding::Absent; 3], "nothing delivered yet");
    sink.deliver(&insts[..2], &src).await.expect("deliver two");
    let after = sink.verify(&insts).await.expect("verify after");
    assert_eq!(after.len(), 3);
    assert!(after[0].is_same() && after[1].is_same(), "{after:?}");
    assert_eq!(after[2], Holding::Absent, "exactly the delivered ones");
}

/// The same SOP Instance UIDs with other content (another pixel seed):
/// `verify` must not call the destination's copy the same. A sink that
/// compares content answers `Different`; one that cannot may answer
/// `Same` only as presence-only.
pub async fn verify_detects_other_content(sink: &dyn PacsSink, _probe: &dyn SinkProbe) {
    let (src, insts) = study(2).expect("generate study");
    sink.deliver(&insts, &src).await.expect("deliver");
    let (mut other_src, _) = study(0).expect("empty");
    let others: Vec<Instance> = insts
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            let spec = dicom_gen::DicomSpec {
                study_uid: inst.dicom.study_instance_uid.to_string(),
                series_uid: inst.dicom.series_instance_uid.to_string(),
                sop_instance_uid: inst.dicom.sop_instance_uid.to_string(),
                seed: 1000 + i as u64,
                ..dicom_gen::DicomSpec::default()
            };
            let bytes = dicom_gen::generate(&spec).expect("generate");
            let summary =
                crate::dicom::validate_dicom(&bytes, bytes.len() as u64, &Default::default())
                    .expect("valid");
            other_src.add(bytes, summary)
        })
        .collect();
    let held = sink.verify(&others).await.expect("verify");
    for (h, inst) in held.iter().zip(&others) {
        match h {
            Holding::Different { reason } => assert!(
                reason.contains(inst.dicom.sop_instance_uid.as_str()),
                "the reason names the UID: {reason}"
            ),
            Holding::Same {
                verification: Verification::PresenceOnly,
            } => {}
            other => panic!("other content called {other:?}"),
        }
    }
    // Delivering the other content must not be reported as the same
    // content held: the destination keeps its version, or replaces it.
    let report = sink.deliver(&others, &other_src).await;
    if let Ok(report) = report {
        let after = sink.verify(&others).await.expect("verify after");
        for ((_, outcome), h) in report.outcomes.iter().zip(&after) {
            if let Holding::Same {
                verification: Verification::Content,
            } = h
            {
                // Replaced: then the sink's claim and the check agree.
                assert!(outcome.is_delivered(), "{outcome:?}");
            }
        }
    }
}

/// A sink's failures are classified: an unreachable or refusing
/// destination is `Error::Pacs` (transient or permanent), never a panic;
/// its outcomes cover every input in order.
pub async fn outcomes_cover_every_instance(sink: &dyn PacsSink, _probe: &dyn SinkProbe) {
    let (src, insts) = study(4).expect("generate study");
    let report = sink.deliver(&insts, &src).await.expect("deliver");
    let uids: Vec<&Uid> = report.outcomes.iter().map(|(u, _)| u).collect();
    let want: Vec<&Uid> = insts.iter().map(|i| &i.dicom.sop_instance_uid).collect();
    assert_eq!(uids, want, "one outcome per instance, in input order");
    for (_, o) in &report.outcomes {
        assert!(
            matches!(
                o,
                InstanceOutcome::Stored
                    | InstanceOutcome::AlreadyPresent
                    | InstanceOutcome::Warning { .. }
            ),
            "{o:?}"
        );
    }
}

/// Generates one `#[tokio::test]` per [`PacsSink`] conformance case.
/// `$factory` is an `async fn() -> (impl PacsSink, impl SinkProbe, impl Sized)`.
#[macro_export]
macro_rules! pacs_sink_conformance {
    ($factory:path) => {
        mod pacs_sink_conformance {
            use super::*;
            $crate::pacs_sink_conformance!(@cases $factory; delivers_byte_exact, redelivery_is_idempotent, source_failure_leaves_nothing, verify_reports_what_is_held, verify_detects_other_content, outcomes_cover_every_instance);
        }
    };
    (@cases $factory:path; $($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let (sink, probe, _guard) = $factory().await;
            $crate::testing::pacs_sink::$case(&sink, &probe).await;
        }
    )*};
}
