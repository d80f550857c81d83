#!/usr/bin/env bash
# Starts and stops the local simq cluster: a single-server Consul agent and a Nomad dev
# agent, on loopback only. State, logs and pid files live in $SIMQ_CLUSTER_DIR
# (default ~/.cache/simq/cluster).
#
#   scripts/cluster.sh start    start both agents (Consul first) and wait until ready;
#                               with SIMQ_ACL=1, Consul ACLs on with default deny and one
#                               least-privilege token per consul/acl/ policy (see there)
#   scripts/cluster.sh start --nodes N
#                               a real N-node cluster (3 to 9) of network namespaces on
#                               this machine instead: scripts/nodes.sh start --nodes N
#   scripts/cluster.sh stop     stop every Nomad job, then Nomad, then Consul; no strays
#                               (and the N-node cluster, when one runs)
#   scripts/cluster.sh status   say what runs, with pids and addresses
#   scripts/cluster.sh restart-consul [DOWN_SECONDS]
#                               stop Consul, wait (default 10 s), start it again on the
#                               same state (KV, sessions, tokens): an outage as a real
#                               Consul server has one (the fault suite uses it)
#
# Consul keeps its state in $SIMQ_CLUSTER_DIR/consul/data while it runs and across
# restart-consul; `start` begins from an empty one and `stop` deletes it, as a dev agent
# (in memory) did.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONSUL_DIR="$SIMQ_CLUSTER_DIR/consul"
NOMAD_DIR="$SIMQ_CLUSTER_DIR/nomad"
READY_TIMEOUT=60


consul_ready() {
  # A leader is elected and the agent answers KV reads.
  [ -n "$(curl -fsS "$CONSUL_HTTP_ADDR/v1/status/leader" | tr -d '"')" ] &&
    consul_curl -fsS -o /dev/null "$CONSUL_HTTP_ADDR/v1/kv/?keys"
}

# Secure mode, before Consul starts: a fresh management token and the ACL config naming it.
prepare_acl() {
  rm -rf "$SIMQ_SECRETS"
  mkdir -p "$SIMQ_SECRETS" && chmod 700 "$SIMQ_SECRETS"
  local token
  token="$(cat /proc/sys/kernel/random/uuid)"
  (
    umask 077
    printf '%s\n' "$token" >"$SIMQ_SECRETS/consul-management.token"
    printf 'X-Consul-Token: %s\n' "$token" >"$SIMQ_SECRETS/management.header"
    cat >"$SIMQ_SECRETS/consul-acl.hcl" <<HCL
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
  tokens {
    initial_management = "$token"
  }
}
HCL
  )
}

WORKLOAD_AUTH_METHOD=simq-nomad-workloads

# Secure mode: Consul trusts the workload identities Nomad signs (checked against Nomad's
# public keys at /.well-known/jwks.json: Consul fetches them when the method is made, so
# this runs once Nomad answers), and a service of a simq job that logs in gets a token
# that may register that service name only (a Consul service identity): a shard cannot
# register itself as an embedder or a balancer.
make_workload_auth() {
  local method rule
  method="$(python3 -c 'import json,sys; print(json.dumps({"Name": sys.argv[1], "Type": "jwt", "Description": "services of simq jobs, by Nomad workload identity",
    "Config": {"JWKSURL": sys.argv[2] + "/.well-known/jwks.json", "JWTSupportedAlgs": ["RS256"], "BoundAudiences": ["consul.io"],
               "ClaimMappings": {"nomad_namespace": "nomad_namespace", "nomad_job_id": "nomad_job_id", "nomad_service": "nomad_service"}}}))' \
    "$WORKLOAD_AUTH_METHOD" "$NOMAD_ADDR")"
  consul_curl -fsS -X PUT --data-binary "$method" "$CONSUL_HTTP_ADDR/v1/acl/auth-method" >/dev/null ||
    die "consul: could not create the auth method $WORKLOAD_AUTH_METHOD"
  # Only services of jobs in Nomad's simq namespace, only under their own name.
  rule="$(python3 -c 'import json,sys; print(json.dumps({"AuthMethod": sys.argv[1], "Description": "a simq service registers itself",
    "BindType": "service", "BindName": "${value.nomad_service}",
    "Selector": "value.nomad_namespace == \"simq\" and value.nomad_service matches \"^simq-\""}))' "$WORKLOAD_AUTH_METHOD")"
  consul_curl -fsS -X PUT --data-binary "$rule" "$CONSUL_HTTP_ADDR/v1/acl/binding-rule" >/dev/null ||
    die "consul: could not create the binding rule of $WORKLOAD_AUTH_METHOD"
}

