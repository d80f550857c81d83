#!/usr/bin/env bash
# Benchmarks on the real corpus (numbers are written to $SIMQ_CACHE/bench/ and printed):
#   scripts/bench.sh embedder   embedder service vs the bare runtime (embedder/BENCH.md)
#   scripts/bench.sh build      full-corpus dg build: phase times, total vs embedding time
#   scripts/bench.sh recall     recall@10 table of the built dg (indexer/BENCH.md)
#   scripts/bench.sh serve      the query path on the running scripts/up.sh stack, side by side
#                               with a plain Python peer and the bare-model bound; writes
#                               BENCHMARKS.md and bench-latency.png (see BENCHMARKS.md)
#   scripts/bench.sh scale      build time, recall and search cost at 10k, 50k and all
#                               questions, and at 4, 8 and 16 shards (rows added to the
#                               serve results; run after serve, then the report is redone)
#   scripts/bench.sh rollout    a rollout of a second full-corpus dg and the rollback, each
#                               under unique-query load at half of serve's capacity (rows
#                               added to the serve results; run after serve)
#   scripts/bench.sh nodes      the full-corpus dg on the single-node stack and on the 3-node
#                               cluster, one after the other: latency and throughput side
#                               by side (BENCHMARKS-NODES.md)
#   scripts/bench.sh update     an incremental build (build --base: 1 % added, 0.1 % removed)
#                               against a full rebuild of the same corpus: time, bytes written,
#                               shard files re-addressed, recall@10 (BENCHMARKS-UPDATE.md)
#   scripts/bench.sh            embedder, build and recall
# Extra build flags can be given in SIMQ_BUILD_FLAGS (e.g. "--shards 4 --clusters 512").
# The build always runs (--force); embeddings are reused from $SIMQ_CACHE/dgs/.embeddings/
# when present, so delete that to time the embedding too.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# One group, read before it runs: editing this file while a benchmark runs is safe.
{

"$SIMQ_ROOT/scripts/setup.sh" >/dev/null
corpus="$("$SIMQ_ROOT/scripts/corpus.sh")"
export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR
cd "$SIMQ_ROOT" || exit 1
cargo build --release --locked --quiet -p simq-embedder -p simq-indexer --bins --examples
bin="$CARGO_TARGET_DIR/release"
out="$SIMQ_CACHE/bench"
mkdir -p "$out"

run_embedder() {
  # The service's layout (one session, a thread per core), then the indexer's (one
  # single-threaded session per core).
  log "embedder throughput (2000 corpus texts), both runtime layouts"
  { "$bin/examples/bench" --texts "$corpus" --n 2000
    echo
    "$bin/examples/bench" --texts "$corpus" --n 2000 --sessions "$(nproc)" --intra-threads 1
  } | tee "$out/embedder.md"
}

run_build() {
  log "full-corpus build: $corpus ${SIMQ_BUILD_FLAGS:-}"
  # shellcheck disable=SC2086
  "$bin/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --force ${SIMQ_BUILD_FLAGS:-} 2>&1 | grep -v '^\s*$' | tee "$out/build.txt"
}

run_recall() {
  local dg
  dg="$(tail -n1 "$out/build.txt")"
  [ -d "$dg" ] || die "no built dg in $out/build.txt: run scripts/bench.sh build first"
  log "recall@10 on $dg"
  "$bin/simq-indexer" eval "$dg" --queries 1000 --nprobe 64,128,192,256,384,512,576,640,768 | tee "$out/recall.md"
}

# The best answered rate of simq's closed-loop sweep (not the cache-hit runs) in RESULTS.
best_closed_loop() {
  python3 -c 'import json,sys; print(max(r["throughput"] for r in map(json.loads, open(sys.argv[1])) if r.get("phase") == "closed" and r.get("system") == "simq"))' "$1"
}

# serve: settings SIMQ_PORT (8080), SIMQ_BENCH_SECONDS per measurement (10),
# SIMQ_BENCH_OVERLOAD_SECS (60), SIMQ_BENCH_CONNECTIONS ("1 2 4 8 16 32 64").
run_serve() {
  local port="${SIMQ_PORT:-8080}" secs="${SIMQ_BENCH_SECONDS:-10}" over_secs="${SIMQ_BENCH_OVERLOAD_SECS:-60}"
  local peer_port=8091 venv="$SIMQ_CACHE/bench-venv" serve="$out/serve" status dg
  status="$(curl -fsS "http://127.0.0.1:$port/v1/status" 2>/dev/null)" ||
    die "no simq balancer answers on 127.0.0.1:$port: start the stack with scripts/up.sh first"
  dg="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["active"]["dg"])' <<<"$status")"
  local dg_dir="$SIMQ_CACHE/dgs/$dg"
  [ -d "$dg_dir" ] || die "the active dg $dg has no directory $dg_dir"
  mkdir -p "$serve"
  cargo build --release --locked --quiet -p simq-balancer --examples

  local req="$SIMQ_ROOT/scripts/bench/requirements.txt" stamp
  stamp="$(sha256sum "$req" | cut -c1-16)"
  if [ "$(cat "$venv/.simq-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "bench: Python venv for the peer ($venv, once)"
    python3 -m venv "$venv" || die "python3 -m venv failed: install Debian's python3-venv"
    "$venv/bin/pip" install -q -r "$req" || die "pip could not install $req: is PyPI reachable?"
    echo "$stamp" >"$venv/.simq-stamp"
  fi
  local export_dir="$out/export/$dg"
  [ -s "$export_dir/texts.txt" ] || "$bin/simq-indexer" export "$dg_dir" --out "$export_dir"
  local queries="$out/queries.txt" long="$out/long-queries.txt"
  if [ ! -s "$queries" ]; then
    log "bench: 150000 unique perturbed queries (seed 7)"
    python3 "$SIMQ_ROOT/scripts/bench/queries.py" "$corpus" --n 150000 --seed 7 >"$queries"
    # Long queries for the overload: four perturbed questions in one.
    paste -d' ' - - - - <"$queries" >"$long"
  fi

  log "bench: starting the peer on 127.0.0.1:$peer_port"
  "$venv/bin/python" "$SIMQ_ROOT/scripts/bench/peer.py" --export "$export_dir" --model-dir "$SIMQ_MODEL_DIR" \
    --port "$peer_port" --nlist 1024 --nprobe 16 >"$serve/peer.log" 2>&1 &
  peer_pid=$!
  # (|| true: under set -e a failing command in the trap would turn success into exit 1.)
  trap 'kill "$peer_pid" 2>/dev/null || true; wait "$peer_pid" 2>/dev/null || true' EXIT
  local deadline=$((SECONDS + 180))
  until curl -fsS "http://127.0.0.1:$peer_port/health" >/dev/null 2>&1; do
    kill -0 "$peer_pid" 2>/dev/null || { cat "$serve/peer.log" >&2; die "the peer did not start (log above)"; }
    [ $SECONDS -lt $deadline ] || die "the peer did not answer within 180 s"
    sleep 1
  done

  # Each run goes on where the last one stopped (serve-next, long-next): the balancers'
  # answer caches still hold the queries of an earlier run on the same stack.
  local results="$serve/results.jsonl" next
  next="$(cat "$out/serve-next" 2>/dev/null || echo 0)"
  [ "$next" -lt 100000 ] 2>/dev/null || next=0
  : >"$results"
  tag() { python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' "$1"; }
  load() { # load SYSTEM PHASE EXTRA_JSON LOADGEN_ARGS...: one measurement, appended to results
    local system=$1 phase=$2 extra=$3 url line
    shift 3
    url="http://127.0.0.1:$port/v1/query"
    [ "$system" = peer ] && url="http://127.0.0.1:$peer_port/v1/query"
    line="$("$bin/examples/loadgen" --url "$url" --queries "$queries" --start "$next" "$@")" || die "loadgen failed"
    next="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["next"])' "$line")"
    echo "$line" | tag "{\"system\": \"$system\", \"phase\": \"$phase\"$extra}" | tee -a "$results" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("[bench]", r["system"], r["phase"], "connections", r.get("connections"), "rate", r.get("offered_rate"), "answered/s %.1f" % r["throughput"], "p50", r["p50_ms"], "p99", r["p99_ms"], "failed", r["failed"], "degraded", r["degraded"])' >&2
  }

  python3 - "$dg_dir" "$(git -C "$SIMQ_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" >>"$results" <<'PY'
import json, os, sys, datetime
m = json.load(open(os.path.join(sys.argv[1], "manifest.json")))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
print(json.dumps({"phase": "machine", "cpus": os.cpu_count(), "cpu": cpu, "memory": f"{int(mem) // 1048576} GiB",
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": sys.argv[2],
                  "items": m["items"], "shards": len(m["shards"]), "clusters": len(m["clusters"]["shard_of"]),
                  "peer_nlist": 1024, "peer_nprobe": 16}))
PY
  log "bench: bound (bare ONNX Runtime on 1000 of the queries)"
  "$bin/examples/bench" --texts "$queries" --n 1000 --bound-only | tag '{"phase": "bound"}' | tee -a "$results" >&2

  # What one gRPC hop costs before any work (Info), back to back and after the service
  # idled 1 to 20 ms; between the stages of a query it idles about 5 ms
  # (balancer/examples/grpc_rtt.rs).
  log "bench: one gRPC hop to a shard and an embedder, back to back and after 1-20 ms idle"
  local kind service addr idle
  for kind in shard embedder; do
    service="simq-$kind"
    addr="$(consul_curl -fsS "http://127.0.0.1:8500/v1/health/service/$service?passing" |
      python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["Service"]; print("http://%s:%s" % (s["Address"], s["Port"]))')" ||
      die "no passing $service in Consul"
    for idle in 0 1000 2000 5000 20000; do
      "$bin/examples/grpc_rtt" --kind "$kind" --addr "$addr" --calls 1000 --idle-us "$idle" --json |
        tag '{"phase": "hop"}' | tee -a "$results" >&2
    done
  done

  log "bench: closed loop"
  local c
  for c in ${SIMQ_BENCH_CONNECTIONS:-1 2 4 8 16 32 64}; do
    if [ "$c" = 8 ]; then
      load simq closed "" --connections "$c" --seconds "$secs" --record "$serve/simq-records.jsonl"
      load peer closed "" --connections "$c" --seconds "$secs" --record "$serve/peer-records.jsonl"
    elif [ "$c" = 1 ]; then
      # One query at a time: where its time goes, from the services' own metrics.
      python3 "$SIMQ_ROOT/scripts/bench/stages.py" >"$serve/stages-before.json"
      load simq closed "" --connections "$c" --seconds "$secs"
      python3 "$SIMQ_ROOT/scripts/bench/stages.py" >"$serve/stages-after.json"
      python3 "$SIMQ_ROOT/scripts/bench/stages.py" --diff "$serve/stages-before.json" "$serve/stages-after.json" |
        tag '{"phase": "stages", "connections": 1}' | tee -a "$results" >&2
      load peer closed "" --connections "$c" --seconds "$secs"
    else
      load simq closed "" --connections "$c" --seconds "$secs"
      load peer closed "" --connections "$c" --seconds "$secs"
    fi
  done
  # Clients that resend at once after a refusal (wrk, most HTTP clients and worker
  # pools): nothing may be refused while the wait a query can expect fits its deadline.
  log "bench: closed loop, clients that resend at once after a 503"
  for c in ${SIMQ_BENCH_RESEND_CONNECTIONS:-8 32 64 128}; do
    load simq closed_resend "" --connections "$c" --seconds "$secs" --ignore-retry-after
    load peer closed_resend "" --connections "$c" --seconds "$secs" --ignore-retry-after
  done
  # Unloaded latency, simq and the peer in alternating short runs, so that both meet the
  # same machine (its speed drifts by 10-20 % within minutes on a shared VM).
  local round
  for round in $(seq 1 "${SIMQ_BENCH_UNLOADED_ROUNDS:-6}"); do
    load simq unloaded ", \"round\": $round" --connections 1 --seconds 5
    load peer unloaded ", \"round\": $round" --connections 1 --seconds 5
  done
  # Where the CPU goes at saturation: each program's share of the machine.
  python3 "$SIMQ_ROOT/scripts/bench/cpu.py" >"$serve/cpu-before.json"
  load simq cpu "" --connections 32 --seconds "$secs"
  python3 "$SIMQ_ROOT/scripts/bench/cpu.py" >"$serve/cpu-after.json"
  python3 "$SIMQ_ROOT/scripts/bench/cpu.py" --diff "$serve/cpu-before.json" "$serve/cpu-after.json" "$secs" |
    tag '{"phase": "cpu_share"}' | tee -a "$results" >&2
  local best
  best="$(best_closed_loop "$results")"
  log "bench: open loop at shares of simq's measured capacity ($best/s)"
  local share rate
  for share in 0.25 0.5 0.75 0.9 1.1; do
    rate="$(python3 -c "print(round($best * $share, 1))")"
    load simq open ", \"share\": $share" --rate "$rate" --seconds "$secs"
    load peer open ", \"share\": $share" --rate "$rate" --seconds "$secs"
  done
  log "bench: cache hits (16 connections repeating 200 queries)"
  # Each balancer keeps its own answer cache and the kernel spreads connections over the
  # balancers, so the warm-up repeats the 200 queries on the measured 16 connections long
  # enough for every balancer to have seen each one (a warm-up of one pass left about half
  # of them to miss, at ~10 ms each, inside the measured run).
  local warm_start=$next
  load simq cache_warm "" --connections 16 --repeat 200 --max 100000 --seconds 5
  next=$warm_start
  load simq cache ", \"repeat\": 200" --connections 16 --repeat 200 --seconds 5
  next=$((warm_start + 200))
  log "bench: recall@10 against exact search"
  "$venv/bin/python" "$SIMQ_ROOT/scripts/bench/recall.py" --export "$export_dir" --model-dir "$SIMQ_MODEL_DIR" \
    "$serve/simq-records.jsonl" "$serve/peer-records.jsonl" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"phase": "recall", "simq": r["simq-records.jsonl"]["recall"], "peer": r["peer-records.jsonl"]["recall"], "queries": r["simq-records.jsonl"]["queries"]}))' |
    tee -a "$results" >&2

  kill "$peer_pid" 2>/dev/null; wait "$peer_pid" 2>/dev/null || true
  log "bench: overload: 200 connections of long unique queries for $over_secs s, twice"
  local q_saved="$queries" n_saved=$next quarter long_next
  quarter=$(($(wc -l <"$long") / 4))
  long_next="$(cat "$out/long-next" 2>/dev/null || echo 0)"
  [ "$long_next" -lt $((quarter * 3)) ] 2>/dev/null || long_next=0
  # Clients that wait the Retry-After of a refusal (as well-behaved HTTP clients do), then
  # clients that resend at once (the worst case: refusals themselves load the machine).
  # Each run wraps within its own quarter of the long queries (the next two quarters at
  # each bench run) and never resends an answered one, so every accepted query misses the
  # answer cache.
  queries="$long" next=$long_next
  load simq overload "" --connections 200 --seconds "$over_secs" --timeout 5 --max 2000000 \
    --end "$((long_next + quarter))"
  next=$((long_next + quarter))
  load simq overload_hostile "" --connections 200 --seconds "$over_secs" --timeout 5 --max 2000000 --ignore-retry-after \
    --end "$((long_next + quarter * 2))"
  echo "$(((long_next + quarter * 2) % (quarter * 4)))" >"$out/long-next"
  queries="$q_saved" next=$n_saved
  sleep 5
  local queued
  # Every embedder's queue, from its /health (found through Consul).
  queued="$(python3 - <<'PY'
import json, urllib.request
entries = json.load(urllib.request.urlopen("http://127.0.0.1:8500/v1/health/service/simq-embedder"))
out = []
for e in entries:
    s = e["Service"]
    url = f"http://{s['Address']}:{s['Meta'].get('metrics_port')}/health"
    try:
        out.append(str(json.load(urllib.request.urlopen(url, timeout=2)).get("queued_texts")))
    except Exception as err:
        out.append(f"? ({err})")
print("/".join(out) or "none")
PY
)"
  load simq after_overload ", \"after_s\": 5, \"queues\": \"$queued queued texts\"" --connections 8 --seconds 5
  echo "$next" >"$out/serve-next"

  "$venv/bin/python" "$SIMQ_ROOT/scripts/bench/report.py" "$results" --md "$SIMQ_ROOT/BENCHMARKS.md" \
    --plot "$SIMQ_ROOT/bench-latency.png" --command "scripts/bench.sh serve"
  log "bench: wrote BENCHMARKS.md and bench-latency.png (raw results: $results)"
}

