//! The local archive hard-links a source's own file instead of writing a
//! copy when it can, and falls back to the copy when it cannot; either
//! way only verified bytes are archived.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use relaypacs_core::testing::collect;
use relaypacs_core::{
    ByteStream, DeliveryReport, FileKey, Holding, Instance, InstanceOutcome, InstanceSource,
    PacsSink, Result, VerifyingStream,
};
use relaypacs_pacs::LocalArchiveSink;
use tempfile::TempDir;

/// Instances kept as files in a folder, read back through the verifying
/// stream (as the pipeline's source does); `local_file` names each file,
/// or, with `point_elsewhere`, a path that cannot be linked.
#[derive(Debug)]
struct FileSource {
    dir: PathBuf,
    point_elsewhere: Option<PathBuf>,
    /// Streams opened: each instance is read once, linked or copied.
    opened: AtomicUsize,
}

impl FileSource {
    fn path(&self, key: FileKey) -> PathBuf {
        self.dir.join(format!("{}.data", key.file))
    }

    /// Write `n` new instances of one study (the conformance suite's
    /// generator) as files; their descriptions.
    async fn add_study(&self, n: usize) -> Vec<Instance> {
        let (memory, insts) = relaypacs_core::testing::pacs_sink::study(n).unwrap();
        for i in &insts {
            let bytes = collect(memory.open(i).await.unwrap()).await.unwrap();
            std::fs::write(self.path(i.key), bytes).unwrap();
        }
        insts
    }
}

#[async_trait]
impl InstanceSource for FileSource {
    async fn open(&self, instance: &Instance) -> Result<ByteStream> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        let bytes = std::fs::read(self.path(instance.key)).unwrap();
        let raw = relaypacs_core::testing::pieces(&bytes, 64 << 10);
        let (verified, _) = VerifyingStream::new(raw, 0, instance.size, Some(instance.sha256));
        Ok(Box::pin(verified))
    }

    fn local_file(&self, instance: &Instance) -> Option<PathBuf> {
        Some(
            self.point_elsewhere
                .clone()
                .unwrap_or_else(|| self.path(instance.key)),
        )
    }
}

/// Where the archive keeps `i` (its own layout).
fn archived(sink: &LocalArchiveSink, i: &Instance) -> PathBuf {
    let d = &i.dicom;
    sink.instance_path(
        &d.study_instance_uid,
        &d.series_instance_uid,
        &d.sop_instance_uid,
    )
}

fn setup(point_elsewhere: Option<PathBuf>) -> (TempDir, FileSource, LocalArchiveSink) {
    let dir = TempDir::new().unwrap();
    let chunks = dir.path().join("chunks");
    std::fs::create_dir(&chunks).unwrap();
    let sink = LocalArchiveSink::open(dir.path().join("archive")).unwrap();
    let src = FileSource {
        dir: chunks,
        point_elsewhere,
        opened: AtomicUsize::new(0),
    };
    (dir, src, sink)
}

fn assert_all(report: &DeliveryReport, want: &InstanceOutcome, what: &str) {
    assert!(
        report.outcomes.iter().all(|(_, o)| o == want),
        "{what}: {report:?}"
    );
}

async fn all_held(sink: &LocalArchiveSink, insts: &[Instance]) {
    for h in sink.verify(insts).await.unwrap() {
        assert!(matches!(h, Holding::Same { .. }), "{h:?}");
    }
}

/// On one filesystem the archive's file is the source's file (one inode,
/// two names), held byte for byte, and stays when the source removes its
/// name (the chunk store's cleanup after delivery).
#[tokio::test]
async fn a_local_file_is_linked_not_copied() {
    let (_dir, src, sink) = setup(None);
    let insts = src.add_study(3).await;
    let report = sink.deliver(&insts, &src).await.unwrap();
    assert_all(&report, &InstanceOutcome::Stored, "first");
    assert_eq!(src.opened.load(Ordering::Relaxed), 3, "each read once");
    for i in &insts {
        let (a, s) = (
            std::fs::metadata(archived(&sink, i)).unwrap(),
            std::fs::metadata(src.path(i.key)).unwrap(),
        );
        assert_eq!((a.dev(), a.ino()), (s.dev(), s.ino()));
        assert_eq!(a.nlink(), 2);
    }
    all_held(&sink, &insts).await;
    // Again: already there, nothing written.
    let again = sink.deliver(&insts, &src).await.unwrap();
    assert_all(&again, &InstanceOutcome::AlreadyPresent, "again");
    for i in &insts {
        std::fs::remove_file(src.path(i.key)).unwrap();
        assert_eq!(std::fs::metadata(archived(&sink, i)).unwrap().nlink(), 1);
    }
    all_held(&sink, &insts).await;
    // No temp names left behind.
    let series = archived(&sink, &insts[0]).parent().unwrap().to_path_buf();
    assert_eq!(std::fs::read_dir(series).unwrap().count(), 3);
}

/// A source file whose bytes changed at rest is never linked: the stream
/// fails before, and the archive holds nothing under that name.
#[tokio::test]
async fn a_file_changed_at_rest_is_not_linked() {
    let (_dir, src, sink) = setup(None);
    let insts = src.add_study(1).await;
    let path = src.path(insts[0].key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert!(sink.deliver(&insts, &src).await.is_err());
    assert!(!archived(&sink, &insts[0]).exists());
    assert!(matches!(
        sink.verify(&insts).await.unwrap()[0],
        Holding::Absent
    ));
}

/// A path that cannot be linked (gone, or a file of another size) is
/// archived as a copy of the verified stream: its own inode.
#[tokio::test]
async fn a_file_that_cannot_be_linked_is_copied() {
    let other = TempDir::new().unwrap();
    let wrong_size = other.path().join("wrong-size");
    std::fs::write(&wrong_size, b"not the instance").unwrap();
    for elsewhere in [other.path().join("missing"), wrong_size] {
        let (_dir, src, sink) = setup(Some(elsewhere.clone()));
        let insts = src.add_study(2).await;
        let report = sink.deliver(&insts, &src).await.unwrap();
        assert_all(&report, &InstanceOutcome::Stored, &format!("{elsewhere:?}"));
        // Found unlinkable before reading: each instance read once, for
        // its copy.
        assert_eq!(src.opened.load(Ordering::Relaxed), 2, "{elsewhere:?}");
        for i in &insts {
            let a = std::fs::metadata(archived(&sink, i)).unwrap();
            let s = std::fs::metadata(src.path(i.key)).unwrap();
            assert_ne!(a.ino(), s.ino(), "{elsewhere:?}");
            assert_eq!(a.nlink(), 1);
            assert_eq!(
                std::fs::read(archived(&sink, i)).unwrap(),
                std::fs::read(src.path(i.key)).unwrap()
            );
        }
        all_held(&sink, &insts).await;
    }
}
