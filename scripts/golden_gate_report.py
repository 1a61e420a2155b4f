#!/usr/bin/env python3
"""Measures what the shipped `golden_gate` vector does on the served model, through the HTTP
API: for a few open prompts and seeds, sampled completions unsteered, with the vector added
at each coefficient, and with a random direction of the same norm at the largest coefficient
(the control), and how many of them mention the bridge ("golden gate" or "bridge"). Prints a
markdown table and one example per condition.

    python3 scripts/golden_gate_report.py --url http://127.0.0.1:8080            # chat models
    python3 scripts/golden_gate_report.py --url http://127.0.0.1:8080 --raw      # base models
"""
import argparse
import json
import urllib.request

CHAT_PROMPTS = ["Tell me about yourself.", "What should I do this weekend?"]
RAW_PROMPTS = [
    "My favourite place in the world is",
    "This weekend I am going to",
    "Let me tell you about myself. I",
    "The most beautiful thing I have ever seen was",
    "When I think about my home town, I remember",
    "Here is a short story about a trip:",
]


def post(url, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def random_direction(url):
    """A fixed pseudo-random direction with golden_gate's norm at golden_gate's layer."""
    import math
    import random
    info = json.load(urllib.request.urlopen(url + "/vectors/golden_gate"))
    layer = info["layers"][0]
    norm = info["norms"][str(layer)]
    rng = random.Random(7)
    v = [rng.gauss(0.0, 1.0) for _ in range(info["d_model"])]
    n = math.sqrt(sum(x * x for x in v))
    return {"values": [x * norm / n for x in v], "layer": layer}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--raw", action="store_true", help="raw prompts (a model without a chat template)")
    ap.add_argument("--coefficients", type=float, nargs="+", default=[1.5, 2.5, 4.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args()
    prompts = RAW_PROMPTS if args.raw else CHAT_PROMPTS * 3
    print("| condition | completions mentioning the bridge |")
    print("|---|---|")
    examples = []
    control = random_direction(args.url)
    conditions = [("unsteered", None)]
    conditions += [("add %.2f" % c, {"vector": "golden_gate", "coefficient": c}) for c in args.coefficients]
    conditions.append(("random direction, same norm, add %.2f" % args.coefficients[-1],
                       dict(control, coefficient=args.coefficients[-1])))
    for label, spec in conditions:
        hits, n, first = 0, 0, None
        for i, p in enumerate(prompts):
            for seed in range(args.seeds):
                body = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                        "seed": 1000 * i + seed}
                if args.raw:
                    body["prompt"] = p
                else:
                    body["messages"] = [{"role": "user", "content": p}]
                if spec:
                    body["steering"] = [spec]
                text = post(args.url, "/generate", body)["text"]
                mentions = "golden gate" in text.lower() or "bridge" in text.lower()
                hits += mentions
                n += 1
                if first is None:
                    first = (p, text)
        print("| %s | %d/%d |" % (label, hits, n))
        examples.append((label, first))
    print()
    for label, (p, text) in examples:
        print("- %s, %r: %r" % (label, p, text.strip()[:160]))


if __name__ == "__main__":
    main()
