#!/usr/bin/env bash
# What the test suite talks to, installed when this machine allows it: Debian's chromium (browser
# tests), Orthanc with DICOMweb (PACS tests), dicom3tools (DICOM SEG/SR conformance), Node.js and
# the test OpenID provider (sign-in tests). Without root it stops with the one command to run.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "installing what the tests need: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  elif sudo -n true 2>/dev/null; then
    echo "installing what the tests need: ${need[*]}"
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "the tests need Debian packages that are not installed; run:" >&2
    echo "  sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
[ -d tests/oidc/node_modules/oidc-provider ] || npm ci --prefix tests/oidc --no-audit --no-fund --silent
