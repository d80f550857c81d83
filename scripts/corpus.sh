#!/usr/bin/env bash
# Obtains simq's demo and benchmark corpus, about 120k English questions, once:
# downloads the PyPI source archive bigbench==1.0.0 (358 MB, sha256-checked), extracts the
# `target` questions of its natural_instructions question-generation subtasks (DROP,
# Quoref, ROPES, MultiRC, CosmosQA, QASC, MC-TACO, Winogrande; Apache-2.0 repo, each
# source under its own licence) and writes one question per line to
#   $SIMQ_CACHE/corpus/questions.txt
# Prints that path. A second run only prints it.
#
#   scripts/corpus.sh               the whole corpus
#   scripts/corpus.sh --sample N    also write questions-N.txt (every k-th line, N lines)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIGBENCH_SHA256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
out_dir="$SIMQ_CACHE/corpus"
corpus="$out_dir/questions.txt"

if [ ! -s "$corpus" ]; then
  archive="$SIMQ_CACHE/downloads/bigbench-1.0.0.tar.gz"
  if [ ! -f "$archive" ]; then
    mkdir -p "$SIMQ_CACHE/downloads"
    log "corpus: downloading bigbench==1.0.0 source archive from PyPI (358 MB, once)"
    pip_download "corpus: bigbench-1.0.0.tar.gz" 342 --no-deps --no-binary :all: -d "$SIMQ_CACHE/downloads" bigbench==1.0.0 ||
      [ -f "$archive" ] ||
      die "could not download bigbench==1.0.0 from PyPI (pip's output: $SIMQ_CACHE/downloads/pip.log): is the index reachable (pip config list; PIP_INDEX_URL)?"
  fi
  verify_sha256 "$archive" "$BIGBENCH_SHA256" "bigbench-1.0.0.tar.gz"
  mkdir -p "$out_dir"
  log "corpus: extracting questions"
  python3 - "$archive" "$corpus.tmp" <<'PY'
import json, re, sys, tarfile
archive, out = sys.argv[1], sys.argv[2]
pattern = re.compile(r"natural_instructions/subtask0[^/]*question_generation[^/]*/task\.json$")
seen, rows = set(), []
with tarfile.open(archive) as tar:
    for member in tar:
        if not pattern.search(member.name):
            continue
        task = json.load(tar.extractfile(member))
        for ex in task.get("examples", []):
            target = ex.get("target")
            for q in target if isinstance(target, list) else [target]:
                if not isinstance(q, str):
                    continue
                q = " ".join(q.split())
                if q and q not in seen:
                    seen.add(q)
                    rows.append(q)
with open(out, "w", encoding="utf-8") as f:
    for q in rows:
        f.write(q + "\n")
PY
  mv "$corpus.tmp" "$corpus"
  log "corpus: $(wc -l <"$corpus") questions in $corpus"
fi

if [ "${1:-}" = "--sample" ]; then
  n="${2:?--sample needs a line count}"
  sample="$out_dir/questions-$n.txt"
  if [ ! -s "$sample" ]; then
    total=$(wc -l <"$corpus")
    step=$(( total / n ))
    [ "$step" -ge 1 ] || step=1
    awk -v s="$step" -v n="$n" 'NR % s == 0 && c < n { print; c++ }' "$corpus" >"$sample"
  fi
  echo "$sample"
else
  echo "$corpus"
fi
