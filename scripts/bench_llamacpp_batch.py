#!/usr/bin/env python3
"""llama.cpp's batched decode as the reference for tiller's batch throughput: N sequences of
the same context length decoded together, one token each per `llama_decode` call of N rows
(one `llama_batch`, one sequence id per row), on the same GGUF and thread count.

    pip install llama-cpp-python==0.3.36
    python3 scripts/bench_llamacpp_batch.py --model PATH.gguf --threads 2 --batch 1,2,4,8,16,32

Each batch size: every sequence is prefilled with the same `--context` tokens, then
`--decode-tokens` steps of N rows are timed. Prints one JSON object per batch size:
{"batch": N, "decode_tok_s": aggregate tokens/s, "per_sequence_tok_s": ..., "step_ms": ...}.
"""
import argparse
import json
import time

import llama_cpp as L


def fill(batch, rows):
    """rows: (token, pos, seq, wants_logits) tuples."""
    for i, (tok, pos, seq, out) in enumerate(rows):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if out else 0
    batch.n_tokens = len(rows)


def run(model, args, n):
    cp = L.llama_context_default_params()
    cp.n_ctx = (args.context + args.decode_tokens + 8) * n
    cp.n_batch = max(512, n)
    cp.n_ubatch = max(512, n)
    cp.n_seq_max = n
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"could not create a context for batch {n}")
    batch = L.llama_batch_init(max(args.context, n), 0, n)
    prompt = [500 + (i * 7) % 2000 for i in range(args.context)]
    for s in range(n):
        fill(batch, [(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)])
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("prefill failed")
    steps = args.decode_tokens
    t0 = time.perf_counter()
    for step in range(steps):
        fill(batch, [(504 + s, args.context + step, s, True) for s in range(n)])
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("decode failed")
        L.llama_get_logits(ctx)
    dt = time.perf_counter() - t0
    best = n * steps / dt
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return {
        "engine": "llama.cpp (llama-cpp-python %s)" % L.__version__,
        "batch": n,
        "threads": args.threads,
        "context": args.context,
        "decode_tokens": steps,
        "decode_tok_s": round(best, 1),
        "per_sequence_tok_s": round(best / n, 1),
        "step_ms": round(1000 * dt / steps, 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,2,4,8,16,32")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        raise SystemExit(f"could not load {args.model}")
    for n in [int(x) for x in args.batch.split(",")]:
        print(json.dumps(run(model, args, n)), flush=True)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
