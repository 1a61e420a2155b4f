#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer_reference.json: token ids of sample texts as llama.cpp
encodes them with the default model's own GGUF tokenizer (the reference tiller must match).

    pip install llama-cpp-python==0.3.36
    python3 scripts/make_tokenizer_fixture.py data/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import sys

import llama_cpp

TEXTS = [
    "What is the capital of France?",
    "Hello, world! How are you doing today?",
    "  leading spaces and trailing   ",
    "Numbers: 12345 and 3.14159, year 2026, 1,000,000.",
    "Unicode: café, naïve, Zürich, 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); } // comment",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Tabs\tand\nnewlines\n\n\nand CRLF\r\nmixed",
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait.",
    "I'm sorry, but I can't help with that. You're absolutely right!",
    "MixedCASE words, ALLCAPS, snake_case_names and camelCaseNames.",
    "URLs like https://example.com/path?query=1&x=y#frag and emails a.b@c.org",
    "   ",
    "a",
]


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You refuse harmful requests."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about yourself."}],
]


def render(template, messages):
    """Renders like Hugging Face's apply_chat_template (trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def main():
    llm = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)
    cases = [{"text": t, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)} for t in TEXTS]
    template = llm.metadata["tokenizer.chat_template"]
    chats = []
    for messages in CHATS:
        text = render(template, messages)
        chats.append({"messages": messages, "text": text,
                      "ids": llm.tokenize(text.encode(), add_bos=False, special=True)})
    out = {"source": "llama.cpp via llama-cpp-python %s, special=True, add_bos=False" % llama_cpp.__version__,
           "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "cases": cases}
    with open("tests/fixtures/tokenizer_reference.json", "w") as f:
        f.write("{\"source\": %s,\n \"model\": %s,\n \"cases\": [\n" % (json.dumps(out["source"]), json.dumps(out["model"])))
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n ],\n \"chats\": [\n")
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in chats))
        f.write("\n ]}\n")


if __name__ == "__main__":
    main()
