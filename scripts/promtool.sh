#!/usr/bin/env bash
# promtool, which the tests use to check deploy/prometheus/alerts.yml: from
# PATH, or unpacked from Debian's `prometheus` package into
# target/promtool/ (extracted, not installed: no service is set up).
# Prints its path (the tests read it from TALLY_TEST_PROMTOOL).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v promtool >/dev/null 2>&1; then
  command -v promtool; exit 0
fi
OUT=target/promtool
if [ ! -x "$OUT/usr/bin/promtool" ]; then
  mkdir -p "$OUT"
  (
    cd "$OUT"
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    apt-get download prometheus >&2 2>/dev/null || {
      $sudo_cmd apt-get update -qq >&2
      apt-get download prometheus >&2
    }
    dpkg-deb -x prometheus_*.deb . >&2
    rm -f prometheus_*.deb
  )
fi
"$OUT/usr/bin/promtool" --version >/dev/null 2>&1
echo "$(pwd)/$OUT/usr/bin/promtool"
