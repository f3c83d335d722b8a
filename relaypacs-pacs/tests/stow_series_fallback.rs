//! `StowSink::verify` retrieving a whole series, against a scripted
//! DICOMweb server on loopback that answers the series retrieval in ways
//! a real PACS rarely does on demand (a part of an instance QIDO-RS did
//! not list, a missing part, an oversized part, a 503, a body that is not
//! multipart): what the series answer decided stands, the rest is
//! retrieved instance by instance, and a transient failure fails `verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use relaypacs_core::testing::dicom_gen::{DicomSpec, generate, new_uid};
use relaypacs_core::{Holding, Instance, PacsSink, Verification};
use relaypacs_pacs::{DicomWebConfig, StowSink};

const CONTENT: Holding = Holding::Same {
    verification: Verification::Content,
};

/// How the scripted server answers `GET …/studies/{st}/series/{se}`.
#[derive(Clone)]
enum SeriesAnswer {
    /// 200 with these parts, in this order.
    Parts(Vec<Vec<u8>>),
    /// This status, empty body.
    Status(u16),
    /// 200 with a body that is not multipart.
    NotMultipart,
}

/// One study of one series held by the scripted server.
struct Pacs {
    study: String,
    series: String,
    /// (SOP Instance UID, file): what QIDO-RS lists and WADO-RS of one
    /// instance returns.
    files: Vec<(String, Vec<u8>)>,
    answer: SeriesAnswer,
    /// Paths asked for, in order.
    log: Mutex<Vec<String>>,
}

impl Pacs {
    fn respond(&self, path: &str) -> (u16, String, Vec<u8>) {
        self.log.lock().unwrap().push(path.to_owned());
        let path = path.split('?').next().unwrap_or_default();
        let study = format!("/dicom-web/studies/{}", self.study);
        let Some(rest) = path.strip_prefix(&study) else {
            return (404, "text/plain".into(), Vec::new());
        };
        let multipart = |parts: &[&[u8]]| {
            let mut b = Vec::new();
            for p in parts {
                b.extend_from_slice(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n");
                b.extend_from_slice(p);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"--XyZ--\r\n");
            (
                200,
                "multipart/related; type=\"application/dicom\"; boundary=XyZ".to_owned(),
                b,
            )
        };
        if rest == "/instances" {
            let listed: Vec<serde_json::Value> = self
                .files
                .iter()
                .map(|(sop, _)| {
                    serde_json::json!({
                        "00080018": {"vr": "UI", "Value": [sop]},
                        "0020000E": {"vr": "UI", "Value": [self.series]},
                    })
                })
                .collect();
            return (
                200,
                "application/dicom+json".into(),
                serde_json::to_vec(&listed).unwrap(),
            );
        }
        let series = format!("/series/{}", self.series);
        match rest.strip_prefix(&series) {
            Some("") => match &self.answer {
                SeriesAnswer::Parts(parts) => {
                    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                    multipart(&parts)
                }
                SeriesAnswer::Status(s) => (*s, "text/plain".into(), Vec::new()),
                SeriesAnswer::NotMultipart => (200, "application/dicom".into(), b"x".to_vec()),
            },
            Some(one) => {
                let sop = one.strip_prefix("/instances/").unwrap_or_default();
                match self.files.iter().find(|(s, _)| s == sop) {
                    Some((_, f)) => multipart(&[f]),
                    None => (404, "text/plain".into(), Vec::new()),
                }
            }
            None => (404, "text/plain".into(), Vec::new()),
        }
    }

    /// Paths asked for: (WADO-RS of the series, WADO-RS of one instance).
    fn retrievals(&self) -> (usize, usize) {
        let log = self.log.lock().unwrap();
        let series = log.iter().filter(|p| p.ends_with(&self.series)).count();
        let one = log
            .iter()
            .filter(|p| p.contains("/series/") && p.contains("/instances/"));
        (series, one.count())
    }
}

/// Serve `pacs` on a loopback port (one thread per connection, one
/// request per connection); the DICOMweb root.
fn serve(pacs: Arc<Pacs>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let root = format!("http://{}/dicom-web", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let pacs = pacs.clone();
            std::thread::spawn(move || answer(&pacs, conn));
        }
    });
    root
}

fn answer(pacs: &Pacs, conn: TcpStream) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(0) | Err(_) => return,
            Ok(_) if header == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let (status, content_type, body) = pacs.respond(&path);
    let mut conn = conn;
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(&body);
}

