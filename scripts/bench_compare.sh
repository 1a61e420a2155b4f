#!/usr/bin/env bash
# Side-by-side speed of tiller and llama.cpp (llama-cpp-python) on the same GGUF, same prompt
# shape and thread count, alternating runs so both see the same machine conditions; prints the
# median of each and the ratios. Needs `pip install llama-cpp-python==0.3.36` (PYTHON=... to
# pick the interpreter) and a release build (`cargo build --release`; TILLER=... for another
# binary). MODEL is a GGUF file or a name `tiller fetch-model --list` shows (fetched into the
# cache on first use), e.g.
#   MODEL=gemma3-270m ROUNDS=3 scripts/bench_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_env.sh
ROUNDS=${ROUNDS:-5}
PROMPT=${PROMPT:-225}
DECODE=${DECODE:-128}
out=$(mktemp -d)
for i in $(seq 1 "$ROUNDS"); do
  "$TILLER" bench --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PROMPT" \
    --decode-tokens "$DECODE" --repeats 1 > "$out/tiller.$i.json"
  "$PYTHON" scripts/bench_llamacpp.py --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PROMPT" \
    --decode-tokens "$DECODE" --repeats 1 > "$out/llamacpp.$i.json" 2>/dev/null
done
"$PYTHON" - "$out" "$ROUNDS" "$(basename "$MODEL")" <<'PY'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
t = [json.load(open(f"{d}/tiller.{i}.json")) for i in range(1, n + 1)]
l = [json.load(open(f"{d}/llamacpp.{i}.json")) for i in range(1, n + 1)]
med = lambda xs: statistics.median(xs)
r = {
    "model": sys.argv[3],
    "rounds": n,
    "tiller_prefill_tok_s": med([x["prefill_tok_s"] for x in t]),
    "tiller_decode_tok_s": med([x["decode_tok_s"] for x in t]),
    "llamacpp_prefill_tok_s": med([x["prefill_tok_s"] for x in l]),
    "llamacpp_decode_tok_s": med([x["decode_tok_s"] for x in l]),
    "prefill_ratio_per_round": [round(a["prefill_tok_s"] / b["prefill_tok_s"], 3) for a, b in zip(t, l)],
    "decode_ratio_per_round": [round(a["decode_tok_s"] / b["decode_tok_s"], 3) for a, b in zip(t, l)],
    "steered_decode_ratio_per_round": [x["steered_decode_ratio"] for x in t],
}
r["prefill_ratio_median"] = med(r["prefill_ratio_per_round"])
r["decode_ratio_median"] = med(r["decode_ratio_per_round"])
r["steered_decode_ratio_median"] = med(r["steered_decode_ratio_per_round"])
print(json.dumps(r, indent=1))
PY
