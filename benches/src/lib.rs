//! Benchmarks of the RelayPACS pipeline: `benches/pipeline.rs` (criterion),
//! the `ingest_bench` binary (1 GiB through the pipeline beside the
//! machine's own write and SHA-256 throughput) and the `tus_bench` binary
//! (1 GiB over tus 1.0 HTTP to our server and to the official `@tus/server`).
