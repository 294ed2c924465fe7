#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/test_mlflow_ui.py, marked `browser`).
#
#   bash scripts/install-chromium.sh      install if missing (root, apt-get); idempotent
#
# Playwright drives this system browser through its executable path (/usr/bin/chromium):
# Playwright's own browser download is not used. Prints the browser's version.
set -euo pipefail

log() { echo "install-chromium: $*" >&2; }

if command -v chromium >/dev/null 2>&1; then
    chromium --version 2>/dev/null || true
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
    command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install Debian's chromium package by hand"; exit 1; }
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive

# Package lists are missing on a fresh machine: fetch them only when chromium has no candidate.
if ! apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    log "apt-get update"
    $SUDO apt-get update -qq
fi
log "apt-get install chromium"
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null 2>&1 || { log "chromium is still not on PATH after the install"; exit 1; }
chromium --version 2>/dev/null || true
