#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/<model>.json: the token ids llama.cpp gives a fixed set of
strings (ASCII, accents, CJK, Arabic, Devanagari, emoji with ZWJ and skin tones, whitespace
runs, tabs and newlines, code, URLs, LaTeX, special-token text) with a model's own GGUF
tokenizer, and the text llama.cpp decodes them back to. tiller must give the same ids.

    pip install llama-cpp-python==0.3.36 jinja2
    python3 scripts/make_tokenizer_fixture.py smollm2-135m-instruct data/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python3 scripts/make_tokenizer_fixture.py gemma3-270m data/models/gemma-3-270m-q4_k_m.gguf
    python3 scripts/make_tokenizer_fixture.py qwen2.5-coder-0.5b-instruct data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""
import hashlib
import json
import os
import sys

import llama_cpp

BASE = [
    # ASCII prose and punctuation
    "What is the capital of France?",
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sorry, but I can't help with that. You're absolutely right!",
    "She said: \"don't\" -- and he'd've agreed; they'll see.",
    "MixedCASE words, ALLCAPS, snake_case_names and camelCaseNames.",
    "The Golden Gate Bridge is a suspension bridge spanning the Golden Gate strait.",
    "a", "A", "ab", "I", "?", "!", "...", "--", "'", "\"", "'s", "'ll", "O'Neil's",
    "e.g. i.e. etc. Mr. Smith vs. Mrs. Jones",
    "(parentheses) [brackets] {braces} <angles>",
    "#hashtag @mention $100 50% 3*4=12 a+b a-b a/b a\\b a|b a^b a~b a`b",
    # numbers
    "0", "7", "42", "123", "1234", "12345", "1234567890", "3.14159", "-273.15", "1e-10",
    "Numbers: 12345 and 3.14159, year 2026, 1,000,000.",
    "Call 555-0123 or +44 20 7946 0958 before 9:30am on 2026-12-01.",
    "v1.2.3-beta+build.45",
    # whitespace
    "", " ", "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ",
    "  leading spaces and trailing   ",
    "Tabs\tand\nnewlines\n\n\nand CRLF\r\nmixed",
    "word  two  spaces   three    four",
    "line one\nline two\n\nparagraph\n\n\n\nfar",
    " a", "  a", "a ", "a  ", " a ", "\ta", "a\t", "\na", "a\n",
    "end with newline\n",
    "\u00a0non-breaking\u00a0space and\u2009thin\u2009space",
    # accents and European scripts
    "café", "naïve", "Zürich", "São Paulo", "Ærøskøbing", "façade", "résumé", "Crème brûlée",
    "Unicode: café, naïve, Zürich, 日本語のテキスト, emoji 🚀🔥, Ελληνικά, русский.",
    "Ελληνικά: Καλημέρα κόσμε", "Русский: Привет, мир!", "Українська мова", "Polski: zażółć gęślą jaźń",
    "Türkçe: İstanbul ığdır", "Čeština: příliš žluťoučký kůň", "Magyar: árvíztűrő tükörfúrógép",
    "e\u0301 decomposed vs \u00e9 composed", "A\u030a\u212b\u00c5",
    # CJK
    "日本語のテキスト", "こんにちは世界", "カタカナ", "漢字とひらがな", "中文：你好，世界！", "繁體中文測試",
    "한국어: 안녕하세요", "東京は日本の首都です。", "我爱北京天安门", "一二三四五六七八九十",
    # Arabic, Hebrew, Devanagari and other scripts
    "العربية: مرحبا بالعالم", "السلام عليكم", "ﷺ", "עברית: שלום עולם", "हिन्दी: नमस्ते दुनिया",
    "संस्कृतम्", "मराठी भाषा", "বাংলা ভাষা", "தமிழ் மொழி", "ภาษาไทย สวัสดี", "ქართული ენა",
    "Հայերեն", "አማርኛ", "ᚠᚢᚦᚨᚱᚲ", "Tiếng Việt: xin chào",
    # emoji
    "🚀", "🔥🔥🔥", "😀😃😄", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🇫🇷🇯🇵", "❤️", "1️⃣",
    "emoji 🚀🔥 in text", "I ❤️ NY", "🧑‍🤝‍🧑 holding hands", "🫠🫶", "☕ coffee",
    # code
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); } // comment",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if x == 1 && y != 2 || !z { return; }",
    "const f = (a, b) => a ?? b;",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "<div class=\"box\"><p>Hello</p></div>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "    indented four\n        indented eight",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "git commit -m \"fix: handle empty input\" && git push origin main",
    "$ ls -la /usr/local/bin | grep -E '^d'",
    "a_b__c___d", "x0 x1 x2", "0x1F 0b1010 0o777",
    # URLs and e-mail
    "URLs like https://example.com/path?query=1&x=y#frag and emails a.b@c.org",
    "https://github.com/huggingface/candle/blob/main/README.md",
    "http://localhost:8080/v1/chat/completions",
    "ftp://files.example.org/pub/data.tar.gz",
    "mailto:someone+tag@example.co.uk",
    "www.example.com/über/straße?q=日本",
    # LaTeX
    "$E = mc^2$",
    "\\frac{a}{b} + \\sqrt{x^2 + y^2}",
    "\\begin{align} \\int_0^\\infty e^{-x} dx = 1 \\end{align}",
    "\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}",
    "$$\\mathbf{A}\\vec{x} = \\lambda \\vec{x}$$",
    "\\alpha\\beta\\gamma \\Delta \\nabla \\partial",
    # repeats
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababab", "!!!!!!!!", "........", "--------",
    "========", "________", "ha ha ha ha ha", "the the the the",
    # mixed
    "The price is €42.50 (≈ $45) — a 10% discount!",
    "Temperature: 23°C ± 0.5°, pressure ≤ 1013 hPa",
    "Arrows → ← ↑ ↓ ⇒ and math ∀x ∃y: x ≠ y ∧ x ∈ ℝ",
    "Quotes “curly” ‘single’ «guillemets» „low“",
    "Mixed 日本 and English and العربية and हिन्दी in one line.",
    "Zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "Control\u0007chars\u001bhere",
    "Ligatures ﬁ ﬂ and fullwidth ＡＢＣ１２３",
    "Roman Ⅻ and superscripts x² y³ and subscripts H₂O",
    "\ufeffBOM at start",
]