/// A series of `n` instances: the server's study (answering the series
/// retrieval with `answer(files)`) and our instances.
fn pacs_of(
    n: usize,
    answer: impl FnOnce(&[Vec<u8>]) -> SeriesAnswer,
) -> (Arc<Pacs>, Vec<Instance>) {
    let (study, series) = (new_uid(), new_uid());
    let mut files = Vec::new();
    let mut insts = Vec::new();
    for seed in 0..n as u64 {
        let bytes = generate(&DicomSpec {
            study_uid: study.clone(),
            series_uid: series.clone(),
            seed,
            ..DicomSpec::default()
        })
        .unwrap();
        let summary =
            relaypacs_core::dicom::validate_dicom(&bytes, bytes.len() as u64, &Default::default())
                .unwrap();
        let key = relaypacs_core::FileKey {
            session: relaypacs_core::SessionId::random(),
            file: relaypacs_core::FileId::random(),
        };
        let inst = Instance::of_bytes(key, &bytes, summary);
        files.push((inst.dicom.sop_instance_uid.to_string(), bytes));
        insts.push(inst);
    }
    let bytes: Vec<Vec<u8>> = files.iter().map(|(_, f)| f.clone()).collect();
    let pacs = Arc::new(Pacs {
        study,
        series,
        answer: answer(&bytes),
        files,
        log: Mutex::new(Vec::new()),
    });
    (pacs, insts)
}

fn sink(pacs: &Arc<Pacs>) -> StowSink {
    StowSink::new(&DicomWebConfig::new(serve(pacs.clone()))).unwrap()
}

/// An object of an instance QIDO-RS did not list (one stored meanwhile),
/// second in the answer: the first part stays decided, the series answer
/// is left there, and the other three are retrieved one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_part_leaves_the_rest_to_one_retrieval_each() {
    let stranger = generate(&DicomSpec::default()).unwrap();
    let (pacs, insts) = pacs_of(4, |f| {
        SeriesAnswer::Parts(vec![
            f[2].clone(),
            stranger,
            f[0].clone(),
            f[1].clone(),
            f[3].clone(),
        ])
    });
    assert_eq!(sink(&pacs).verify(&insts).await.unwrap(), [CONTENT; 4]);
    assert_eq!(pacs.retrievals(), (1, 3));
}

/// An instance the series answer lacks is retrieved on its own (and
/// found), never `Absent` on the series answer's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_missing_from_the_series_answer_is_retrieved_on_its_own() {
    let (pacs, insts) = pacs_of(4, |f| SeriesAnswer::Parts(vec![f[3].clone(), f[0].clone()]));
    assert_eq!(sink(&pacs).verify(&insts).await.unwrap(), [CONTENT; 4]);
    assert_eq!(pacs.retrievals(), (1, 2));
}

/// A part larger than its instance may be is `Different` from the series
/// answer alone; the others are the same; nothing else is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_part_is_different_without_another_retrieval() {
    let (pacs, insts) = pacs_of(3, |f| {
        let padded = [f[1].clone(), vec![0u8; 70 << 10]].concat();
        SeriesAnswer::Parts(vec![f[0].clone(), padded, f[2].clone()])
    });
    let h = sink(&pacs).verify(&insts).await.unwrap();
    assert_eq!(h[0], CONTENT);
    assert_eq!(h[2], CONTENT);
    assert!(
        matches!(&h[1], Holding::Different { reason } if reason.contains("more bytes than were sent")),
        "{h:?}"
    );
    assert_eq!(pacs.retrievals(), (1, 0));
}

/// A series retrieval refused as such (4xx) or answered with something
/// that is not multipart: instance by instance. A 503: `verify` fails,
/// transient, as for any retrieval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_unusable_or_failing_series_answers() {
    for answer in [SeriesAnswer::Status(400), SeriesAnswer::NotMultipart] {
        let (pacs, insts) = pacs_of(3, |_| answer.clone());
        assert_eq!(sink(&pacs).verify(&insts).await.unwrap(), [CONTENT; 3]);
        assert_eq!(pacs.retrievals(), (1, 3));
    }
    let (pacs, insts) = pacs_of(3, |_| SeriesAnswer::Status(503));
    let e = sink(&pacs).verify(&insts).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(pacs.retrievals(), (1, 0));
}
