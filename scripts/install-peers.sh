#!/usr/bin/env bash
# Installs the real peers the tests talk to, idempotently:
#   dcmtk (DICOM tools), orthanc + orthanc-dicomweb (PACS), redis-server,
#   s3s-fs 0.14.1 (S3-compatible server that checks signatures and checksums).
# Usage: scripts/install-peers.sh [all|apt|s3s-fs]
# Tools land in $RELAYPACS_TOOLS (default ~/.cache/relaypacs/tools).
set -euo pipefail
what="${1:-all}"
tools="${RELAYPACS_TOOLS:-$HOME/.cache/relaypacs/tools}"
mkdir -p "$tools"

# Serialize concurrent callers (tests may call this in parallel).
exec 9>"$tools/.install.lock"
flock 9

need_apt=()
if [[ "$what" == all || "$what" == apt ]]; then
  command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
  command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
  [[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need_apt+=(orthanc-dicomweb)
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  if (( ${#need_apt[@]} )); then
    echo "install-peers: apt-get install ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need_apt[@]}" >&2
  fi
fi

if [[ "$what" == all || "$what" == s3s-fs ]]; then
  if [[ ! -x "$tools/bin/s3s-fs" ]]; then
    echo "install-peers: cargo install s3s-fs@0.14.1 (a few minutes, once)" >&2
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$tools" >&2
  fi
fi