# Secure mode, once Consul is ready: one policy and one token per consul/acl/*.hcl, the
# Consul agent's own token, and the Nomad agent's Consul token in its config.
make_acl_tokens() {
  local p json secret
  for p in balancer indexer nomad-agent consul-agent; do
    json="$(python3 -c 'import json,sys; print(json.dumps({"Name": "simq-" + sys.argv[1], "Rules": open(sys.argv[2]).read()}))' "$p" "$SIMQ_ROOT/consul/acl/$p.hcl")"
    consul_curl -fsS -X PUT --data-binary "$json" "$CONSUL_HTTP_ADDR/v1/acl/policy" >/dev/null ||
      die "consul: could not create policy simq-$p"
    secret="$(consul_curl -fsS -X PUT --data-binary "{\"Description\": \"simq $p\", \"Policies\": [{\"Name\": \"simq-$p\"}]}" "$CONSUL_HTTP_ADDR/v1/acl/token" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')" || die "consul: could not create the $p token"
    (umask 077 && printf '%s\n' "$secret" >"$SIMQ_SECRETS/$p.token")
  done
  # (Tokens go through stdin, never a command line that ps would show.)
  printf '{"Token": "%s"}' "$(cat "$SIMQ_SECRETS/consul-agent.token")" |
    consul_curl -fsS -X PUT --data-binary @- "$CONSUL_HTTP_ADDR/v1/agent/token/agent" >/dev/null ||
    die "consul: could not set the agent token"
  # The Nomad agent's own token; each service is registered with a token of its own, got
  # by logging in to Consul with the service's Nomad workload identity (aud consul.io).
  (
    umask 077
    cat >"$SIMQ_SECRETS/nomad-consul.hcl" <<HCL
consul {
  token               = "$(cat "$SIMQ_SECRETS/nomad-agent.token")"
  service_auth_method = "$WORKLOAD_AUTH_METHOD"
  service_identity {
    aud = ["consul.io"]
    ttl = "1h"
  }
}
HCL
  )
  log "consul: ACLs on (default deny); tokens for balancer, indexer, nomad-agent, consul-agent in $SIMQ_SECRETS; services register with their own identity ($WORKLOAD_AUTH_METHOD)"
}

# nomad_curl ARGS...: curl to Nomad, with the management token (from a header file) once
# secure mode has bootstrapped Nomad's ACLs.
nomad_curl() {
  if [ -f "$SIMQ_SECRETS/nomad-management.header" ]; then
    curl -H @"$SIMQ_SECRETS/nomad-management.header" "$@"
  else
    curl "$@"
  fi
}

nomad_healthy() {
  curl -fsS "$NOMAD_ADDR/v1/agent/health" |
    python3 -c 'import json,sys; h=json.load(sys.stdin); sys.exit(0 if h["client"]["ok"] and h["server"]["ok"] else 1)'
}

nomad_ready() {
  nomad_healthy &&
    nomad_curl -fsS "$NOMAD_ADDR/v1/nodes" |
    python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if any(x["Status"]=="ready" and x["Drivers"].get("raw_exec",{}).get("Healthy") for x in n) else 1)'
}

# Secure mode, once Nomad's server answers: bootstrap its ACLs (the management token), the
# "simq" namespace for simq's jobs, and the deployer policy and token (nomad/acl/).
make_nomad_acl() {
  local out secret json
  out="$(curl -fsS -X POST "$NOMAD_ADDR/v1/acl/bootstrap")" || return 1
  secret="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])' <<<"$out")"
  (
    umask 077
    printf '%s\n' "$secret" >"$SIMQ_SECRETS/nomad-management.token"
    printf 'X-Nomad-Token: %s\n' "$secret" >"$SIMQ_SECRETS/nomad-management.header"
  )
  nomad_curl -fsS -X POST --data-binary '{"Name": "simq", "Description": "simq jobs"}' "$NOMAD_ADDR/v1/namespace" >/dev/null ||
    die "nomad: could not create the simq namespace"
  json="$(python3 -c 'import json,sys; print(json.dumps({"Name": "simq-deployer", "Description": "simq deploy.sh and simq-indexer", "Rules": open(sys.argv[1]).read()}))' "$SIMQ_ROOT/nomad/acl/deployer.hcl")"
  nomad_curl -fsS -X POST --data-binary "$json" "$NOMAD_ADDR/v1/acl/policy/simq-deployer" >/dev/null ||
    die "nomad: could not create policy simq-deployer"
  secret="$(nomad_curl -fsS -X POST --data-binary '{"Name": "simq deployer", "Type": "client", "Policies": ["simq-deployer"]}' "$NOMAD_ADDR/v1/acl/token" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')" || die "nomad: could not create the deployer token"
  (umask 077 && printf '%s\n' "$secret" >"$SIMQ_SECRETS/nomad-deployer.token")
}