# Special-token text in context, per model (special tokens are split out of raw text).
SPECIALS = {
    "smollm2-135m-instruct": [
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "text<|im_end|>more", "a<|endoftext|>b",
    ],
    "gemma3-270m": [
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<bos>Hello", "text<end_of_turn>more",
        "<pad><unk><mask>", "[multimodal]",
    ],
    "qwen2.5-coder-0.5b-instruct": [
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
        "text<|im_end|>more",
    ],
}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You refuse harmful requests."},
     {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me about yourself."}],
]


def generated():
    """Programmatic cases: sentences over many scripts and lengths."""
    words = ["steer", "vector", "résumé", "日本", "مرحبا", "नमस्ते", "🚀", "x_1", "42", "Hello"]
    out = []
    for i in range(40):
        n = 1 + i % 7
        sep = [" ", "  ", "\n", "\t", ", ", "", " - "][i % 7]
        out.append(sep.join(words[(i + k) % len(words)] for k in range(n)))
    return out


def render(template, messages):
    """Renders like Hugging Face's apply_chat_template (trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    name, path = sys.argv[1], sys.argv[2]
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    texts = BASE + generated() + SPECIALS[name]
    assert len(texts) >= 200, len(texts)
    cases = []
    for t in texts:
        ids = llm.tokenize(t.encode(), add_bos=False, special=True)
        decoded = llm.detokenize(ids).decode("utf-8", "replace")
        cases.append({"text": t, "ids": ids, "decoded": decoded})
    chats = []
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        for messages in CHATS:
            text = render(template, messages)
            chats.append({"messages": messages, "text": text,
                          "ids": llm.tokenize(text.encode(), add_bos=False, special=True)})
    os.makedirs("tests/fixtures/tokenizer", exist_ok=True)
    out = "tests/fixtures/tokenizer/%s.json" % name
    with open(out, "w") as f:
        f.write("{\"source\": %s,\n" % json.dumps(
            "llama.cpp via llama-cpp-python %s, special=True, add_bos=False" % llama_cpp.__version__))
        f.write(" \"model\": %s,\n \"sha256\": %s,\n \"cases\": [\n" % (
            json.dumps(os.path.basename(path)), json.dumps(sha256(path))))
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n ],\n \"chats\": [\n")
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in chats))
        f.write("\n ]}\n")
    print(out, len(cases), "cases", len(chats), "chats")


if __name__ == "__main__":
    main()
