#!/usr/bin/env bash
# Secure mode, end to end on real agents: a cluster with Consul and Nomad ACLs on and
# default deny (SIMQ_ACL=1 scripts/cluster.sh start), balancers that require API keys,
# the stack deployed and a second dg rolled out with the least-privilege tokens of
# consul/acl/ and nomad/acl/ under unique-query load sent with an API key (0 failed), and
# what each token may not do checked against the real agents. scripts/test.sh runs it
# after the other integration tests, once their cluster is stopped; it stops its own.
#
# Needs: the debug build (cargo build --workspace --all-targets) and SIMQ_TEST_CORPUS.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${SIMQ_TEST_CORPUS:?set by scripts/test.sh (a sample of the real corpus)}"
bin="$CARGO_TARGET_DIR/debug"
port=18081
work="$(mktemp -d)"
failures=0

fail() { log "acl test FAILED: $*"; failures=$((failures + 1)); }
pass() { log "acl test ok: $*"; }

cleanup() {
  local rc=$?
  [ -z "${load_pid:-}" ] || kill -TERM "$load_pid" 2>/dev/null || true
  "$SIMQ_ROOT/scripts/cluster.sh" stop >/dev/null 2>&1 || true
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

if "$SIMQ_ROOT/scripts/cluster.sh" status >/dev/null 2>&1; then
  die "a cluster is running: the ACL test starts its own (stop it with scripts/down.sh)"
fi
SIMQ_ACL=1 "$SIMQ_ROOT/scripts/cluster.sh" start
acl_enabled || die "secure mode did not leave its tokens in $SIMQ_SECRETS"

# token_header TOKEN-FILE: put the token in $work/header (mode 600), so that it goes to
# curl as a header file, never on its command line.
token_header() { (umask 077 && printf 'X-Consul-Token: %s\n' "$(cat "$1")" >"$work/header"); }
# kv_status TOKEN-FILE METHOD KEY: the HTTP status of one KV call made with that token
# (empty file name: no token, the anonymous user).
kv_status() {
  local file=$1 method=$2 key=$3 header=()
  if [ -n "$file" ]; then
    token_header "$file"
    header=(-H @"$work/header")
  fi
  curl -s -o /dev/null -w '%{http_code}' "${header[@]}" -X "$method" --data-binary x "$CONSUL_HTTP_ADDR/v1/kv/$key"
}
expect() { # expect WHAT WANT GOT
  if [ "$2" = "$3" ]; then pass "$1 ($3)"; else fail "$1: expected HTTP $2, got $3"; fi
}

sed -n '1,600p' "$SIMQ_TEST_CORPUS" >"$work/a.txt"
sed -n '601,1200p' "$SIMQ_TEST_CORPUS" >"$work/b.txt"
sed -n '5001,7000p' "$SIMQ_TEST_CORPUS" >"$work/queries.txt"
deploy() { # deploy CORPUS: the dg now served
  SIMQ_BIN_DIR="$bin" SIMQ_CORPUS="$1" SIMQ_SHARDS=2 SIMQ_CLUSTERS=32 SIMQ_NPROBE=8 \
    SIMQ_BALANCERS=1 SIMQ_EMBEDDERS=1 SIMQ_PORT=$port SIMQ_API_KEYS=required "$SIMQ_ROOT/scripts/deploy.sh"
}

log "acl test: deploy dg A with the indexer's and the balancer's tokens, API keys required"
dg_a="$(deploy "$work/a.txt")" || die "deploy with least-privilege tokens failed"
pass "stack deployed and serving $dg_a with ACLs on"

# The whole secure mode at once: the load below sends an API key made with the indexer's
# Consul token.
(umask 077 && CONSUL_HTTP_TOKEN_FILE="$SIMQ_SECRETS/indexer.token" "$bin/simq-indexer" keys create \
  --label acl-load --rate 100 --burst 100 >"$work/key") || die "could not create the load's API key"
(umask 077 && printf 'Authorization: Bearer %s\n' "$(cat "$work/key")" >"$work/key-header")
query_status() { # query_status [CURL ARGS...]: the HTTP status of one query
  curl -s -o /dev/null -w '%{http_code}' "$@" -X POST "http://127.0.0.1:$port/v1/query" -d '{"query": "How long did the war last?"}'
}
keyed_ok() { [ "$(query_status -H @"$work/key-header")" = 200 ]; }
for _ in $(seq 1 40); do keyed_ok && break; sleep 0.25; done
expect "a query with the new API key is answered" 200 "$(query_status -H @"$work/key-header")"
expect "a query without an API key is refused" 401 "$(query_status)"

log "acl test: roll out dg B under 5 unique queries/s (each with the API key)"
"$bin/examples/loadgen" --url "http://127.0.0.1:$port/v1/query" --queries "$work/queries.txt" \
  --rate 5 --seconds 300 --max 2000 --timeout 5 --api-key-file "$work/key" >"$work/load.json" &
load_pid=$!
sleep 3
dg_b="$(deploy "$work/b.txt")" || die "rollout with least-privilege tokens failed"
sleep 3
kill -TERM "$load_pid"
wait "$load_pid" || fail "loadgen failed"
load_pid=""
read -r sent failed degraded < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["sent"], r["failed"], r["degraded"])' "$work/load.json")
log "acl test: rollout $dg_a -> $dg_b under load: $sent queries, $failed failed, $degraded degraded"
[ "$dg_a" != "$dg_b" ] || fail "the second deploy did not change the dg"
[ "$failed" = 0 ] && [ "$sent" -gt 0 ] || fail "$failed of $sent queries failed during the rollout"
answer="$(curl -fsS -H @"$work/key-header" -X POST "http://127.0.0.1:$port/v1/query" -d '{"query": "How long did the war last?"}')" ||
  fail "no answer after the rollout"