# start_consul [keep]: start the agent; with "keep", on the state and secrets it had.
start_consul() {
  local keep=${1:-}
  if pid_alive "$CONSUL_DIR/consul.pid"; then
    log "consul: already running (pid $(cat "$CONSUL_DIR/consul.pid"))"
    return
  fi
  [ -x "$CONSUL_BIN" ] || die "consul $CONSUL_VERSION is not built: run scripts/setup.sh first"
  if curl -fsS -o /dev/null "$CONSUL_HTTP_ADDR/v1/status/leader" 2>/dev/null; then
    die "something else already answers on $CONSUL_HTTP_ADDR: stop it first (simq's cluster did not start it)"
  fi
  [ -n "$keep" ] || { rm -rf "$CONSUL_DIR/data"; : >"$CONSUL_DIR/consul.log" 2>/dev/null || true; }
  # (Consul keeps ACL tokens in its state: only this user may read it.)
  mkdir -p "$CONSUL_DIR/data" && chmod 700 "$CONSUL_DIR/data"
  local acl=()
  if [ -n "$keep" ]; then
    ! acl_enabled || acl=(-config-file "$SIMQ_SECRETS/consul-acl.hcl")
  elif [ "${SIMQ_ACL:-0}" = 1 ]; then
    prepare_acl
    acl=(-config-file "$SIMQ_SECRETS/consul-acl.hcl")
  else
    rm -rf "$SIMQ_SECRETS"
  fi
  log "consul: starting v$CONSUL_VERSION${keep:+ on its previous state}, log $CONSUL_DIR/consul.log"
  # One server that elects itself (-bootstrap-expect 1), its state on disk so that a
  # restarted agent keeps KV, sessions and ACL tokens.
  setsid "$CONSUL_BIN" agent -server -bootstrap-expect 1 -data-dir "$CONSUL_DIR/data" \
    -config-file "$SIMQ_ROOT/consul/dev-agent.hcl" "${acl[@]}" \
    -pid-file "$CONSUL_DIR/consul.pid" >>"$CONSUL_DIR/consul.log" 2>&1 </dev/null &
  wait_for "$READY_TIMEOUT" consul_ready ||
    { tail -n 20 "$CONSUL_DIR/consul.log" >&2; die "consul did not become ready within ${READY_TIMEOUT}s (log above)"; }
  log "consul: ready at $CONSUL_HTTP_ADDR (pid $(cat "$CONSUL_DIR/consul.pid"))"
  if acl_enabled && [ -z "$keep" ]; then make_acl_tokens; fi
}

# The Nomad agent's CPU cgroup (cgroup v1 "cpu" or v2 with the cpu controller), where it
# and its helpers (logmon, artifact downloads) run at a low CPU weight. Placing 8 new
# shards starts 16 Go processes and copies their files; each of their threads weighed as
# much as all of Nomad's tasks together (they sit in the root cgroup, the tasks under
# /nomad), so for seconds serving got a small share of the CPU and queries were refused.
# With the weight low they use what serving leaves idle. Empty when there are no writable
# cgroups (the agent then runs where it was started).
agent_cgroup() {
  if [ -w /sys/fs/cgroup/cpu/cgroup.procs ]; then
    echo /sys/fs/cgroup/cpu/simq-nomad-agent
  elif [ -w /sys/fs/cgroup/cgroup.procs ] && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; then
    echo /sys/fs/cgroup/simq-nomad-agent
  fi
}

# agent_cgroup_enter: move this shell into the agent's cgroup (made with a low weight).
agent_cgroup_enter() {
  local cg
  cg="$(agent_cgroup)"
  [ -n "$cg" ] || { log "nomad: no writable CPU cgroup; the agent runs at normal CPU weight"; return 0; }
  {
    mkdir -p "$cg" &&
      if [ -f "$cg/cpu.shares" ]; then
        echo "${SIMQ_AGENT_CPU_SHARES:-64}" >"$cg/cpu.shares"  # v1: tasks under /nomad weigh 1024
      else
        echo "${SIMQ_AGENT_CPU_WEIGHT:-6}" >"$cg/cpu.weight"   # v2: default weight 100
      fi &&
      echo "$BASHPID" >"$cg/cgroup.procs"
  } 2>/dev/null || log "nomad: could not use the CPU cgroup $cg; the agent runs at normal CPU weight"
}

