//! Crash test: a process writing chunks is SIGKILLed at random points, at
//! least 50 times. After each kill, every acknowledged chunk must be
//! recorded and its stored bytes must hash to the source; resuming
//! completes the file byte-exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use relaypacs_core::testing::collect;
use relaypacs_core::{ChunkStore as _, SessionStore as _};
use relaypacs_core::{FileKey, PipelineConfig, Sha256Digest};
use relaypacs_integration::Embedded;

const KILLS: usize = 60;
const CHUNK: usize = 256 << 10;

#[derive(serde::Deserialize)]
struct WriterState {
    session: relaypacs_core::SessionId,
    file: relaypacs_core::FileId,
}

fn check_acknowledged(data: &Path, source: &[u8], acked: &[u64]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Ok(b) = std::fs::read(data.join("writer-state.json")) else {
            assert!(acked.is_empty(), "chunks acknowledged but no upload state");
            return;
        };
        let st: WriterState = serde_json::from_slice(&b).unwrap();
        let e =
            Embedded::open(data, PipelineConfig::default()).expect("stores reopen after SIGKILL");
        let chunks = e.sessions.chunks(st.session, st.file).await.unwrap();
        for off in acked {
            let c = chunks
                .iter()
                .find(|c| c.offset == *off)
                .unwrap_or_else(|| panic!("acknowledged chunk {off} lost"));
            let end = (*off as usize + CHUNK).min(source.len());
            assert_eq!(
                c.sha256,
                Sha256Digest::of(&source[*off as usize..end]),
                "recorded digest of {off}"
            );
            let key = FileKey {
                session: st.session,
                file: st.file,
            };
            let stored = collect(e.chunks.read(key, c.offset..c.end()).await.unwrap())
                .await
                .unwrap();
            assert_eq!(
                Sha256Digest::of(&stored),
                c.sha256,
                "stored bytes of acknowledged chunk {off} are wrong"
            );
        }
        // The audit trail reopens (torn tail cut) and verifies.
        relaypacs_storage::verify_chain(e.audit.path()).unwrap();
    });
}

#[test]
fn sigkill_loop_loses_no_acknowledged_chunk() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (set CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let src_path = dir.path().join("source.dcm");
    let source =
        relaypacs_integration::dicom_of_size(&relaypacs_integration::new_study(), 24 << 20);
    std::fs::write(&src_path, &source).unwrap();
    let exe = env!("CARGO_BIN_EXE_crash_writer");
    let mut acked: Vec<u64> = Vec::new();
    let mut kills = 0;
    let mut checked = 0usize;
    let mut kills_mid_upload = 0usize;
    let mut finished = false;
    while kills < KILLS {
        let mut child = Command::new(exe)
            .args([
                data.to_str().unwrap(),
                src_path.to_str().unwrap(),
                &CHUNK.to_string(),
                &rng.random::<u64>().to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(20..400));
        let mut done = false;
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(l) if l == "DONE" => done = true,
                Ok(l) => acked.push(l.trim_start_matches("ACK ").parse().unwrap()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // SIGKILL: no destructor, no flush, exactly like a crash.
        let _ = child.kill();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        // Lines already printed were acknowledged before the kill.
        acked.extend(
            rx.try_iter()
                .filter(|l| l.starts_with("ACK "))
                .map(|l| l[4..].parse::<u64>().unwrap()),
        );
        if done {
            finished = true;
            // Start over with a fresh upload so every round has chunks to kill.
            check_acknowledged(&data, &source, &acked);
            std::fs::remove_dir_all(&data).unwrap();
            acked.clear();
            continue;
        }
        assert!(
            status.code().is_none() || status.code() == Some(0),
            "writer failed on its own: {status:?}"
        );
        kills += 1;
        if !acked.is_empty() {
            kills_mid_upload += 1;
        }
        checked += acked.len();
        check_acknowledged(&data, &source, &acked);
    }
    // Resume to the end and complete: byte-exact.
    let out = Command::new(exe)
        .args([
            data.to_str().unwrap(),
            src_path.to_str().unwrap(),
            &CHUNK.to_string(),
            "1",
            "complete",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("COMPLETE {}", Sha256Digest::of(&source).to_hex());
    assert!(text.contains(&want), "completed file differs: {text}");
    let st: WriterState =
        serde_json::from_slice(&std::fs::read(data.join("writer-state.json")).unwrap()).unwrap();
    let stored = std::fs::read(
        data.join("chunks")
            .join(st.session.to_string())
            .join(format!("{}.data", st.file)),
    )
    .unwrap();
    assert!(stored == source, "stored file is not byte-identical");
    eprintln!(
        "{kills} kills ({kills_mid_upload} with chunks acknowledged), {checked} acknowledged-chunk checks, a full upload finished in between: {finished}"
    );
    assert!(
        kills_mid_upload >= KILLS / 2,
        "too few kills landed mid-upload ({kills_mid_upload}); the test would prove little"
    );
}
