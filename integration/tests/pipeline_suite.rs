//! The pipeline's end-to-end tests on its real adapters, one test binary:
//! each module is one concern (crash, failpoints, outbox, duplicates,
//! multi-gateway, ...). One binary instead of one per file keeps a clean
//! build's disk footprint small. The tests that measure this process's peak
//! memory (`large_file`, `hostile_pipeline`) stay in binaries of their own,
//! where no other test's allocations count.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failure must panic

mod caps_and_denials;
mod crash;
mod duplicates;
mod failpoints;
mod ingest_file;
mod multi_gateway;
mod one_door;
mod outbox;
mod pipeline;
mod pipeline_props;
mod pipeline_s3;
mod put_range;
mod request_scoped;
mod session_duplicate_race;
mod shared_session_cap;
mod shared_sink;