start_nomad() {
  if pid_alive "$NOMAD_DIR/nomad.pid"; then
    log "nomad: already running (pid $(cat "$NOMAD_DIR/nomad.pid"))"
    return
  fi
  [ -x "$NOMAD_BIN" ] || die "nomad $NOMAD_VERSION is not built: run scripts/setup.sh first"
  if curl -fsS -o /dev/null "$NOMAD_ADDR/v1/agent/health" 2>/dev/null; then
    die "something else already answers on $NOMAD_ADDR: stop it first (simq's cluster did not start it)"
  fi
  mkdir -p "$NOMAD_DIR/data"
  log "nomad: starting v$NOMAD_VERSION, log $NOMAD_DIR/nomad.log"
  # -dev creates alloc_mounts/ in the working directory: run it from its state dir.
  # Exec'd directly by setsid (no wrapper shell), so $! is the agent's own pid.
  local acl=()
  if acl_enabled; then
    (umask 077 && printf 'acl {\n  enabled = true\n}\n' >"$SIMQ_SECRETS/nomad-acl.hcl")
    acl=(-config "$SIMQ_SECRETS/nomad-consul.hcl" -config "$SIMQ_SECRETS/nomad-acl.hcl")
  fi
  (cd "$NOMAD_DIR" && agent_cgroup_enter && exec setsid "$NOMAD_BIN" agent -dev -config "$SIMQ_ROOT/nomad/dev-agent.hcl" "${acl[@]}" \
    -data-dir "$NOMAD_DIR/data" >"$NOMAD_DIR/nomad.log" 2>&1 </dev/null) &
  echo $! >"$NOMAD_DIR/nomad.pid"
  if acl_enabled; then
    wait_for "$READY_TIMEOUT" nomad_healthy && wait_for 30 make_nomad_acl ||
      { tail -n 20 "$NOMAD_DIR/nomad.log" >&2; die "nomad: ACL bootstrap failed (log above)"; }
    make_workload_auth
    log "nomad: ACLs on (default deny); simq's jobs in namespace simq; deployer token in $SIMQ_SECRETS"
  fi
  wait_for "$READY_TIMEOUT" nomad_ready ||
    { tail -n 20 "$NOMAD_DIR/nomad.log" >&2; die "nomad did not become ready within ${READY_TIMEOUT}s (log above)"; }
  log "nomad: ready at $NOMAD_ADDR (pid $(cat "$NOMAD_DIR/nomad.pid"))"
}

# stop_pid NAME PIDFILE: SIGINT, then wait up to 30 s, then SIGKILL.
stop_pid() {
  local name=$1 pidfile=$2 pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return; }
  pid="$(cat "$pidfile")"
  log "$name: stopping (pid $pid)"
  kill -INT "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: did not exit on SIGINT within 30 s, killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# What outlived the agent: Nomad's own plugin processes (logmon, executor) and task
