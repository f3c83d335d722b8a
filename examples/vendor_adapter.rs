//! # A vendor's own adapters: the guide to copy
//!
//! RelayPACS talks to the world only through object-safe async traits of
//! `relaypacs-core`. This file is what a vendor writes to plug in their
//! own destination and storage, and how they prove it honours the
//! contracts with the public conformance suites — one macro call each:
//!
//! - [`FolderSink`], a [`PacsSink`]: writes each instance to a folder as
//!   `<SOP Instance UID>.dcm` (atomically, never overwriting another
//!   object) and POSTs a JSON callback to an HTTP URL naming the instances
//!   it holds;
//! - [`CountingChunkStore`], a [`ChunkStore`] decorator: counts the bytes
//!   acknowledged and read over any store (here
//!   [`relaypacs_storage::LocalChunkStore`]).
//!
//! Run the suites with `cargo test -p relaypacs-examples --example
//! vendor_adapter`; try the sink with `cargo run -p relaypacs-examples
//! --example vendor_adapter -- <folder>`.
//!
//! Dependencies a vendor needs: `relaypacs-core` (with the `testing`
//! feature as a dev-dependency for the suites), `async-trait` (the traits
//! are `#[async_trait]`), `futures` and an async runtime for their own I/O.
//! The suite macros need no `tokio` or `async-trait` in the calling crate.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use relaypacs_core::dicom::Part10Hasher;
use relaypacs_core::{
    ByteStream, ChunkPlacement, ChunkRecord, ChunkStore, DeliveryReport, Error, FileKey, Holding,
    Instance, InstanceOutcome, InstanceSource, PacsSink, Result, SessionId, compare_content,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ------------------------------------------------------------- the sink

/// A destination that keeps each instance as `<root>/<SOP Instance
/// UID>.dcm` and tells an HTTP endpoint what it holds.
///
/// How it meets the [`PacsSink`] contract:
/// - **durable when it says so**: an instance is streamed from the
///   [`InstanceSource`] into a temporary file in the same folder, fsync'd,
///   then linked to its final name and the folder fsync'd; only then is it
///   `Stored`;
/// - **nothing partial**: a source that fails midway (the pipeline's source
///   re-checks the SHA-256 at the end) leaves only the temporary file,
///   which is removed;
/// - **idempotent, never overwrites**: the final name is created with a
///   hard link, which fails if it exists; an identical copy is
///   `AlreadyPresent`, another object under the same UID is a permanent
///   `Failed` naming the UID (the folder keeps its own version);
/// - **verify proves content**: the held file is hashed and judged by
///   [`compare_content`], the rule every sink shares;
/// - **errors are classified**: a callback that cannot be delivered is a
///   transient [`Error::Pacs`] (the files are durable, so the retry finds
///   them `AlreadyPresent` and sends the callback again: the receiver must
///   accept repeats).
#[derive(Debug, Clone)]
pub struct FolderSink {
    root: PathBuf,
    callback: Option<Callback>,
}

/// Where the callback goes: `http://host:port/path`.
#[derive(Debug, Clone)]
struct Callback {
    address: String,
    host: String,
    path: String,
}

impl FolderSink {
    /// A sink writing into `root` (created if missing), with no callback.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create archive folder", e))?;
        Ok(Self {
            root,
            callback: None,
        })
    }

    /// The same sink, POSTing `{"study": …, "held": [SOP Instance UIDs]}`
    /// to `url` (`http://host:port/path`, plain HTTP/1.1) after each
    /// delivery.
    pub fn with_callback(mut self, url: &str) -> Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            Error::invalid("VENDOR_CALLBACK_URL", "the callback URL must be http://")
        })?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Err(Error::invalid("VENDOR_CALLBACK_URL", "no host in the URL"));
        }
        let address = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        self.callback = Some(Callback {
            address,
            host: authority.to_owned(),
            path: if path.is_empty() { "/" } else { path }.to_owned(),
        });
        Ok(self)
    }

    /// Where an instance lives (SOP Instance UIDs are digits and dots:
    /// safe as a file name, checked when parsed).
    pub fn path_of(&self, instance: &Instance) -> PathBuf {
        self.root
            .join(format!("{}.dcm", instance.dicom.sop_instance_uid))
    }

    /// What the folder holds for `instance`, by content.
    async fn holding(&self, instance: &Instance) -> Result<Holding> {
        let mut file = match tokio::fs::File::open(self.path_of(instance)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Holding::Absent),
            Err(e) => return Err(Error::io("open archived instance", e)),
        };
        let mut hasher = Part10Hasher::new(64 << 10);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Error::io("read archived instance", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(compare_content(instance, &hasher.finish()))
    }

    /// Stream one instance into the folder; `Stored` once durable.
    async fn store(
        &self,
        instance: &Instance,
        source: &dyn InstanceSource,
    ) -> Result<InstanceOutcome> {
        let tmp = self.root.join(format!(
            ".incoming-{}-{}",
            instance.dicom.sop_instance_uid,
            SessionId::random()
        ));
        let written = self.write_temp(&tmp, instance, source).await;
        let linked = match written {
            Ok(()) => std::fs::hard_link(&tmp, self.path_of(instance)),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        match linked {
            Ok(()) => {
                sync_dir(&self.root).await?;
                Ok(InstanceOutcome::Stored)
            }
            // Someone stored this UID meanwhile: report what is held.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(match self.holding(instance).await? {
                    Holding::Same { .. } => InstanceOutcome::AlreadyPresent,
                    other => refused(&other),
                })
            }
            Err(e) => Err(Error::io("link archived instance", e)),
        }
    }

    async fn write_temp(
        &self,
        tmp: &Path,
        instance: &Instance,
        source: &dyn InstanceSource,
    ) -> Result<()> {
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| Error::io("create incoming file", e))?;
        let mut body = source.open(instance).await?;
        while let Some(piece) = body.next().await {
            file.write_all(&piece?)
                .await
                .map_err(|e| Error::io("write incoming file", e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| Error::io("fsync incoming file", e))
    }

    /// POST the callback; any failure is transient.
    async fn notify(&self, instances: &[Instance], report: &DeliveryReport) -> Result<()> {
        let Some(cb) = &self.callback else {
            return Ok(());
        };
        let held: Vec<String> = report
            .outcomes
            .iter()
            .filter(|(_, o)| o.is_delivered())
            .map(|(uid, _)| format!("\"{uid}\""))
            .collect();
        let study = instances
            .first()
            .map(|i| i.dicom.study_instance_uid.to_string())
            .unwrap_or_default();
        // UIDs are digits and dots: nothing to escape.
        let body = format!("{{\"study\":\"{study}\",\"held\":[{}]}}", held.join(","));
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            cb.path,
            cb.host,
            body.len()
        );
        let exchange = async {
            let mut conn = tokio::net::TcpStream::connect(&cb.address).await?;
            conn.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = match tokio::time::timeout(Duration::from_secs(10), exchange).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(Error::pacs_transient(
                    format!("callback to {} failed", cb.address),
                    Some(Box::new(e)),
                ));
            }
            Err(_) => {
                return Err(Error::pacs_transient(
                    format!("callback to {} timed out", cb.address),
                    None,
                ));
            }
        };
        let status = String::from_utf8_lossy(&answer);
        let ok = status
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code.starts_with('2'));
        if ok {
            Ok(())
        } else {
            let line = status.lines().next().unwrap_or_default().to_owned();
            Err(Error::pacs_transient(
                format!("callback answered {line:?}"),
                None,
            ))
        }
    }
}

