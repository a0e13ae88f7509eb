#!/usr/bin/env bash
# Runs a whole Meridian on this machine, three regions on three loopback addresses:
#   etcd               127.0.0.1:2379 (data in a temp dir)
#   control planes     127.0.0.1:7000 and 127.0.0.1:7001 (admin: /metrics on :7090 and :7091)
#   agents             us-east 127.0.1.1, eu-west 127.0.2.1, ap-south 127.0.3.1
#                      (local API :7100, admin :7190 on each), each pointed at both replicas
#   sidecars           one per region: outbound :15001, gateway :15002, admin :15090
#   sample function    run by the agents as the `process` functions `hello` (one warm instance
#                      per region) and `slow` (scales from zero with load, back to zero when idle);
#                      installed in <run dir>/functions, the agents' only allowed command root,
#                      and run as the system user meridian-fn (created if missing) when this
#                      script runs as root, as you otherwise: function instances never run as root
#   relay              the cross-region links, with latency (one way: us-east<->eu-west 40 ms,
#                      us-east<->ap-south 120 ms, eu-west<->ap-south 100 ms); each sidecar reads
#                      its tables through the relay (:7101), control API on 127.0.0.1:7199
# then applies deploy/local/sample-function.yaml, waits until us-east's sidecar serves `hello`,
# prints what to try (a call, a crash, an etcd outage, a partition, scale up and down) and keeps
# running until Ctrl-C, which stops everything. A component that dies is reported and the rest
# keep running, so that routing without etcd or a control plane can be tried.
# Traces: with OTEL_EXPORTER_OTLP_ENDPOINT set (e.g. http://127.0.0.1:4317, a Jaeger), every
# component exports its spans there as meridian-<component>[-<region>].
#
# Usage: deploy/local/run.sh [--release]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD

PROFILE=debug
case "${1:-}" in
    "") ;;
    --release) PROFILE=release ;;
    -h | --help)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "unknown argument: $1 (usage: deploy/local/run.sh [--release])" >&2
        exit 2
        ;;
esac

REGIONS=(us-east eu-west ap-south)
CP_ADDRS=(127.0.0.1:7000 127.0.0.1:7001)
ETCD_CLIENT=127.0.0.1:2379
ETCD_PEER=127.0.0.1:2380
AGENT_API_PORT=7100
TAP_PORT=7101
OUTBOUND_PORT=15001
GATEWAY_PORT=15002
ADMIN_PORT=15090
RELAY_CONTROL=127.0.0.1:7199
# Admin endpoints (/metrics, /ready) of the control planes (one port each: they share an address)
# and of the agents (on each region's address).
CP_ADMIN_PORTS=(7090 7091)
AGENT_ADMIN_PORT=7190
LATENCIES=(us-east:eu-west=40 us-east:ap-south=120 eu-west:ap-south=100)

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

install_prerequisites() {
    deploy/install-packages.sh \
        protoc=protobuf-compiler etcd=etcd-server,etcd-client
}

region_ip() { echo "127.0.$(($1 + 1)).1"; }

# Whether every directory from / down to $1 lets other users through (their x bit, or t).
traversable() {
    local dir
    dir=$(cd "$1" && pwd -P) || return 1
    while :; do
        case $(stat -c %A "$dir") in *x | *t) ;; *) return 1 ;; esac
        [ "$dir" = / ] && return 0
        dir=$(dirname "$dir")
    done
}

# Whether something accepts connections on host:port.
listening() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }

# wait_for DESCRIPTION SECONDS LOG COMMAND...: polls COMMAND until it succeeds; on timeout shows
# the end of LOG and fails.
wait_for() {
    local what=$1 seconds=$2 logfile=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            [ -f "$logfile" ] && tail -n 30 "$logfile" >&2
            die "timed out after ${seconds}s waiting for $what (log: $logfile)"
        fi
        sleep 0.2
    done
}