[[ "$answer" == *"\"dg\":\"$dg_b\""* ]] && pass "answers come from $dg_b" || fail "answer not from $dg_b: $answer"

S="$SIMQ_SECRETS"
expect "anonymous may not read the pointer" 403 "$(kv_status "" GET simq/active)"
expect "balancer token reads the pointer" 200 "$(kv_status "$S/balancer.token" GET simq/active)"
expect "balancer token may not write the pointer" 403 "$(kv_status "$S/balancer.token" PUT simq/active)"
expect "balancer token may not write an API key record" 403 "$(kv_status "$S/balancer.token" PUT simq/keys/00000000)"
expect "indexer token writes under simq/" 200 "$(kv_status "$S/indexer.token" PUT simq/acl-test)"
expect "indexer token may not write outside simq/" 403 "$(kv_status "$S/indexer.token" PUT other/acl-test)"
# Each service registered with a token of its own (Nomad workload identity -> Consul
# service identity), and such a token may register only its own service name.
workload_tokens="$(consul_curl -fsS "$CONSUL_HTTP_ADDR/v1/acl/tokens?authmethod=simq-nomad-workloads")"
identities="$(python3 -c 'import json,sys; print(" ".join(sorted({i["ServiceName"] for t in json.load(sys.stdin) for i in t.get("ServiceIdentities") or []})))' <<<"$workload_tokens")"
for service in simq-balancer simq-blobs simq-embedder simq-shard; do
  [[ " $identities " == *" $service "* ]] && pass "$service registered with its own workload identity token" ||
    fail "no workload identity token of $service (tokens of simq-nomad-workloads name: ${identities:-none})"
done
accessor="$(python3 -c 'import json,sys; print(next(t["AccessorID"] for t in json.load(sys.stdin) if any(i["ServiceName"] == "simq-shard" for i in t.get("ServiceIdentities") or [])))' <<<"$workload_tokens")" ||
  fail "no token of simq-shard to test"
consul_curl -fsS "$CONSUL_HTTP_ADDR/v1/acl/token/$accessor" | python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])' |
  (umask 077 && cat >"$work/shard.token")
register_status() { # register_status TOKEN-FILE NAME: HTTP status of a service registration
  token_header "$1"
  curl -s -o /dev/null -w '%{http_code}' -H @"$work/header" -X PUT \
    --data-binary "{\"Name\": \"$2\", \"ID\": \"acl-test-$2\", \"Port\": 1}" "$CONSUL_HTTP_ADDR/v1/agent/service/register"
}
expect "a shard's registration token may not register an embedder" 403 "$(register_status "$work/shard.token" simq-embedder)"
expect "a shard's registration token may not register a balancer" 403 "$(register_status "$work/shard.token" simq-balancer)"
expect "a shard's registration token may not read KV" 403 "$(kv_status "$work/shard.token" GET simq/active)"
expect "a shard's registration token may not write a manifest" 403 "$(kv_status "$work/shard.token" PUT "simq/dg/$dg_b/manifest")"
expect "nomad agent token may not write simq/ KV" 403 "$(kv_status "$S/nomad-agent.token" PUT simq/active)"
expect "nomad agent token may not read manifests" 403 "$(kv_status "$S/nomad-agent.token" GET "simq/dg/$dg_b/manifest")"

