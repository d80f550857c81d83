# shellcheck shell=bash
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
# sha256 of libonnxruntime.so.$ORT_VERSION inside the manylinux x86_64 wheel.
ORT_LIB_SHA256="fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3"

SIMQ_BIN="$SIMQ_CACHE/bin"
CONSUL_BIN="$SIMQ_BIN/consul-$CONSUL_VERSION/consul"
NOMAD_BIN="$SIMQ_BIN/nomad-$NOMAD_VERSION/nomad"
PROMTOOL_BIN="$SIMQ_BIN/prometheus-$PROMETHEUS_VERSION/promtool"
PROMETHEUS_BIN="$SIMQ_BIN/prometheus-$PROMETHEUS_VERSION/prometheus"
ORT_LIB="$SIMQ_CACHE/ort/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION"
SIMQ_MODEL_DIR="${SIMQ_MODEL_DIR:-$SIMQ_CACHE/models/minilm-l6-v2-int8}"
SIMQ_CLUSTER_DIR="${SIMQ_CLUSTER_DIR:-$SIMQ_CACHE/cluster}"
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