etcd_healthy() {
    local response
    response=$(
        exec 3<>"/dev/tcp/${ETCD_CLIENT%:*}/${ETCD_CLIENT##*:}" || exit 1
        printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$ETCD_CLIENT" >&3
        timeout 2 cat <&3
    ) || return 1
    [[ $response == *'"health":"true"'* ]]
}

# with_service NAME ATTRIBUTES COMMAND...: runs COMMAND (exec, so the pid stays the command's)
# with OTEL_SERVICE_NAME=NAME and ATTRIBUTES added to OTEL_RESOURCE_ATTRIBUTES when traces are
# exported (the caller set OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
# both are exported, so every component inherits the endpoint itself).
with_service() {
    local name=$1 attributes=$2
    shift 2
    if [ -n "$OTLP_ENDPOINT" ]; then
        exec env OTEL_SERVICE_NAME="$name" \
            OTEL_RESOURCE_ATTRIBUTES="${OTEL_RESOURCE_ATTRIBUTES:+$OTEL_RESOURCE_ATTRIBUTES,}$attributes" \
            "$@"
    fi
    exec "$@"
}

ctl() { "$BIN_DIR/meridianctl" --control-plane "http://${CP_ADDRS[0]}" "$@"; }

# Every agent acknowledged a table at least as new as the sample function hello.
agents_acked_sample() {
    local fn_json agents_json version acked count=0
    fn_json=$(ctl get functions hello -o json) || return 1
    version=$(grep -o '"version": *[0-9]*' <<<"$fn_json" | head -n 1 | grep -o '[0-9]*$') || return 1
    agents_json=$(ctl get agents -o json) || return 1
    for region in "${REGIONS[@]}"; do
        [[ $agents_json == *"\"$region-1\""* ]] || return 1
    done
    for acked in $(grep -o '"ackedVersion": *[0-9]*' <<<"$agents_json" | grep -o '[0-9]*$'); do
        [ "$acked" -ge "$version" ] && count=$((count + 1))
    done
    [ "$count" -ge "${#REGIONS[@]}" ]
}

OTLP_ENDPOINT=${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-${OTEL_EXPORTER_OTLP_ENDPOINT:-}}
[ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ] && export OTEL_EXPORTER_OTLP_ENDPOINT
[ -n "${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-}" ] && export OTEL_EXPORTER_OTLP_TRACES_ENDPOINT

install_prerequisites
command -v cargo >/dev/null 2>&1 || die "cargo is not on the PATH: install Rust (https://rustup.rs) first"

REGION_ADDRS=()
for i in "${!REGIONS[@]}"; do
    ip=$(region_ip "$i")
    for port in "$AGENT_API_PORT" "$TAP_PORT" "$OUTBOUND_PORT" "$GATEWAY_PORT" "$ADMIN_PORT" \
        "$AGENT_ADMIN_PORT"; do
        REGION_ADDRS+=("$ip:$port")
    done
done
for port in "${CP_ADMIN_PORTS[@]}"; do
    REGION_ADDRS+=("127.0.0.1:$port")
done
for addr in "$ETCD_CLIENT" "$ETCD_PEER" "${CP_ADDRS[@]}" "$RELAY_CONTROL" "${REGION_ADDRS[@]}"; do
    listening "$addr" && die "$addr is already in use (another Meridian or etcd running?)"
done

log "building the binaries and the sample function ($PROFILE)"
build_flags=(--workspace --bins --examples --locked)
[ "$PROFILE" = release ] && build_flags+=(--release)
cargo build "${build_flags[@]}"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN_DIR=$TARGET_DIR/$PROFILE

# Function instances never run as root: as root, the agents run them as meridian-fn.
RUN_AS=()
RUN_BASE=${TMPDIR:-/tmp}
if [ "$(id -u)" -eq 0 ]; then
    if ! id -u meridian-fn >/dev/null 2>&1; then
        log "creating the system user meridian-fn (the functions' instances run as it)"
        useradd --system --no-create-home --shell /usr/sbin/nologin meridian-fn
    fi
    RUN_AS=(--run-as meridian-fn)
    # meridian-fn must reach its working directories in the agents' state dirs, under the run
    # directory: a TMPDIR it cannot traverse (e.g. under /root) will not do.
    traversable "$RUN_BASE" || RUN_BASE=/tmp
