//! Conformance suite for [`PacsSink`] implementations.
//!
//! Run it with [`pacs_sink_conformance!`](crate::pacs_sink_conformance).
//! The factory also returns a [`SinkProbe`] that reads back what the
//! destination holds, so byte-exactness is checked at the destination.
//!
//! The cases a PACS vendor cares most about:
//! - other bytes under an existing SOP Instance UID are never called the
//!   same ([`verify_detects_other_content`]);
//! - a destination that keeps its own version when sent other bytes is
//!   never reported as holding the new content, and one that replaces it
//!   is never reported as holding the old
//!   ([`kept_or_replaced_version_is_reported_as_held`]);
//! - a partial write (the source fails mid-stream) leaves nothing
//!   ([`source_failure_leaves_nothing`]);
//! - an unreachable destination is a transient [`Error::Pacs`], never a
//!   permanent refusal ([`unreachable_destination_is_transient`], when the
//!   factory can point a sink at one).

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
    /// The stored bytes of `instance` as a Part-10 file, if the
    /// destination holds something under its SOP Instance UID (the whole
    /// [`Instance`] is given, so a layout keyed by study or series finds it
    /// directly). A destination that rewrites the file meta group
    /// (C-STORE) returns its own file; see
    /// [`preserves_file_meta`](Self::preserves_file_meta).
    async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>>;

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
            .fetch(inst)
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
        assert!(probe.fetch(i).await.expect("probe").is_some());
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
    let held = probe.fetch(&insts[0]).await.expect("probe");
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

/// Instances with the same UIDs as `insts` and other pixel data (seeded
/// from `seed`), in a source of their own.
fn other_content(insts: &[Instance], seed: u64) -> (MemorySource, Vec<Instance>) {
    let mut src = MemorySource::default();
    let others = insts
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            let spec = dicom_gen::DicomSpec {
                study_uid: inst.dicom.study_instance_uid.to_string(),
                series_uid: inst.dicom.series_instance_uid.to_string(),
                sop_instance_uid: inst.dicom.sop_instance_uid.to_string(),
                seed: seed + i as u64,
                ..dicom_gen::DicomSpec::default()
            };
            let bytes = dicom_gen::generate(&spec).expect("generate");
            let summary =
                crate::dicom::validate_dicom(&bytes, bytes.len() as u64, &Default::default())
                    .expect("valid");
            src.add(bytes, summary)
        })
        .collect();
    (src, others)
}

/// The same SOP Instance UIDs with other content (another pixel seed):
/// `verify` must not call the destination's copy the same. A sink that
/// compares content answers `Different`; one that cannot may answer
/// `Same` only as presence-only.
pub async fn verify_detects_other_content(sink: &dyn PacsSink, _probe: &dyn SinkProbe) {
    let (src, insts) = study(2).expect("generate study");
    sink.deliver(&insts, &src).await.expect("deliver");
    let (other_src, others) = other_content(&insts, 1000);
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

/// A destination sent other bytes under a SOP Instance UID it already
/// holds either keeps its own version or replaces it; the probe says
/// which, and `verify` must agree: the version held is the same (by
/// content, or presence-only), the other one is never `Same` by content.
/// The destination never holds a mix of the two.
pub async fn kept_or_replaced_version_is_reported_as_held(
    sink: &dyn PacsSink,
    probe: &dyn SinkProbe,
) {
    let (src, insts) = study(1).expect("generate study");
    sink.deliver(&insts, &src).await.expect("deliver");
    let (other_src, others) = other_content(&insts, 2000);
    // The sink may refuse (a conflict) or claim success: either way the
    // check below decides what is held.
    let _ = sink.deliver(&others, &other_src).await;
    let whole = probe.preserves_file_meta();
    let held = probe
        .fetch(&insts[0])
        .await
        .expect("probe")
        .expect("the destination still holds something under the UID");
    let first = src.files.get(&insts[0].key).expect("source bytes");
    let second = other_src.files.get(&others[0].key).expect("source bytes");
    let held = Sha256Digest::of(held_part(&held, whole));
    let (kept, gone) = if held == Sha256Digest::of(held_part(first, whole)) {
        (&insts, &others)
    } else {
        assert_eq!(
            held,
            Sha256Digest::of(held_part(second, whole)),
            "the destination holds neither version"
        );
        (&others, &insts)
    };
    let now = sink.verify(kept).await.expect("verify the version held");
    assert!(now[0].is_same(), "the version held is not found: {now:?}");
    let now = sink
        .verify(gone)
        .await
        .expect("verify the version not held");
    assert!(
        !matches!(
            now[0],
            Holding::Same {
                verification: Verification::Content
            }
        ),
        "the version the destination does not hold was called held by content: {now:?}"
    );
}

/// An unreachable destination (nothing listens, the host is down): both
/// `deliver` and `verify` fail as [`Error::Pacs`] with `transient: true`
/// (for `deliver`, a report of transient failures for every instance is
/// also accepted), since a retry later may succeed; nothing is reported
/// delivered and nothing is called held or absent.
pub async fn unreachable_destination_is_transient(sink: &dyn PacsSink) {
    let (src, insts) = study(2).expect("generate study");
    match sink.deliver(&insts, &src).await {
        Err(Error::Pacs { transient, .. }) => {
            assert!(
                transient,
                "an unreachable destination is a transient failure"
            )
        }
        Err(e) => panic!("an unreachable destination must be Error::Pacs, got {e:?}"),
        Ok(report) => {
            assert_eq!(report.outcomes.len(), insts.len(), "{report:?}");
            for (_, o) in &report.outcomes {
                assert!(
                    matches!(
                        o,
                        InstanceOutcome::Failed {
                            transient: true,
                            ..
                        }
                    ),
                    "an unreachable destination reported {o:?}"
                );
            }
        }
    }
    match sink.verify(&insts).await {
        Err(Error::Pacs {
            transient: true, ..
        }) => {}
        other => panic!("verify against an unreachable destination: {other:?}"),
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

/// Generates a module `$name` with one `#[test]` per [`PacsSink`]
/// conformance case. `$factory` is an `async fn() -> (impl PacsSink, impl
/// SinkProbe, impl Sized)`. With `unreachable = $down`, where `$down` is an
/// `async fn() -> (impl PacsSink, impl Sized)` giving a sink whose
/// destination cannot be reached, the module also checks that such
/// failures are transient. The calling crate needs no tokio of its own.
///
/// ```text
/// relaypacs_core::pacs_sink_conformance!(my_sink, make_sink);
/// relaypacs_core::pacs_sink_conformance!(my_sink_full, make_sink, unreachable = make_sink_to_nowhere);
/// ```
#[macro_export]
macro_rules! pacs_sink_conformance {
    ($name:ident, $factory:path $(, unreachable = $down:path)? $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::pacs_sink_conformance!(@cases $factory; delivers_byte_exact, redelivery_is_idempotent, source_failure_leaves_nothing, verify_reports_what_is_held, verify_detects_other_content, kept_or_replaced_version_is_reported_as_held, outcomes_cover_every_instance);
            $(
                #[test]
                fn unreachable_destination_is_transient() {
                    $crate::testing::__rt::run(async {
                        let (sink, _guard) = $down().await;
                        $crate::testing::pacs_sink::unreachable_destination_is_transient(&sink).await;
                    })
                }
            )?
        }
    };
    (@cases $factory:path; $($case:ident),*) => {$(
        #[test]
        fn $case() {
            $crate::testing::__rt::run(async {
                let (sink, probe, _guard) = $factory().await;
                $crate::testing::pacs_sink::$case(&sink, &probe).await;
            })
        }
    )*};
}
