# tally — see README.md.
SHELL := /bin/bash
CARGO ?= cargo
CARGO_HOME ?= $(HOME)/.cargo
TANSU := $(CARGO_HOME)/bin/tansu
TANSU_VERSION := 0.6.0
BROKER_PORT ?= 9092
export TANSU_BIN := $(TANSU)
# The commit in tally_build_info (only the binary's main.rs reads it).
export TALLY_GIT_COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null)

.PHONY: help all build release tansu postgres moto broker run test soak unit lint fmt bench bench-smoke bench-api bench-archive bench-rebuild report-demo clean clean-stale

## help: list the targets.
help:
	@grep -E '^## [a-z-]+:' $(MAKEFILE_LIST) | sed -E 's/^## ([a-z-]+): /  \1\t/' | expand -t 16

all: build

## build: the debug build of tally (what `make run` and the tests use).

build:
	$(CARGO) build -p tally

## release: the release build (what `make bench` and `make soak` use).
release:
	$(CARGO) build --release -p tally -p tally-tools

## tansu: the Kafka-compatible broker used locally and by the tests (installed once per machine).
tansu: $(TANSU)
$(TANSU):
	$(CARGO) install tansu --locked --version $(TANSU_VERSION) --features dynostore,libsql

## postgres: a local PostgreSQL on 127.0.0.1:5432 with role and database `tally` (password
## `tally`) for the PostgreSQL serving-store tests; installs Debian's postgresql when absent.
postgres:
	scripts/postgres.sh

## moto: the S3-compatible server (PyPI moto[server]) the S3 archive tests start on loopback.
moto:
	scripts/moto.sh

## broker: run tansu on 127.0.0.1:$(BROKER_PORT) in the foreground (storage in data/tansu/).
broker: $(TANSU)
	mkdir -p data/tansu
	cd data/tansu && $(TANSU) broker --listener-url tcp://127.0.0.1:$(BROKER_PORT) \
	  --advertised-listener-url tcp://127.0.0.1:$(BROKER_PORT) \
	  --storage-engine sqlite://tansu.db

## run: quick start: broker, topic, tally run and a demo producer; prints what to open; Ctrl-C stops all.
run: $(TANSU) build
	TANSU=$(TANSU) BROKER_PORT=$(BROKER_PORT) TALLY_BIN=$(CURDIR)/target/debug/tally scripts/run-local.sh

## test: the one test command (unit, property, SQL, end-to-end and crash tests).
# --all-targets resolves features exactly as `cargo test --workspace` does, so the
# tally binary the black-box tests run and the test binaries share one build.
test: $(TANSU) postgres moto
	$(CARGO) build --workspace --all-targets
	TALLY_TEST_PYTHON=$$(scripts/moto.sh) TALLY_TEST_PROMTOOL=$$(scripts/promtool.sh) TALLY_TEST_CHROMIUM=$$(scripts/chromium.sh) $(CARGO) test --workspace --no-fail-fast -- --test-threads=2
	$(MAKE) --no-print-directory bench-smoke

## soak: the long fault runs (issue #5): >= 20 SIGKILLs over >= 1 M events (SOAK_EVENTS,
## SOAK_KILLS), then the fault and crash tests again, all against a release tally.
SOAK_EVENTS ?= 1000000
SOAK_KILLS ?= 20
soak: $(TANSU) postgres moto release
	$(CARGO) build --workspace --all-targets
	TALLY_BIN=$(CURDIR)/target/release/tally SOAK_EVENTS=$(SOAK_EVENTS) SOAK_KILLS=$(SOAK_KILLS) \
	  $(CARGO) test --workspace --test it soak_kill_loop -- --ignored --nocapture
	set -o pipefail; TALLY_BIN=$(CURDIR)/target/release/tally TALLY_TEST_PYTHON=$$(scripts/moto.sh) $(CARGO) test --workspace --test it -- faults:: limits:: crash:: replay:: postgres:: s3:: --test-threads=2 --nocapture 2>&1 | tee target/soak-faults.log | grep -E "^test |survived|SOAK|FAULTS|test result"
	@grep -h "^FAULTS" target/soak-faults.log | tr ' ' '\n' | grep = | awk -F= '{n[$$1]+=$$2; t+=$$2} END {printf "SOAK faults injected and survived, counts exact after each: "; for (k in n) printf "%s=%d ", k, n[k]; printf "(total %d, plus the kill loop above)\n", t}'

## unit: the library's unit, property and contract tests only (no broker needed).
unit:
	$(CARGO) test -p tally --lib

## lint: formatting and clippy with warnings as errors; clean before every commit.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fmt: format the workspace.
fmt:
	$(CARGO) fmt --all

## bench: pre-fill a topic with BENCH_EVENTS events and time `tally run` draining it.
BENCH_EVENTS ?= 5000000
## The drain (with the bare-consumer limit and the PostgreSQL store), freshness and API latency at a
## steady FRESH_RATE, backfill speed, then the core path without a broker against DuckDB and
## DataFusion (CORE_EVENTS events) with peak RSS per buffered event, the ingest cost of the sketch
## rollups (SKETCH_EVENTS, replay with and without them); ends with one summary table.
CORE_EVENTS ?= 5000000
FRESH_RATE ?= 10000
bench: $(TANSU) release postgres
	TANSU=$(TANSU) BENCH_EVENTS=$(BENCH_EVENTS) CORE_EVENTS=$(CORE_EVENTS) FRESH_RATE=$(FRESH_RATE) scripts/bench.sh

## bench-smoke: every part of `make bench`, scaled down, on the debug build; checks that it runs
## (no timing assertion). Part of `make test`.
bench-smoke: $(TANSU) postgres
	TALLY_BIN=$(CURDIR)/target/debug/tally TANSU=$(TANSU) BENCH_EVENTS=50000 BACKFILL_EVENTS=50000 CORE_EVENTS=50000 SKETCH_EVENTS=50000 SKETCH_RUNS=1 \
	  FRESH_RATE=2000 FRESH_PROBES=20 FRESH_HISTORY=20000 scripts/bench.sh

## bench-archive: the same one-day `tally verify` over an archive of 1 day and of 30 days
## (ARCHIVE_DAY_EVENTS per day): bookkeeping cost must not grow with the archive's age.
bench-archive: release
	scripts/bench-archive-age.sh

## bench-rebuild: `tally rebuild` of a 2 M-event archive and `tally compact` of it in small files, no broker
bench-rebuild: release
	scripts/bench-rebuild.sh

## bench-api: open-loop latency of /v1/count, /v1/stats and a /v1/rollups query, idle and under ingest.
bench-api: $(TANSU) release
	TANSU=$(TANSU) scripts/bench-api.sh

## report-demo: events for the sample dims through a local broker and `tally run`, then the
## monthly report as HTML, CSV and Markdown in bench-out/report/ (REPORT_SCREENSHOT=x.png: Chromium).
report-demo: $(TANSU) release
	TANSU=$(TANSU) scripts/report-demo.sh

## clean: remove the build directory.
clean:
	$(CARGO) clean

## clean-stale: free disk without a full rebuild: test and binary executables in target/*/deps
## not touched for a day (each debug one is over 1 GB), and the incremental caches.
clean-stale:
	find target/debug/deps target/release/deps -maxdepth 1 -type f -perm -u+x -mtime +0 \
	  ! -name '*.so' ! -name '*.rlib' ! -name '*.rmeta' ! -name '*.d' -print -delete 2>/dev/null | wc -l | xargs echo "removed executables:"
	rm -rf target/debug/incremental target/release/incremental