/// The permanent refusal of another object held under the same UID.
fn refused(held: &Holding) -> InstanceOutcome {
    let reason = match held {
        Holding::Different { reason } => reason.clone(),
        other => format!("the folder holds {other:?}"),
    };
    InstanceOutcome::Failed {
        transient: false,
        reason,
    }
}

/// Make a rename or link in `dir` durable.
async fn sync_dir(dir: &Path) -> Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir).and_then(|d| d.sync_all()))
        .await
        .map_err(|e| Error::io("fsync archive folder", std::io::Error::other(e)))?
        .map_err(|e| Error::io("fsync archive folder", e))
}

impl fmt::Display for FolderSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "folder:{}", self.root.display())
    }
}

#[async_trait]
impl PacsSink for FolderSink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let mut report = DeliveryReport::default();
        for instance in instances {
            // Check before sending: an identical copy is not written again,
            // another object is never overwritten.
            let outcome = match self.holding(instance).await? {
                Holding::Absent => self.store(instance, source).await?,
                Holding::Same { .. } => InstanceOutcome::AlreadyPresent,
                other => refused(&other),
            };
            report
                .outcomes
                .push((instance.dicom.sop_instance_uid.clone(), outcome));
        }
        self.notify(instances, &report).await?;
        Ok(report)
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        let mut held = Vec::with_capacity(instances.len());
        for instance in instances {
            held.push(self.holding(instance).await?);
        }
        Ok(held)
    }
}

