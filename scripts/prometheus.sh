#!/usr/bin/env bash
# Runs Prometheus in the foreground against the local cluster: it finds every simq
# instance through Consul (consul/prometheus/prometheus.yml) and evaluates the alert rules
# (consul/prometheus/alerts.yml). Ctrl-C stops it.
#
#   scripts/prometheus.sh [PORT]    UI and API on 127.0.0.1:PORT [default: 9090]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

port="${1:-9090}"
"$SIMQ_ROOT/scripts/setup.sh" prometheus
curl -fsS "$CONSUL_HTTP_ADDR/v1/status/leader" >/dev/null 2>&1 ||
  die "Consul does not answer at $CONSUL_HTTP_ADDR: start the cluster (scripts/up.sh or scripts/cluster.sh start)"
data="$SIMQ_CACHE/prometheus-data"
mkdir -p "$data"
log "prometheus on http://127.0.0.1:$port (targets: /targets, alerts: /alerts); data in $data"
exec "$PROMETHEUS_BIN" --config.file="$SIMQ_ROOT/consul/prometheus/prometheus.yml" \
  --web.listen-address="127.0.0.1:$port" --storage.tsdb.path="$data" --log.level=warn
