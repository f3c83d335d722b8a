//! Benchmarks of the RelayPACS pipeline: `benches/pipeline.rs` (criterion)
//! and the `ingest_bench` binary (1 GiB through the pipeline beside the
//! machine's own write and SHA-256 throughput).