fi

RUN_DIR=$(mktemp -d "$RUN_BASE/meridian-local.XXXXXX")
# Traversable, not listable (like the agents' state dirs inside it); the logs are yours alone.
chmod 0711 "$RUN_DIR"
LOGS=$RUN_DIR/logs
mkdir -m 0700 "$LOGS"
log "run directory (logs, etcd data, agent state): $RUN_DIR"
# The agents' only allowed command root: the sample function, where meridian-fn can reach it (the
# checkout may be where it cannot). A hard link costs nothing; another file system gets a copy.
FUNCTIONS_DIR=$RUN_DIR/functions
install -d -m 0755 "$FUNCTIONS_DIR"
ln "$BIN_DIR/examples/sample_function" "$FUNCTIONS_DIR/" 2>/dev/null ||
    install -m 0755 "$BIN_DIR/examples/sample_function" "$FUNCTIONS_DIR/"

# Started processes, in start order; stopped in reverse order (the agents stop their function
# instances). One of the WATCHED ones that dies is reported; the rest keep running.
NAMES=()
PIDS=()
WATCHED=()

start() {
    local name=$1
    shift
    "$@" >"$LOGS/$name.log" 2>&1 &
    NAMES+=("$name")
    PIDS+=("$!")
    WATCHED+=("$!")
    log "started $name (pid $!), log: $LOGS/$name.log"
}

