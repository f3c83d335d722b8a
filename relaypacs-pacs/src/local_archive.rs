//! [`LocalArchiveSink`]: a folder laid out by Study/Series/SOP Instance UID.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use relaypacs_core::dicom::{ContentDigest, Part10Hasher};
use relaypacs_core::{
    DeliveryReport, Error, Holding, Instance, InstanceOutcome, InstanceSource, IntegrityError,
    PacsSink, Result, Sha256Digest, StorageErrorKind, Uid, Verification, compare_content,
};
use sha2::{Digest, Sha256};

/// A [`PacsSink`] writing each instance to
/// `<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`, so
/// the gateway runs with no external PACS.
///
/// Paths are built only from [`Uid`]s, which are digits and dots, so no
/// value can escape the root. Each instance is streamed into a temp file
/// (from an [`InstanceSource`], whose stream fails unless its bytes are the
/// verified ones), fsync'd,
/// linked into place without replacing anything (`link` fails if the name
/// exists), and the directory is fsync'd: crash-safe, never partial. When
/// the source keeps the instance as a durable local file on the archive's
/// filesystem ([`InstanceSource::local_file`]: the local chunk store), that
/// file is hard-linked into place instead, once its stream has proven the
/// bytes: no copy written, and no data sync (see `link_one`). An
/// instance already archived with identical bytes is `AlreadyPresent`;
/// with different bytes it is refused, never overwritten.
#[derive(Clone)]
pub struct LocalArchiveSink {
    root: PathBuf,
}

impl fmt::Debug for LocalArchiveSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalArchiveSink")
            .field("root", &self.root)
            .finish()
    }
}

impl fmt::Display for LocalArchiveSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "local-archive:{}", self.root.display())
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(op, e)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync archive directory"))
}

fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(p) = dir.parent() {
        create_dir_durable(p)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io("create archive directory", e)),
    }
    match dir.parent() {
        Some(p) => fsync_dir(p),
        None => Ok(()),
    }
}

/// The content digests of an archived file (streamed, 1 MiB at a time).
fn file_content(path: &Path) -> Result<ContentDigest> {
    let mut f = File::open(path).map_err(io("open archived instance"))?;
    let mut h = Part10Hasher::new(META_CAP);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read archived instance"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Largest file meta group looked for when comparing content.
const META_CAP: usize = 1 << 20;

/// The SHA-256 of an archived file alone (one pass; the data set digest
/// is only needed when the whole file differs).
fn file_digest(path: &Path) -> Result<Sha256Digest> {
    let mut f = File::open(path).map_err(io("open archived instance"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read archived instance"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finalize().into()))
}

/// What the archive holds for `inst`, compared by content: the file is
/// read back and hashed whole (the archive writes instances byte for
/// byte, so that one pass settles the usual case); only a file that
/// differs is read again for its data set digest and transfer syntax
/// ([`compare_content`] accepts the same data set under another meta
/// group, and names a transcoded copy).
fn held_content(path: &Path, inst: &Instance) -> Result<Holding> {
    if file_digest(path)? == inst.sha256 {
        return Ok(Holding::Same {
            verification: Verification::Content,
        });
    }
    Ok(compare_content(inst, &file_content(path)?))
}

impl LocalArchiveSink {
    /// An archive rooted at `root` (created if missing).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        create_dir_durable(&root)?;
        Ok(Self { root })
    }

    /// Where an instance is (or would be) archived.
    pub fn instance_path(&self, study: &Uid, series: &Uid, sop: &Uid) -> PathBuf {
        self.root
            .join(study.as_str())
            .join(series.as_str())
            .join(format!("{}.dcm", sop.as_str()))
    }

    /// Find an archived instance by SOP Instance UID (walks the archive).
    pub fn find(&self, sop: &Uid) -> Result<Option<PathBuf>> {
        let name = format!("{}.dcm", sop.as_str());
        for study in std::fs::read_dir(&self.root).map_err(io("list archive"))? {
            let study = study.map_err(io("list archive"))?.path();
            if !study.is_dir() {
                continue;
            }
            for series in std::fs::read_dir(&study).map_err(io("list archive"))? {
                let p = series.map_err(io("list archive"))?.path().join(&name);
                if p.is_file() {
                    return Ok(Some(p));
                }
            }
        }
        Ok(None)
    }

    /// Archive `inst` as a hard link to the source's own file `src`: no
    /// copy written, and no sync of data (the source's file is durable).
    /// Only a regular file of the instance's size on the archive's own
    /// filesystem is tried, checked before anything is read. The source's
    /// stream is then read to its end: it fails unless the bytes at rest
    /// are the verified ones, and nothing is linked before. Then the name
    /// is linked into place (never replacing one) and the folder fsync'd:
    /// crash-safe like the copy. `None` when the file cannot be linked
    /// here: the caller writes a copy from the stream instead.
    async fn link_one(
        &self,
        inst: &Instance,
        source: &dyn InstanceSource,
        src: PathBuf,
        target: &Path,
        dir: &Path,
    ) -> Result<Option<InstanceOutcome>> {
        let (size, root) = (inst.size, self.root.clone());
        let (src, linkable) = tokio::task::spawn_blocking(move || {
            let ok = linkable(&src, size, &root);
            (src, ok)
        })
        .await
        .map_err(join_err)?;
        if !linkable {
            return Ok(None);
        }
        let mut stream = source.open(inst).await?;
        let mut n = 0u64;
        while let Some(item) = stream.next().await {
            n += item?.len() as u64;
        }
        whole_stream(inst, n)?;
        let expected = inst.sha256;
        let (tg, dr) = (target.to_path_buf(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<Option<InstanceOutcome>> {
            create_dir_durable(&dr)?;
            let outcome = match std::fs::hard_link(&src, &tg) {
                Ok(()) => InstanceOutcome::Stored,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    same_or_refused(file_digest(&tg)?, expected)
                }
                // Gone since, or links not allowed there: a copy.
                Err(_) => return Ok(None),
            };
            fsync_dir(&dr)?;
            Ok(Some(outcome))
        })
        .await
        .map_err(join_err)?
    }

    async fn deliver_one(
        &self,
        inst: &Instance,
        source: &dyn InstanceSource,
    ) -> Result<InstanceOutcome> {
        let d = &inst.dicom;
        let target = self.instance_path(
            &d.study_instance_uid,
            &d.series_instance_uid,
            &d.sop_instance_uid,
        );
        let dir = target
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        let expected = inst.sha256;
        if target.exists() {
            let t = target.clone();
            let held = tokio::task::spawn_blocking(move || file_digest(&t))
                .await
                .map_err(join_err)??;
            return Ok(same_or_refused(held, expected));
        }
        if let Some(src) = source.local_file(inst)
            && let Some(outcome) = self.link_one(inst, source, src, &target, &dir).await?
        {
            return Ok(outcome);
        }
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut r);
        let tmp = dir.join(format!(".{}.{}.tmp", d.sop_instance_uid, hex::encode(r)));
        let (dir2, tmp2) = (dir.clone(), tmp.clone());
        let mut file = tokio::task::spawn_blocking(move || -> Result<File> {
            create_dir_durable(&dir2)?;
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp2)
                .map_err(io("create archive temp file"))
        })
        .await
        .map_err(join_err)??;
        let res: Result<InstanceOutcome> = async {
            // Not hashed again here: by the `InstanceSource` contract the
            // stream ends without error only if its bytes are the verified
            // ones (the pipeline's source hashes them on the way and fails
            // at the end otherwise), and nothing is linked into place
            // before the stream has ended cleanly. What reached the disk is
            // then proven by `verify`, which reads the archived file back.
            let mut stream = source.open(inst).await?;
            let mut n = 0u64;
            while let Some(item) = stream.next().await {
                let b = item?;
                n += b.len() as u64;
                let (f, r) = tokio::task::spawn_blocking(move || {
                    let r = file.write_all(&b);
                    (file, r)
                })
                .await
                .map_err(join_err)?;
                file = f;
                r.map_err(io("write archive temp file"))?;
            }
            whole_stream(inst, n)?;
            let (t, tg, dr) = (tmp.clone(), target.clone(), dir.clone());
            tokio::task::spawn_blocking(move || -> Result<InstanceOutcome> {
                // Crash-safe publish: fsync temp, link into place (never
                // replacing an existing name), fsync dir, drop the temp name.
                file.sync_all().map_err(io("fsync archive temp file"))?;
                let outcome = match std::fs::hard_link(&t, &tg) {
                    Ok(()) => InstanceOutcome::Stored,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        same_or_refused(file_digest(&tg)?, expected)
                    }
                    Err(e) => return Err(Error::io("link archived instance", e)),
                };
                std::fs::remove_file(&t).map_err(io("remove archive temp file"))?;
                fsync_dir(&dr)?;
                Ok(outcome)
            })
            .await
            .map_err(join_err)?
        }
        .await;
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp); // best effort; a leftover temp name is never read
        }
        res
    }
}

