#!/usr/bin/env bash
# A real multi-node Consul + Nomad cluster on this one machine (issue 31, Build item 1):
# each node is a network namespace simq-nK with its own address on a private bridge, a
# Consul server and a Nomad server + client with persistent data dirs, so quorum, leader
# election and the loss of a node behave as on three machines. Needs root (namespaces,
# links, cgroups). State, logs and data live in $SIMQ_CLUSTER_DIR/nodes.
#
#   scripts/nodes.sh start [--nodes N]  create the namespaces and bridge, start every agent,
#                                       wait for quorum (Consul and Nomad leader, N voters,
#                                       N Nomad servers alive, N clients ready with raw_exec)
#   scripts/nodes.sh stop               stop all of it; checks that no process, mount,
#                                       namespace, link or cgroup of it is left
#   scripts/nodes.sh status             each node's agents (pids, address), leaders, peers
#   scripts/nodes.sh power-off K        node K loses power: link down, every process of its
#                                       namespace SIGKILLed (tasks too), its mounts gone
#   scripts/nodes.sh power-on K         link up, node K's agents start again on their data
#                                       dirs and rejoin; waits until they have
#   scripts/nodes.sh partition K        node K's link goes down, its processes run on
#   scripts/nodes.sh heal K             ... and comes back up
#   scripts/nodes.sh freeze K           SIGSTOP every process of node K (a hung machine)
#   scripts/nodes.sh thaw K             ... SIGCONT
#   scripts/nodes.sh consul-kill K      node K's Consul server SIGKILLed, the rest runs on
#   scripts/nodes.sh consul-start K     ... started again; waits until it is a healthy voter
#
# Network: SIMQ_NODES_SUBNET (default 10.231.0.0/24, must be private and not routed by the
# host yet). The host's side of the bridge simq-br0 gets .1 (the "ops" address: the host
# runs the CLI, tests and load from it), node K gets .(10+K) on the veth simq-nK inside its
# namespace (host end simq-vK). No namespace has a default route and the bridge has no
# link to a host interface: the nodes' addresses exist only on this machine.
#
# The host also runs a Consul client agent on the ops address that serves HTTP on
# 127.0.0.1:8500 (SIMQ_NODES_CONSUL_HTTP to change it, e.g. while the single-node cluster
# holds 8500), so tools using CONSUL_HTTP_ADDR=http://127.0.0.1:8500 keep working; Nomad's
# HTTP API is on every node's address, port 4646 (`start` prints a NOMAD_ADDR).
#
# Cgroups: Nomad 1.11 ignores client.cgroup_parent on cgroups v1 (it is only reported as a
# node attribute; the parent stays /nomad, see client/lib/cgroupslib/switch_linux.go), so
# all nodes and the single-node cluster would share /sys/fs/cgroup/*/nomad. Instead each
# Nomad agent runs in a mount namespace of its own in which /sys/fs/cgroup/<controller>/
# simq-nK is bind-mounted over /sys/fs/cgroup/<controller>: the node's "/nomad" is the
# host's /sys/fs/cgroup/<controller>/simq-nK/nomad, as a container's cgroup view would be.
# The same mount namespace keeps the node's tmpfs mounts (task secrets) off the host's
# mount table, and they vanish with the node's processes, as on a real power-off.
#
# Agents are started with `nsenter --net=/run/netns/simq-nK`, not `ip netns exec` (which
# remounts /sys and would hide the cgroup tree from Nomad).
#
# Sourcing this file (tests do) defines its functions, node_address_ok among them, and
# runs nothing.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NODES_DIR="$SIMQ_CLUSTER_DIR/nodes"
# What `start` decided (subnet, addresses, node count): read by every other subcommand.
NODES_STATE="$NODES_DIR/cluster.env"
NODES_BRIDGE=simq-br0
NODES_READY_TIMEOUT=90
# The host's Consul client's HTTP address (the ops agent); default Consul's usual port.
OPS_CONSUL_HTTP="${SIMQ_NODES_CONSUL_HTTP:-127.0.0.1:8500}"
# Low CPU weight for each node's agents (cgroup v1 cpu.shares; tasks get 1024), as
# scripts/cluster.sh does for the single node's agent: serving gets the CPU first.
NODES_AGENT_CPU_SHARES="${SIMQ_AGENT_CPU_SHARES:-64}"
# The blob store (SeaweedFS) in a cgroup of its own beside the agents: sharing theirs, its
# work (serving artifacts, re-electing its masters) took Consul's and Nomad's small share
# under load (measured: Raft leaders stepped down, a client missed its heartbeats and every
# embedder was placed on the one other node).
NODES_BLOBS_CPU_SHARES="${SIMQ_BLOBS_CPU_SHARES:-512}"
# Agents must not send anything through a proxy the caller's environment names.
AGENT_ENV=(env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u all_proxy -u ALL_PROXY)

# ---- names and state ----

# node_ns K / node_veth K / host_veth K: the names of node K's namespace, its veth inside
# the namespace (Nomad's network_interface) and the veth's host end on the bridge.
node_ns() { echo "simq-n$1"; }
node_veth() { echo "simq-n$1"; }
host_veth() { echo "simq-v$1"; }
node_dir() { echo "$NODES_DIR/n$1"; }

# load_state: NODES_COUNT, NODES_SUBNET, NODES_PREFIX, OPS_ADDR, NODE_ADDRS (by index from
# 1) from the state file; false when no cluster was started.
load_state() {
  [ -f "$NODES_STATE" ] || return 1
  # shellcheck source=/dev/null
  source "$NODES_STATE"
  read -ra NODE_ADDRS <<<"_ $NODE_ADDR_LIST"
}

# node_addr K: node K's address.
node_addr() { echo "${NODE_ADDRS[$1]}"; }

# node_of_addr ADDR[:PORT]: the index of the node with that address (empty if none).
node_of_addr() {
  local a=${1%:*} k
  for ((k = 1; k <= NODES_COUNT; k++)); do [ "${NODE_ADDRS[$k]}" != "$a" ] || { echo "$k"; return; }; done
}

# powered_off K: true while node K is off (power-off without power-on).
powered_off() { [ -f "$(node_dir "$1")/powered-off" ]; }

# cgroup_controllers: the cgroup hierarchies mounted under /sys/fs/cgroup (v1 controllers,
# the named systemd one, the v2 "unified" one on hybrid hosts): each gets a subtree per node.
cgroup_controllers() {
  awk '$9 ~ /^cgroup2?$/ && $5 ~ "^/sys/fs/cgroup/" { sub("^/sys/fs/cgroup/", "", $5); print $5 }' /proc/self/mountinfo | sort -u
}

