#!/usr/bin/env python3
"""Turns the JSON lines of scripts/bench.sh serve into BENCHMARKS.md and a plot.

    report.py RESULTS.jsonl --md BENCHMARKS.md --plot bench-latency.png --command "..."

Each line is a loadgen summary with "system" (simq or peer) and "phase" (closed, unloaded, open,
cache, overload, bound, hop, recall, scale, machine) added by bench.sh."""
import argparse
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("results")
p.add_argument("--md", required=True)
p.add_argument("--plot", required=True)
p.add_argument("--command", required=True)
a = p.parse_args()
rows = [json.loads(l) for l in open(a.results) if l.strip()]


def phase(name, system=None):
    return [r for r in rows if r.get("phase") == name and (system is None or r.get("system") == system)]


def one(name, system=None):
    found = phase(name, system)
    return found[-1] if found else {}


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(x, y):
    return "-" if not x or not y else f"{x / y:.2f}"


machine = one("machine")
bound = one("bound")
recall = one("recall")
md = []
md.append("# simq benchmarks\n")
md.append(f"Reproduce: `{a.command}` (with the `scripts/up.sh` stack running).\n")
md.append(f"Machine: {machine.get('cpus', '?')} cores ({machine.get('cpu', '?')}), {machine.get('memory', '?')}; "
          f"run {machine.get('date', '?')}; simq {machine.get('commit', '?')}; corpus {machine.get('items', '?')} queries.\n")
md.append("Everything below comes from one run on this machine: simq (the `up.sh` stack under Nomad: 2 balancers "
          "sharing port 8080 with 1 thread and 16 queries in flight each, 2 embedders of which the balancers call the "
          "first while the second stands by (`--embedder-order stable`), "
          f"{machine.get('shards', '?')} shards), the peer (`scripts/bench/peer.py`: FastAPI in one uvicorn "
          "process, onnxruntime with one thread per core, faiss `IndexIVFFlat` with "
          f"{machine.get('peer_nlist', '?')} lists and nprobe {machine.get('peer_nprobe', '?')}, same model file, "
          "tokenizer and items), and the bound (bare ONNX Runtime on the same queries, no service). "
          "Load: unique perturbed corpus queries (`scripts/bench/queries.py`, fixed seed), none repeated, so every "
          "simq query misses its answer cache unless the table says otherwise. Load generator: "
          "`balancer/examples/loadgen.rs` (hyper's pooled HTTP/1 client, about 30 µs of CPU per request) on the same "
          "2 cores.\n")

md.append("## Targets\n")
simq_unloaded = next((r for r in phase("closed", "simq") if r.get("connections") == 1), {})
peer_unloaded = next((r for r in phase("closed", "peer") if r.get("connections") == 1), {})
simq_best = max((r.get("throughput", 0) for r in phase("closed", "simq")), default=0)
peer_best = max((r.get("throughput", 0) for r in phase("closed", "peer")), default=0)
cache = one("cache", "simq")
over = one("overload", "simq")
hostile = one("overload_hostile", "simq")
after = one("after_overload", "simq")
md.append("| target | measured | met |")
md.append("|---|---|---|")
t1 = simq_unloaded.get("p50_ms"), peer_unloaded.get("p50_ms")
t1_how = ""
# Alternating short runs (phase "unloaded"), when the run has them: the median of each
# system's per-run p50.
pairs = [(s, next((q for q in phase("unloaded", "peer") if q.get("round") == s.get("round")), None))
         for s in phase("unloaded", "simq")]
pairs = [(s["p50_ms"], q["p50_ms"]) for s, q in pairs if q and s.get("p50_ms") and q.get("p50_ms")]
if pairs:
    t1 = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    t1_how = (f" (medians of {len(pairs)} alternating 5 s runs each; simq's p50 the lower in "
              f"{sum(1 for s, q in pairs if s <= q)} of {len(pairs)} pairs)")
