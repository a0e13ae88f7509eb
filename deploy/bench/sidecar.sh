#!/usr/bin/env bash
# The sidecar benchmark in one command: installs wrk and HAProxy (Debian packages) if missing,
# builds meridian-sidecar and bench-sidecar in release mode, and runs bench-sidecar, which
# measures on loopback, with the same backend and the same load generator (wrk):
#   direct; through one meridian-sidecar (a 1,000-function table); through HAProxy (1 thread).
# It prints a Markdown table of latency (p50/p99, and what the proxy adds), max throughput with
# the proxy pinned to one CPU, CPU per request, and memory, then the targets met or missed.
#
# Usage: deploy/bench/sidecar.sh [bench-sidecar flags: --duration SECS --connections N
#                                 --functions N --skip-haproxy]
# Needs 2 CPUs or more; numbers are only comparable within one run on a quiet machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

log() { printf '==> %s\n' "$*" >&2; }

deploy/install-packages.sh \
    wrk=wrk haproxy=haproxy protoc=protobuf-compiler taskset=util-linux

log "building meridian-sidecar and bench-sidecar (release)"
cargo build --release --locked -p meridian-sidecar --bin meridian-sidecar \
    -p meridian-tests --bin bench-sidecar

TARGET_DIR=${CARGO_TARGET_DIR:-target}
log "running bench-sidecar $*"
exec "$TARGET_DIR/release/bench-sidecar" "$@"
