#!/usr/bin/env python3
"""Where a query's time goes, from the services' own Prometheus metrics: the balancers'
request, embed and shard-call histograms, the embedders' inference time and the shards'
search time (every instance found through Consul's catalog, metrics on its
`metrics_port`). Run it before and after a measurement; `stages.py --diff BEFORE AFTER`
prints the mean per query of each stage during it.

    stages.py > before.json; ...; stages.py > after.json; stages.py --diff before.json after.json"""
import json
import os
import sys
import urllib.request

CONSUL = os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
# (service, metric) pairs whose _sum and _count are added up over every instance.
METRICS = {
    "simq-balancer": ("simq_balancer_request_seconds", "simq_balancer_embed_seconds", "simq_balancer_shard_seconds"),
    "simq-embedder": ("simq_embedder_inference_seconds",),
    "simq-shard": ("simq_shard_search_seconds",),
}


def snapshot():
    out = {}
    for service, names in METRICS.items():
        entries = json.load(urllib.request.urlopen(f"{CONSUL}/v1/catalog/service/{service}", timeout=5))
        for e in entries:
            port = e.get("ServiceMeta", {}).get("metrics_port")
            if not port:
                continue
            try:
                text = urllib.request.urlopen(f"http://{e['ServiceAddress'] or '127.0.0.1'}:{port}/metrics", timeout=5).read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if any(key in (f"{n}_sum", f"{n}_count") for n in names):
                    out[key] = out.get(key, 0.0) + float(value)
    return out


def diff(before, after):
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("simq_balancer_request_seconds_count", 0.0)

    def mean_ms(name):
        count = d.get(f"{name}_count", 0.0)
        return round(d.get(f"{name}_sum", 0.0) / count * 1000, 2) if count else None

    return {
        "queries": int(n),
        "request_ms": mean_ms("simq_balancer_request_seconds"),
        "embed_call_ms": mean_ms("simq_balancer_embed_seconds"),
        "embedder_inference_ms": mean_ms("simq_embedder_inference_seconds"),
        "shard_calls_per_query": round(d.get("simq_balancer_shard_seconds_count", 0.0) / n, 2) if n else None,
        "shard_call_ms": mean_ms("simq_balancer_shard_seconds"),
        "shard_search_ms": mean_ms("simq_shard_search_seconds"),
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--diff":
        print(json.dumps(diff(json.load(open(sys.argv[2])), json.load(open(sys.argv[3])))))
    elif len(sys.argv) == 1:
        print(json.dumps(snapshot()))
    else:
        sys.exit(__doc__)
