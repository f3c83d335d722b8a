//! Ingest a folder of DICOM files through the RelayPACS pipeline into the
//! local archive, on the embedded defaults, and print a summary.
//!
//! ```text
//! cargo run --release -p relaypacs-examples --bin ingest -- [FOLDER] [--data DIR]
//! ```
//! With no folder, a demo study (CT, MR and Secondary Capture instances)
//! is generated first. Data lives under `--data` (default `./.relaypacs`):
//! `chunks/`, the state database `state.db` (SQLite: sessions, files, chunk
//! records), `archive/<study>/<series>/<sop>.dcm`, and the hash-chained
//! audit trail `audit/audit.jsonl`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use relaypacs_core::testing::dicom_gen::{DicomSpec, SopClass, generate, new_uid};
use relaypacs_core::{
    Actor, ByteStream, Error, FileState, NewFile, NewSession, Pipeline, PipelineConfig,
    SessionState, Sha256Digest,
};
use relaypacs_pacs::LocalArchiveSink;
use relaypacs_storage::{
    JsonlAuditSink, LocalChunkStore, SqlOptions, SqlSessionStore, SqlState, verify_chain,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

fn usage() -> ! {
    eprintln!("usage: ingest [FOLDER] [--data DIR]");
    std::process::exit(2)
}

async fn file_digest(path: &Path) -> std::io::Result<Sha256Digest> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(Sha256Digest(h.finalize().into()));
        }
        h.update(&buf[..n]);
    }
}

async fn file_body(path: &Path) -> std::io::Result<ByteStream> {
    let f = tokio::fs::File::open(path).await?;
    let s = tokio_util::io::ReaderStream::with_capacity(f, 256 << 10)
        .map(|r| r.map_err(|e| Error::io("read input file", e)));
    Ok(Box::pin(s))
}

/// Upload one file through the pipeline (8 MiB chunks, each with its
/// digest) and complete it.
async fn ingest_file(
    p: &Pipeline,
    actor: &Actor,
    s: relaypacs_core::SessionId,
    path: &Path,
) -> Result<FileState, Error> {
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| Error::io("stat input", e))?
        .len();
    let digest = file_digest(path)
        .await
        .map_err(|e| Error::io("hash input", e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let f = p
        .add_file(
            actor,
            s,
            NewFile {
                name,
                size,
                sha256: Some(digest),
            },
        )
        .await?;
    let body = file_body(path)
        .await
        .map_err(|e| Error::io("read input", e))?;
    Ok(p.ingest_stream(actor, s, f.id, body).await?.state)
}

fn demo_study(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let study = new_uid();
    for (i, class) in [SopClass::Ct, SopClass::Mr, SopClass::SecondaryCapture]
        .into_iter()
        .enumerate()
    {
        let spec = DicomSpec {
            study_uid: study.clone(),
            series_uid: format!("{study}.{i}"),
            sop_instance_uid: new_uid(),
            sop_class: class,
            seed: i as u64,
            ..DicomSpec::default()
        };
        let bytes = generate(&spec).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("demo-{i}.dcm")), bytes)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut folder = None;
    let mut data = PathBuf::from(".relaypacs");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => data = args.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            _ if folder.is_none() => folder = Some(PathBuf::from(a)),
            _ => usage(),
        }
    }
    if let Err(e) = run(folder, data).await {
        eprintln!("ingest failed: {} ({})", e, e.code());
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

async fn run(folder: Option<PathBuf>, data: PathBuf) -> Result<(), Error> {
    let folder = match folder {
        Some(f) => f,
        None => {
            let demo = data.join("demo-input");
            demo_study(&demo).map_err(|e| Error::io("write demo study", e))?;
            println!(
                "no folder given: generated a demo study in {}",
                demo.display()
            );
            demo
        }
    };
    let audit = JsonlAuditSink::open(data.join("audit").join("audit.jsonl"))?;
    let archive = LocalArchiveSink::open(data.join("archive"))?;
    // SQLite under the data folder, as the server's default; an absolute
    // path, since `sqlite://relative/x` would read `relative` as a host.
    let db_path =
        std::path::absolute(data.join("state.db")).map_err(|e| Error::io("data folder", e))?;
    let state = SqlState::connect(
        &format!("sqlite://{}", db_path.display()),
        None,
        &SqlOptions::default(),
    )
    .await?;
    let p = Pipeline::new(
        Arc::new(LocalChunkStore::open(data.join("chunks"))?),
        Arc::new(SqlSessionStore::new(state.clone())),
        Arc::new(archive.clone()),
        Arc::new(audit.clone()),
        PipelineConfig::default(),
    );
    let actor = Actor::user(std::env::var("USER").unwrap_or_else(|_| "local".into()));
    let s = p
        .create_session(
            &actor,
            NewSession {
                allow_multiple_studies: true,
                request_scoped: false,
            },
        )
        .await?
        .id;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&folder)
        .map_err(|e| Error::io("list input folder", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let (mut ok, mut bad) = (0, 0);
    for path in &paths {
        match ingest_file(&p, &actor, s, path).await {
            Ok(FileState::Valid { dicom }) => {
                ok += 1;
                println!(
                    "  ok      {}  SOP {}  ({})",
                    path.display(),
                    dicom.sop_instance_uid,
                    dicom.transfer_syntax
                );
            }
            Ok(FileState::Uploading) => bad += 1,
            Err(e) => {
                bad += 1;
                println!("  refused {}  {}: {e}", path.display(), e.code());
            }
        }
    }
    if ok > 0 {
        // Files that were refused stay in the session; drop them before delivery.
        let rec = p.session(&actor, s).await?;
        for f in rec
            .files
            .values()
            .filter(|f| !matches!(f.state, FileState::Valid { .. }))
        {
            p.remove_file(&actor, s, f.id).await?;
        }
        let rec = p
            .complete_and_deliver(&actor, s, &Default::default())
            .await?;
        if let SessionState::Delivered { sink, .. } = &rec.state {
            println!("delivered {ok} instance(s) to {sink}");
        }
    }
    let head = verify_chain(audit.path())
        .map_err(|e| Error::invalid("RELAY_AUDIT_CHAIN", e.to_string()))?;
    println!(
        "summary: {ok} ingested, {bad} refused; {}; audit trail {} ({} records, chain verified)",
        archive,
        audit.path().display(),
        head.count
    );
    state.close().await;
    Ok(())
}