# rollout: with the up.sh stack and serve's results: a rollout of another full-corpus dg
# and the rollback to the active one, each under open-loop unique-query load at half of
# the capacity serve measured (SIMQ_BENCH_ROLLOUT_SHARE, 0.5); counts failed and degraded.
# under_load STEP COMMAND...: COMMAND under open-loop load (every other query from a client
# that sends it again at once after a 503); one result line appended to $results. Reads the
# caller's locals (bash scopes them dynamically): port, rate, share, best, queries, next,
# results.
under_load() {
  local step=$1 pid started took line
  shift
  "$bin/examples/loadgen" --queries "$queries" --start "$next" --rate "$rate" --seconds 1800 --max 1000000 --impatient 10 \
    --timeout 5 --url "http://127.0.0.1:$port/v1/query" --timeline "$out/rollout-$step-timeline.jsonl" >"$out/rollout-load.json" &
  pid=$!
  python3 "$SIMQ_ROOT/scripts/bench/cpu.py" >"$out/rollout-cpu-before.json"
  sleep 5
  started=$SECONDS
  log "bench: $step under $rate unique queries/s ($share of $best/s)"
  "$@" >"$out/rollout-$step.log" 2>&1 || { kill -TERM "$pid"; wait "$pid"; cat "$out/rollout-$step.log" >&2; die "$step failed (log above)"; }
  took=$((SECONDS - started))
  sleep 5
  python3 "$SIMQ_ROOT/scripts/bench/cpu.py" >"$out/rollout-cpu-after.json"
  local cpu
  # Each program's share of the machine over the step and the 10 s around it (processes
  # that ended during it, such as the old shards, are missed).
  cpu="$(python3 "$SIMQ_ROOT/scripts/bench/cpu.py" --diff "$out/rollout-cpu-before.json" "$out/rollout-cpu-after.json" "$((took + 10))")"
  kill -TERM "$pid"
  wait "$pid" || die "loadgen failed"
  line="$(cat "$out/rollout-load.json")"
  next="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["next"])' "$line")"
  echo "$next" >"$out/rollout-next"
  echo "$line" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r.update(json.loads(sys.argv[1])); print(json.dumps(r))' \
    "{\"system\": \"simq\", \"phase\": \"rollout\", \"step\": \"$step\", \"step_s\": $took, \"share\": $share, \"cpu\": $cpu}" |
    tee -a "$results" >&2
}