// ------------------------------------------------------- the chunk store

/// A [`ChunkStore`] decorator counting the bytes acknowledged by
/// `put_chunk` and the bytes served by `read`, over any store.
///
/// A decorator passes every call through and keeps the contract of the
/// store it wraps: it never acknowledges a chunk the inner store did not,
/// and counts a chunk only once the inner store returned `Ok` (a body that
/// failed midway is not counted).
#[derive(Debug)]
pub struct CountingChunkStore<S> {
    inner: S,
    stored: AtomicU64,
    read: Arc<AtomicU64>,
}

impl<S> CountingChunkStore<S> {
    /// Count what passes through `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            stored: AtomicU64::new(0),
            read: Arc::default(),
        }
    }

    /// Bytes of acknowledged chunks so far.
    pub fn bytes_stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Bytes served by `read` so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

impl<S: fmt::Display> fmt::Display for CountingChunkStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "counting({})", self.inner)
    }
}

#[async_trait]
impl<S: ChunkStore> ChunkStore for CountingChunkStore<S> {
    async fn create_file(&self, key: FileKey, size: u64) -> Result<()> {
        self.inner.create_file(key, size).await
    }

    async fn put_chunk(
        &self,
        key: FileKey,
        placement: ChunkPlacement,
        body: ByteStream,
    ) -> Result<String> {
        let receipt = self.inner.put_chunk(key, placement, body).await?;
        self.stored.fetch_add(placement.length, Ordering::Relaxed);
        Ok(receipt)
    }

    async fn seal_file(&self, key: FileKey, size: u64, chunks: &[ChunkRecord]) -> Result<()> {
        self.inner.seal_file(key, size, chunks).await
    }

    async fn read(&self, key: FileKey, range: Range<u64>) -> Result<ByteStream> {
        let counter = self.read.clone();
        let stream = self.inner.read(key, range).await?;
        Ok(Box::pin(stream.inspect_ok(move |b| {
            counter.fetch_add(b.len() as u64, Ordering::Relaxed);
        })))
    }

    async fn delete_file(&self, key: FileKey) -> Result<()> {
        self.inner.delete_file(key).await
    }

    async fn delete_session(&self, session: SessionId) -> Result<()> {
        self.inner.delete_session(session).await
    }
}

// ------------------------------------------------------------- the demo

/// Deliver a generated study of three instances into the folder given as
/// the first argument (default `./vendor-archive`), twice, and verify it.
#[tokio::main]
async fn main() -> Result<()> {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "vendor-archive".into());
    let sink = FolderSink::open(&root)?;
    let (source, instances) = relaypacs_core::testing::pacs_sink::study(3)?;
    for round in ["first", "second"] {
        let report = sink.deliver(&instances, &source).await?;
        for (uid, outcome) in &report.outcomes {
            println!("{round} delivery: {uid}: {outcome:?}");
        }
    }
    for (instance, held) in instances.iter().zip(sink.verify(&instances).await?) {
        println!("{}: {held:?}", sink.path_of(instance).display());
    }
    Ok(())
}

// ------------------------------------------------------------ the proof

#[cfg(test)]
mod tests {
    //! The public conformance suites, one macro call per adapter. Nothing
    //! here names `tokio` or `async-trait`: the macros bring their runtime.
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use relaypacs_core::testing::async_trait;
    use relaypacs_core::testing::pacs_sink::SinkProbe;
    use relaypacs_core::testing::tempfile::TempDir;
    use relaypacs_storage::LocalChunkStore;

