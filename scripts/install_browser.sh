#!/usr/bin/env bash
# Installs what the browser test needs: Debian's Chromium (as root, with apt-get) and
# Playwright's driver library (playwright-core, from npm; it drives the system Chromium and
# downloads no browser of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  else
    echo "install Debian's chromium (apt-get install chromium) for the browser test" >&2
  fi
fi
if command -v npm >/dev/null; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "install node and npm for the browser test" >&2
fi
