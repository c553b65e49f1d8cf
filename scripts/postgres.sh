#!/usr/bin/env bash
# Make a local PostgreSQL answer on 127.0.0.1:5432 with a `tally` role and
# database (password `tally`), for the PostgreSQL serving-store tests and
# `make bench`. Installs Debian's postgresql when absent; idempotent.
set -euo pipefail
PORT=${TALLY_PG_PORT:-5432}
sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing Debian's postgresql..." >&2
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq postgresql >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p "$PORT"; then
  ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -q "^$ver main$"; then
    $sudo_cmd pg_createcluster "$ver" main -p "$PORT" >/dev/null
  fi
  $sudo_cmd pg_ctlcluster "$ver" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p "$PORT" && break; sleep 0.2; done
fi
psql_su() { $sudo_cmd runuser -u postgres -- psql -p "$PORT" -qtAX "$@"; }
if [ "$(psql_su -c "SELECT 1 FROM pg_roles WHERE rolname = 'tally'")" != "1" ]; then
  psql_su -c "CREATE ROLE tally LOGIN SUPERUSER PASSWORD 'tally'"
fi
if [ "$(psql_su -c "SELECT 1 FROM pg_database WHERE datname = 'tally'")" != "1" ]; then
  psql_su -c "CREATE DATABASE tally OWNER tally"
fi
echo "PostgreSQL ready: postgres://tally:tally@127.0.0.1:$PORT/tally" >&2
