#!/usr/bin/env python3
"""CPU seconds used so far by simq's processes and the benchmark's, grouped by program
(simq-embedder, simq-balancer, simq-shard, loadgen, python peer), from /proc. Run it
before and after a measurement; `cpu.py --diff BEFORE AFTER SECONDS` prints each group's
share of the machine during the measurement. Counted per process: one that starts during
the measurement counts from its start, one that exits during it (the old shards of a
rollout) counts nothing, since its time after the first snapshot is gone with it (a group
total would go negative).

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
            out[pid] = [group, (int(stat[11]) + int(stat[12])) / tick]
    return out


if len(sys.argv) == 5 and sys.argv[1] == "--diff":
    before, after = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
    seconds, cores = float(sys.argv[4]), os.cpu_count()
    used = {}
    for pid, (group, cpu) in after.items():
        was = before.get(pid)
        start = was[1] if was and was[0] == group else 0.0
        used[group] = used.get(group, 0.0) + cpu - start
    print(json.dumps({g: round(u / seconds / cores, 3) for g, u in used.items()}))
else:
    print(json.dumps(snapshot()))