# processes (raw_exec tasks survive a killed agent), whose working directory is inside
# Nomad's data dir. End them.
kill_strays() {
  local p pid cwd exe
  local own_net
  own_net="$(readlink /proc/self/ns/net)"
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    # (The agents of scripts/nodes.sh run the same binary in their nodes' namespaces.)
    [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$own_net" ] || continue
    cwd="$(readlink "$p/cwd" 2>/dev/null || true)"
    exe="$(readlink "$p/exe" 2>/dev/null || true)"
    case "$cwd" in "$NOMAD_DIR"/data/*) ;; *) [ "$exe" = "$NOMAD_BIN" ] || continue ;; esac
    log "stray process $pid ($(tr '\0' ' ' <"$p/cmdline" | cut -c1-80)): killing"
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# Nomad mounts a tmpfs for each task's secrets/ and private/ dirs; allocations the agent
# did not garbage-collect before it stopped leave them mounted. Unmount them.
unmount_leftovers() {
  local m
  awk '{print $2}' /proc/mounts | { grep "^$NOMAD_DIR/data/" || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done
}

cmd_start() {
  need_cmd curl "Install Debian's curl package."
  start_consul
  start_nomad
  log "cluster ready: consul $CONSUL_HTTP_ADDR, nomad $NOMAD_ADDR, state in $SIMQ_CLUSTER_DIR"
}

# The full-corpus build scripts/up.sh started in the background: its whole process group.
stop_full_corpus() {
  pid_alive "$FULL_CORPUS_PID" || { rm -f "$FULL_CORPUS_PID"; return 0; }
  local pid
  pid="$(cat "$FULL_CORPUS_PID")"
  log "full-corpus build and rollout: stopping (process group $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 10))
  while kill -0 -- "-$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$FULL_CORPUS_PID"
}

cmd_stop() {
  stop_full_corpus
  pid_alive "$NOMAD_DIR/nomad.pid" && stop_simq_jobs "$NOMAD_ADDR" 60
  stop_pid nomad "$NOMAD_DIR/nomad.pid"
  kill_strays
  unmount_leftovers
  # The dev agent's allocation directories hold every downloaded shard file: garbage once
  # every job is purged, and left behind they filled the disk over many runs (9.5 GB; at
  # 99 % Nomad collects failed allocations at once, logs and all). Only when nothing is
  # mounted below them any more.
  local mounts
  mounts="$(awk '{print $2}' /proc/mounts | { grep "^$NOMAD_DIR/data/" || true; })"
  if [ -z "$mounts" ]; then
    rm -rf "$NOMAD_DIR/data" "$NOMAD_DIR/alloc_mounts"
  else
    log "left $NOMAD_DIR/data in place: still mounted below it: $mounts"
  fi
  local cg
  cg="$(agent_cgroup)"
  [ -z "$cg" ] || [ ! -d "$cg" ] || rmdir "$cg" 2>/dev/null || true
  stop_pid consul "$CONSUL_DIR/consul.pid"
  # The next start begins from an empty Consul: its tokens are worthless now.
  rm -rf "$SIMQ_SECRETS" "$CONSUL_DIR/data"
  log "cluster stopped"
}

cmd_status() {
  local rc=0
  pid_alive "$FULL_CORPUS_PID" &&
    echo "full corpus: being built and rolled out, process group $(cat "$FULL_CORPUS_PID"), log $SIMQ_CLUSTER_DIR/full-corpus.log"
  if pid_alive "$CONSUL_DIR/consul.pid"; then
    echo "consul: running, pid $(cat "$CONSUL_DIR/consul.pid"), $CONSUL_HTTP_ADDR, $(first_line "$CONSUL_BIN" version)"
    acl_enabled && echo "consul ACLs: on, default deny; tokens in $SIMQ_SECRETS"
  else
    echo "consul: stopped"; rc=1
  fi
  if pid_alive "$NOMAD_DIR/nomad.pid"; then
    echo "nomad:  running, pid $(cat "$NOMAD_DIR/nomad.pid"), $NOMAD_ADDR, $(first_line "$NOMAD_BIN" version)"
    [ ! -f "$SIMQ_SECRETS/nomad-management.token" ] ||
      echo "nomad ACLs: on, default deny; simq's jobs in namespace simq (NOMAD_NAMESPACE=simq); deployer token in $SIMQ_SECRETS"
  else
    echo "nomad:  stopped"; rc=1
  fi
  return $rc
}

cmd_restart_consul() {
  local down=${1:-10}
  [[ "$down" =~ ^[0-9]+$ ]] || die "restart-consul: DOWN_SECONDS must be a whole number, not '$down'"
  pid_alive "$CONSUL_DIR/consul.pid" || die "consul is not running (scripts/cluster.sh start)"
  stop_pid consul "$CONSUL_DIR/consul.pid"
  log "consul: down for $down s"
  sleep "$down"
  start_consul keep
}

case "${1:-}" in
  start)
    if [ "${2:-}" = --nodes ] && [ "${3:-1}" != 1 ]; then
      pid_alive "$CONSUL_DIR/consul.pid" && die "the single-node cluster runs: scripts/cluster.sh stop first"
      exec bash "$SIMQ_ROOT/scripts/nodes.sh" start --nodes "$3"
    fi
    [ -z "${2:-}" ] || [ "${2:-} ${3:-}" = "--nodes 1" ] || die "usage: scripts/cluster.sh start [--nodes N]"
    cmd_start
    ;;
  stop)
    [ ! -f "$SIMQ_CLUSTER_DIR/nodes/cluster.env" ] || bash "$SIMQ_ROOT/scripts/nodes.sh" stop
    cmd_stop
    ;;
  status) cmd_status ;;
  restart-consul) cmd_restart_consul "${2:-10}" ;;
  *) die "usage: scripts/cluster.sh start [--nodes N]|stop|status|restart-consul [DOWN_SECONDS]" ;;
esac
