#!/usr/bin/env bash
# Runs the end-to-end suite beside two CPU hogs (`stress-ng --cpu 2`), to show that no test
# depends on having the machine to itself: every assertion must hold at any speed. Run by hand
# (CI runs the suite once, unloaded, through tests/run.sh); each run's result and time are
# printed, and the exit status is non-zero if any run failed.
#
# Usage: tests/stress.sh [RUNS]      (default 1; e.g. `tests/stress.sh 3`)
# Env:   CARGO_TARGET_DIR is honoured; STRESS_CPUS sets the number of hogs (default 2);
#        extra test arguments go in STRESS_TEST_ARGS (e.g. "--test recovery").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs="${1:-1}"
case "$runs" in
    '' | *[!0-9]* | 0)
        echo "RUNS must be a positive number, not '$runs'" >&2
        exit 2
        ;;
esac
cpus="${STRESS_CPUS:-2}"

deploy/install-packages.sh protoc=protobuf-compiler etcd=etcd-server,etcd-client \
    promtool=prometheus docker-compose=docker-compose stress-ng=stress-ng

# The build is not under test: finish it before the hogs start.
cargo build --workspace --bins --examples --locked
cargo test -p meridian-tests --locked --no-run

hogs=""
stop_hogs() {
    if [ -n "$hogs" ]; then
        kill "$hogs" 2>/dev/null || true
        wait "$hogs" 2>/dev/null || true
        hogs=""
    fi
}
trap stop_hogs EXIT INT TERM

failed=0
results=()
for run in $(seq 1 "$runs"); do
    stress-ng --cpu "$cpus" --timeout 0 --quiet &
    hogs=$!
    started=$SECONDS
    echo "==> run $run of $runs: the end-to-end suite beside stress-ng --cpu $cpus" >&2
    # shellcheck disable=SC2086 # STRESS_TEST_ARGS is a list of words on purpose
    if timeout 2400 cargo test -p meridian-tests --locked --no-fail-fast ${STRESS_TEST_ARGS:-}; then
        results+=("run $run: passed in $((SECONDS - started)) s")
    else
        results+=("run $run: FAILED after $((SECONDS - started)) s")
        failed=1
    fi
    stop_hogs
done

echo >&2
printf '%s\n' "${results[@]}" >&2
exit "$failed"
