#!/usr/bin/env bash
# The one test command: installs the real peers (dcmtk, Orthanc, Redis,
# s3s-fs) if missing, then runs formatting and lint checks and every test of
# the workspace (unit, conformance against local files / in-memory / a real
# S3 server on loopback, property, crash and hostile-DICOM tests, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${RELAYPACS_TOOLS:-$HOME/.cache/relaypacs/tools}/bin:$PATH"

scripts/install-peers.sh all

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
  echo "test.sh: tests failed" >&2
  exit "$status"
fi
passed=$(grep -E '^test result: ' target/test-output.txt | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')
echo "workspace: $passed"
