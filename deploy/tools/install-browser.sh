#!/usr/bin/env bash
# Install the browser the report-page tests drive (tests/helm/test_dashboards.py): Debian's chromium,
# which Playwright (a dev dependency) launches as /usr/bin/chromium, and a font for the screenshot.
# Playwright's own browser downloads are never used. Idempotent: where the browser is, it returns.
set -euo pipefail

BROWSER=/usr/bin/chromium
if [[ -x "$BROWSER" ]]; then
  echo "install-browser: $("$BROWSER" --version 2>/dev/null || echo chromium) already at $BROWSER"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here: install chromium so that $BROWSER exists" >&2
  exit 1
fi
SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation
echo "install-browser: $("$BROWSER" --version) installed at $BROWSER"