# Nomad: simq's jobs run in the "simq" namespace, deployed and rolled out above with the
# deployer token; it may touch nothing else.
nomad_status() { # nomad_status TOKEN-FILE METHOD PATH [BODY]: the HTTP status of one call
  local file=$1 method=$2 path=$3 body=${4:-} header=() data=()
  if [ -n "$file" ]; then
    (umask 077 && printf 'X-Nomad-Token: %s\n' "$(cat "$file")" >"$work/nomad-header")
    header=(-H @"$work/nomad-header")
  fi
  [ -z "$body" ] || data=(--data-binary "$body")
  curl -s -o /dev/null -w '%{http_code}' "${header[@]}" "${data[@]}" -X "$method" "$NOMAD_ADDR$path"
}
D="$S/nomad-deployer.token"
other='{"Job": {"ID": "acl-other", "Name": "acl-other", "Namespace": "default", "Type": "batch", "Datacenters": ["*"],
  "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec", "Config": {"command": "/bin/true"}}]}]}}'
expect "the management token registers another job (namespace default)" 200 "$(nomad_status "$S/nomad-management.token" POST /v1/jobs "$other")"
expect "anonymous may not list simq's Nomad jobs" 403 "$(nomad_status "" GET '/v1/jobs?namespace=simq')"
expect "deployer token lists simq's jobs" 200 "$(nomad_status "$D" GET '/v1/jobs?namespace=simq')"
listed="$(curl -s -H @"$work/nomad-header" "$NOMAD_ADDR/v1/jobs?namespace=simq")"
for job in simq-blobs simq-embedder simq-shards simq-balancer; do
  [[ "$listed" == *"\"ID\":\"$job\""* ]] && pass "$job runs in the simq namespace" || fail "$job is not in the simq namespace: $listed"
done
expect "deployer token may not read a job of another namespace" 403 "$(nomad_status "$D" GET '/v1/job/acl-other?namespace=default')"
expect "deployer token may not stop a job of another namespace" 403 "$(nomad_status "$D" DELETE '/v1/job/acl-other?namespace=default')"
expect "deployer token may not register a job in another namespace" 403 "$(nomad_status "$D" POST '/v1/jobs?namespace=default' "$other")"
expect "deployer token may not read nodes" 403 "$(nomad_status "$D" GET /v1/nodes)"
expect "deployer token may not list ACL tokens" 403 "$(nomad_status "$D" GET /v1/acl/tokens)"
if CONSUL_HTTP_TOKEN_FILE="$S/indexer.token" NOMAD_TOKEN_FILE="$D" NOMAD_NAMESPACE=simq "$bin/simq-indexer" status >"$work/status.out" 2>&1 &&
  grep -q "shards job runs: $dg_b" "$work/status.out"; then
  pass "simq-indexer status with the deployer token sees the shards job of $dg_b"
else
  fail "simq-indexer status with the deployer token: $(cat "$work/status.out")"
fi

# simq-indexer keys acts with the token it is given: the indexer's may, the balancer's not.
if key="$(CONSUL_HTTP_TOKEN_FILE="$S/indexer.token" "$bin/simq-indexer" keys create --label acl-test 2>"$work/keys.err")"; then
  pass "indexer token creates an API key (${key:0:13}...)"
else
  fail "indexer token could not create an API key: $(cat "$work/keys.err")"
fi
if CONSUL_HTTP_TOKEN_FILE="$S/balancer.token" "$bin/simq-indexer" keys create --label acl-test >/dev/null 2>"$work/keys.err"; then
  fail "the balancer token created an API key"
else
  grep -q "403" "$work/keys.err" && pass "balancer token may not create an API key (403)" ||
    fail "balancer token refused without a 403: $(cat "$work/keys.err")"
fi

# No token in anything simq printed: the agents' and the tasks' logs. (Left out: the
# secrets directory, and Consul's state directory, where Consul keeps its tokens.)
leaked=0
# found SECRET: files under the cluster directory holding SECRET, those two left out.
found() {
  grep -rlF --exclude-dir=secrets "$1" "$SIMQ_CLUSTER_DIR" 2>/dev/null | grep -v "^$SIMQ_CLUSTER_DIR/consul/data/" || true
}
for t in "$S"/*.token; do
  files="$(found "$(cat "$t")")"
  if [ -n "$files" ]; then
    fail "the $(basename "$t") secret appears in a log under $SIMQ_CLUSTER_DIR: $(head -n 3 <<<"$files" | tr '\n' ' ')"
    leaked=1
  fi
done
if [ -n "$(found "$(cat "$work/key")")" ]; then
  fail "the load's API key appears in a log under $SIMQ_CLUSTER_DIR"
  leaked=1
fi
[ $leaked = 1 ] || pass "no token and no API key in the logs under $SIMQ_CLUSTER_DIR"

[ $failures = 0 ] || die "$failures ACL checks failed"
log "acl test: all checks passed"
