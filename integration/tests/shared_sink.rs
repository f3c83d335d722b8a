//! A vendor keeps its own handle on its sink and still hands it to the
//! pipeline: `Arc<MySink>` and `Box<dyn PacsSink>` are sinks themselves
//! (the blanket `PacsSink` impls), so they go through code generic over
//! `PacsSink` and into `Pipeline::new`, and the vendor's handle sees what
//! the pipeline delivered.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use relaypacs_core::{
    Actor, DeliveryReport, Holding, Instance, InstanceSource, OutboxConfig, PacsSink,
    PipelineConfig, Result, SessionState,
};
use relaypacs_integration::{Embedded, StateDb, dicom, new_study, open_session, upload_file};
use relaypacs_pacs::LocalArchiveSink;

/// A vendor's sink: the local archive, counting the instances it delivers.
#[derive(Debug)]
struct MySink {
    archive: LocalArchiveSink,
    delivered: AtomicUsize,
}

impl fmt::Display for MySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "my-sink({})", self.archive)
    }
}

#[async_trait]
impl PacsSink for MySink {
    async fn deliver(
        &self,
        instances: &[Instance],
        source: &dyn InstanceSource,
    ) -> Result<DeliveryReport> {
        let report = self.archive.deliver(instances, source).await?;
        self.delivered.fetch_add(instances.len(), Ordering::SeqCst);
        Ok(report)
    }

    async fn verify(&self, instances: &[Instance]) -> Result<Vec<Holding>> {
        self.archive.verify(instances).await
    }
}

/// Code generic over a sink, as a vendor's decorator or builder is.
fn for_pipeline<S: PacsSink>(sink: S) -> Arc<dyn PacsSink> {
    Arc::new(sink)
}

/// Upload two files through a pipeline whose sink `wrap` builds from the
/// vendor's `Arc<MySink>`, deliver them, and count what the vendor's
/// handle saw.
async fn deliver_through(wrap: impl FnOnce(Arc<MySink>) -> Arc<dyn PacsSink>) {
    let dir = tempfile::tempdir().unwrap();
    let mut mine = None;
    let e = Embedded::open_wrapped(
        dir.path(),
        PipelineConfig::default(),
        &StateDb::Sqlite,
        |archive| {
            let sink = Arc::new(MySink {
                archive,
                delivered: AtomicUsize::new(0),
            });
            mine = Some(Arc::clone(&sink));
            wrap(sink)
        },
    )
    .await
    .unwrap();
    let mine = mine.unwrap();
    let actor = Actor::user("alice");
    let sid = open_session(&e.pipeline, &actor).await.unwrap();
    let study = new_study();
    for i in 0..2u64 {
        let data = dicom(&study, i);
        upload_file(&e.pipeline, &actor, sid, &format!("f{i}"), &data, 1 << 20)
            .await
            .unwrap();
    }
    let done = e
        .pipeline
        .complete_and_deliver(&actor, sid, &OutboxConfig::default())
        .await
        .unwrap();
    match done.state {
        SessionState::Delivered { sink, .. } => assert!(sink.starts_with("my-sink("), "{sink}"),
        s => panic!("not delivered: {s:?}"),
    }
    assert_eq!(mine.delivered.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_pipeline_takes_an_arc_of_the_vendors_sink() {
    deliver_through(|mine| for_pipeline(mine)).await;
}

#[tokio::test]
async fn the_pipeline_takes_a_boxed_sink() {
    deliver_through(|mine| {
        let boxed: Box<dyn PacsSink> = Box::new(mine);
        for_pipeline(boxed)
    })
    .await;
}
