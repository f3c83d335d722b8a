#!/usr/bin/env bash
# The one test command: installs the real peers (dcmtk, Orthanc, PostgreSQL
# 15, rsyslog, s3s-fs, the tus clients) if missing, then runs
# formatting and lint checks and every test of the workspace (unit,
# conformance against local files, SQLite and throwaway PostgreSQL clusters,
# in-memory and a real S3 server on loopback, property, crash, multi-gateway
# and hostile-DICOM tests, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${RELAYPACS_TOOLS:-$HOME/.cache/relaypacs/tools}/bin:$PATH"
# A test run builds once: incremental caches would only add gigabytes to
# target/ (a clean run must fit a small CI disk).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

scripts/install-peers.sh all

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# What a vendor trims must build clean too (README: Cargo features).
for features in stow-rs c-store ""; do
  cargo clippy -p relaypacs-pacs --no-default-features --features "$features" --all-targets -- -D warnings
done
cargo clippy -p relaypacs-storage --no-default-features --all-targets -- -D warnings
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
  echo "test.sh: tests failed" >&2
  exit "$status"
fi
passed=$(grep -E '^test result: ' target/test-output.txt | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')

# Fuzzing (after the tests): every cargo-fuzz target of fuzz/ runs
# RELAYPACS_FUZZ_SECS seconds (default 30; 0 skips) from a corpus seeded by
# the generators (examples' fuzz-seeds), on the pinned stable toolchain
# with RUSTC_BOOTSTRAP=1 (see fuzz/README.md). A crash, timeout or memory
# blow-up of any target fails the run; the input is in fuzz/artifacts/.
fuzz_secs=${RELAYPACS_FUZZ_SECS:-30}
if [[ "$fuzz_secs" != 0 ]]; then
  tools="${RELAYPACS_TOOLS:-$HOME/.cache/relaypacs/tools}"
  if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --root "$tools"
  fi
  cargo run -q -p relaypacs-examples --bin fuzz-seeds -- fuzz/corpus
  export RUSTC_BOOTSTRAP=1
  # One build of every target (the runs below reuse it).
  (cd fuzz && cargo fuzz build)
  # Two targets at a time: the tests are done, so each gets one of the two
  # cores for its full time and the fuzz phase takes half the wall time.
  fuzz_one() {
    local t=$1 log="target/fuzz-$1.log"
    if (cd fuzz && cargo fuzz run "$t" -- -max_total_time="$fuzz_secs" \
          -rss_limit_mb=1024 -timeout=10 -print_final_stats=1) >"$log" 2>&1; then
      runs=$(grep -oE '^Done [0-9]+ runs' "$log" | awk '{print $2}')
      cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
      echo "fuzz $t: ${runs:-?} runs in ${fuzz_secs} s, cov ${cov:-?}, no crash"
    else
      echo "fuzz $t: FAILED (see $log and fuzz/artifacts/$t/)" >&2
      tail -40 "$log" >&2
      touch "target/fuzz-$t.failed"
    fi
  }
  export -f fuzz_one
  export fuzz_secs
  rm -f target/fuzz-*.failed
  (cd fuzz && cargo fuzz list) | xargs -P 2 -I{} bash -c 'fuzz_one "$1"' _ {}
  failed=()
  for f in target/fuzz-*.failed; do
    [[ -e "$f" ]] || continue
    t=${f#target/fuzz-}
    failed+=("${t%.failed}")
  done
  if [[ ${#failed[@]} -ne 0 ]]; then
    echo "test.sh: fuzz targets failed: ${failed[*]}" >&2
    exit 1
  fi
fi

# The closing line: every test of the workspace (the fuzz runs above are
# not counted in it).
echo "workspace: $passed"
