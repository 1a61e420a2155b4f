#!/usr/bin/env python3
"""Side-by-side reference: prefill and decode tokens/s of llama.cpp (llama-cpp-python) on a GGUF.

Runs the same prompt shape as `tiller bench` (a prompt of N tokens, then M greedy decode steps)
so the two can be compared as a ratio measured on the same machine in one sitting:

    pip install llama-cpp-python==0.3.36
    python3 scripts/bench_llamacpp.py --model PATH.gguf --threads 2 --prompt-tokens 225 --decode-tokens 128

Prints one JSON object: {"prefill_tok_s": ..., "decode_tok_s": ...}.
"""
import argparse
import json
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=225)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    llm = llama_cpp.Llama(
        args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.prompt_tokens + args.decode_tokens + 8,
        n_batch=512,
        verbose=False,
    )
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 5 + 10)
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)[: args.prompt_tokens]
    best_prefill, best_decode = 0.0, 0.0
    for _ in range(args.repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = 504
        for _ in range(args.decode_tokens):
            llm.eval([tok])
        t2 = time.perf_counter()
        best_prefill = max(best_prefill, len(prompt) / (t1 - t0))
        best_decode = max(best_decode, args.decode_tokens / (t2 - t1))
    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python %s)" % llama_cpp.__version__,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "decode_tokens": args.decode_tokens,
        "prefill_tok_s": round(best_prefill, 1),
        "decode_tok_s": round(best_decode, 1),
    }))


if __name__ == "__main__":
    main()
