#!/usr/bin/env python3
"""recall@k of recorded answers against exact search: embeds each recorded query with the
model (same file and tokenizer as simq), ranks every exported item by inner product, and
counts how many of the true top k texts each answer holds.

    recall.py --export DIR --model-dir DIR --k 10 RECORDS.jsonl...

Prints one JSON object: {file: recall}."""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--export", required=True)
p.add_argument("--model-dir", required=True)
p.add_argument("--k", type=int, default=10)
p.add_argument("--max", type=int, default=1000)
p.add_argument("records", nargs="+")
a = p.parse_args()

texts = open(os.path.join(a.export, "texts.txt"), encoding="utf-8").read().split("\n")[:-1]
vectors = np.fromfile(os.path.join(a.export, "vectors.f32"), dtype="<f4").reshape(len(texts), -1)
manifest = json.load(open(os.path.join(a.model_dir, "simq-model.json")))
tokenizer = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
tokenizer.no_padding()
tokenizer.enable_truncation(max_length=manifest.get("max_tokens", 256))
session = ort.InferenceSession(os.path.join(a.model_dir, "model.onnx"), providers=["CPUExecutionProvider"])
inputs = {i.name for i in session.get_inputs()}
truth_cache = {}


def truth(q):
    if q not in truth_cache:
        enc = tokenizer.encode(manifest.get("query_prefix", "") + q)
        feed = {
            "input_ids": np.array([enc.ids], dtype=np.int64),
            "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
        }
        hidden = session.run(None, {k: v for k, v in feed.items() if k in inputs})[0][0]
        v = hidden.mean(axis=0)
        v /= np.linalg.norm(v)
        scores = vectors @ v
        top = np.argpartition(-scores, a.k)[: a.k]
        truth_cache[q] = {texts[i] for i in top}
    return truth_cache[q]


out = {}
for path in a.records:
    rows = [json.loads(l) for l in open(path, encoding="utf-8")][: a.max]
    hits = sum(len(truth(r["query"]) & set(r["results"][: a.k])) for r in rows)
    out[os.path.basename(path)] = {"queries": len(rows), "recall": hits / max(1, len(rows) * a.k)}
print(json.dumps(out))
