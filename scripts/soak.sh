#!/usr/bin/env bash
# Kill campaign (outside CI): the release gateway forwarding to a real
# Orthanc is SIGKILLed again and again under parallel tus and STOW-RS
# clients; every acknowledged byte, every completed study and the audit
# trail are checked (see integration/src/bin/soak.rs).
#
#   bash scripts/soak.sh                      # 1,000 SIGKILLs, 8 clients
#   bash scripts/soak.sh --kills 200 --power-loss   # power cuts (root): the
#       data folder on a loop-mounted ext4 whose unsynced writes are lost
#
# Extra arguments go to the campaign binary (--clients N, --work DIR,
# --out FILE). The JSON summary is printed and written to
# target/soak-<mode>.json. Exit code 1 on any violation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh apt >/dev/null
cargo build --release --locked -p relaypacs-http --bin relaypacs
cargo build --release --locked -p relaypacs-integration --bin soak
mode=sigkill
for a in "$@"; do [[ "$a" == --power-loss ]] && mode=power-loss; done
exec target/release/soak --gateway target/release/relaypacs \
  --work "${TMPDIR:-/tmp}/relaypacs-soak-$mode" --out "target/soak-$mode.json" "$@"
