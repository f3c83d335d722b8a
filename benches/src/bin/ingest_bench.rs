//! Uploads one large file (default 1 GiB) through the pipeline on the
//! embedded adapters in 8 MiB chunks and prints MB/s and peak RSS beside
//! this machine's own sequential-write (fdatasync'd) and SHA-256
//! throughput, measured in the same run on the same disk.
//!
//! Usage: `ingest_bench [size-MiB] [chunk-MiB] [dir]`

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Instant;

use relaypacs_benches::mbps;
use relaypacs_core::testing::dicom_gen::{DicomSpec, new_uid, write_large_file};
use relaypacs_core::testing::pieces;
use relaypacs_core::{Actor, NewFile, PipelineConfig, PutChunk, Sha256Digest};
use relaypacs_integration::{Embedded, open_session, peak_rss_bytes};
use sha2::{Digest, Sha256};

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("ingest_bench: {msg}");
    std::process::exit(1)
}

/// Machine limit 1: write `size` bytes sequentially in 8 MiB blocks, with
/// one fdatasync at the end (`dd conv=fdatasync`), or after every `sync_every`
/// bytes (what a durable chunk acknowledgement needs).
fn disk_write(dir: &std::path::Path, size: u64, sync_every: Option<u64>) -> f64 {
    let path = dir.join("ddtest.bin");
    let block = relaypacs_core::testing::pattern(7, 8 << 20);
    let t = Instant::now();
    let mut f = File::create(&path).unwrap_or_else(|e| die(e));
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap_or_else(|e| die(e));
        left -= n as u64;
        if let Some(every) = sync_every
            && (size - left).is_multiple_of(every)
        {
            f.sync_data().unwrap_or_else(|e| die(e));
        }
    }
    f.sync_data().unwrap_or_else(|e| die(e));
    let r = mbps(size, t.elapsed().as_secs_f64());
    let _ = std::fs::remove_file(&path);
    r
}

/// Machine limit 2: SHA-256 over `size` bytes from memory.
fn sha_speed(size: u64) -> f64 {
    let block = relaypacs_core::testing::pattern(8, 8 << 20);
    let t = Instant::now();
    let mut h = Sha256::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        h.update(&block[..n]);
        left -= n as u64;
    }
    std::hint::black_box(h.finalize());
    mbps(size, t.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let chunk_mib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let base = args
        .get(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).unwrap_or_else(|e| die(e));
    let src = work.path().join("source.dcm");
    let spec = DicomSpec {
        study_uid: new_uid(),
        series_uid: new_uid(),
        sop_instance_uid: new_uid(),
        ..DicomSpec::default()
    };
    write_large_file(&src, &spec, size_mib << 20).unwrap_or_else(|e| die(e));
    let size = std::fs::metadata(&src).unwrap_or_else(|e| die(e)).len();
    // The client's own whole-file and per-chunk digests (not timed).
    let mut h = Sha256::new();
    let mut f = File::open(&src).unwrap_or_else(|e| die(e));
    let chunk = (chunk_mib << 20) as usize;
    let mut buf = vec![0u8; chunk];
    let mut chunk_digests = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| die(e));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        chunk_digests.push(Sha256Digest::of(&buf[..n]));
    }
    let whole = Sha256Digest(h.finalize().into());

    let write_limit = disk_write(work.path(), size, None);
    let synced_limit = disk_write(work.path(), size, Some(chunk as u64));
    let sha_limit = sha_speed(size);

    let rss_before = peak_rss_bytes().unwrap_or(0);
    let e = Embedded::open(&work.path().join("data"), PipelineConfig::default())
        .await
        .unwrap_or_else(|e| die(e));
    let p = &e.pipeline;
    let actor = Actor::user("bench");
    let t = Instant::now();
    let s = open_session(p, &actor).await.unwrap_or_else(|e| die(e));
    let fr = p
        .add_file(
            &actor,
            s,
            NewFile {
                name: "big.dcm".into(),
                size,
                sha256: Some(whole),
            },
        )
        .await
        .unwrap_or_else(|e| die(e));
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        f.seek(SeekFrom::Start(off)).unwrap_or_else(|e| die(e));
        f.read_exact(&mut buf[..n]).unwrap_or_else(|e| die(e));
        let digest = chunk_digests[(off / chunk as u64) as usize];
        let spec = PutChunk {
            offset: off,
            length: n as u64,
            sha256: Some(digest),
        };
        p.put_chunk(&actor, s, fr.id, spec, pieces(&buf[..n], 256 << 10))
            .await
            .unwrap_or_else(|e| die(e));
        off += n as u64;
    }
    let upload = t.elapsed().as_secs_f64();
    let t2 = Instant::now();
    p.complete_file(&actor, s, fr.id)
        .await
        .unwrap_or_else(|e| die(e));
    let complete = t2.elapsed().as_secs_f64();
    let total = t.elapsed().as_secs_f64();
    let peak = peak_rss_bytes().unwrap_or(0);
    let ingest = mbps(size, total);
    let limit = write_limit.min(sha_limit);
    println!(
        "file: {:.0} MiB in {} MiB chunks (chunk digests computed by the client, outside the timing)",
        size as f64 / 1048576.0,
        chunk_mib
    );
    println!(
        "machine (same run): sequential write + one fdatasync {write_limit:.0} MB/s; with fdatasync every {chunk_mib} MiB {synced_limit:.0} MB/s; SHA-256 {sha_limit:.0} MB/s"
    );
    println!(
        "ingest: upload {upload:.2} s, complete (re-verify every chunk + whole file, validate) {complete:.2} s"
    );
    println!(
        "ingest throughput: {ingest:.0} MB/s end to end = {:.0}% of the machine limit ({limit:.0} MB/s)",
        100.0 * ingest / limit
    );
    println!(
        "end to end vs the fdatasync-every-chunk limit ({:.0} MB/s): {:.0}%",
        synced_limit.min(sha_limit),
        100.0 * ingest / synced_limit.min(sha_limit)
    );
    println!(
        "upload phase alone: {:.0} MB/s = {:.0}% of the limit",
        mbps(size, upload),
        100.0 * mbps(size, upload) / limit
    );
    println!(
        "peak RSS: {:.1} MiB (process, including the {} MiB client chunk buffer; {:.1} MiB before the pipeline ran)",
        peak as f64 / 1048576.0,
        chunk_mib,
        rss_before as f64 / 1048576.0
    );
}