# ---- the guard on every address a tool sends to ----

# node_address_ok ADDR: true when ADDR is loopback, or an address this script created and
# that the host routes onto its bridge right now (the ops address, or a node's). Anything
# else, even a node address once the bridge is gone (the host's default route would then
# carry it off the machine), is refused.
node_address_ok() {
  local a=$1 x dev
  case "$a" in 127.*|localhost|::1|'[::1]') return 0 ;; esac
  load_state || return 1
  for x in "$OPS_ADDR" "${NODE_ADDRS[@]:1}"; do
    [ "$a" = "$x" ] || continue
    dev="$(ip -j route get "$a" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)[0].get("dev",""))' 2>/dev/null || true)"
    # (The ops address is local: the kernel answers "dev lo" for it; it must sit on the bridge.)
    if [ "$a" = "$OPS_ADDR" ]; then
      ip -j addr show dev "$NODES_BRIDGE" 2>/dev/null | grep -q "\"local\":\"$a\"" && return 0
    else
      [ "$dev" = "$NODES_BRIDGE" ] && return 0
    fi
    return 1
  done
  return 1
}

# ncurl CURL-ARGS... URL: curl, only after node_address_ok passed for every URL's host;
# no proxy, short timeouts (a powered-off node must not stall a check; NCURL_MAX_TIME
# seconds per request, default 10).
ncurl() {
  local arg host
  for arg in "$@"; do
    case "$arg" in
      http://* | https://*)
        host="${arg#*://}"
        host="${host%%/*}"
        host="${host%:*}"
        node_address_ok "$host" || die "refusing to send to $arg: $host is neither loopback nor an address of scripts/nodes.sh's cluster"
        ;;
    esac
  done
  curl --noproxy '*' --connect-timeout 2 --max-time "${NCURL_MAX_TIME:-10}" "$@"
}

# json EXPR: evaluate the Python expression EXPR with d = the JSON on stdin; print it.
json() { python3 -c 'import json,sys; d=json.load(sys.stdin); r=eval(sys.argv[1]); print(r if not isinstance(r,(list,dict)) else json.dumps(r))' "$1"; }

# show_logs [K...]: the tail of the named nodes' logs (all when none), for an error.
show_logs() {
  local k f
  for k in "${@:-$(seq 1 "$NODES_COUNT")}"; do
    for f in "$(node_dir "$k")"/consul.log "$(node_dir "$k")"/nomad.log; do
      [ -f "$f" ] && { echo "---- tail of $f" >&2; tail -n 12 "$f" >&2; }
    done
  done
  [ -f "$NODES_DIR/ops/consul.log" ] && { echo "---- tail of $NODES_DIR/ops/consul.log" >&2; tail -n 8 "$NODES_DIR/ops/consul.log" >&2; }
  return 0
}

# guard_cluster_addresses: simq-indexer and the nomad CLI send to the addresses Consul
# (CONSUL_HTTP_ADDR) and Nomad (NOMAD_ADDR) name, past ncurl: first check each of them
# with node_address_ok.
guard_cluster_addresses() {
  local a
  for a in "$(echo "${NOMAD_ADDR#*://}" | cut -d: -f1)" \
    $(ncurl -fsS "$CONSUL_HTTP_ADDR/v1/catalog/services" | json '" ".join(d)' | tr ' ' '\n' |
      while read -r s; do ncurl -fsS "$CONSUL_HTTP_ADDR/v1/catalog/service/$s" | json '" ".join(e["ServiceAddress"] or e["Address"] for e in d)'; done); do
    node_address_ok "$a" || die "refusing: Consul or Nomad names $a, which is neither loopback nor an address of scripts/nodes.sh's cluster"
  done
}

# ---- Consul and Nomad API views ----

# ops_consul PATH: GET from the host's Consul client agent.
ops_consul() { ncurl -fsS "http://$OPS_CONSUL_HTTP$1"; }

# consul_leader_node: the name (nK) of the Consul leader's node; false without a leader.
consul_leader_node() {
  local l k
  l="$(ops_consul /v1/status/leader | tr -d '"')"
  [ -n "$l" ] && k="$(node_of_addr "$l")" && [ -n "$k" ] && echo "n$k"
}

# consul_voters: how many voters the Raft configuration has (read through the leader).
consul_voters() { ops_consul /v1/operator/raft/configuration | json 'sum(1 for s in d["Servers"] if s["Voter"])'; }

# consul_quorum N: a leader, N voters, and the ops agent answers catalog reads.
consul_quorum() {
  consul_leader_node >/dev/null && [ "$(consul_voters)" = "$1" ] && ops_consul /v1/catalog/nodes >/dev/null
}

# consul_server_healthy K: autopilot sees node K's server alive, healthy and voting.
consul_server_healthy() {
  ops_consul /v1/operator/autopilot/health |
    python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(s["Name"]==sys.argv[1] and s["Healthy"] and s["Voter"] for s in d["Servers"]) else 1)' "n$1"
}

# nomad_url: the HTTP address of the first node that is on and answers (Nomad's API
# forwards to the leader from any server).
nomad_url() {
  local k
  for ((k = 1; k <= NODES_COUNT; k++)); do
    powered_off "$k" && continue
    ncurl -fsS -o /dev/null --max-time 2 "http://$(node_addr "$k"):4646/v1/agent/health?type=server" 2>/dev/null &&
      { echo "http://$(node_addr "$k"):4646"; return; }
  done
  return 1
}

# nomad_get PATH: GET from Nomad through any node that answers.
nomad_get() {
  local u
  u="$(nomad_url)" || return 1
  ncurl -fsS "$u$1"
}

# nomad_leader_node: the node (nK) of the Nomad leader; false without a leader.
nomad_leader_node() {
  local l k
  l="$(nomad_get /v1/status/leader | tr -d '"')"
  [ -n "$l" ] && k="$(node_of_addr "$l")" && [ -n "$k" ] && echo "n$k"
}

# nomad_servers_alive: how many Nomad servers gossip as alive.
nomad_servers_alive() { nomad_get /v1/agent/members | json 'sum(1 for m in d["Members"] if m["Status"]=="alive")'; }

