#!/usr/bin/env python3
"""The peer simq is measured against: a plain similar-query service as a user would write
it in an afternoon. FastAPI in one uvicorn process, onnxruntime with one thread per core,
the same model file and tokenizer as simq, faiss IndexIVFFlat (inner product on
L2-normalised vectors) over exactly the items of simq's dg (`simq-indexer export`).

    peer.py --export DIR --model-dir DIR [--port 8091] [--nlist 1024] [--nprobe 16]

POST /v1/query {"query": "...", "k": 10} answers {"results": [{"text", "score"}]}."""
import argparse
import json
import os
import time

import faiss
import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--export", required=True)
p.add_argument("--model-dir", required=True)
p.add_argument("--port", type=int, default=8091)
p.add_argument("--nlist", type=int, default=1024)
p.add_argument("--nprobe", type=int, default=16)
a = p.parse_args()

started = time.time()
texts = open(os.path.join(a.export, "texts.txt"), encoding="utf-8").read().split("\n")[:-1]
vectors = np.fromfile(os.path.join(a.export, "vectors.f32"), dtype="<f4").reshape(len(texts), -1)
dims = vectors.shape[1]
quantizer = faiss.IndexFlatIP(dims)
index = faiss.IndexIVFFlat(quantizer, dims, a.nlist, faiss.METRIC_INNER_PRODUCT)
index.train(vectors)
index.add(vectors)
index.nprobe = a.nprobe

manifest = json.load(open(os.path.join(a.model_dir, "simq-model.json")))
tokenizer = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
tokenizer.no_padding()
tokenizer.enable_truncation(max_length=manifest.get("max_tokens", 256))
options = ort.SessionOptions()
options.intra_op_num_threads = os.cpu_count()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
session = ort.InferenceSession(os.path.join(a.model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])
inputs = {i.name for i in session.get_inputs()}
print(f"peer ready: {len(texts)} items, IVF{a.nlist} nprobe {a.nprobe}, {time.time() - started:.1f} s", flush=True)


def embed(text):
    enc = tokenizer.encode(manifest.get("query_prefix", "") + text)
    feed = {
        "input_ids": np.array([enc.ids], dtype=np.int64),
        "attention_mask": np.array([enc.attention_mask], dtype=np.int64),
        "token_type_ids": np.array([enc.type_ids], dtype=np.int64),
    }
    hidden = session.run(None, {k: v for k, v in feed.items() if k in inputs})[0]
    mask = feed["attention_mask"][..., None].astype(np.float32)
    v = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


app = FastAPI()


@app.post("/v1/query")
def query(body: dict):
    k = int(body.get("k", 10))
    scores, ids = index.search(embed(body["query"]), k)
    return {"results": [{"text": texts[i], "score": float(s)} for s, i in zip(scores[0], ids[0]) if i >= 0]}


@app.get("/health")
def health():
    return {"status": "ok"}


uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
