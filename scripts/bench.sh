#!/usr/bin/env bash
# Benchmarks on the real corpus (numbers are written to $SIMQ_CACHE/bench/ and printed):
#   scripts/bench.sh embedder   embedder service vs the bare runtime (embedder/BENCH.md)
#   scripts/bench.sh build      full-corpus dg build: phase times, total vs embedding time
#   scripts/bench.sh recall     recall@10 table of the built dg (indexer/BENCH.md)
#   scripts/bench.sh            all three
# Extra build flags can be given in SIMQ_BUILD_FLAGS (e.g. "--shards 4 --n-trees 16").
# The build always runs (--force); embeddings are reused from $SIMQ_CACHE/dgs/.embeddings/
# when present, so delete that to time the embedding too.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$SIMQ_ROOT/scripts/setup.sh" >/dev/null
corpus="$("$SIMQ_ROOT/scripts/corpus.sh")"
export ORT_DYLIB_PATH="$ORT_LIB" SIMQ_MODEL_DIR
cd "$SIMQ_ROOT"
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
  "$bin/simq-indexer" eval "$dg" --queries 500 --nprobe 1,2,4 --search-k 0,5000,20000,40000 | tee "$out/recall.md"
}

case "${1:-all}" in
  embedder) run_embedder ;;
  build) run_build ;;
  recall) run_recall ;;
  all) run_embedder; run_build; run_recall ;;
  *) die "usage: scripts/bench.sh [embedder|build|recall|all]" ;;
esac
