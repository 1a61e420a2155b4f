#!/usr/bin/env python3
"""Checks that a control vector exported by tiller steers llama.cpp exactly as it steers tiller.

Loads the GGUF control vector the way llama.cpp's `llama_control_vector_load` does (tensors
`direction.N`, N >= 1, scaled at load), applies it with `llama_apply_adapter_cvec` over layers
1..n_layer (llama.cpp adds direction.N to the output of block N), and compares the next-token
log-probabilities after a prompt with tiller's `/inspect/logprobs` for the same vector added at
its own layers with the same scale.

    pip install llama-cpp-python==0.3.36 gguf
    curl -s 'localhost:8080/vectors/golden_gate?format=gguf' -o /tmp/golden_gate.gguf
    python3 scripts/llamacpp_control_vector.py --model data/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --vector /tmp/golden_gate.gguf --name golden_gate --scale 2.5 --url http://127.0.0.1:8080
"""
import argparse
import ctypes
import json
import math
import urllib.request

import gguf
import llama_cpp
import numpy as np


def load_control_vector(path, scale, n_layer):
    """Mirrors llama.cpp's common loader: data[(il - 1) * n_embd ...] = direction.il * scale."""
    reader = gguf.GGUFReader(path)
    dirs = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            raise SystemExit("unexpected tensor %s" % t.name)
        layer = int(t.name.split(".")[1])
        if layer == 0 or t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise SystemExit("llama.cpp would refuse %s" % t.name)
        dirs[layer] = np.array(t.data, dtype=np.float32)
    n_embd = len(next(iter(dirs.values())))
    data = np.zeros(n_embd * n_layer, dtype=np.float32)
    for il, v in dirs.items():
        data[(il - 1) * n_embd: il * n_embd] = v * scale
    return data, n_embd, sorted(dirs)


def log_softmax(x):
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def llama_logprobs(model, prompt, cvec):
    llm = llama_cpp.Llama(model, n_threads=2, verbose=False, n_ctx=512, logits_all=True)
    n_layer = llama_cpp.llama_model_n_layer(llm.model) if hasattr(llama_cpp, "llama_model_n_layer") else llm.metadata_n_layer
    if cvec is not None:
        data, n_embd = cvec
        buf = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_apply_adapter_cvec(llm.ctx, buf, len(data), n_embd, 1, n_layer)
        if rc != 0:
            raise SystemExit("llama_apply_adapter_cvec failed: %d" % rc)
    toks = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.eval(toks)
    return log_softmax(np.array(llm.scores[len(toks) - 1], dtype=np.float64)), llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--vector", required=True, help="control-vector GGUF exported by tiller")
    ap.add_argument("--name", required=True, help="the vector's name on the tiller server")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--prompt", default="<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is your favourite landmark?<|im_end|>\n<|im_start|>assistant\nMy favourite landmark is the")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()

    probe = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    n_layer = int(probe.metadata["llama.block_count"])
    data, n_embd, layers = load_control_vector(args.vector, args.scale, n_layer)
    base, llm = llama_logprobs(args.model, args.prompt, None)
    steered, _ = llama_logprobs(args.model, args.prompt, (data, n_embd))
    top = np.argsort(-steered)[: args.top]
    targets = [llm.detokenize([int(t)]).decode("utf-8", "replace") for t in top]

    body = {"prompt": args.prompt, "targets": targets, "top_k": args.top,
            "steering": [{"vector": args.name, "coefficient": args.scale}]}
    req = urllib.request.Request(args.url + "/inspect/logprobs", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    tiller = json.load(urllib.request.urlopen(req))

    rows = []
    for t, tok in zip(targets, top):
        tr = next(x for x in tiller["targets"] if x["text"] == t)
        if len(tr["token_ids"]) != 1:
            continue
        rows.append({
            "token": t,
            "llama_cpp_unsteered": round(float(base[tok]), 3),
            "llama_cpp_steered": round(float(steered[tok]), 3),
            "tiller_unsteered": round(tr["unsteered"]["logprob"], 3),
            "tiller_steered": round(tr["steered"]["logprob"], 3),
        })
    shift_l = np.array([r["llama_cpp_steered"] - r["llama_cpp_unsteered"] for r in rows])
    shift_t = np.array([r["tiller_steered"] - r["tiller_unsteered"] for r in rows])
    corr = float(np.corrcoef(shift_l, shift_t)[0, 1]) if len(rows) > 2 else float("nan")
    print(json.dumps({
        "layers": layers,
        "scale": args.scale,
        "llama_cpp_top_steered": [r["token"] for r in rows],
        "tiller_top_steered": [x["token"] for x in tiller["top"]["steered"]],
        "rows": rows,
        "shift_correlation": round(corr, 4),
        "max_shift_difference": round(float(np.max(np.abs(shift_l - shift_t))), 3) if rows else None,
    }, indent=1))


if __name__ == "__main__":
    main()
