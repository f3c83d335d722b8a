#!/usr/bin/env bash
# Fetches the web app's vendored libraries from the npm registry at pinned
# versions, checks each tarball's SHA-256, and copies the files the app uses
# into relaypacs-http/web/vendor/<name>/ (with the package's LICENSE), then
# writes relaypacs-http/web/vendor/VERSIONS.md. The output is committed (the
# server embeds it); rerunning this script reproduces it byte for byte.
# Usage: scripts/vendor-web.sh            (needs npm; network to the registry)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vendor="$root/relaypacs-http/web/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# name  version  sha256-of-the-registry-tarball  license  files-from-package/ (space separated)
pins=(
  "tus-js-client|4.3.1|919f46808b2c689be9214df5c0f21879bee4a4599b34e212ada8f14de1db9bc0|MIT|dist/tus.min.js"
  "dicom-parser|1.8.21|8d4656b35d15174bc549b69a42d78cde60c0b73fcc72bf80c47ffcacd9bd4ca9|MIT|dist/dicomParser.min.js"
  "hash-wasm|4.13.0|237a2735a3bb8725603a797fea1ba3e455d70e11f338518a65d42dab60182b68|MIT|dist/sha256.umd.min.js"
  "uplot|1.6.32|4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d|MIT|dist/uPlot.esm.js dist/uPlot.iife.min.js dist/uPlot.min.css"
)

{
  echo "# Vendored web libraries"
  echo
  echo "Written by \`scripts/vendor-web.sh\` (do not edit by hand): each package is the"
  echo "npm registry tarball at the pinned version, checked against its SHA-256 below;"
  echo "the listed files are copied unchanged, with the package's LICENSE."
  echo
  echo "| package | version | tarball sha256 | license | files |"
  echo "|---|---|---|---|---|"
} > "$work/VERSIONS.md"

for pin in "${pins[@]}"; do
  IFS='|' read -r name version sha license files <<<"$pin"
  (cd "$work" && npm pack --silent "$name@$version" >/dev/null)
  tgz="$work/$name-$version.tgz"
  got="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [[ "$got" != "$sha" ]]; then
    echo "vendor-web: $name@$version: tarball sha256 $got, expected $sha" >&2
    exit 1
  fi
  mkdir -p "$work/x/$name"
  tar xzf "$tgz" -C "$work/x/$name"
  rm -rf "${vendor:?}/$name"
  mkdir -p "$vendor/$name"
  listed=()
  for f in $files LICENSE; do
    cp "$work/x/$name/package/$f" "$vendor/$name/$(basename "$f")"
    listed+=("$(basename "$f")")
  done
  echo "| $name | $version | \`$sha\` | $license | ${listed[*]} |" >> "$work/VERSIONS.md"
done
cp "$work/VERSIONS.md" "$vendor/VERSIONS.md"
echo "vendor-web: wrote $vendor" >&2