run_rollout() {
  local port="${SIMQ_PORT:-8080}" results="$out/serve/results.jsonl" share="${SIMQ_BENCH_ROLLOUT_SHARE:-0.5}"
  local status active best rate other queries="$out/rollout-queries.txt" next
  # Each run goes on where the last one stopped: the balancers' answer caches still hold
  # the queries of an earlier run on the same stack, and a cache hit proves nothing here.
  next="$(cat "$out/rollout-next" 2>/dev/null || echo 0)"
  [ "$next" -lt 90000 ] 2>/dev/null || next=0
  [ -s "$results" ] || die "run scripts/bench.sh serve first (the rollout runs at a share of its measured capacity)"
  status="$(curl -fsS "http://127.0.0.1:$port/v1/status" 2>/dev/null)" ||
    die "no simq balancer answers on 127.0.0.1:$port: start the stack with scripts/up.sh first"
  active="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["active"]["dg"])' <<<"$status")"
  cargo build --release --locked --quiet -p simq-balancer --examples
  best="$(best_closed_loop "$results")"
  rate="$(python3 -c "print(round($best * $share, 1))")"
  [ -s "$queries" ] || python3 "$SIMQ_ROOT/scripts/bench/queries.py" "$corpus" --n 100000 --seed 8 >"$queries"
  # Another dg of the same corpus: 4000 fine clusters instead of the default 4096.
  log "bench: rollout: building a second full-corpus dg (4000 clusters)"
  other="$("$bin/simq-indexer" build "$corpus" --out "$SIMQ_CACHE/dgs" --clusters 4000)"
  [ "$(basename "$other")" != "$active" ] || die "the second dg equals the active one ($active)"
  "$bin/simq-indexer" publish "$other" --blobs "$SIMQ_CACHE/blobs" >/dev/null
  sed -i '/"phase": "rollout"/d' "$results"
  under_load "rollout" "$bin/simq-indexer" rollout "$(basename "$other")"
  under_load "rollback" "$bin/simq-indexer" rollback
  local venv="$SIMQ_CACHE/bench-venv"
  "$venv/bin/python" "$SIMQ_ROOT/scripts/bench/report.py" "$results" --md "$SIMQ_ROOT/BENCHMARKS.md" \
    --plot "$SIMQ_ROOT/bench-latency.png" --command "scripts/bench.sh serve && scripts/bench.sh rollout && scripts/bench.sh scale"
  log "bench: rollout rows added to BENCHMARKS.md"
}

