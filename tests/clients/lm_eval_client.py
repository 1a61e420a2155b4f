#!/usr/bin/env python3
"""lm-evaluation-harness's own client code against a running tiller: the `local-completions`
model with the remote tokenizer (`/tokenizer_info`, `/tokenize`, `/detokenize`), so its
log-likelihood requests (`echo: true, logprobs: 1, max_tokens: 1`, prompts as lists of token
ids) and generation requests are built and parsed by lm-eval itself. Checks its scores
against tiller's teacher-forced scoring, greedy detection, batching, and steering through the
`X-Steering` header. Exits non-zero on the first failure.

    python3 tests/clients/lm_eval_client.py --base-url http://127.0.0.1:8080
"""
import argparse
import json
import math
import sys
import urllib.request

from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI


def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)
    print("ok:", what)


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))


def harness(base, model, batch_size=1, header=None):
    return LocalCompletionsAPI(
        base_url=base + "/v1/completions", model=model, tokenizer_backend="remote",
        tokenized_requests=True, batch_size=batch_size, max_retries=1,
        header=header or {"Authorization": "Bearer none"})


def loglikelihood(lm, pairs):
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    return lm.loglikelihood(reqs, disable_tqdm=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]

    context = "The capital of France is"
    greedy = post(base, "/v1/completions", {"model": model, "prompt": context, "max_tokens": 2, "temperature": 0})
    continuation = greedy["choices"][0]["text"]
    pairs = [(context, continuation), (context, " a small village"), ("Water freezes at zero degrees", " Celsius")]

    lm = harness(base, model)
    res = loglikelihood(lm, pairs)
    check(len(res) == 3 and all(isinstance(lp, float) and lp < 0 for lp, _ in res), "lm-eval scores every pair: %r" % (res,))
    check(res[0][1] is True, "the greedy continuation %r is greedy" % continuation)
    check(res[1][1] is False, "a made-up continuation is not greedy")
    check(res[0][0] > res[1][0], "the greedy continuation is likelier")

    # The same numbers as tiller's own teacher-forced scoring of the continuation.
    for (ctx, cont), (lp, _) in zip(pairs, res):
        forced = post(base, "/inspect/logprobs", {"prompt": ctx, "targets": [cont]})
        expected = forced["targets"][0]["unsteered"]["logprob"]
        check(math.isclose(lp, expected, abs_tol=2e-3), "%r: lm-eval %.5f vs /inspect/logprobs %.5f" % (cont, lp, expected))

    # Batched requests (several token-id prompts in one request) give the same scores.
    batched = loglikelihood(harness(base, model, batch_size=3), pairs)
    check(all(math.isclose(a[0], b[0], abs_tol=1e-4) and a[1] == b[1] for a, b in zip(batched, res)),
          "batch of 3 prompts gives the same scores: %r" % (batched,))

    # Steering from the header changes the log-likelihoods.
    steered = loglikelihood(harness(base, model, header={"X-Steering": "golden_gate:12:8"}), pairs)
    check(all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(steered, res)), "X-Steering changes every score: %r" % (steered,))

    # Generation requests, as lm-eval builds them (`until` stop sequences, greedy).
    gen = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                      arguments=(context, {"until": ["\n"], "max_gen_toks": 8}))], disable_tqdm=True)
    check(len(gen) == 1 and gen[0].startswith(continuation), "generate_until: %r" % gen)
    print("all lm-eval client checks passed")


if __name__ == "__main__":
    main()
