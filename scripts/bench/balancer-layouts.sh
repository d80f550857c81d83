#!/usr/bin/env bash
# Cache-hit throughput of balancer layouts, interleaved: by default one balancer process
# with 2 threads against two single-threaded processes sharing a port (SO_REUSEPORT, the
# up.sh default). Run with the scripts/up.sh stack up (the balancers started here use its
# Consul, embedders and shards, on ports 9090 and up; the stack's own balancers are left
# alone). Each round starts the layout fresh, warms every process's answer cache (the
# load for 5 s), then measures 5 s with perf stat on the balancer processes (CPU and
# context switches per answer) and how the kernel spread the connections. Settings:
# ROUNDS (default 8); LAYOUTS, port:processes:threads each (default "9090:1:2
# 9091:2:1"); CONNECTIONS, client connections repeating 200 queries (default 16).
# Prints one line per layout and round.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
{
bin="$CARGO_TARGET_DIR/release"
queries="$SIMQ_CACHE/bench/queries.txt"
[ -s "$queries" ] || die "no $queries: run scripts/bench.sh serve once first"
[ -x "$bin/examples/loadgen" ] || die "no loadgen: cargo build --release -p simq-balancer --examples"
need_cmd perf "Install Debian's linux-perf package."
pids=()
start_layout() { # start_layout PORT PROCESSES THREADS
  local port=$1 n=$2 threads=$3 i
  for i in $(seq 1 "$n"); do
    "$bin/simq-balancer" --listen "127.0.0.1:$port" --reuse-port --admin-listen "127.0.0.1:$((port + 100 + i))" \
      --upgrade-sock "$SIMQ_CLUSTER_DIR/layouts-$port-$i.sock" --consul "$CONSUL_HTTP_ADDR" --threads "$threads" \
      --embedder-order stable >"$SIMQ_CLUSTER_DIR/layouts-$port-$i.log" 2>&1 &
    pids+=($!)
  done
  for _ in $(seq 1 100); do
    curl -fsS -X POST -d '{"query": "warm up"}' "http://127.0.0.1:$port/v1/query" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "the balancers on port $port did not answer (logs: $SIMQ_CLUSTER_DIR/layouts-$port-*.log)"
}
stop_layout() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=(); }
trap stop_layout EXIT
loadgen() { "$bin/examples/loadgen" --url "http://127.0.0.1:$1/v1/query" --queries "$queries" --start 140000 "${@:2}"; }
tmp="$(mktemp -d)"
for round in $(seq 1 "${ROUNDS:-8}"); do
  for layout in ${LAYOUTS:-9090:1:2 9091:2:1}; do
    set -- ${layout//:/ }
    start_layout "$1" "$2" "$3"
    loadgen "$1" --connections "${CONNECTIONS:-16}" --repeat 200 --max 100000 --seconds 5 >/dev/null
    perf stat -e task-clock,context-switches -p "$(IFS=,; echo "${pids[*]}")" -o "$tmp/perf" -- sleep 5 &
    perf_pid=$!
    loadgen "$1" --connections "${CONNECTIONS:-16}" --repeat 200 --max 1000000 --seconds 5 >"$tmp/load.json" &
    load_pid=$!
    sleep 2
    split=""
    for p in "${pids[@]}"; do split+="$(ss -Htnp state established "( sport = :$1 )" | grep -c "pid=$p,") "; done
    wait "$load_pid" "$perf_pid"
    python3 - "$tmp/load.json" "$tmp/perf" "$round" "$2 x $3" "$split" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
ms = float(re.search(r"([\d.,]+)\s+msec task-clock", t).group(1).replace(",", ""))
cs = int(re.search(r"([\d,]+)\s+context-switches", t).group(1).replace(",", ""))
n = r["throughput"] * 5
print(f"round {sys.argv[3]}: {sys.argv[4]} thread(s): {r['throughput']:.0f} answers/s, "
      f"balancer CPU {ms * 1000 / n:.1f} us/answer, {cs / n:.3f} context switches/answer, "
      f"connections per process {sys.argv[5].strip()}, p50 {r['p50_ms']} ms, failed {r['failed']}")
PY
    stop_layout
  done
done
rm -rf "$tmp"
exit
}