# nomad_voters: how many voters Nomad's Raft configuration has.
nomad_voters() { nomad_get /v1/operator/raft/configuration | json 'sum(1 for s in d["Servers"] if s["Voter"])'; }

# nomad_nodes_ready: how many clients are ready with a healthy raw_exec driver.
nomad_nodes_ready() {
  nomad_get /v1/nodes | json 'sum(1 for n in d if n["Status"]=="ready" and n["Drivers"].get("raw_exec",{}).get("Healthy"))'
}

# nomad_quorum N: a leader, N servers alive and voting, N clients ready with raw_exec.
nomad_quorum() {
  nomad_leader_node >/dev/null && [ "$(nomad_servers_alive)" = "$1" ] && [ "$(nomad_voters)" = "$1" ] &&
    [ "$(nomad_nodes_ready)" = "$1" ]
}

# nomad_node_back K: node K's Nomad server alive again and its client ready with raw_exec.
nomad_node_back() {
  nomad_get /v1/agent/members | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(m["Name"].split(".")[0]==sys.argv[1] and m["Status"]=="alive" for m in d["Members"]) else 1)' "n$1" &&
    nomad_get /v1/nodes | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(n["Name"]==sys.argv[1] and n["Status"]=="ready" and n["Drivers"].get("raw_exec",{}).get("Healthy") for n in d) else 1)' "n$1"
}

# ---- the network ----

# plan_subnet SUBNET N: print the state file's lines for SUBNET with N nodes, or stop when
# SUBNET is not a private IPv4 subnet with room for them, or overlaps anything the host
# routes or has as an address already (then traffic to it would reach something real).
plan_subnet() {
  python3 - "$1" "$2" "$(ip -j route show table all)" "$(ip -j addr show)" <<'PY'
import ipaddress, json, sys
raw, n, routes, addrs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
def fail(msg):
    print(msg, file=sys.stderr); sys.exit(1)
try:
    net = ipaddress.ip_network(raw, strict=True)
except ValueError as e:
    fail(f"SIMQ_NODES_SUBNET={raw} is not a subnet: {e}")
if net.version != 4 or not net.is_private:
    fail(f"SIMQ_NODES_SUBNET={raw} is not a private IPv4 subnet (10/8, 172.16/12, 192.168/16)")
if net.num_addresses < 10 + n + 2:
    fail(f"SIMQ_NODES_SUBNET={raw} is too small for the ops address .1 and nodes .11-.{10 + n}")
for r in routes:
    dst = r.get("dst", "")
    if dst in ("", "default") or ":" in dst:
        continue  # the default route carries everything; that is why nodes never get one
    try:
        rn = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
    except ValueError:
        continue
    if rn.overlaps(net):
        fail(f"the host already routes {dst} (dev {r.get('dev', '?')}, table {r.get('table', 'main')}), "
             f"which overlaps {net}: choose a free SIMQ_NODES_SUBNET")
for link in addrs:
    for a in link.get("addr_info", []):
        if a.get("family") == "inet" and ipaddress.ip_address(a["local"]) in net:
            fail(f"{link['ifname']} already has {a['local']}, inside {net}: choose a free SIMQ_NODES_SUBNET")
base = net.network_address
print(f"NODES_COUNT={n}")
print(f"NODES_SUBNET={net}")
print(f"NODES_PREFIX={net.prefixlen}")
print(f"OPS_ADDR={base + 1}")
print("NODE_ADDR_LIST='" + " ".join(str(base + 10 + k) for k in range(1, n + 1)) + "'")
PY
}

# net_up: the bridge with the ops address, and per node a namespace joined to it by a veth
# pair, the node's address on it, loopback up, and no default route (none is ever added).
net_up() {
  local k ns
  ip link add "$NODES_BRIDGE" type bridge
  ip addr add "$OPS_ADDR/$NODES_PREFIX" dev "$NODES_BRIDGE"
  ip link set "$NODES_BRIDGE" up
  for ((k = 1; k <= NODES_COUNT; k++)); do
    ns="$(node_ns "$k")"
    ip netns add "$ns"
    ip link add "$(host_veth "$k")" type veth peer name "$(node_veth "$k")" netns "$ns"
    ip link set "$(host_veth "$k")" master "$NODES_BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$k")/$NODES_PREFIX" dev "$(node_veth "$k")"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$(node_veth "$k")" up
    # A LAN's failure detection, as on real nodes (docs/CLUSTER.md): a peer that answers
    # no SYN within 3 s (1 retry, not 6: 127 s), or leaves sent data unacknowledged for
    # about 13 s (5 retries, not 15: minutes), is gone. A lost node costs each caller that
    # long instead of its client's own timeout (SeaweedFS dials volume servers with 30 s;
    # with 2 retries, 7 s per artifact whose first copy tried was on the lost node made a
    # partitioned node's replicas run elsewhere after 55 s, near the 60 s bound).
    nsenter --net="/run/netns/$ns" sh -c 'echo 1 >/proc/sys/net/ipv4/tcp_syn_retries && echo 5 >/proc/sys/net/ipv4/tcp_retries2'
    ! ip -n "$ns" route show default | grep -q . || die "namespace $ns has a default route"
  done
}

# net_down: delete what net_up made (a namespace's veth end goes with it), and /run/netns's
# own mount when `ip netns add` made it for us and no other namespace uses it.
net_down() {
  local k
  for ((k = 1; k <= NODES_COUNT; k++)); do
    ip link del "$(host_veth "$k")" 2>/dev/null || true
    ip netns del "$(node_ns "$k")" 2>/dev/null || true
  done
  ip link del "$NODES_BRIDGE" 2>/dev/null || true
  if [ "${RUN_NETNS_WAS_MOUNTED:-1}" = 0 ] && mountpoint -q /run/netns && [ -z "$(ls -A /run/netns)" ]; then
    umount /run/netns 2>/dev/null || true
  fi
}

# ---- cgroups ----

# node_cgroups_make K: /sys/fs/cgroup/<controller>/simq-nK for every hierarchy (the root
# of node K's cgroup view; cpusets need CPUs and memory nodes before anything may join),
# and simq-nK/agents and simq-nK/blobs in "cpu" at low weights for the node's agents and
# its blob store.
node_cgroups_make() {
  local k=$1 c cg
  for c in $(cgroup_controllers); do
    cg="/sys/fs/cgroup/$c/$(node_ns "$k")"
    mkdir -p "$cg"
    if [ "$c" = cpuset ]; then
      cat /sys/fs/cgroup/cpuset/cpuset.cpus >"$cg/cpuset.cpus"
      cat /sys/fs/cgroup/cpuset/cpuset.mems >"$cg/cpuset.mems"
    fi
  done
  cg="/sys/fs/cgroup/cpu/$(node_ns "$k")"
  mkdir -p "$cg/agents" "$cg/blobs"
  echo "$NODES_AGENT_CPU_SHARES" >"$cg/agents/cpu.shares"
  echo "$NODES_BLOBS_CPU_SHARES" >"$cg/blobs/cpu.shares"
}