stop_all() {
    trap - INT TERM EXIT
    [ "${#PIDS[@]}" -eq 0 ] && return 0
    echo >&2
    log "stopping"
    local i pid deadline
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "${NAMES[i]} did not stop within 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    log "stopped; logs kept in $LOGS"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start etcd etcd --name local --data-dir "$RUN_DIR/etcd" \
    --listen-client-urls "http://$ETCD_CLIENT" --advertise-client-urls "http://$ETCD_CLIENT" \
    --listen-peer-urls "http://$ETCD_PEER" --initial-advertise-peer-urls "http://$ETCD_PEER" \
    --initial-cluster "local=http://$ETCD_PEER" \
    --heartbeat-interval 10 --election-timeout 100
wait_for "etcd" 30 "$LOGS/etcd.log" etcd_healthy

CP_URLS=()
for i in "${!CP_ADDRS[@]}"; do
    addr=${CP_ADDRS[i]}
    # Both replicas share 127.0.0.1, so each needs its own admin port.
    start "control-plane-$i" with_service meridian-control-plane "service.instance.id=cp-$i" \
        "$BIN_DIR/meridian-control-plane" \
        --listen "$addr" --etcd-endpoints "http://$ETCD_CLIENT" --replica-id "cp-$i" \
        --admin "127.0.0.1:${CP_ADMIN_PORTS[i]}"
    CP_URLS+=("http://$addr")
done
for i in "${!CP_ADDRS[@]}"; do
    wait_for "control plane ${CP_ADDRS[i]}" 30 "$LOGS/control-plane-$i.log" \
        "$BIN_DIR/meridianctl" --control-plane "${CP_URLS[i]}" get functions
done

control_planes=$(
    IFS=,
    echo "${CP_URLS[*]}"
)
for i in "${!REGIONS[@]}"; do
    region=${REGIONS[i]}
    ip=$(region_ip "$i")
    mkdir -p "$RUN_DIR/agent-$region"
    # The functions' `command: sample_function` is looked up in the allowed command root (never
    # in PATH).
    start "agent-$region" with_service "meridian-agent-$region" "cloud.region=$region" \
        "$BIN_DIR/meridian-agent" \
        --region "$region" --agent-id "$region-1" --zone "$region-a" \
        --listen "$ip:$AGENT_API_PORT" --gateway "$ip:$GATEWAY_PORT" \
        --control-plane "$control_planes" --state-dir "$RUN_DIR/agent-$region" \
        --admin "$ip:$AGENT_ADMIN_PORT" \
        --allowed-command-root "$FUNCTIONS_DIR" ${RUN_AS[@]+"${RUN_AS[@]}"}
done

# The relay: each region's sidecar reads its tables through the relay (:$TAP_PORT), which
# rewrites the other regions' gateway addresses into links (with latency) from this region.
relay_args=(--control "$RELAY_CONTROL")
for i in "${!REGIONS[@]}"; do
    ip=$(region_ip "$i")
    relay_args+=(--region "${REGIONS[i]}=$ip:$TAP_PORT=http://$ip:$AGENT_API_PORT")
done
for latency in "${LATENCIES[@]}"; do
    relay_args+=(--latency "$latency")
done
start relay "$BIN_DIR/meridian-relay" "${relay_args[@]}"

for i in "${!REGIONS[@]}"; do
    region=${REGIONS[i]}
    ip=$(region_ip "$i")
    start "sidecar-$region" with_service "meridian-sidecar-$region" "cloud.region=$region" \
        "$BIN_DIR/meridian-sidecar" \
        --region "$region" --agent "http://$ip:$TAP_PORT" --client-id "sidecar-$region" \
        --outbound "$ip:$OUTBOUND_PORT" --gateway "$ip:$GATEWAY_PORT" --admin "$ip:$ADMIN_PORT"
done

log "applying deploy/local/sample-function.yaml"
ctl apply -f "$ROOT/deploy/local/sample-function.yaml"
wait_for "every agent to acknowledge the sample function" 60 "$LOGS/agent-us-east.log" \
    agents_acked_sample
ctl get agents

US_EAST=$(region_ip 0)
CALL="curl -i -H 'Host: hello' http://$US_EAST:$OUTBOUND_PORT/"

# One HTTP/1.0 GET through us-east's outbound listener with bash alone; prints the response.
call_hello() {
    (
        exec 3<>"/dev/tcp/$US_EAST/$OUTBOUND_PORT" || exit 1
        printf 'GET / HTTP/1.0\r\nHost: hello\r\n\r\n' >&3
        timeout 5 cat <&3
    )
}
served_by_us_east() { call_hello | grep -qi '^meridian-region: us-east'; }
wait_for "us-east's sidecar to serve hello" 30 "$LOGS/sidecar-us-east.log" served_by_us_east
printf '\n$ %s\n' "$CALL"
call_hello | tr -d '\r'

# The pid of the instance of function $1 that the agent of region $2 runs (from /proc).
instance_pid() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        # Other users' processes cannot be read, and short-lived ones vanish: skip them quietly.
        if { tr '\0' '\n' <"$environ" | grep -qx "MERIDIAN_FUNCTION=default/$1"; } 2>/dev/null &&
            { tr '\0' '\n' <"$environ" | grep -qx "REGION=$2"; } 2>/dev/null; then
            echo "$pid"
            return 0
        fi
    done
    echo "<pid>"
}
# hello has a ready instance in every region (READY is the 5th column of `get instances`).
hello_ready_everywhere() {
    [ "$(ctl get instances hello | awk 'NR > 1 && $5 >= 1' | wc -l)" -ge "${#REGIONS[@]}" ]
}
wait_for "hello to be ready in every region" 30 "$LOGS/agent-us-east.log" hello_ready_everywhere
printf '\n$ meridianctl get instances\n'
ctl get instances

if [ "${#RUN_AS[@]}" -gt 0 ]; then
    INSTANCE_USER=meridian-fn
else
    INSTANCE_USER="$(id -un) (this script is not root)"
fi

if [ -n "$OTLP_ENDPOINT" ]; then
    TRACES="Traces: every component exports its spans (OTLP/gRPC) to $OTLP_ENDPOINT, as the services
