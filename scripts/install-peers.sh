#!/usr/bin/env bash
# Installs the real peers the tests talk to, idempotently:
#   dcmtk (DICOM tools), orthanc + orthanc-dicomweb (PACS),
#   rsyslog + rsyslog-gnutls (syslog collector over TLS, RFC 5425),
#   postgresql-15 (test clusters started by relaypacs-test-peers),
#   s3s-fs 0.14.1 (S3-compatible server that checks signatures and checksums),
#   the tus clients tuspy (PyPI, in a venv) and tus-js-client + @tus/server
#   (npm, clients/node/node_modules), pinned by clients/; chromium +
#   chromium-driver and playwright-core (clients/browser) for the web app.
# Usage: scripts/install-peers.sh [all|apt|s3s-fs|clients]
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
  command -v curl >/dev/null 2>&1 || need_apt+=(curl)
  command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
  # pdftotext: the report tests read the PDFs the server renders.
  command -v pdftotext >/dev/null 2>&1 || need_apt+=(poppler-utils)
  command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
  # Debian's Chromium for the web app's browser test (driven by
  # playwright-core from clients/browser, which downloads no browser).
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  [[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]] || need_apt+=(orthanc-dicomweb)
  command -v rsyslogd >/dev/null 2>&1 || need_apt+=(rsyslog)
  [[ -n "$(find /usr/lib -name lmnsd_gtls.so -print -quit 2>/dev/null)" ]] || need_apt+=(rsyslog-gnutls)
  # PostgreSQL 15 (server and psql): tests start their own clusters with
  # initdb/pg_ctl from here, on free ports, as the postgres user.
  [[ -x /usr/lib/postgresql/15/bin/initdb ]] || need_apt+=(postgresql-15)
  if (( ${#need_apt[@]} )); then
    echo "install-peers: apt-get install ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need_apt[@]}" >&2
    # Debian's package creates a system cluster (15/main, port 5432) and
    # may start it. No test uses it (their ports come from the ephemeral
    # range); stop it so it holds no memory. Harmless if it never started.
    if [[ " ${need_apt[*]} " == *" postgresql-15 "* ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
      pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
    fi
  fi
fi

if [[ "$what" == all || "$what" == s3s-fs ]]; then
  if [[ ! -x "$tools/bin/s3s-fs" ]]; then
    echo "install-peers: cargo install s3s-fs@0.14.1 (a few minutes, once)" >&2
    cargo install s3s-fs@0.14.1 --locked --features binary --root "$tools" >&2
  fi
fi

if [[ "$what" == all || "$what" == clients ]]; then
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="$tools/venv"
  stamp="$venv/.requirements"
  if ! cmp -s "$root/clients/python/requirements.txt" "$stamp" 2>/dev/null; then
    echo "install-peers: tuspy venv ($venv)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q -r "$root/clients/python/requirements.txt" >&2
    cp "$root/clients/python/requirements.txt" "$stamp"
  fi
  lock="$root/clients/node/node_modules/.package-lock.json"
  if [[ ! -e "$lock" || "$root/clients/node/package-lock.json" -nt "$lock" ]]; then
    echo "install-peers: npm ci (tus-js-client, @tus/server)" >&2
    npm ci --silent --prefix "$root/clients/node" >&2
  fi
  lock="$root/clients/browser/node_modules/.package-lock.json"
  if [[ ! -e "$lock" || "$root/clients/browser/package-lock.json" -nt "$lock" ]]; then
    echo "install-peers: npm ci (playwright-core, for Debian's chromium)" >&2
    npm ci --silent --prefix "$root/clients/browser" >&2
  fi
fi
