#!/usr/bin/env bash
# Batch throughput of tiller against llama.cpp's batched decode on the same GGUF, in one
# sitting: for each batch size, `tiller bench --batch N` (the engine, no HTTP) and
# scripts/bench_llamacpp_batch.py (N sequence ids in one llama_batch) back to back, ROUNDS
# times alternating; prints the median aggregate decode tokens/s of each, their ratio, and each
# engine's batch-N / batch-1 scaling, and tiller's steered / unsteered ratio (every sequence
# with its own plan; `tiller bench --batch` interleaves the two step by step). Needs `pip install llama-cpp-python==0.3.36` and a
# release build. MODEL is a GGUF file or a model name (`tiller fetch-model --list`), e.g.
#   MODEL=qwen2.5-coder-0.5b-instruct BATCH=1,8 ROUNDS=3 scripts/bench_batch.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_env.sh
ROUNDS=${ROUNDS:-3}
BATCH=${BATCH:-1,2,4,8,16,32}
CONTEXT=${CONTEXT:-64}
DECODE=${DECODE:-32}
out=$(mktemp -d)
for i in $(seq 1 "$ROUNDS"); do
  for n in ${BATCH//,/ }; do
    "$TILLER" bench --model "$MODEL" --threads "$THREADS" --batch "$n" --prompt-tokens "$CONTEXT" \
      --decode-tokens "$DECODE" 2>/dev/null >> "$out/tiller.jsonl"
    "$PYTHON" scripts/bench_llamacpp_batch.py --model "$MODEL" --threads "$THREADS" --batch "$n" \
      --context "$CONTEXT" --decode-tokens "$DECODE" 2>/dev/null >> "$out/llamacpp.jsonl"
  done
done
"$PYTHON" - "$out" "$(basename "$MODEL")" <<'PY'
import json, statistics, sys
d, model = sys.argv[1], sys.argv[2]
def medians(f, key="decode_tok_s"):
    by = {}
    for line in open(f"{d}/{f}"):
        r = json.loads(line)
        by.setdefault(r["batch"], []).append(r[key])
    return {n: statistics.median(v) for n, v in by.items()}
t, l = medians("tiller.jsonl"), medians("llamacpp.jsonl")
steered = medians("tiller.jsonl", "steered_ratio")
print(f"{model}: aggregate decode tok/s (median of rounds)")
print(f"{'batch':>6} {'tiller':>9} {'llama.cpp':>10} {'ratio':>7} {'tiller/b1':>10} {'llama/b1':>9} {'steered':>8}")
for n in sorted(t):
    print(f"{n:>6} {t[n]:>9.1f} {l[n]:>10.1f} {t[n] / l[n]:>6.2f}x "
          f"{t[n] / t[min(t)]:>9.2f}x {l[n] / l[min(l)]:>8.2f}x {steered[n]:>8.3f}")
PY