meridian-control-plane, meridian-agent-<region> and meridian-sidecar-<region>. In Jaeger's UI
(a Jaeger all-in-one serves it on port 16686, e.g. http://localhost:16686) pick the service
meridian-sidecar-us-east and Find Traces; a call that failed over (the crash or the partition
below) is one trace with both regions' sidecar spans and the reason on the attempt span."
else
    TRACES="Traces: off. To see every call as a trace, start a Jaeger and run this script again with
the OTLP endpoint set, e.g.:
  docker run -d --name jaeger -p 4317:4317 -p 16686:16686 jaegertracing/all-in-one:1.62.0
  OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 deploy/local/run.sh
then open http://localhost:16686 (service meridian-sidecar-us-east)."
fi

cat <<EOF

Meridian is running: etcd, 2 control-plane replicas, 3 agents (running the functions' instances),
3 sidecars and the relay. Ctrl-C stops everything. Logs: $LOGS
Function instances run as $INSTANCE_USER, never as root, and only programs in
$FUNCTIONS_DIR may start (each instance's first line in
\`meridianctl logs hello\` says who it runs as: sample_function uid=...).

Call the function hello through us-east's sidecar (answered in us-east, see meridian-region):
  $CALL

Crash: kill us-east's instance of hello; the agent starts a new one (a new id, restarts 1) and
calls keep working meanwhile (the sidecar retries elsewhere):
  kill -9 $(instance_pid hello us-east)
  $CALL
  meridianctl describe function hello

Outage: kill etcd (and the control planes, if you like); the agents and sidecars keep routing
on the tables they hold, and the script keeps the rest running:
  kill -9 ${PIDS[0]}   # etcd
  $CALL

Partition: cut us-east off from eu-west; within a second ap-south answers. Then heal it:
  curl -X POST http://$RELAY_CONTROL/links/us-east/eu-west/blackhole
  $CALL
  meridianctl explain --from us-east hello   # eu-west down; where the next call goes, and why
  curl -X POST http://$RELAY_CONTROL/links/us-east/eu-west/heal
  curl http://$RELAY_CONTROL/links

Scale from zero, out under load, and back to zero: slow (200 ms a call, 5 calls per instance)
runs nothing until called. The first call is held while an instance starts (meridian-held-ms);
40 callers at once scale it out in seconds; 20 s after the last call it is back at zero:
  curl -i -H 'Host: slow' http://$US_EAST:$OUTBOUND_PORT/
  seq 4000 | xargs -P 40 -I{} curl -s -o /dev/null -H 'Host: slow' http://$US_EAST:$OUTBOUND_PORT/ &
  watch -n 1 $BIN_DIR/meridianctl get instances slow
  meridianctl logs slow --region us-east --tail 5

What us-east's sidecar sees (each tier's priority and share, probe states and round trips,
ejections, held requests) and counts; and the other components' metrics:
  curl http://$US_EAST:$ADMIN_PORT/routes
  curl http://$US_EAST:$ADMIN_PORT/metrics
  curl http://$US_EAST:$AGENT_ADMIN_PORT/metrics       # us-east's agent
  curl http://127.0.0.1:${CP_ADMIN_PORTS[0]}/metrics       # control plane cp-0 (cp-1: :${CP_ADMIN_PORTS[1]})

$TRACES

The control plane:
  export PATH="$BIN_DIR:\$PATH"
  meridianctl status
  meridianctl get functions
  meridianctl get instances
  meridianctl get agents
  meridianctl get routes us-east
  meridianctl describe function hello
  meridianctl --control-plane 127.0.0.1:7001 get agents -o yaml
  grpcurl -plaintext 127.0.0.1:7000 list

EOF

# Until Ctrl-C. A component that dies is reported and the rest keep running: the mesh is built
# to keep routing when etcd or a control plane is gone, and this is where to try it.
set +e
while [ "${#WATCHED[@]}" -gt 0 ]; do
    wait -n "${WATCHED[@]}"
    status=$?
    alive=()
    for pid in "${WATCHED[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            alive+=("$pid")
            continue
        fi
        for i in "${!PIDS[@]}"; do
            if [ "${PIDS[i]}" = "$pid" ]; then
                log "${NAMES[i]} exited (status $status); the rest keep running (Ctrl-C stops them). Its log: $LOGS/${NAMES[i]}.log"
            fi
        done
    done
    WATCHED=("${alive[@]}")
done
log "every component has exited"
exit 1
