//! Conformance suite for [`AuditSink`] implementations.
//!
//! Run it with [`audit_sink_conformance!`](crate::audit_sink_conformance).

use std::sync::Arc;

use crate::audit::{AuditAction, AuditEvent, AuditOutcome, AuditSink};
use crate::ids::{SessionId, Uid};

fn event(i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(
        format!("user-{}", i % 3),
        AuditAction::ChunkStored,
        AuditOutcome::Success,
    );
    e.session = Some(SessionId::random());
    e.study = Uid::parse("1.2.3.4").ok();
    e.detail = format!("event {i} \"quoted\"\nnewline\u{1b}[31m");
    e
}

/// Events come back in order, with every field intact.
pub async fn ordered_roundtrip(sink: &dyn AuditSink) {
    let before = sink.events().await.expect("events").len();
    let evs: Vec<_> = (0..50).map(event).collect();
    for e in &evs {
        sink.record(e).await.expect("record");
    }
    let got = sink.events().await.expect("events");
    assert_eq!(&got[before..], &evs[..]);
}

/// Concurrent writers lose nothing.
pub async fn concurrent_records(sink: Arc<dyn AuditSink>) {
    let before = sink.events().await.expect("events").len();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let sink = sink.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    sink.record(&event(t * 100 + i)).await.expect("record");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(sink.events().await.expect("events").len() - before, 200);
}

/// Generates a module `$name` with one `#[test]` per [`AuditSink`]
/// conformance case. `$factory` is an `async fn() -> (impl AuditSink,
/// impl Sized)`; the calling crate needs no tokio of its own.
///
/// ```text
/// relaypacs_core::audit_sink_conformance!(jsonl_audit, make_audit);
/// ```
#[macro_export]
macro_rules! audit_sink_conformance {
    ($name:ident, $factory:path $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn ordered_roundtrip() {
                $crate::testing::__rt::run(async {
                    let (sink, _guard) = $factory().await;
                    $crate::testing::audit_sink::ordered_roundtrip(&sink).await;
                })
            }
            #[test]
            fn concurrent_records() {
                $crate::testing::__rt::run(async {
                    let (sink, _guard) = $factory().await;
                    $crate::testing::audit_sink::concurrent_records(::std::sync::Arc::new(sink))
                        .await;
                })
            }
        }
    };
}