md.append(f"| unloaded p50 <= peer's p50 | simq {fmt(t1[0], 2)} ms, peer {fmt(t1[1], 2)} ms{t1_how} | {'yes' if t1[0] and t1[1] and t1[0] <= t1[1] else 'no'} |")
md.append(f"| saturated throughput >= 1.6 x peer | simq {fmt(simq_best)} /s, peer {fmt(peer_best)} /s, ratio {ratio(simq_best, peer_best)} | {'yes' if peer_best and simq_best >= 1.6 * peer_best else 'no'} |")
b = bound.get("best_texts_per_s")
md.append(f"| saturated throughput >= 0.85 x bare-model bound | bound {fmt(b)} /s, ratio {ratio(simq_best, b)} | {'yes' if b and simq_best >= 0.85 * b else 'no'} |")
rs = recall.get("simq")
md.append(f"| recall@10 >= 0.98 at the defaults | simq {fmt(rs, 4)}, peer {fmt(recall.get('peer'), 4)} | {'yes' if rs and rs >= 0.98 else 'no'} |")
md.append(f"| cache hits >= 20,000 /s | {fmt(cache.get('throughput'), 0)} /s | {'yes' if cache.get('throughput', 0) >= 20000 else 'no'} |")
for label, o in (("clients wait Retry-After", over), ("clients ignore Retry-After", hostile)):
    if o:
        md.append(f"| overload ({label}): refusals < 50 ms, accepted answer in the deadline | refused p99 {fmt(o.get('refused_p99_ms'))} ms, accepted p99 {fmt(o.get('p99_ms'))} ms, {o.get('by_status')}, {o.get('degraded', 0)} of the accepted answered by the light contour (degraded), {o.get('cached', 0)} from the answer cache | "
                  f"{'yes' if (o.get('refused_p99_ms') or 0) < 50 and (o.get('p99_ms') or 0) < 2000 else 'no'} |")
if after:
    md.append(f"| normal service within 5 s after overload | p50 {fmt(after.get('p50_ms'), 2)} ms, failed {after.get('failed')}, queues {after.get('queues', '?')} | "
              f"{'yes' if after.get('failed') == 0 else 'no'} |")
for r in phase("rollout", "simq"):
    md.append(f"| {r.get('step')} under unique-query load at {r.get('share')} of capacity: zero failed, zero degraded | "
              f"{r.get('ok')} answered ({r.get('cached', 0)} from the answer cache), {r.get('failed')} failed {r.get('by_status')}, "
              f"{r.get('degraded')} degraded, p99 {fmt(r.get('p99_ms'))} ms | "
              f"{'yes' if r.get('failed') == 0 and r.get('degraded') == 0 else 'no'} |")
md.append("")

md.append("## Bound: bare ONNX Runtime, same queries\n")
md.append(f"Single query (one session, a thread per core): p50 {fmt(bound.get('single_query_p50_ms'), 2)} ms, "
          f"p99 {fmt(bound.get('single_query_p99_ms'), 2)} ms. Best throughput ({bound.get('best_layout', '?')}): "
          f"{fmt(bound.get('best_texts_per_s'))} texts/s.\n")

cpu = one("cpu_share")
if cpu:
    numbers = {k: v for k, v in cpu.items() if isinstance(v, (int, float)) and v > 0.005}
    shares = ", ".join(f"{k} {v * 100:.0f} %" for k, v in sorted(numbers.items(), key=lambda kv: -kv[1]))
    md.append("## Where the CPU goes at saturation\n")
    md.append(f"simq under 32 closed-loop connections, share of the whole machine per program: {shares}.\n")
    cpu_run = one("cpu", "simq")
    cores = machine.get("cpus") or 2
    if cpu_run.get("throughput") and b:
        per_query = {k: v * cores * 1000 / cpu_run["throughput"] for k, v in numbers.items()}
        bare = cores * 1000 / b
        total = sum(v for k, v in per_query.items() if k.startswith("simq-"))
        md.append(f"What limits it: at {cpu_run['throughput']:.0f} queries/s the embedder spends "
                  f"{per_query.get('simq-embedder', 0):.1f} ms of CPU per query, against {bare:.1f} ms per text for the bare "
                  f"model at its best ({bound.get('best_layout', '?')}); the shards spend {per_query.get('simq-shard', 0):.1f} ms "
                  f"and the balancer {per_query.get('simq-balancer', 0):.1f} ms, in all "
                  f"{total:.1f} ms of CPU per query, which caps {cores} cores at {cores * 1000 / max(total, 0.001):.0f} "
                  "queries/s before the load generator (on the same cores, not counted above) takes its share. The "
                  "embedder sorts the texts it gathers from concurrent requests by length and cuts them into the batches "
                  "of least cost for one single-threaded session per core (a lone query runs on one more session with a "
                  "thread per core); the bound hands all texts at once, sorted by length, to the same sessions: the gap "
                  "is the padding and the fixed cost of the small batches that concurrent requests form "
                  "(embedder/BENCH.md). Even at the bound's CPU per text, with the shards and the balancer as they are, "
                  "the 2 cores would answer at most "
                  f"{cores * 1000 / max(total - per_query.get('simq-embedder', 0) + bare, 0.001):.0f} "
                  "queries/s.\n")