# node_cgroups_remove K [SUBTREE]: remove node K's cgroups (or only SUBTREE of them, e.g.
# "nomad": the tasks' ones a power-off leaves), deepest first; those still holding a
# process stay (and the caller's check reports them).
node_cgroups_remove() {
  local k=$1 sub=${2:-} c d
  for _ in 1 2 3 4 5; do
    for c in $(cgroup_controllers); do
      d="/sys/fs/cgroup/$c/$(node_ns "$k")${sub:+/$sub}"
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    node_cgroups_left "$k" "$sub" || return 0
    sleep 0.2  # (a killed task's cgroup empties once the kernel has reaped it)
  done
}

# node_cgroups_left K [SUBTREE]: print node K's cgroup dirs that still exist.
node_cgroups_left() {
  local c d found=1
  for c in $(cgroup_controllers); do
    d="/sys/fs/cgroup/$c/$(node_ns "$1")${2:+/$2}"
    [ -d "$d" ] && { echo "$d"; found=0; }
  done
  return $found
}

# ---- agents ----

# write_node_configs K: node K's own part of its Consul and Nomad config (the common part
# is consul/node-agent.hcl and nomad/node-agent.hcl in the repo).
write_node_configs() {
  local k=$1 dir addr j peers_consul="" peers_nomad=""
  dir="$(node_dir "$k")"
  addr="$(node_addr "$k")"
  for ((j = 1; j <= NODES_COUNT; j++)); do
    [ "$j" = "$k" ] && continue
    peers_consul+="${peers_consul:+, }\"$(node_addr "$j")\""
    peers_nomad+="${peers_nomad:+, }\"$(node_addr "$j"):4648\""
  done
  cat >"$dir/consul.hcl" <<HCL
# Node n$k's part of its Consul server config, written by scripts/nodes.sh start.
node_name        = "n$k"
data_dir         = "$dir/consul/data"
bind_addr        = "$addr"
advertise_addr   = "$addr"
# The node's address for the host and other nodes; loopback for its own Nomad agent.
client_addr      = "$addr 127.0.0.1"
bootstrap_expect = $NODES_COUNT
retry_join       = [$peers_consul]
HCL
  cat >"$dir/nomad.hcl" <<HCL
# Node n$k's part of its Nomad agent config, written by scripts/nodes.sh start.
name      = "n$k"
data_dir  = "$dir/nomad/data"
bind_addr = "$addr"
advertise {
  http = "$addr"
  rpc  = "$addr"
  serf = "$addr"
}
server {
  bootstrap_expect = $NODES_COUNT
  server_join {
    retry_join = [$peers_nomad]
  }
}
client {
  # Tasks' ports and services get this interface's address, the node's.
  network_interface = "$(node_veth "$k")"
  # No "servers": an agent that is also a server gives its client its own RPC address,
  # and the local server forwards to the leader (waiting out an election). A list of
  # every server made a client that first tried a server not yet up wait 15-30 s
  # (Nomad's registration retry) before it registered.
  # Reported as a node attribute only: Nomad 1.11 ignores it on cgroups v1, where each
  # node's cgroups are kept apart by its own mount namespace instead (scripts/nodes.sh).
  cgroup_parent     = "$(node_ns "$k")"
}
HCL
}

# agent_pid NS ARGV0 MARK: the pid of the agent in namespace NS whose executable is ARGV0
# and whose command line holds MARK (its config file), not of a helper (Nomad's logmon,
# executor) or a wrapper; empty if none runs.
agent_pid() {
  local p exe
  for p in $(ip netns pids "$1" 2>/dev/null); do
    exe="$(readlink "/proc/$p/exe" 2>/dev/null || true)"
    [ "$exe" = "$2" ] || continue
    tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -q -- " agent .*$3" && { echo "$p"; return; }
  done
}

# start_consul_server K: node K's Consul server, in its namespace, on its data dir.
start_consul_server() {
  local k=$1 dir ns
  dir="$(node_dir "$k")"
  ns="$(node_ns "$k")"
  mkdir -p "$dir/consul/data" && chmod 700 "$dir/consul/data"
  (
    echo "$BASHPID" >"/sys/fs/cgroup/cpu/$ns/agents/cgroup.procs"
    exec "${AGENT_ENV[@]}" nsenter --net="/run/netns/$ns" setsid "$CONSUL_BIN" agent \
      -config-file "$SIMQ_ROOT/consul/node-agent.hcl" -config-file "$dir/consul.hcl" -pid-file "$dir/consul.pid"
  ) >>"$dir/consul.log" 2>&1 </dev/null &
}

# start_nomad_agent K: node K's Nomad agent, in its namespace and in a mount namespace of
# its own where the node's cgroup subtrees replace /sys/fs/cgroup/<controller>.
start_nomad_agent() {
  local k=$1 dir ns
  dir="$(node_dir "$k")"
  ns="$(node_ns "$k")"
  mkdir -p "$dir/nomad/data"
  (
    cd "$dir/nomad" || exit 1
    echo "$BASHPID" >"/sys/fs/cgroup/cpu/$ns/agents/cgroup.procs"
    # (unshare without --fork and setsid outside a process group leader exec: the pid
    # stays the agent's; agent_pid finds it regardless.)
    exec "${AGENT_ENV[@]}" nsenter --net="/run/netns/$ns" unshare --mount --propagation private -- bash -c '
      set -e
      for c in $1; do mount --bind "/sys/fs/cgroup/$c/$2" "/sys/fs/cgroup/$c"; done
      shift 2
      exec setsid "$@"' bash "$(cgroup_controllers | tr '\n' ' ')" "$ns" \
      "$NOMAD_BIN" agent -config "$SIMQ_ROOT/nomad/node-agent.hcl" -config "$dir/nomad.hcl"
  ) >>"$dir/nomad.log" 2>&1 </dev/null &
}

