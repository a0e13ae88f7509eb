#!/usr/bin/env bash
# The one command that checks everything: installs what the build and the end-to-end tests need
# (protoc, etcd, promtool) if it is missing, then runs clippy, rustfmt, the build of every binary
# and every test of the workspace. Exits non-zero if any step fails; every step runs even after a failure
# (except the tests, which need the build), so one run shows every problem.
#
# Usage: tests/run.sh            (from anywhere; works on the repository this script is in)
# Env:   CARGO_TARGET_DIR is honoured; extra arguments are passed to `cargo test` after `--`,
#        e.g. `tests/run.sh --nocapture`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

install_prerequisites() {
    # promtool (Debian's prometheus package) checks every /metrics endpoint (tests/tests/metrics.rs);
    # docker-compose validates deploy/compose without a Docker engine (tests/tests/deploy_files.rs).
    deploy/install-packages.sh protoc=protobuf-compiler etcd=etcd-server,etcd-client \
        promtool=prometheus docker-compose=docker-compose
}

install_prerequisites
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not on the PATH: install Rust (https://rustup.rs) first" >&2
    exit 1
fi

# A minimal Rust install may lack the formatter and the linter.
if command -v rustup >/dev/null 2>&1; then
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

failed=()
step() {
    local name="$1"
    shift
    log "$name: $*"
    local started=$SECONDS
    if "$@"; then
        echo "--- $name: ok ($((SECONDS - started)) s)" >&2
    else
        echo "--- $name: FAILED ($((SECONDS - started)) s)" >&2
        failed+=("$name")
        return 1
    fi
}

step fmt cargo fmt --all --check || true
step clippy cargo clippy --workspace --all-targets --locked -- -D warnings || true
if step build cargo build --workspace --bins --examples --locked; then
    # The end-to-end tests start the binaries and the sample function built above
    # (target/<profile>/, target/<profile>/examples/); each test has its own deadlines, and the
    # timeout is only a last resort against a hang.
    step test timeout 1500 cargo test --workspace --locked --no-fail-fast -- "$@" || true
else
    failed+=("test (skipped: the build failed)")
fi

echo >&2
if [ "${#failed[@]}" -ne 0 ]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "all checks passed" >&2