stages = one("stages")
if stages.get("queries"):
    shard_phase = (stages.get("request_ms") or 0) - (stages.get("embed_call_ms") or 0)
    md.append("## Where an unloaded query's time goes\n")
    md.append(f"One query at a time (the first closed-loop row, {stages['queries']} queries), means per query from the "
              f"services' own metrics (`scripts/bench/stages.py`): the balancer answered in {fmt(stages.get('request_ms'), 2)} ms. "
              f"Its embed call took {fmt(stages.get('embed_call_ms'), 2)} ms, of which {fmt(stages.get('embedder_inference_ms'), 2)} ms "
              f"of inference in the embedder (the bare model alone: p50 {fmt(bound.get('single_query_p50_ms'), 2)} ms); the rest "
              f"is the gRPC hop, tokenising and the hand-over to the inference thread. Then {stages.get('shard_calls_per_query')} "
              f"shard calls in parallel, each {fmt(stages.get('shard_call_ms'), 2)} ms as the balancer sees it, of which "
              f"{fmt(stages.get('shard_search_ms'), 2)} ms inside the shard: {fmt(shard_phase, 2)} ms from the vector to the merged answer, on 2 cores shared by the balancer and "
              f"every shard process. The peer embeds and searches in one process: p50 {fmt(peer_unloaded.get('p50_ms'))} ms.\n")
    hop = {(r.get("kind"), r.get("idle_us")): r for r in phase("hop")}
    if hop:
        def hop_ms(kind, idle):
            return fmt(hop.get((kind, idle), {}).get("p50_ms"), 2)
        sweep = ", ".join(f"{hop_ms('shard', i)} / {hop_ms('embedder', i)} ms after {i // 1000} ms"
                          for i in (1000, 2000, 5000, 20000) if ("shard", i) in hop)
        md.append("What a hop costs: a gRPC call that does no work (`Info`, `balancer/examples/grpc_rtt.rs`, one at a "
                  f"time, 1000 calls) took p50 {hop_ms('shard', 0)} ms to a shard and {hop_ms('embedder', 0)} ms to an "
                  f"embedder back to back, and more the longer the service had idled before each call ({sweep}); "
                  "between the stages of a query the embedder and the shards idle about 5 ms. This is not the wake-up "
                  "of a halted core: in a hand-run (2026-11-25, a shard outside the cluster) a shard and its client pinned "
                  "to the same CPU paid 0.41-0.46 ms after 5 ms against 0.36-0.46 unpinned, a shard on a one-thread "
                  "runtime the same, a client spinning instead of sleeping more, and a Python echo over a plain socket "
                  "0.12 ms. The cost grows with the idle time, as a "
                  "working set going cold on a shared virtual machine would, and a gRPC server's working set (tokio, "
                  "hyper, h2, tonic) is larger than an echo's. simq pays it on the embed call and again on the shard "
                  "calls (in parallel); the peer has no hop between embedding and search.\n")

if pairs:
    md.append("## Unloaded, alternating runs\n")
    md.append("One connection, unique queries, simq and the peer in turn for 5 s each (p50 ms per run, in order): "
              + "; ".join(f"{s:.2f} / {q:.2f}" for s, q in pairs) + ".\n")

md.append("## Closed loop, unique queries\n")
md.append("| connections | simq q/s | simq p50 / p90 / p99 ms | simq failed / degraded / cache hits | peer q/s | peer p50 / p90 / p99 ms | peer failed | simq / peer | simq / bound |")
md.append("|---:|---:|---|---|---:|---|---|---:|---:|")
for s in phase("closed", "simq"):
    c = s.get("connections")
    q = next((r for r in phase("closed", "peer") if r.get("connections") == c), {})
    md.append(f"| {c} | {fmt(s.get('throughput'))} | {fmt(s.get('p50_ms'))} / {fmt(s.get('p90_ms'))} / {fmt(s.get('p99_ms'))} | "
              f"{s.get('failed')} / {s.get('degraded')} / {s.get('cached', 0)} | {fmt(q.get('throughput'))} | "
              f"{fmt(q.get('p50_ms'))} / {fmt(q.get('p90_ms'))} / {fmt(q.get('p99_ms'))} | {q.get('failed', '-')} | "
              f"{ratio(s.get('throughput'), q.get('throughput'))} | {ratio(s.get('throughput'), b)} |")
md.append("")

