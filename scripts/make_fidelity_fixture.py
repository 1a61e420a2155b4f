#!/usr/bin/env python3
"""Writes tests/fixtures/fidelity/<model>.json: llama.cpp's greedy continuations of fixed raw
prompts, unsteered and with a control vector, for tiller's teacher-forced agreement tests.

For each prompt: the prompt's token ids (BOS as the model's file says), the 24 tokens
llama.cpp's greedy decoding appends, the margin between the top two log-probabilities at
each step (a small margin is a near tie that rounding may flip) and the five most likely
tokens with their log-probabilities. The steered runs add a fixed
direction to the output of three middle blocks with llama.cpp's control-vector API
(`llama_apply_adapter_cvec`: row N-1 of its data is added to the output of block N); the
fixture stores the direction so tiller can add exactly the same one.

    pip install llama-cpp-python==0.3.36
    python3 scripts/make_fidelity_fixture.py smollm2-135m-instruct data/models/SmolLM2-135M-Instruct.Q4_1.gguf 80
    python3 scripts/make_fidelity_fixture.py gemma3-270m data/models/gemma-3-270m-q4_k_m.gguf 100
    python3 scripts/make_fidelity_fixture.py qwen2.5-coder-0.5b-instruct data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 10

The last argument is the norm of the added direction (about half the residual norm at those
blocks, which differs by orders of magnitude between models).
"""
import ctypes
import json
import math
import os
import sys

import llama_cpp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "In 1969, Neil Armstrong",
]
STEERED_PROMPTS = PROMPTS
STEPS = 24


def log_softmax(x):
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def greedy(llm, prompt_ids, steps):
    llm.reset()
    llm.eval(prompt_ids)
    out, margins, top = [], [], []
    for _ in range(steps):
        lp = log_softmax(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
        order = np.argsort(-lp)
        out.append(int(order[0]))
        margins.append(round(float(lp[order[0]] - lp[order[1]]), 4))
        top.append([[int(t), round(float(lp[t]), 4)] for t in order[:5]])
        llm.eval([int(order[0])])
    return out, margins, top


def direction(n_embd, layer, norm):
    v = np.array([math.sin(0.37 * i + 1.3 * layer) for i in range(n_embd)], dtype=np.float64)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def main():
    name, path, norm = sys.argv[1], sys.argv[2], float(sys.argv[3])
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    n_embd = llama_cpp.llama_model_n_embd(llm.model)
    runs = []
    for p in PROMPTS:
        ids = llm.tokenize(p.encode(), add_bos=True, special=True)
        cont, margins, top = greedy(llm, ids, STEPS)
        runs.append({"prompt": p, "prompt_ids": ids, "continuation": cont, "margins": margins,
                     "top_logprobs": top})
    layers = [n_layer // 2 - 1, n_layer // 2, n_layer // 2 + 1]
    dirs = {l: direction(n_embd, l, norm) for l in layers}
    data = np.zeros(n_embd * n_layer, dtype=np.float32)
    for l, v in dirs.items():
        data[(l - 1) * n_embd: l * n_embd] = v
    buf = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if llama_cpp.llama_apply_adapter_cvec(llm.ctx, buf, len(data), n_embd, 1, n_layer) != 0:
        raise SystemExit("llama_apply_adapter_cvec failed")
    steered = []
    for p in STEERED_PROMPTS:
        ids = llm.tokenize(p.encode(), add_bos=True, special=True)
        cont, margins, top = greedy(llm, ids, STEPS)
        steered.append({"prompt": p, "prompt_ids": ids, "continuation": cont, "margins": margins,
                        "top_logprobs": top})
    os.makedirs("tests/fixtures/fidelity", exist_ok=True)
    out = "tests/fixtures/fidelity/%s.json" % name
    doc = {
        "source": "llama.cpp via llama-cpp-python %s, greedy, n_threads=2" % llama_cpp.__version__,
        "model": os.path.basename(path),
        "unsteered": runs,
        "steering": {"layers": {str(l): [float(x) for x in v] for l, v in dirs.items()},
                     "norm": norm, "runs": steered},
    }
    with open(out, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    for r in runs + steered:
        print(repr(llm.detokenize(r["continuation"]).decode("utf-8", "replace")))
    print(out)


if __name__ == "__main__":
    main()
