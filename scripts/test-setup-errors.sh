#!/usr/bin/env bash
# Proves that set-up stops with a message naming what is missing and how to provide it:
# no Go, an unreachable registry (PyPI, Go proxy), a file with the wrong sha256, a pinned
# version the registry no longer serves (the source check and a download), no corpus
# source left.
# Runs each case against a throw-away $SIMQ_CACHE; touches nothing else. scripts/test.sh runs it.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failures=0
last_out=""

# expect_failure NAME EXPECTED-SUBSTRING ENV... -- SCRIPT ARGS...: scripts/SCRIPT.sh must
# exit non-zero and say EXPECTED.
expect_failure() {
  local name=$1 expected=$2
  shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local out rc
  local script=$1
  shift
  out="$(env SIMQ_CACHE="$scratch/$name" "${envs[@]}" bash "$root/scripts/$script.sh" "$@" 2>&1)"
  rc=$?
  last_out=$out
  if [ $rc -ne 0 ] && grep -qF -- "$expected" <<<"$out"; then
    echo "ok: $name"
  else
    echo "FAIL: $name (exit $rc), expected a message containing: $expected"
    echo "$out" | tail -n 5 | sed 's/^/    /'
    failures=$((failures + 1))
  fi
}

# No Go on PATH: keep only what the script itself needs.
nogo="$scratch/nogo-bin"
mkdir -p "$nogo"
for c in bash env dirname cat grep head sha256sum cut mktemp mkdir date printf ls rm mv; do
  ln -s "$(command -v "$c")" "$nogo/$c"
done
expect_failure no-go "'go' is not installed. Install Go" PATH="$nogo" -- setup consul

# The Go module proxy unreachable (fresh module cache, so nothing is cached).
expect_failure go-proxy-unreachable "is the Go module proxy reachable" \
  GOPROXY=http://127.0.0.1:9 GOFLAGS=-mod=mod -- setup nomad

# PyPI unreachable.
expect_failure pypi-unreachable "could not download onnxruntime==1.31.1 from PyPI" \
  PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_FIND_LINKS= PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=2 -- setup ort

# A wheel with the right name but the wrong bytes inside.
mkdir -p "$scratch/wrong-sha256/downloads" "$scratch/wheel/onnxruntime/capi"
echo "not onnxruntime" >"$scratch/wheel/onnxruntime/capi/libonnxruntime.so.1.31.1"
(cd "$scratch/wheel" && python3 -c 'import zipfile,sys; z=zipfile.ZipFile(sys.argv[1],"w"); z.write("onnxruntime/capi/libonnxruntime.so.1.31.1"); z.close()' \
  "$scratch/wrong-sha256/downloads/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl")
expect_failure wrong-sha256 "sha256 mismatch" -- setup ort

# A pinned version PyPI no longer serves (bigbench 1.0.0, simq's corpus until 2026-12-06),
# and a crate version that never existed: the source check names each.
expect_failure check-names-missing-pins "NOT SERVED: pypi:bigbench==1.0.0: PyPI serves no bigbench 1.0.0" \
  SIMQ_EXTRA_PINS="pypi:bigbench==1.0.0 crate:serde@0.0.999" -- setup check
grep -qF "NOT SERVED: crate:serde@0.0.999: crates.io serves no serde 0.0.999" <<<"$last_out" ||
  { echo "FAIL: check-names-missing-pins does not name the crate"; failures=$((failures + 1)); }

# No corpus source left: the error names every source tried and what PyPI answered.
expect_failure corpus-sources-gone "bigbench==1.0.0: NOT SERVED: PyPI serves no bigbench 1.0.0 (versions served: 0.0.1)" \
  SIMQ_CORPUS_SOURCES="pyserini==0.0.999@00 bigbench==1.0.0@00" PIP_FIND_LINKS= -- corpus
grep -qF "pyserini==0.0.999: NOT SERVED: PyPI serves no pyserini 0.0.999" <<<"$last_out" ||
  { echo "FAIL: corpus-sources-gone does not name the first source"; failures=$((failures + 1)); }

[ $failures -eq 0 ] || { echo "$failures set-up error case(s) failed"; exit 1; }