resend = phase("closed_resend", "simq")
if resend:
    md.append("## Closed loop, clients that resend at once after a 503\n")
    md.append("Each connection sends its next unique query as soon as it gets an answer or a refusal, "
              "ignoring `Retry-After` (as `wrk` and most HTTP clients and worker pools do). "
              "Refused: 503 answers (each a request, so a client that resends at once can be refused many times per answered query).\n")
    md.append("| connections | simq answered q/s | simq p50 / p99 ms | simq refused (503) / other failed / degraded | peer answered q/s | peer p50 / p99 ms | peer failed | simq / peer |")
    md.append("|---:|---:|---|---|---:|---|---|---:|")
    for s in resend:
        c = s.get("connections")
        q = next((r for r in phase("closed_resend", "peer") if r.get("connections") == c), {})
        refused = (s.get("by_status") or {}).get("503", 0)
        md.append(f"| {c} | {fmt(s.get('throughput'))} | {fmt(s.get('p50_ms'))} / {fmt(s.get('p99_ms'))} | "
                  f"{refused} / {s.get('failed', 0) - refused} / {s.get('degraded')} | {fmt(q.get('throughput'))} | "
                  f"{fmt(q.get('p50_ms'))} / {fmt(q.get('p99_ms'))} | {q.get('failed', '-')} | {ratio(s.get('throughput'), q.get('throughput'))} |")
    md.append("")

md.append("## Open loop, unique queries\n")
md.append("Latency counted from each query's scheduled send time.\n")
md.append("| offered q/s | simq answered q/s | simq p50 / p99 ms | simq failed (by status) | peer answered q/s | peer p50 / p99 ms | peer failed |")
md.append("|---:|---:|---|---|---:|---|---|")
for s in phase("open", "simq"):
    rate = s.get("offered_rate")
    q = next((r for r in phase("open", "peer") if r.get("offered_rate") == rate), {})
    md.append(f"| {fmt(rate, 0)} | {fmt(s.get('throughput'))} | {fmt(s.get('p50_ms'))} / {fmt(s.get('p99_ms'))} | "
              f"{s.get('failed')} {s.get('by_status')} | {fmt(q.get('throughput'))} | {fmt(q.get('p50_ms'))} / {fmt(q.get('p99_ms'))} | {q.get('failed', '-')} |")
md.append("")

md.append("## Cache hits\n")
md.append(f"{cache.get('connections', '?')} connections repeating {cache.get('repeat', '?')} queries: "
          f"{fmt(cache.get('throughput'), 0)} answers/s, p50 {fmt(cache.get('p50_ms'), 2)} ms, p99 {fmt(cache.get('p99_ms'), 2)} ms, "
          f"{cache.get('cached')} of {cache.get('ok')} from the cache.\n")

md.append("## Recall@10 against exact search\n")
md.append(f"Over {recall.get('queries', '?')} answered unique queries of the closed-loop runs, exact top 10 by brute force "
          f"over every item (`scripts/bench/recall.py`): simq {fmt(rs, 4)}, peer {fmt(recall.get('peer'), 4)}.\n")