    use super::*;

    /// A tiny HTTP endpoint on 127.0.0.1 that answers 204 and keeps every
    /// callback body; stops when dropped.
    #[derive(Debug)]
    pub struct Receiver {
        url: String,
        bodies: Arc<Mutex<Vec<String>>>,
        stop: Arc<AtomicBool>,
    }

    impl Receiver {
        fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let url = format!("http://{}/relaypacs/held", listener.local_addr().unwrap());
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (b, s) = (bodies.clone(), stop.clone());
            std::thread::spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            conn.set_nonblocking(false).unwrap();
                            b.lock().unwrap().push(read_request_body(&mut conn));
                            let _ = conn.write_all(
                                b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\
                                  Connection: close\r\n\r\n",
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            Self { url, bodies, stop }
        }

        fn bodies(&self) -> Vec<String> {
            self.bodies.lock().unwrap().clone()
        }
    }

    impl Drop for Receiver {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn read_request_body(conn: &mut std::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }

    /// Reads back what the folder holds: the whole `Instance` is handed
    /// over, so the probe finds the file without scanning.
    pub struct Probe(FolderSink);

    #[async_trait]
    impl SinkProbe for Probe {
        async fn fetch(&self, instance: &Instance) -> Result<Option<Vec<u8>>> {
            match std::fs::read(self.0.path_of(instance)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("probe", e)),
            }
        }
    }

    /// The factory of the sink suite: a fresh folder and callback receiver
    /// per case (the guard keeps both alive).
    async fn folder_sink() -> (FolderSink, Probe, (TempDir, Receiver)) {
        let dir = TempDir::new().unwrap();
        let receiver = Receiver::start();
        let sink = FolderSink::open(dir.path().join("archive"))
            .unwrap()
            .with_callback(&receiver.url)
            .unwrap();
        (sink.clone(), Probe(sink), (dir, receiver))
    }

    /// The factory of the chunk-store suite.
    async fn counting_chunks() -> (CountingChunkStore<LocalChunkStore>, TempDir) {
        let dir = TempDir::new().unwrap();
        let store = LocalChunkStore::open(dir.path().join("chunks")).unwrap();
        (CountingChunkStore::new(store), dir)
    }

    relaypacs_core::pacs_sink_conformance!(folder_sink_conformance, folder_sink);
    relaypacs_core::chunk_store_conformance!(counting_chunk_store_conformance, counting_chunks);

    /// What the suites cannot know: the callback names what is held, and
    /// the counter counts acknowledged bytes only.
    #[test]
    fn callback_names_the_instances_held_and_bytes_are_counted() {
        relaypacs_core::testing::__rt::run(async {
            let (sink, _probe, (dir, receiver)) = folder_sink().await;
            let (source, instances) = relaypacs_core::testing::pacs_sink::study(2).unwrap();
            let report = sink.deliver(&instances, &source).await.unwrap();
            assert!(report.all_delivered(), "{report:?}");
            let bodies = receiver.bodies();
            assert_eq!(bodies.len(), 1, "{bodies:?}");
            for i in &instances {
                assert!(
                    bodies[0].contains(i.dicom.sop_instance_uid.as_str()),
                    "{bodies:?}"
                );
            }
            // An unreachable callback is a transient failure; the files stay.
            let down = FolderSink::open(dir.path().join("archive"))
                .unwrap()
                .with_callback(&format!(
                    "http://127.0.0.1:{}/x",
                    TcpListener::bind("127.0.0.1:0")
                        .unwrap()
                        .local_addr()
                        .unwrap()
                        .port()
                ))
                .unwrap();
            match down.deliver(&instances, &source).await {
                Err(Error::Pacs {
                    transient: true, ..
                }) => {}
                other => panic!("{other:?}"),
            }

            let (store, _chunks_dir) = counting_chunks().await;
            relaypacs_core::testing::chunk_store::out_of_order_roundtrip(&store).await;
            let size = (3u64 << 20) + 12_345;
            assert_eq!(store.bytes_stored(), size);
            assert_eq!(store.bytes_read(), size + 20);
        })
    }
}