/// Whether `src` is a regular file of `size` bytes on `root`'s
/// filesystem (a hard link cannot cross filesystems).
fn linkable(src: &Path, size: u64, root: &Path) -> bool {
    let Ok(m) = std::fs::metadata(src) else {
        return false;
    };
    if !m.is_file() || m.len() != size {
        return false;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(root).is_ok_and(|r| r.dev() == m.dev())
    }
    #[cfg(not(unix))]
    {
        let _ = root;
        true
    }
}

/// `Ok` when a source's stream of `inst` that ended cleanly gave `n`
/// bytes, its whole size.
fn whole_stream(inst: &Instance, n: u64) -> Result<()> {
    if n == inst.size {
        return Ok(());
    }
    Err(IntegrityError::StoredSize {
        expected: inst.size,
        actual: n,
    }
    .into())
}

fn same_or_refused(held: Sha256Digest, expected: Sha256Digest) -> InstanceOutcome {
    if held == expected {
        InstanceOutcome::AlreadyPresent
    } else {
        InstanceOutcome::Failed {
            transient: false,
            reason: "the archive holds different content for this SOP Instance UID".into(),
        }
    }
}

fn join_err(e: tokio::task::JoinError) -> Error {
    Error::storage(StorageErrorKind::Io, "archive task", e.to_string())
}

#[async_trait]
impl PacsSink for LocalArchiveSink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let mut report = DeliveryReport::default();
        for inst in instances {
            let outcome = self.deliver_one(inst, source).await?;
            report
                .outcomes
                .push((inst.dicom.sop_instance_uid.clone(), outcome));
        }
        Ok(report)
    }
    /// Held means: the file is at its path and its bytes hash to the
    /// verified digest (a full re-read; the archive is local).
    /// Reads every archived file back and compares its content (the
    /// archive is always content-verified).
    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        let items: Vec<(PathBuf, Instance)> = instances
            .iter()
            .map(|i| {
                (
                    self.instance_path(
                        &i.dicom.study_instance_uid,
                        &i.dicom.series_instance_uid,
                        &i.dicom.sop_instance_uid,
                    ),
                    i.clone(),
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            items
                .iter()
                .map(|(p, inst)| {
                    if !p.is_file() {
                        return Ok(Holding::Absent);
                    }
                    held_content(p, inst)
                })
                .collect()
        })
        .await
        .map_err(join_err)?
    }
}
