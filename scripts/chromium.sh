#!/usr/bin/env bash
# The browser the console tests drive: Debian's `chromium`, installed when
# missing. Prints its path (the tests read it from TALLY_TEST_CHROMIUM).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium >&2
fi
command -v chromium