scale = phase("scale")
if scale:
    md.append("## Cost as the corpus grows\n")
    md.append("`scripts/bench.sh scale`: `simq-indexer build` of the first 10k and 50k queries and of all of them "
              "(embedding timed apart; \"cached\": embedded by an earlier run, delete `~/.cache/simq/bench/scale/dgs/.embeddings/` "
              "to time it again), then `simq-indexer eval` "
              "(500 stored queries sent again, nprobe 576, routing and shard search in one thread).\n")
    md.append("| items | shards | clusters | k-means + index s | embedding s | corpus read per query | recall@10 | search ms per query |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in scale:
        md.append(f"| {r.get('items')} | {r.get('shards')} | {r.get('clusters')} | {fmt(r.get('build_s'))} | {fmt(r.get('embed_s')) if (r.get('embed_s') or 0) >= 1 else 'cached'} | {r.get('scanned')} | {r.get('recall')} | {r.get('mean_ms')} |")
    md.append("")

if over:
    md.append("## Overload and recovery\n")
    md.append("The closed-loop rows above and the first overload run use clients that wait a refusal's "
              "`Retry-After` before their next query, as well-behaved HTTP clients do; the second run's clients "
              "resend at once (`loadgen --ignore-retry-after`), so refusals themselves load the 2 cores that the "
              "balancer, the embedder and the load generator share. Each run wraps within its own half of the "
              "long queries and never resends a query that was answered, so accepted queries miss the answer "
              "cache (refused ones never reached it and may be sent again).\n")
    for label, o in (("Clients waiting Retry-After", over), ("Clients ignoring Retry-After", hostile)):
        if o:
            md.append(f"{label}: {o.get('connections')} connections of long unique queries for {fmt(o.get('seconds'), 0)} s: "
                      f"answers by status {o.get('by_status')} ({o.get('degraded', 0)} answered by the light contour, degraded; {o.get('cached', 0)} from the answer cache), accepted p50 {fmt(o.get('p50_ms'))} ms / p99 {fmt(o.get('p99_ms'))} ms, "
                      f"refusals p99 {fmt(o.get('refused_p99_ms'))} ms.\n")
    if after:
        md.append(f"Then, {after.get('after_s', '?')} s after the last overload stopped, 8 connections of normal unique queries: "
                  f"{fmt(after.get('throughput'))} q/s, p50 {fmt(after.get('p50_ms'), 2)} ms, failed {after.get('failed')}; "
                  f"embedder queue {after.get('queues', '?')}.")
    md.append("\n")

rollouts = phase("rollout", "simq")
if rollouts:
    md.append("## Rollout and rollback under load\n")
    md.append("`scripts/bench.sh rollout`: a second dg of the full corpus (4000 fine clusters instead of 4096) rolled "
              "out with `simq-indexer rollout` (new shards as canaries beside the old, verified, one flip, promotion), "
              "then `simq-indexer rollback`, each under open-loop unique queries at a share of the best closed-loop "
              "throughput above; the load starts 5 s before the step and ends 5 s after it.\n")
    md.append("For about 5 s after the new shards are placed, Nomad starts an executor and a logmon process per "
              "allocation (two Go processes per shard) and copies the dg's shard files (675 MB) out of the blob store. "
              "Those processes sit in the root CPU cgroup or in Nomad's parent cgroup, where each of their threads "
              "weighed as much as all of Nomad's tasks together (the tasks share `/nomad`, 1024 shares): the serving "
              "processes got a small share of the CPU, queries queued past the balancers' in-flight limit and were "
              "refused (503). `scripts/cluster.sh` now starts the Nomad agent, and with it logmon and the artifact "
              "downloads, in a cgroup of its own with 64 CPU shares, so that machinery runs on what serving leaves "
              "idle. Measured on one stack at 78.3 queries/s (0.5 of capacity), rollout then rollback, fresh "
              "queries each run: the agent in the root cgroup as before, 84 + 59 and 94 + 79 failed (p99 about 1 s) "
              "in two runs; in its own cgroup, 0 + 0 failed and 0 degraded in two runs (p99 68-120 ms). (Those runs, "
              "on 2026-11-24 at 1ea9bf7, moved the running agent and its logmon processes into the cgroup by hand, "
              "as `cluster.sh` now does at start.) The rows below are this run's. The shards' own file checks "
              "run under SCHED_IDLE. Cache hits are counted apart: each run takes queries no earlier run on the "
              "stack used.\n")
    md.append("| step | step took s | offered q/s | answered | of them cache hits | failed (by status) | degraded | p50 / p99 ms | CPU share by program over the step |")
    md.append("|---|---:|---:|---:|---:|---|---:|---|---|")
    for r in rollouts:
        cpu = ", ".join(f"{k} {v * 100:.0f} %" for k, v in sorted((r.get("cpu") or {}).items(), key=lambda kv: -kv[1]) if v >= 0.01)
        md.append(f"| {r.get('step')} | {r.get('step_s')} | {fmt(r.get('offered_rate'))} | {r.get('ok')} | {r.get('cached', 0)} | {r.get('failed')} {r.get('by_status')} | "
                  f"{r.get('degraded')} | {fmt(r.get('p50_ms'))} / {fmt(r.get('p99_ms'))} | {cpu} |")
    md.append("")

md.append(f"![latency against offered load]({a.plot.split('/')[-1]})\n")
open(a.md, "w").write("\n".join(md))

fig, ax = plt.subplots(figsize=(7, 4.5))
for system, style in (("simq", "o-"), ("peer", "s--")):
    pts = sorted((r["offered_rate"], r.get("p50_ms"), r.get("p99_ms")) for r in phase("open", system) if r.get("p50_ms"))
    if pts:
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=f"{system} p50")
        ax.plot([x for x, _, _ in pts], [z for _, _, z in pts], style, alpha=0.5, label=f"{system} p99")
ax.set_xlabel("offered load (unique queries/s)")
ax.set_ylabel("latency (ms)")
ax.set_yscale("log")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
ax.set_title("Latency against offered load (open loop, unique queries)")
fig.tight_layout()
fig.savefig(a.plot, dpi=110)
