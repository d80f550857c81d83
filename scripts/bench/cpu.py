#!/usr/bin/env python3
"""CPU seconds used so far by simq's processes and the benchmark's, grouped by program
(simq-embedder, simq-balancer, simq-shard, loadgen, python peer), from /proc. Run it
before and after a measurement; `cpu.py --diff BEFORE AFTER SECONDS` prints each group's
share of the machine during the measurement.

    cpu.py > before.json; ...; cpu.py > after.json; cpu.py --diff before.json after.json 10"""
import json
import os
import sys

GROUPS = ("simq-embedder", "simq-balancer", "simq-shard", "loadgen", "peer.py", "simq-indexer", "consul", "nomad")


def snapshot():
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        words = " ".join(c.decode(errors="replace") for c in cmd[:3])
        group = next((g for g in GROUPS if g in words), None)
        if group:
            out[group] = out.get(group, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return out


if len(sys.argv) == 5 and sys.argv[1] == "--diff":
    before, after = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
    seconds, cores = float(sys.argv[4]), os.cpu_count()
    print(json.dumps({g: round((after.get(g, 0) - before.get(g, 0)) / seconds / cores, 3) for g in after}))
else:
    print(json.dumps(snapshot()))