# record_pids K: write nomad.pid of node K once its agent runs (Consul writes its own).
record_pids() {
  local k=$1 pid
  pid="$(agent_pid "$(node_ns "$k")" "$NOMAD_BIN" "$(node_dir "$k")/nomad.hcl")"
  [ -n "$pid" ] && echo "$pid" >"$(node_dir "$k")/nomad.pid" && pid_alive "$(node_dir "$k")/consul.pid"
}

# The replicated blob store: on each node a SeaweedFS server (master, volume server, filer
# and S3 gateway in one `weed` process). Masters elect a leader among the nodes (Raft);
# each blob is kept on 2 nodes (replication 001); every node's S3 gateway serves every
# blob, so each Nomad client fetches artifacts from its own node (blob_url on the
# namespace's loopback) and losing a node loses no blob. The masters' election timeout is
# 2 s, not 10: while they have no leader, reads of chunks not yet located stall (measured:
# a lost leader's replicas took 31 s to fetch their artifacts with 10 s). Ports: master
# 9333, volume 8380 (8080 is the balancers'), filer 8888, S3 8333, each gRPC port +10000.
NODES_BUCKET=simq-blobs
NODES_S3_PORT=8333

# start_weed K: node K's SeaweedFS server, in its namespace, on its data dir.
start_weed() {
  local k=$1 dir ns peers="" j
  dir="$(node_dir "$k")"
  ns="$(node_ns "$k")"
  mkdir -p "$dir/weed"
  for ((j = 1; j <= NODES_COUNT; j++)); do peers+="${peers:+,}$(node_addr "$j"):9333"; done
  (
    echo "$BASHPID" >"/sys/fs/cgroup/cpu/$ns/blobs/cgroup.procs"
    # A /tmp of its own (a tmpfs in a mount namespace of its own): weed's processes talk
    # over unix sockets named /tmp/seaweedfs-*-<port>.sock, which the three nodes of this
    # one machine would otherwise share (measured: n2's filer dialled n1's). (-ip.bind
    # 0.0.0.0 inside the namespace: its address and its own loopback, nothing else.)
    # (Without AWS credentials in its environment: with them weed turns S3 auth on.)
    exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY nsenter --net="/run/netns/$ns" unshare --mount --propagation private -- bash -c '
      mount -t tmpfs -o size=64m tmpfs /tmp && exec setsid "$@"' bash \
      "$WEED_BIN" -logtostderr server -dir="$dir/weed" \
      -ip="$(node_addr "$k")" -ip.bind=0.0.0.0 -master.port=9333 -master.peers="$peers" \
      -master.defaultReplication=001 -master.volumeSizeLimitMB=256 -master.telemetry=false -master.electionTimeout=2s \
      -volume.port=8380 -volume.max=0 -filer.port=8888 -filer.localSocket="$dir/weed/filer.sock" \
      -s3 -s3.port="$NODES_S3_PORT" -s3.localSocket="$dir/weed/s3.sock" -s3.port.iceberg=0 -s3.port.lance=0
  ) >>"$dir/weed.log" 2>&1 </dev/null &
  echo $! >"$dir/weed.pid"
}

# nodes_blobs: the blob store spec of simq-indexer (publish, put-blob) on this cluster.
nodes_blobs() { echo "s3://$NODES_BUCKET"; }
# nodes_s3_endpoints: the S3 gateways of the nodes that are on, comma-separated (simq-indexer
# tries them in order: SIMQ_S3_ENDPOINTS).
nodes_s3_endpoints() {
  local k out=""
  for ((k = 1; k <= NODES_COUNT; k++)); do
    powered_off "$k" || out+="${out:+,}http://$(node_addr "$k"):$NODES_S3_PORT"
  done
  echo "$out"
}
# nodes_blob_url: where a node's Nomad client fetches artifacts: its own node's S3 gateway
# (on the namespace's loopback), GET <url>/<sha256>.
nodes_blob_url() { echo "http://127.0.0.1:$NODES_S3_PORT/$NODES_BUCKET"; }

# blob_copies SHA256: on how many nodes the blob's least-copied chunk lies (the filer's
# metadata names each chunk's volume, the master where each volume is); fails when the
# blob is not there.
blob_copies() {
  local k a="" vids v n min=""
  for ((k = 1; k <= NODES_COUNT; k++)); do powered_off "$k" || { a="$(node_addr "$k")"; break; }; done
  [ -n "$a" ] || return 1
  vids="$(ncurl -fsS "http://$a:8888/buckets/$NODES_BUCKET/$1?metadata=true" |
    json '" ".join(sorted({c["file_id"].split(",")[0] for c in d.get("chunks") or []}))')" || return 1
  [ -n "$vids" ] || return 1
  for v in $vids; do
    n="$(ncurl -fsS "http://$a:9333/dir/lookup?volumeId=$v" | json 'len({l["url"].rsplit(":", 1)[0] for l in d.get("locations") or []})')" || return 1
    if [ -z "$min" ] || [ "$n" -lt "$min" ]; then min=$n; fi
  done
  echo "$min"
}

# blob_store_ready: every node that is on answers S3, and the bucket exists (made once).
blob_store_ready() {
  local k code
  for ((k = 1; k <= NODES_COUNT; k++)); do
    powered_off "$k" && continue
    code="$(NCURL_MAX_TIME=5 ncurl -s -o /dev/null -w '%{http_code}' -X PUT "http://$(node_addr "$k"):$NODES_S3_PORT/$NODES_BUCKET" 2>/dev/null)" || return 1
    # 200: made now; 409: it exists.
    [ "$code" = 200 ] || [ "$code" = 409 ] || return 1
  done
}

# start_nodes K...: both agents of the nodes K... (every Consul first: Nomad registers in
# it; then every Nomad agent at once, so that they elect a leader before a client's first
# registration gives up).
start_nodes() {
  local k
  for k in "$@"; do start_consul_server "$k"; done
  for k in "$@"; do start_weed "$k"; done
  for k in "$@"; do start_nomad_agent "$k"; done
  for k in "$@"; do
    wait_for 20 record_pids "$k" || { show_logs "$k"; die "node n$k: its agents did not start (logs above)"; }
  done
}

