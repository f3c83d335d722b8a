//! Shared harness for the end-to-end tests: a [`Pipeline`] on the embedded
//! adapters in one data folder, and helpers to upload files in chunks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use relaypacs_core::testing::pieces;
use relaypacs_core::{
    Actor, FileId, FileRecord, NewFile, NewSession, PacsSink, Pipeline, PipelineConfig, PutChunk,
    PutOutcome, Result, SessionId, Sha256Digest,
};
use relaypacs_pacs::LocalArchiveSink;
use relaypacs_storage::{FileSessionStore, JsonlAuditSink, LocalChunkStore};

/// A pipeline over the local adapters rooted at one folder.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// The data folder.
    pub root: PathBuf,
    /// The archive sink (to look at what was delivered).
    pub archive: LocalArchiveSink,
    /// The audit sink.
    pub audit: JsonlAuditSink,
    /// The session store the pipeline was built with (for assertions on
    /// what is recorded; the pipeline itself is the only door for work).
    pub sessions: FileSessionStore,
    /// The chunk store the pipeline was built with (for assertions on what
    /// is stored).
    pub chunks: LocalChunkStore,
}

impl Embedded {
    /// Open the embedded adapters under `root` (creating it).
    pub fn open(root: &Path, config: PipelineConfig) -> Result<Self> {
        Self::open_wrapped(root, config, |a| Arc::new(a))
    }

    /// Like [`open`](Self::open), with the archive sink wrapped by `wrap`
    /// (fault injection in tests).
    pub fn open_wrapped(
        root: &Path,
        config: PipelineConfig,
        wrap: impl FnOnce(LocalArchiveSink) -> Arc<dyn PacsSink>,
    ) -> Result<Self> {
        let chunks = LocalChunkStore::open(root.join("chunks"))?;
        let sessions = FileSessionStore::open(root.join("sessions"))?;
        let archive = LocalArchiveSink::open(root.join("archive"))?;
        let audit = JsonlAuditSink::open(root.join("audit").join("audit.jsonl"))?;
        let pipeline = Pipeline::new(
            Arc::new(chunks.clone()),
            Arc::new(sessions.clone()),
            wrap(archive.clone()),
            Arc::new(audit.clone()),
            config,
        );
        Ok(Self {
            pipeline,
            root: root.to_path_buf(),
            archive,
            audit,
            sessions,
            chunks,
        })
    }
}

/// Upload `data` as a new file of `session` in chunks of `chunk` bytes (in
/// order, each with its digest declared) and complete it, through
/// [`Pipeline::ingest_stream_chunked`].
pub async fn upload_file(
    p: &Pipeline,
    actor: &Actor,
    session: SessionId,
    name: &str,
    data: &[u8],
    chunk: usize,
) -> Result<FileRecord> {
    let f = p
        .add_file(
            actor,
            session,
            NewFile {
                name: name.into(),
                size: data.len() as u64,
                sha256: Some(Sha256Digest::of(data)),
            },
        )
        .await?;
    let bytes = pieces(data, 64 << 10);
    p.ingest_stream_chunked(actor, session, f.id, chunk as u64, bytes)
        .await
}

/// Put one chunk with its digest declared.
pub async fn put(
    p: &Pipeline,
    actor: &Actor,
    session: SessionId,
    file: FileId,
    offset: u64,
    data: &[u8],
) -> Result<PutOutcome> {
    let spec = PutChunk {
        offset,
        length: data.len() as u64,
        sha256: Some(Sha256Digest::of(data)),
    };
    p.put_chunk(actor, session, file, spec, pieces(data, 64 << 10))
        .await
}

/// Open a session for `actor`.
pub async fn open_session(p: &Pipeline, actor: &Actor) -> Result<SessionId> {
    Ok(p.create_session(actor, NewSession::default()).await?.id)
}

/// Peak resident set size of this process in bytes (VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A valid Part-10 file (Secondary Capture, Explicit VR LE, 400 x 400 x
/// 16 bit, about 320 KB) of `study`, with pixel data from `seed`.
pub fn dicom(study: &str, seed: u64) -> Vec<u8> {
    dicom_sized(study, seed, 400)
}

/// Like [`dicom`] with `side` x `side` pixels.
pub fn dicom_sized(study: &str, seed: u64, side: u16) -> Vec<u8> {
    use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
    let spec = DicomSpec {
        study_uid: study.to_owned(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: new_uid(),
        seed,
        rows: side,
        cols: side,
        ..DicomSpec::default()
    };
    match generate(&spec) {
        Ok(b) => b,
        // Generation of a fixed, valid spec cannot fail short of a bug in
        // the generator; tests want to stop right there.
        Err(e) => panic!("test DICOM generation failed: {e}"),
    }
}

/// A new random study UID.
pub fn new_study() -> String {
    relaypacs_core::testing::dicom_gen::new_uid()
}

/// A valid Part-10 file of `study` whose pixel data makes it at least
/// `size` bytes (built in memory; for files beyond a few hundred MiB use
/// `dicom_gen::write_large_file`).
pub fn dicom_of_size(study: &str, size: usize) -> Vec<u8> {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("big.dcm");
    use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
    let spec = DicomSpec {
        study_uid: study.to_owned(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: new_uid(),
        ..DicomSpec::default()
    };
    if let Err(e) = write_large_file(&path, &spec, size as u64) {
        panic!("large DICOM generation failed: {e}");
    }
    match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => panic!("read generated file: {e}"),
    }
}
