#!/usr/bin/env python3
"""Activation-patching benchmark: a full sweep (every layer x every position of a 26-token
prompt, one site) against the naive cost of one full forward pass per cell, both measured in
the same run against a running tiller.

Usage: scripts/patch_bench.py [URL]   (default http://localhost:8080)
"""
import json, time, urllib.request, statistics, sys
URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8080"
clean = "Fact: the Eiffel Tower, a famous landmark that was built in 1889, is located in the city of"
corrupted = "Fact: the Colosseum, a famous landmark that was built in the year 80, is located in the city of"
def post(path, body):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(), {"content-type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return out, time.perf_counter() - t
# One forward pass over the 26 tokens (layer 0 read only), as the naive per-cell cost.
passes = [post("/inspect/activations", {"prompt": corrupted, "layers": [0], "top_k": 0})[1] for _ in range(7)]
t_pass = statistics.median(passes)
sweep, wall = post("/inspect/patch", {"clean": clean, "corrupted": corrupted,
    "metric": {"logit_diff": [" Paris", " Rome"]}, "site": "resid_pre"})
cells = sweep["cells"]
print(json.dumps({"tokens": len(sweep["clean_tokens"]), "cells": cells, "sweep_s": round(wall, 2),
    "one_pass_s": round(t_pass, 4), "naive_s": round(cells * t_pass, 1),
    "speedup_vs_naive": round(cells * t_pass / wall, 2),
    "clean": sweep["clean"], "corrupted": sweep["corrupted"]}))
rec = sweep["recovery"]
toks = [t["text"] for t in sweep["corrupted_tokens"]]
for li in [0, 5, 10, 15, 20, 25, 29]:
    row = rec[li]
    best = max(range(len(row)), key=lambda p: row[p] if row[p] is not None else -9)
    print(f"layer {li:2d}: best position {best} ({toks[best]!r}) recovery {row[best]:.2f}; last {row[-1]:.2f}")