# start_ops_consul: the host's Consul client agent on the ops address, HTTP on
# $OPS_CONSUL_HTTP only (no DNS, no gRPC), joined to every node's server.
start_ops_consul() {
  local dir="$NODES_DIR/ops" joins="" k
  mkdir -p "$dir/data" && chmod 700 "$dir/data"
  for ((k = 1; k <= NODES_COUNT; k++)); do joins+="${joins:+, }\"$(node_addr "$k")\""; done
  cat >"$dir/consul.hcl" <<HCL
# The host's Consul client agent (the "ops" node), written by scripts/nodes.sh start:
# gossip on the bridge's host address, HTTP API for the host's tools on loopback only.
node_name                   = "ops"
server                      = false
data_dir                    = "$dir/data"
bind_addr                   = "$OPS_ADDR"
advertise_addr              = "$OPS_ADDR"
client_addr                 = "${OPS_CONSUL_HTTP%:*}"
retry_join                  = [$joins]
disable_update_check        = true
disable_anonymous_signature = true
log_level                   = "INFO"
ports {
  http     = ${OPS_CONSUL_HTTP##*:}
  dns      = -1
  grpc     = -1
  grpc_tls = -1
}
HCL
  "${AGENT_ENV[@]}" setsid "$CONSUL_BIN" agent -config-file "$dir/consul.hcl" -pid-file "$dir/consul.pid" \
    >>"$dir/consul.log" 2>&1 </dev/null &
}

# stop_pids SECONDS PIDFILE...: SIGINT to each, wait up to SECONDS for all, SIGKILL the rest.
stop_pids() {
  local limit=$1 f pids=() p deadline
  shift
  for f in "$@"; do pid_alive "$f" && pids+=("$(cat "$f")"); rm -f "$f"; done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -INT "${pids[@]}" 2>/dev/null || true
  deadline=$((SECONDS + limit))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then
      log "pid $p did not exit on SIGINT within ${limit}s: killing"
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
}

# kill_namespace K: SIGKILL every process in node K's namespace until none is left (tasks
# may fork while it runs).
kill_namespace() {
  local ns pids
  ns="$(node_ns "$1")"
  for _ in $(seq 1 20); do
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  log "node n$1: processes still in $ns after SIGKILL: $pids"
}

# node_processes: pids of anything of this cluster that runs: a command line naming the
# nodes' dir (agents) or a working directory inside it (Nomad's helpers, tasks).
node_processes() {
  local p cwd
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" != "$$" ] && [ "${p#/proc/}" != "$BASHPID" ] || continue
    cwd="$(readlink "$p/cwd" 2>/dev/null || true)"
    case "$cwd" in "$NODES_DIR" | "$NODES_DIR"/*) echo "${p#/proc/}"; continue ;; esac
    tr '\0' '\n' 2>/dev/null <"$p/cmdline" | grep -q "^$NODES_DIR/" && echo "${p#/proc/}"
  done
  return 0
}

# node_mounts: mount points of the host's mount table under the nodes' dir.
node_mounts() { awk '{print $2}' /proc/mounts | { grep "^$NODES_DIR/" || true; }; }

# ---- subcommands ----

# cmd_start [--nodes N]: everything from nothing; on failure, cleans up what it made.
cmd_start() {
  local n=3 k t0=$SECONDS state
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) n=${2:-}; shift 2 || die "--nodes needs a number" ;;
      --nodes=*) n=${1#--nodes=}; shift ;;
      *) die "start: unknown argument '$1' (usage: scripts/nodes.sh start [--nodes N])" ;;
    esac
  done
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 3 ] && [ "$n" -le 9 ] || die "--nodes must be 3 to 9, not '$n'"
  [ "$(id -u)" = 0 ] || die "scripts/nodes.sh needs root (network namespaces, links, cgroups)"
  need_cmd ip "Install Debian's iproute2 package."
  need_cmd nsenter "Install Debian's util-linux package."
  need_cmd unshare "Install Debian's util-linux package."
  need_cmd curl "Install Debian's curl package."
  [ -x "$CONSUL_BIN" ] || die "consul $CONSUL_VERSION is not built ($CONSUL_BIN): run scripts/setup.sh first"
  [ -x "$NOMAD_BIN" ] || die "nomad $NOMAD_VERSION is not built ($NOMAD_BIN): run scripts/setup.sh first"
  [ -x "$WEED_BIN" ] || die "seaweedfs is not built ($WEED_BIN): run scripts/setup.sh first"
  [ -w /sys/fs/cgroup/cpu/cgroup.procs ] || die "scripts/nodes.sh needs writable cgroups v1 (hybrid) at /sys/fs/cgroup/cpu"
  if [ -f "$NODES_STATE" ] || ip link show "$NODES_BRIDGE" >/dev/null 2>&1; then
    die "a node cluster is already set up ($NODES_STATE or link $NODES_BRIDGE exists): scripts/nodes.sh stop first"
  fi
  if curl --noproxy '*' -s -o /dev/null --max-time 2 "http://$OPS_CONSUL_HTTP/" 2>/dev/null; then
    die "something already answers on $OPS_CONSUL_HTTP (the single-node cluster?): stop it, or set SIMQ_NODES_CONSUL_HTTP"
  fi
  state="$(plan_subnet "${SIMQ_NODES_SUBNET:-10.231.0.0/24}" "$n" 2>&1)" || die "$state"
  rm -rf "$NODES_DIR"
  mkdir -p "$NODES_DIR"
  {
    echo "# scripts/nodes.sh start wrote this; stop deletes it."
    echo "$state"
    echo "RUN_NETNS_WAS_MOUNTED=$(mountpoint -q /run/netns 2>/dev/null && echo 1 || echo 0)"
  } >"$NODES_STATE"
  load_state
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed: cleaning up"; cmd_stop || true; fi' EXIT
  log "network: bridge $NODES_BRIDGE, ops address $OPS_ADDR, nodes ${NODE_ADDRS[*]:1} ($NODES_SUBNET, no default route)"
  net_up
  for ((k = 1; k <= NODES_COUNT; k++)); do
    mkdir -p "$(node_dir "$k")"
    node_cgroups_make "$k"
    write_node_configs "$k"
  done
  log "agents: starting Consul server and Nomad server + client on each of $NODES_COUNT nodes, Consul client on $OPS_ADDR (HTTP $OPS_CONSUL_HTTP); logs in $NODES_DIR"
  start_nodes $(seq 1 "$NODES_COUNT")
  start_ops_consul
  wait_for "$NODES_READY_TIMEOUT" consul_quorum "$NODES_COUNT" ||
    { show_logs; die "consul: no leader with $NODES_COUNT voters reachable through $OPS_CONSUL_HTTP within ${NODES_READY_TIMEOUT}s (logs above)"; }
  log "consul: leader on $(consul_leader_node), $(consul_voters) voters"
  wait_for "$NODES_READY_TIMEOUT" nomad_quorum "$NODES_COUNT" ||
    { show_logs; die "nomad: not $NODES_COUNT servers alive with a leader and $NODES_COUNT clients ready with raw_exec within ${NODES_READY_TIMEOUT}s (logs above)"; }
  log "nomad: leader on $(nomad_leader_node), $(nomad_servers_alive) servers alive, $(nomad_nodes_ready) clients ready"
  wait_for 60 blob_store_ready ||
    { tail -n 20 "$(node_dir 1)/weed.log" >&2; die "seaweedfs: the S3 gateways did not all answer (or make bucket $NODES_BUCKET) within 60 s (log of n1 above)"; }
  log "blob store: SeaweedFS on every node, bucket $NODES_BUCKET, 2 copies of each blob, S3 at $(nodes_s3_endpoints)"
  trap - EXIT
  log "cluster of $NODES_COUNT nodes ready in $((SECONDS - t0)) s: CONSUL_HTTP_ADDR=http://$OPS_CONSUL_HTTP NOMAD_ADDR=http://$(node_addr 1):4646"
  echo "export CONSUL_HTTP_ADDR=http://$OPS_CONSUL_HTTP NOMAD_ADDR=http://$(node_addr 1):4646"
}

# stop_jobs: simq's jobs stopped while a server still answers, so that tasks end the way
# Nomad ends them; whatever is left is killed afterwards anyway.
stop_jobs() {
  local u
  u="$(nomad_url 2>/dev/null)" || return 0
  stop_simq_jobs "$u" 30
}

# nodes_left: what of the node cluster is still there (processes, mounts, namespaces,
# links, cgroups), as "KIND: ...;" items; empty when nothing is. stop and the test check it.
nodes_left() {
  local k p left=""
  p="$(node_processes; pgrep -f "$NODES_DIR/" || true)"
  p="$(echo "$p" | sort -u | tr '\n' ' ')"
  [ -z "${p// /}" ] || left+=" processes: $p;"
  p="$(node_mounts; awk '{print $2}' /proc/mounts | grep -E "^/run/netns/simq-" || true)"
  p="$(echo "$p" | tr '\n' ' ')"
  [ -z "${p// /}" ] || left+=" mounts: $p;"
  p="$(ip netns list 2>/dev/null | awk '$1 ~ /^simq-n[0-9]+$/ {print $1}' | tr '\n' ' ')"
  [ -z "${p// /}" ] || left+=" namespaces: $p;"
  p="$(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^simq-(br0|v[0-9]+|n[0-9]+)(@|$)/ {print $2}' | tr '\n' ' ')"
  [ -z "${p// /}" ] || left+=" links: $p;"
  p="$(ls -d /sys/fs/cgroup/*/simq-n[0-9]* 2>/dev/null | tr '\n' ' ' || true)"
  [ -z "${p// /}" ] || left+=" cgroups: $p;"
  printf '%s' "$left"
}

# cmd_stop: stop everything start made and check that nothing of it is left.
cmd_stop() {
  local k left=""
  if ! load_state; then
    # Nothing recorded: still clean up links or namespaces of an earlier run, if any.
    NODES_COUNT=9 NODE_ADDRS=() RUN_NETNS_WAS_MOUNTED=1
  fi
  stop_jobs
  local nomads=() consuls=() weeds=()
  for ((k = 1; k <= NODES_COUNT; k++)); do
    nomads+=("$(node_dir "$k")/nomad.pid")
    consuls+=("$(node_dir "$k")/consul.pid")
    weeds+=("$(node_dir "$k")/weed.pid")
  done
  log "stopping the Nomad agents, then SeaweedFS and the Consul agents"
  stop_pids 30 "${nomads[@]}"
  stop_pids 10 "${weeds[@]}"
  stop_pids 30 "${consuls[@]}" "$NODES_DIR/ops/consul.pid"
  for ((k = 1; k <= NODES_COUNT; k++)); do kill_namespace "$k"; done
  local p
  for p in $(node_processes); do
    log "stray process $p ($(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | cut -c1-80)): killing"
    kill -KILL "$p" 2>/dev/null || true
  done
  local m
  node_mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || log "could not unmount $m"; done
  net_down
  for ((k = 1; k <= NODES_COUNT; k++)); do node_cgroups_remove "$k" || true; done
  # Check: nothing of the cluster may remain.
  sleep 0.3
  left="$(nodes_left)"
  [ -z "$left" ] || die "node cluster stop left:$left"
  # The next start begins from empty data dirs; the logs stay for reading.
  for ((k = 1; k <= NODES_COUNT; k++)); do rm -rf --one-file-system "$(node_dir "$k")/consul/data" "$(node_dir "$k")/nomad/data" "$(node_dir "$k")/weed"; done
  rm -rf --one-file-system "$NODES_DIR/ops/data"
  rm -f "$NODES_STATE"
  log "node cluster stopped: no process, mount, namespace, link or cgroup left"
}

# cmd_status: what runs where; false when any agent of a node that is on is down.
cmd_status() {
  local k rc=0 c n link
  load_state || { echo "node cluster: not started"; return 1; }
  echo "node cluster: $NODES_COUNT nodes on $NODES_SUBNET (bridge $NODES_BRIDGE, ops $OPS_ADDR), data and logs in $NODES_DIR"
  for ((k = 1; k <= NODES_COUNT; k++)); do
    c="$(pid_alive "$(node_dir "$k")/consul.pid" && echo "consul pid $(cat "$(node_dir "$k")/consul.pid")" || echo "consul stopped")"
    n="$(pid_alive "$(node_dir "$k")/nomad.pid" && echo "nomad pid $(cat "$(node_dir "$k")/nomad.pid")" || echo "nomad stopped")"
    n+=", $(pid_alive "$(node_dir "$k")/weed.pid" && echo "seaweedfs pid $(cat "$(node_dir "$k")/weed.pid")" || echo "seaweedfs stopped")"
    link="$(ip -j link show "$(host_veth "$k")" 2>/dev/null | json 'd[0]["operstate"]' 2>/dev/null || echo missing)"
    echo "  n$k $(node_addr "$k") (netns $(node_ns "$k"), link $link$(powered_off "$k" && echo ", POWERED OFF")): $c, $n"
    powered_off "$k" || { [[ "$c" == *pid* && "$n" == *pid* ]] || rc=1; }
  done
  c="$(pid_alive "$NODES_DIR/ops/consul.pid" && echo "pid $(cat "$NODES_DIR/ops/consul.pid")" || echo stopped)"
  echo "  ops $OPS_ADDR: consul client $c, HTTP http://$OPS_CONSUL_HTTP"
  echo "consul: leader $(consul_leader_node 2>/dev/null || echo none), voters $(consul_voters 2>/dev/null || echo '?'), members: $(ops_consul /v1/agent/members 2>/dev/null | json '" ".join(m["Name"] + "=" + {1: "alive", 2: "leaving", 3: "left", 4: "failed"}.get(m["Status"], str(m["Status"])) for m in d)' 2>/dev/null || echo '?')"
  echo "nomad:  leader $(nomad_leader_node 2>/dev/null || echo none), voters $(nomad_voters 2>/dev/null || echo '?'), servers alive $(nomad_servers_alive 2>/dev/null || echo '?'), clients ready $(nomad_nodes_ready 2>/dev/null || echo '?'), NOMAD_ADDR=$(nomad_url 2>/dev/null || echo none)"
  return $rc
}

# check_node_arg K: K names a node of the running cluster.
check_node_arg() {
  load_state || die "no node cluster is set up (scripts/nodes.sh start)"
  [[ "${1:-}" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES_COUNT" ] || die "name a node 1 to $NODES_COUNT, not '${1:-}'"
}

# cmd_power_off K: node K loses power: its link goes down and every process in its
# namespace (agents, Nomad's helpers, tasks) dies at once; its tmpfs mounts go with its
# mount namespace and the tasks' cgroups are removed, as a reboot would lose them.
cmd_power_off() {
  check_node_arg "${1:-}"
  local k=$1
  powered_off "$k" && die "node n$k is already powered off"
  ip link set "$(host_veth "$k")" down
  touch "$(node_dir "$k")/powered-off"
  kill_namespace "$k"
  rm -f "$(node_dir "$k")/consul.pid" "$(node_dir "$k")/nomad.pid"
  node_cgroups_remove "$k" nomad >/dev/null || true
  log "node n$k: powered off (link $(host_veth "$k") down, every process of $(node_ns "$k") killed)"
}

# cmd_power_on K: link up, node K's agents start on their data dirs; waits until its Consul
# server votes and is healthy again, and its Nomad server is alive and its client ready.
cmd_power_on() {
  check_node_arg "${1:-}"
  local k=$1 t0=$SECONDS
  powered_off "$k" || die "node n$k is not powered off"
  node_cgroups_make "$k"
  ip link set "$(host_veth "$k")" up
  rm -f "$(node_dir "$k")/powered-off"
  start_nodes "$k"
  wait_for "$NODES_READY_TIMEOUT" consul_server_healthy "$k" ||
    { show_logs "$k"; die "node n$k: its Consul server did not rejoin as a healthy voter within ${NODES_READY_TIMEOUT}s (logs above)"; }
  wait_for "$NODES_READY_TIMEOUT" nomad_node_back "$k" ||
    { show_logs "$k"; die "node n$k: its Nomad server and client did not rejoin within ${NODES_READY_TIMEOUT}s (logs above)"; }
  log "node n$k: powered on and rejoined in $((SECONDS - t0)) s"
}

# cmd_partition K: node K is cut off (its link goes down) while everything on it runs on.
cmd_partition() {
  check_node_arg "${1:-}"
  powered_off "$1" && die "node n$1 is powered off"
  ip link set "$(host_veth "$1")" down
  log "node n$1: partitioned (link $(host_veth "$1") down, its processes run on)"
}

# cmd_heal K: node K's link comes back up.
cmd_heal() {
  check_node_arg "${1:-}"
  powered_off "$1" && die "node n$1 is powered off (power-on, not heal)"
  ip link set "$(host_veth "$1")" up
  log "node n$1: healed (link $(host_veth "$1") up)"
}

# cmd_signal_node K SIGNAL WHAT: send SIGNAL to every process of node K's namespace.
cmd_signal_node() {
  check_node_arg "${1:-}"
  local pids
  pids="$(ip netns pids "$(node_ns "$1")" 2>/dev/null || true)"
  [ -n "$pids" ] || die "node n$1 runs no process"
  # shellcheck disable=SC2086
  kill -"$2" $pids 2>/dev/null || true
  log "node n$1: $3 ($(wc -w <<<"$pids") processes, SIG$2)"
}

# cmd_consul_kill K: node K's Consul server dies (SIGKILL); everything else runs on.
cmd_consul_kill() {
  check_node_arg "${1:-}"
  local pid
  pid="$(cat "$(node_dir "$1")/consul.pid" 2>/dev/null)" && pid_alive "$(node_dir "$1")/consul.pid" ||
    die "node n$1 runs no Consul server"
  kill -KILL "$pid"
  rm -f "$(node_dir "$1")/consul.pid"
  log "node n$1: Consul server killed (pid $pid)"
}

# cmd_consul_start K: node K's Consul server starts again on its data dir; waits until it
# is a healthy voter.
cmd_consul_start() {
  check_node_arg "${1:-}"
  local k=$1 t0=$SECONDS
  pid_alive "$(node_dir "$k")/consul.pid" && die "node n$k's Consul server runs"
  start_consul_server "$k"
  wait_for "$NODES_READY_TIMEOUT" consul_server_healthy "$k" ||
    { show_logs "$k"; die "node n$k: its Consul server did not rejoin as a healthy voter within ${NODES_READY_TIMEOUT}s (logs above)"; }
  log "node n$k: Consul server restarted and a healthy voter in $((SECONDS - t0)) s"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    power-off) cmd_power_off "${2:-}" ;;
    power-on) cmd_power_on "${2:-}" ;;
    partition) cmd_partition "${2:-}" ;;
    heal) cmd_heal "${2:-}" ;;
    freeze) cmd_signal_node "${2:-}" STOP "frozen" ;;
    thaw) cmd_signal_node "${2:-}" CONT "thawed" ;;
    consul-kill) cmd_consul_kill "${2:-}" ;;
    consul-start) cmd_consul_start "${2:-}" ;;
    *) die "usage: scripts/nodes.sh start [--nodes N] | stop | status | power-off K | power-on K | partition K | heal K | freeze K | thaw K | consul-kill K | consul-start K" ;;
  esac
fi
