#!/usr/bin/env python3
"""Talks to a running tiller with the official `openai` Python package, as a user's client
would: plain, streamed, steered (through `extra_headers` and `extra_body`) and failing
requests, for chat completions and completions. Exits non-zero on the first failure.

    python3 tests/clients/openai_client.py --base-url http://127.0.0.1:8080/v1
"""
import argparse
import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print("FAIL:", what)
        sys.exit(1)
    print("ok:", what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="not-needed", max_retries=0)

    models = client.models.list()
    model = models.data[0].id
    check(len(models.data) == 1 and model, "models.list returns the served model")

    messages = [{"role": "user", "content": "Tell me about yourself."}]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    text = plain.choices[0].message.content
    check(bool(text) and plain.choices[0].finish_reason in ("stop", "length"), "plain chat completion: %r" % text[:60])
    check(plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens, "usage adds up")

    france = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40, temperature=0)
    check(france.choices[0].message.content == "The capital of France is Paris.", "greedy answer: Paris")

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(chunks[0].choices[0].delta.role == "assistant", "stream opens with the role")
    check(streamed == text, "streamed chat equals the plain one")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens,
          "stream ends with usage")

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=40, temperature=0,
        extra_headers={"X-Steering": "golden_gate:12:2.5"})
    via_header = raw.parse().choices[0].message.content
    check(raw.headers.get("x-steering-applied") == "golden_gate:12:2.5", "X-Steering-Applied echoes the plan")
    check(via_header != text, "steered through extra_headers differs: %r" % via_header[:60])
    check("bridge" in via_header.lower() or "golden" in via_header.lower(), "and talks about the bridge")

    via_body = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0,
        extra_body={"steering": [{"vector": "golden_gate", "layer": 12, "coefficient": 2.5}]}).choices[0].message.content
    check(via_body == via_header, "extra_body steering gives the same text as the header")

    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                       extra_body={"steering": [{"vector": "golden_gate", "layer": 99}]})
        check(False, "bad layer is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "layer" in str(e), "bad layer is a 400 naming the field")
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=8)
        check(False, "unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model is a 404")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, extra_headers={"X-Steering": "golden_gate:12"})
        check(False, "bad header is refused")
    except openai.BadRequestError as e:
        check("X-Steering" in str(e), "bad X-Steering header is a 400 naming it")

    prompt = "The best thing about San Francisco is"
    c_plain = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    c_text = c_plain.choices[0].text
    check(bool(c_text), "plain completion: %r" % c_text[:60])
    c_stream = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True) if c.choices)
    check(c_stream == c_text, "streamed completion equals the plain one")
    c_header = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                         extra_headers={"X-Steering": "golden_gate:12:2.5"}).choices[0].text
    c_body = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0,
                                       extra_body={"steering": [{"vector": "golden_gate", "layer": 12, "coefficient": 2.5}]}).choices[0].text
    check(c_header != c_text and c_body == c_header, "steered completions differ from plain and agree")
    try:
        client.completions.create(model=model, prompt=prompt, max_tokens=8, n=2)
        check(False, "n=2 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "n=2 is a 400")
    # echo with logprobs scores a prompt (one choice per prompt, token ids or strings).
    ids = [[504, 3575, 282, 4649, 314], [504, 3575]]
    scored = client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    first, second = sorted(scored.choices, key=lambda c: c.index)
    check(len(first.logprobs.tokens) == 5 and len(second.logprobs.tokens) == 2, "echo: one choice per prompt, its tokens")
    check(first.logprobs.token_logprobs[0] is None and all(x < 0 for x in first.logprobs.token_logprobs[1:]),
          "echo: the first token has no log-probability, the others do")
    check(first.logprobs.token_logprobs[1] == second.logprobs.token_logprobs[1], "echo: a shared prefix scores the same")
    check(first.text == "".join(first.logprobs.tokens), "echo: the text is the prompt")
    texts = client.completions.create(model=model, prompt=["The capital of France is", "Once upon a time"],
                                      max_tokens=4, temperature=0)
    check([c.index for c in texts.choices] == [0, 1] and all(c.text for c in texts.choices), "a list of prompts")
    print("all OpenAI client checks passed")


if __name__ == "__main__":
    main()