run_scale() {
  local results="$out/serve/results.jsonl" venv="$SIMQ_CACHE/bench-venv" n shards file line
  [ -s "$results" ] || die "run scripts/bench.sh serve first (the scale rows join its results)"
  # Reuse the cached embeddings of the full corpus; the subsets' are kept beside them.
  mkdir -p "$out/scale/dgs/.embeddings"
  local cached
  for cached in "$SIMQ_CACHE"/dgs/.embeddings/*.f32; do
    [ -e "$cached" ] && ln -sf "$cached" "$out/scale/dgs/.embeddings/"
  done
  sed -i '/"phase": "scale"/d' "$results"
  for n in 10000 50000 all; do
    file="$corpus"
    if [ "$n" != all ]; then
      file="$out/scale/questions-$n.txt"
      head -n "$n" "$corpus" >"$file"
    fi
    for shards in 2 4 8 16; do
      [ "$n" = all ] || [ "$shards" = 2 ] || continue
      log "bench: scale: $n questions, $shards shards"
      "$bin/simq-indexer" build "$file" --out "$out/scale/dgs" --shards "$shards" --force >"$out/scale/dir" 2>"$out/scale/build.log"
      "$bin/simq-indexer" eval "$(cat "$out/scale/dir")" --queries 500 --nprobe 576 --json "$out/scale/eval.json" >/dev/null
      line="$(python3 - "$out/scale/build.log" "$out/scale/eval.json" "$(cat "$out/scale/dir")" "$shards" <<'PY'
import json, re, sys
log = open(sys.argv[1]).read()
m = re.search(r"time: total ([0-9.]+) s = embed ([0-9.]+) s .* k-means ([0-9.]+) s \+ index ([0-9.]+) s", log)
row = json.load(open(sys.argv[2]))[0]
manifest = json.load(open(sys.argv[3] + "/manifest.json"))
print(json.dumps({"phase": "scale", "items": manifest["items"], "shards": int(sys.argv[4]),
                  "clusters": len(manifest["clusters"]["shard_of"]),
                  "build_s": float(m.group(3)) + float(m.group(4)), "embed_s": float(m.group(2)),
                  "scanned": f"{row['scanned'] * 100:.1f} %", "recall": round(row["recall"], 4),
                  "mean_ms": round(row["mean_ms"], 2)}))
PY
)"
      echo "$line" | tee -a "$results" >&2
    done
  done
  rm -rf "$out/scale/dgs"/dg-*
  "$venv/bin/python" "$SIMQ_ROOT/scripts/bench/report.py" "$results" --md "$SIMQ_ROOT/BENCHMARKS.md" \
    --plot "$SIMQ_ROOT/bench-latency.png" --command "scripts/bench.sh serve && scripts/bench.sh rollout && scripts/bench.sh scale"
  log "bench: scale rows added to BENCHMARKS.md"
}

# nodes: what the 3-node cluster costs against the single node, on the same machine: the
# full-corpus dg served by the scripts/up.sh layout (one node: 2 balancers, 2 embedders of
# which one takes the calls, 2 shards) and by scripts/deploy.sh --nodes (3 nodes: a
# balancer and an embedder each, 2 shards x 2 replicas apart), one after the other, with the
# same unique queries and load generator: 1 connection (unloaded latency), 16 and 32
# connections closed loop (throughput), SIMQ_BENCH_SECONDS (10) each. Starts and stops
# both stacks; refuses when a cluster runs. Writes BENCHMARKS-NODES.md.
run_nodes() {
  local secs="${SIMQ_BENCH_SECONDS:-10}" results="$out/nodes.jsonl" queries="$out/queries.txt" next=0
  if "$SIMQ_ROOT/scripts/cluster.sh" status >/dev/null 2>&1 || ip netns list 2>/dev/null | grep simq- >/dev/null; then
    die "a simq cluster runs: stop it first (scripts/down.sh, scripts/nodes.sh stop)"
  fi
  cargo build --release --locked --quiet -p simq-balancer --examples
  if [ ! -s "$queries" ]; then
    log "bench: 150000 unique perturbed queries (seed 7)"
    python3 "$SIMQ_ROOT/scripts/bench/queries.py" "$corpus" --n 150000 --seed 7 >"$queries"
  fi
  : >"$results"
  measure() { # measure STACK CONNECTIONS URL...: one closed-loop run, appended to results
    local stack=$1 conns=$2 line u urls=()
    shift 2
    for u in "$@"; do urls+=(--url "$u"); done
    line="$("$bin/examples/loadgen" --queries "$queries" --start "$next" --connections "$conns" --seconds "$secs" "${urls[@]}")" ||
      die "loadgen failed against $stack"
    next="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["next"])' "$line")"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(stack=sys.argv[2], connections=int(sys.argv[3])); print(json.dumps(r))' \
      "$line" "$stack" "$conns" | tee -a "$results" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("[bench]", r["stack"], "connections", r["connections"], "answered/s %.1f" % r["throughput"], "p50", r["p50_ms"], "p99", r["p99_ms"], "failed", r["failed"], "degraded", r["degraded"])' >&2
  }
  sweep() { # sweep STACK URL...: a 3 s warm-up (discarded), then 1, 16 and 32 connections
    local stack=$1 c u warm=()
    shift
    for u in "$@"; do warm+=(--url "$u"); done
    "$bin/examples/loadgen" --queries "$queries" --start "$next" --connections 4 --seconds 3 "${warm[@]}" >/dev/null || true
    next=$((next + 2000))
    for c in 1 16 32; do measure "$stack" "$c" "$@"; done
  }
  # What stops the stack that runs, for the EXIT trap (global: the trap runs after this
  # function's locals are gone).
  BENCH_STOP_STACK=""
  trap '[ -z "$BENCH_STOP_STACK" ] || $BENCH_STOP_STACK >/dev/null 2>&1 || true' EXIT

  log "bench: nodes: the single node (scripts/cluster.sh start, scripts/deploy.sh)"
  BENCH_STOP_STACK="$SIMQ_ROOT/scripts/down.sh"
  "$SIMQ_ROOT/scripts/cluster.sh" start >"$out/nodes-single.log" 2>&1 || die "cluster.sh start failed ($out/nodes-single.log)"
  SIMQ_CORPUS="$corpus" "$SIMQ_ROOT/scripts/deploy.sh" >>"$out/nodes-single.log" 2>&1 || die "deploy.sh failed ($out/nodes-single.log)"
  sweep "one node" "http://127.0.0.1:${SIMQ_PORT:-8080}/v1/query"
  "$SIMQ_ROOT/scripts/down.sh" >/dev/null 2>&1
  BENCH_STOP_STACK=""

  log "bench: nodes: three nodes (scripts/nodes.sh start --nodes 3, scripts/deploy.sh --nodes)"
  BENCH_STOP_STACK="$SIMQ_ROOT/scripts/nodes.sh stop"
  "$SIMQ_ROOT/scripts/nodes.sh" start --nodes 3 >"$out/nodes-three.log" 2>&1 || die "nodes.sh start failed ($out/nodes-three.log)"
  SIMQ_CORPUS="$corpus" "$SIMQ_ROOT/scripts/deploy.sh" --nodes >>"$out/nodes-three.log" 2>&1 || die "deploy.sh --nodes failed ($out/nodes-three.log)"
  local urls=() n a
  for n in 1 2 3; do
    a="$(source "$SIMQ_ROOT/scripts/nodes.sh" && load_state && node_addr "$n")"
    (source "$SIMQ_ROOT/scripts/nodes.sh" && node_address_ok "$a") || die "refusing: $a is not a node address of scripts/nodes.sh's cluster"
    urls+=("http://$a:${SIMQ_PORT:-8080}/v1/query")
  done
  sweep "three nodes" "${urls[@]}"
  "$SIMQ_ROOT/scripts/nodes.sh" stop >/dev/null 2>&1
  BENCH_STOP_STACK=""

  python3 - "$results" "$SIMQ_ROOT/BENCHMARKS-NODES.md" "$(git -C "$SIMQ_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$secs" <<'PY'
import datetime, json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["stack"], r["connections"]): r for r in rows}
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
out = ["# simq on one node and on three", "",
       "Reproduce: `scripts/bench.sh nodes` (starts and stops both stacks itself).", "",
       f"Machine: 2 cores, run {now}, simq {sys.argv[3]}; the full corpus dg; unique perturbed queries "
       f"(`scripts/bench/queries.py`, seed 7), closed loop, {sys.argv[4]} s per row, the same load generator "
       "(`balancer/examples/loadgen.rs`) on the same 2 cores. One node: the `scripts/up.sh` layout (2 balancers "
       "sharing 127.0.0.1:8080, 2 embedders of which one takes the calls, 2 shards). Three nodes: "
       "`scripts/deploy.sh --nodes` on `scripts/nodes.sh`'s namespaces (a balancer and an embedder per node, "
       "each balancer using its own node's embedder first, 2 shards x 2 replicas on distinct nodes, the load "
       "round robin over the 3 balancers). Same 2 cores for both: the nodes add hops, agents and 3 model "
       "sessions competing for the cores, not capacity.", "",
       "| connections | one node: answered/s | p50 ms | p99 ms | three nodes: answered/s | p50 ms | p99 ms | throughput ratio (3 / 1) |",
       "|---:|---:|---:|---:|---:|---:|---:|---:|"]
for c in (1, 16, 32):
    a, b = by.get(("one node", c)), by.get(("three nodes", c))
    if not a or not b:
        continue
    out.append(f"| {c} | {a['throughput']:.1f} | {a['p50_ms']:.2f} | {a['p99_ms']:.1f} | {b['throughput']:.1f} | "
               f"{b['p50_ms']:.2f} | {b['p99_ms']:.1f} | {b['throughput'] / a['throughput']:.2f} |")
# A 400 is the generated query's fault (e.g. over the 1,000-character limit), not the service's.
def failed(r):
    return r["failed"] - r["by_status"].get("400", 0)
bad = [(r["stack"], r["connections"], failed(r), r["degraded"]) for r in rows if failed(r) or r["degraded"]]
out += ["", "Failed or degraded answers: " + (", ".join(f"{s} at {c} connections: {f} failed, {d} degraded" for s, c, f, d in bad) if bad else "none in any row.")]
inputs = [(r["stack"], r["connections"], r["by_error"]) for r in rows if r["by_status"].get("400")]
if inputs:
    out += ["", "Refused as bad input (400, the generator's queries, not failures): " + ", ".join(f"{s} at {c} connections: {e}" for s, c, e in inputs) + "."]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
}

# update: an incremental build (build --base) of the full-corpus dg with 1 % new questions
# added and 0.1 % removed, against a full rebuild of the same corpus from scratch: time,
# bytes written, shard files re-addressed, recall@10 (BENCHMARKS-UPDATE.md).
run_update() {
  local dgs="$SIMQ_CACHE/dgs" work="$out/update" base
  base="$("$bin/simq-indexer" build "$corpus" --out "$dgs" --only-if-built)" ||
    die "no full-corpus dg in $dgs: run scripts/up.sh --wait first"
  rm -rf "$work"
  mkdir -p "$work/dgs"
  "$bin/simq-indexer" export "$base" --out "$work/base" >/dev/null 2>&1 || die "export of $base failed"
  log "bench: update: change set (1 % new perturbed questions, seed 9; every 1000th question removed)"
  python3 "$SIMQ_ROOT/scripts/bench/queries.py" "$corpus" --n 20000 --seed 9 >"$work/candidates.txt"
  python3 - "$work" <<'PY'
import sys
work = sys.argv[1]
base = open(f"{work}/base/texts.txt").read().splitlines()
known = {t.lower() for t in base}
add = []
for line in open(f"{work}/candidates.txt"):
    t = " ".join(line.split())
    if t and t.lower() not in known and len(t) <= 1000:
        known.add(t.lower())
        add.append(t)
    if len(add) == len(base) // 100:
        break
remove = base[::1000]
gone = set(remove)
open(f"{work}/add.txt", "w").write("\n".join(add) + "\n")
open(f"{work}/remove.txt", "w").write("\n".join(remove) + "\n")
open(f"{work}/full.txt", "w").write("\n".join([t for t in base if t not in gone] + add) + "\n")
print(f"[bench] base {len(base)} questions, {len(add)} added, {len(remove)} removed", file=sys.stderr)
PY
  local flags shards clusters started inc_s full_s inc full
  read -r shards clusters < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(len(m["shards"]), m["build"]["clusters_requested"])' "$base/manifest.json")
  flags="--shards $shards --clusters $clusters"
  log "bench: update: incremental build from $(basename "$base")"
  started=$SECONDS
  inc="$("$bin/simq-indexer" build --base "$base" --add "$work/add.txt" --remove "$work/remove.txt" --out "$work/dgs" 2>"$work/incremental.log")" ||
    { cat "$work/incremental.log" >&2; die "the incremental build failed (log above)"; }
  inc_s=$((SECONDS - started))
  log "bench: update: full rebuild of the same corpus ($flags; embeds every question)"
  started=$SECONDS
  # shellcheck disable=SC2086
  full="$("$bin/simq-indexer" build "$work/full.txt" --out "$work/dgs" $flags 2>"$work/full.log")" ||
    { cat "$work/full.log" >&2; die "the full rebuild failed (log above)"; }
  full_s=$((SECONDS - started))
  log "bench: update: recall@10 of both (1000 queries, nprobe 576)"
  "$bin/simq-indexer" eval "$inc" --queries 1000 --nprobe 576 --json "$work/eval-incremental.json" >/dev/null 2>&1
  "$bin/simq-indexer" eval "$full" --queries 1000 --nprobe 576 --json "$work/eval-full.json" >/dev/null 2>&1

  # Both rolled out on the running stack (it must serve the base), each under unique-query
  # load at half of serve's capacity, and rolled back.
  local port="${SIMQ_PORT:-8080}" status results="$work/rollout.jsonl" share="${SIMQ_BENCH_ROLLOUT_SHARE:-0.5}"
  local best rate next queries="$out/rollout-queries.txt" dg step before after
  : >"$results"
  : >"$work/replaced.txt"
  if status="$(curl -fsS "http://127.0.0.1:$port/v1/status" 2>/dev/null)"; then
    [ -s "$out/serve/results.jsonl" ] || die "run scripts/bench.sh serve first (the rollouts run at a share of its measured capacity)"
    [ "$(python3 -c 'import json,sys; print(json.load(sys.stdin)["active"]["dg"])' <<<"$status")" = "$(basename "$base")" ] ||
      die "the stack on 127.0.0.1:$port does not serve the base $(basename "$base")"
    cargo build --release --locked --quiet -p simq-balancer --examples
    best="$(best_closed_loop "$out/serve/results.jsonl")"
    rate="$(python3 -c "print(round($best * $share, 1))")"
    next="$(cat "$out/rollout-next" 2>/dev/null || echo 0)"
    [ "$next" -lt 90000 ] 2>/dev/null || next=0
    [ -s "$queries" ] || python3 "$SIMQ_ROOT/scripts/bench/queries.py" "$corpus" --n 100000 --seed 8 >"$queries"
    # Running shard instances (allocation ids), to count the ones a step replaced.
    shard_allocs() {
      curl -fsS "http://127.0.0.1:4646/v1/job/simq-shards/allocations" |
        python3 -c 'import json,sys; print(" ".join(sorted(a["ID"] for a in json.load(sys.stdin) if a["ClientStatus"] == "running" and a["DesiredStatus"] == "run")))'
    }
    for step in incremental full; do
      dg="$inc"
      [ "$step" = full ] && dg="$full"
      "$bin/simq-indexer" publish "$dg" --blobs "$SIMQ_CACHE/blobs" >"$work/publish-$step.log" 2>&1 ||
        { cat "$work/publish-$step.log" >&2; die "publish of $dg failed"; }
      before="$(shard_allocs)"
      under_load "$step-rollout" "$bin/simq-indexer" rollout "$(basename "$dg")"
      after="$(shard_allocs)"
      python3 -c 'import sys; b, a = set(sys.argv[2].split()), set(sys.argv[3].split()); print(sys.argv[1], len(b - a), len(b))' \
        "$step" "$before" "$after" >>"$work/replaced.txt"
      under_load "$step-rollback" "$bin/simq-indexer" rollback
    done
  else
    log "bench: update: no stack answers on 127.0.0.1:$port: the rollouts are not measured (scripts/up.sh --wait first)"
  fi
  python3 - "$work" "$base" "$inc" "$full" "$inc_s" "$full_s" "$SIMQ_ROOT/BENCHMARKS-UPDATE.md" \
    "$(git -C "$SIMQ_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import datetime, json, os, re, sys
work, base, inc, full, inc_s, full_s, md, commit = sys.argv[1:]
man = lambda d: json.load(open(os.path.join(d, "manifest.json")))
b, i, f = man(base), man(inc), man(full)
def size(d):
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
def readdressed(m):
    old = {s["shard"]: s["sha256"] for s in b["shards"]}
    return sum(1 for s in m["shards"] if old.get(s["shard"]) != s["sha256"])
def recall(path):
    rows = json.load(open(path))
    rows = rows if isinstance(rows, list) else rows.get("rows", rows)
    row = rows[-1]
    return row.get("recall") or row.get("recall_at_k")
log = open(f"{work}/incremental.log").read()
written = re.search(r"\(([\d.]+) MB written\)", log)
timing = re.search(r"time: total ([\d.]+) s = read base ([\d.]+) s \+ embed ([\d.]+) s \+ index ([\d.]+) s", log)
fit = re.search(r"fit: .*", log)
full_log = open(f"{work}/full.log").read()
full_t = re.search(r"time: total .*", full_log)
base_info = i["build"].get("base", {})
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
ri, rf = recall(f"{work}/eval-incremental.json"), recall(f"{work}/eval-full.json")
out = [
    "# Incremental builds: `build --base` against a full rebuild", "",
    f"Measured {now} at commit {commit} on this machine ({os.cpu_count()} cores) by `scripts/bench.sh update`.", "",
    f"Base: {b['dg']} ({b['items']:,} questions, {len(b['shards'])} shards, {len(b['clusters']['shard_of']):,} fine clusters). "
    f"Change: {base_info.get('added', '?'):,} new questions added (1 %: perturbed corpus questions the base does not hold, seed 9) "
    f"and {base_info.get('removed', '?'):,} removed (0.1 %: every 1000th). The full rebuild builds the same resulting corpus "
    "from scratch with the same options (embedding every question: a new corpus has no cached embeddings).", "",
    "| build | time s | bytes written MB | shard files re-addressed | recall@10 (1000 queries, nprobe 576) | dg |",
    "|---|---:|---:|---:|---:|---|",
    f"| incremental (`build --base`) | {inc_s} | {float(written.group(1)) if written else float('nan'):.1f} | {readdressed(i)} of {len(i['shards'])} | {ri:.4f} | {i['dg']} |",
    f"| full rebuild | {full_s} | {size(full) / 1e6:.1f} | {readdressed(f)} of {len(f['shards'])} | {rf:.4f} | {f['dg']} |",
    "",
    f"Incremental / full time: {int(inc_s) / max(int(full_s), 1):.2f}. Recall difference: {ri - rf:+.4f}.", "",
    f"Incremental phases: {timing.group(0) if timing else '?'}. Full rebuild: {full_t.group(0) if full_t else '?'}.", "",
    f"Drift guard: {fit.group(0) if fit else '?'}.", "",
]
rows = [json.loads(l) for l in open(f"{work}/rollout.jsonl") if l.strip()]
replaced = {l.split()[0]: l.split()[1:] for l in open(f"{work}/replaced.txt") if l.strip()}
if rows:
    out += ["## Rolled out under load", "",
            f"Each dg rolled out on the `scripts/up.sh` stack (which served the base) and rolled back, under open-loop unique queries at "
            f"{rows[0]['share']} of the capacity `scripts/bench.sh serve` measured ({rows[0]['offered_rate']} queries/s; every other query "
            "from a client that resends at once after a 503). Replaced: running shard instances of the base that the rollout stopped.", "",
            "| step | took s | answered | failed | degraded | p99 ms | shard instances replaced |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        kind = r["step"].split("-")[0]
        rep = replaced.get(kind, ["?", "?"]) if r["step"].endswith("rollout") else None
        out.append(f"| {r['step']} | {r['step_s']} | {r['ok']} | {r['failed']} {r.get('by_status', {})} | {r['degraded']} | "
                   f"{r['p99_ms']} | {f'{rep[0]} of {rep[1]}' if rep else '-'} |")
    out.append("")
open(md, "w").write("\n".join(out))
print("\n".join(out))
PY
  log "bench: wrote BENCHMARKS-UPDATE.md (work files in $work)"
}

case "${1:-all}" in
  embedder) run_embedder ;;
  build) run_build ;;
  recall) run_recall ;;
  serve) run_serve ;;
  scale) run_scale ;;
  rollout) run_rollout ;;
  nodes) run_nodes ;;
  update) run_update ;;
  all) run_embedder; run_build; run_recall ;;
  *) die "usage: scripts/bench.sh [embedder|build|recall|serve|scale|rollout|nodes|update|all]" ;;
esac
exit
}
