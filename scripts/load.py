#!/usr/bin/env python3
"""Bounded query load against the balancer, for measuring downtime during rollouts.

    scripts/load.py [--port 8080] [--max 20000] [--seconds 300] [--stop-file F] CORPUS

Sends real corpus questions one at a time (20 ms apart) until --max queries, --seconds,
or until the stop file exists; then prints one JSON line: ok, failed (with the first
failures), answers per dg in order of first appearance, and latency percentiles."""
import argparse, json, os, time, urllib.error, urllib.request

p = argparse.ArgumentParser()
p.add_argument("corpus")
p.add_argument("--port", type=int, default=8080)
p.add_argument("--max", type=int, default=20000)
p.add_argument("--seconds", type=float, default=300)
p.add_argument("--stop-file")
a = p.parse_args()
texts = [l.strip() for l in open(a.corpus, encoding="utf-8") if l.strip()][::97][:2000]
ok, failed, dgs, lat = 0, [], {}, []
start = time.time()
for i in range(a.max):
    if time.time() - start > a.seconds or (a.stop_file and os.path.exists(a.stop_file)):
        break
    body = json.dumps({"query": texts[i % len(texts)], "k": 5}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{a.port}/v1/query", data=body, method="POST")
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            ans = json.load(r)
            ok += 1
            dgs[ans["dg"]] = dgs.get(ans["dg"], 0) + 1
            lat.append((time.time() - t) * 1000)
    except urllib.error.HTTPError as e:
        failed.append(f"{e.code} {e.read()[:200]!r}")
    except Exception as e:  # connection refused, timeout
        failed.append(repr(e)[:200])
    time.sleep(0.02)
lat.sort()
pct = lambda q: round(lat[min(len(lat) - 1, int(len(lat) * q))], 1) if lat else None
print(json.dumps({"ok": ok, "failed": len(failed), "first_failures": failed[:5], "dgs": dgs,
                  "p50_ms": pct(0.5), "p99_ms": pct(0.99), "seconds": round(time.time() - start, 1)}))
