//! Shared harness for the end-to-end tests: a [`Pipeline`] on the embedded
//! adapters in one data folder (state in SQLite there, or in a PostgreSQL
//! database), and helpers to upload files in chunks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use relaypacs_core::testing::pieces;
use relaypacs_core::{
    Actor, ChunkStore, FileId, FileRecord, NewFile, NewSession, PacsSink, Pipeline, PipelineConfig,
    PutChunk, PutOutcome, Result, SessionId, Sha256Digest,
};
use relaypacs_pacs::LocalArchiveSink;
use relaypacs_storage::{
    JsonlAuditSink, LocalChunkStore, SqlAuditSink, SqlOptions, SqlSessionStore, SqlState,
};

/// Where an [`Embedded`] keeps its state (sessions, files, chunk records,
/// accepted instances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateDb {
    /// SQLite in `<root>/state.db` (the embedded default, as the server's).
    Sqlite,
    /// The PostgreSQL database at this URL (`postgres://…`), e.g. from
    /// `relaypacs_test_peers::Postgres::create_database`.
    Postgres(String),
}

impl StateDb {
    /// The connection URL for a data folder `root`.
    pub fn url(&self, root: &Path) -> Result<String> {
        match self {
            StateDb::Sqlite => {
                // An absolute path: `sqlite://relative/x` would read
                // `relative` as a host.
                let path = std::path::absolute(root.join("state.db")).map_err(|e| {
                    relaypacs_core::Error::storage(
                        relaypacs_core::StorageErrorKind::Io,
                        "resolve the state database path",
                        e,
                    )
                })?;
                Ok(format!("sqlite://{}", path.display()))
            }
            StateDb::Postgres(url) => Ok(url.clone()),
        }
    }

    /// A short name for logs and test output (`sqlite` or `postgres`).
    pub fn engine_name(&self) -> &'static str {
        match self {
            StateDb::Sqlite => "sqlite",
            StateDb::Postgres(_) => "postgres",
        }
    }
}

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
    pub sessions: SqlSessionStore,
    /// The state database under [`sessions`](Self::sessions).
    pub state: SqlState,
    /// The chunk store the pipeline was built with (for assertions on what
    /// is stored).
    pub chunks: LocalChunkStore,
}

impl Embedded {
    /// Open the embedded adapters under `root` (creating it), state in
    /// SQLite at `root/state.db`.
    pub async fn open(root: &Path, config: PipelineConfig) -> Result<Self> {
        Self::open_on(root, config, &StateDb::Sqlite).await
    }

    /// Like [`open`](Self::open), with the state in `db`.
    pub async fn open_on(root: &Path, config: PipelineConfig, db: &StateDb) -> Result<Self> {
        Self::open_wrapped(root, config, db, |a| Arc::new(a)).await
    }

    /// Like [`open_on`](Self::open_on), with the archive sink wrapped by
    /// `wrap` (fault injection in tests).
    pub async fn open_wrapped(
        root: &Path,
        config: PipelineConfig,
        db: &StateDb,
        wrap: impl FnOnce(LocalArchiveSink) -> Arc<dyn PacsSink>,
    ) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| {
            relaypacs_core::Error::storage(
                relaypacs_core::StorageErrorKind::Io,
                "create the data folder",
                e,
            )
        })?;
        let chunks = LocalChunkStore::open(root.join("chunks"))?;
        let state = SqlState::connect(&db.url(root)?, None, &SqlOptions::default()).await?;
        let sessions = SqlSessionStore::new(state.clone());
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
            state,
            chunks,
        })
    }

    /// Close the state database's connections (the pipeline can no longer
    /// use it). Dropping without closing is fine too; closing first ends a
    /// PostgreSQL database's sessions before the test drops it or its
    /// cluster.
    pub async fn close(&self) {
        self.state.close().await;
    }
}

/// A throwaway PostgreSQL cluster for one test (stopped and removed when
/// dropped), handing out a fresh database per [`Embedded`].
#[derive(Debug)]
pub struct PgCluster {
    /// The cluster (to crash it with `kill9` and bring it back).
    pub pg: relaypacs_test_peers::Postgres,
    next: std::sync::atomic::AtomicUsize,
}

impl PgCluster {
    /// Start a cluster with PostgreSQL's durable settings (`fsync`,
    /// `synchronous_commit` on).
    pub fn start() -> Self {
        Self {
            pg: relaypacs_test_peers::Postgres::start(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A new, empty database on this cluster (`state_<n>`).
    pub fn fresh_db(&self) -> StateDb {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StateDb::Postgres(self.pg.create_database(&format!("state_{n}")))
    }
}

/// One gateway of several sharing a service: a [`Pipeline`] with its own
/// connection pool to a shared state database (sessions, index, outbox and
/// audit chain all in it), on a chunk store and a sink the caller shares
/// between gateways.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// This gateway's connection pool.
    pub state: SqlState,
    /// The session store on [`state`](Self::state) (for assertions).
    pub sessions: SqlSessionStore,
    /// The audit sink appending to the database's one chain.
    pub audit: SqlAuditSink,
}

impl Gateway {
    /// Open a gateway on the state database at `url` (its own pool;
    /// migrations run under the database's lock), with `chunks` and `sink`
    /// as given (shared with the other gateways, or not).
    pub async fn open_shared(
        url: &str,
        chunks: Arc<dyn ChunkStore>,
        sink: Arc<dyn PacsSink>,
        config: PipelineConfig,
    ) -> Result<Self> {
        let state = SqlState::connect(url, None, &SqlOptions::default()).await?;
        let audit = SqlAuditSink::new(state.clone());
        // As the server: on SQLite a step's audit records in the step's
        // transaction, on PostgreSQL through the sink's group commit.
        let sessions = SqlSessionStore::new(state.clone());
        let sessions = if state.engine() == relaypacs_storage::Engine::Sqlite {
            sessions.with_audit(&audit)
        } else {
            sessions
        };
        let pipeline = Pipeline::new(
            chunks,
            Arc::new(sessions.clone()),
            sink,
            Arc::new(audit.clone()),
            config,
        );
        Ok(Self {
            pipeline,
            state,
            sessions,
            audit,
        })
    }

    /// Close this gateway's connections.
    pub async fn close(&self) {
        self.state.close().await;
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

/// A valid Part-10 file of `study`, `side` x `side` pixels from `seed`,
/// with the given SOP Instance UID (two files with one UID and other
/// bytes, for the index of accepted instances).
pub fn dicom_with_sop(study: &str, sop_instance_uid: &str, seed: u64, side: u16) -> Vec<u8> {
    use relaypacs_core::testing::dicom_gen::{DicomSpec, generate};
    let spec = DicomSpec {
        study_uid: study.to_owned(),
        series_uid: format!("{study}.1"),
        sop_instance_uid: sop_instance_uid.to_owned(),
        seed,
        rows: side,
        cols: side,
        ..DicomSpec::default()
    };
    match generate(&spec) {
        Ok(b) => b,
        // As in `dicom_sized`: a fixed, valid spec.
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
