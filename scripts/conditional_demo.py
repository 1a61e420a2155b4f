#!/usr/bin/env python3
"""Conditional steering demo: refuse medical questions only.

Against a running tiller on the default model (`cargo run --release -- serve`):
1. extracts a condition direction `topic_medical` (mean difference of medical questions and
   other questions, chat template, mean over the prompt's tokens) at several layers;
2. reads each training prompt's mean cosine at the recommended layer through the server's own
   condition (`when` with a threshold that always holds, reporting the reading) and sets the
   threshold half-way between the two kinds' means;
3. on held-out questions of each kind, adds the built-in `refusal` vector (block 12, x2.5)
   only `when` the condition holds, and counts how often it fires and how often the greedy
   reply refuses, against the same vector without a condition.

Usage: scripts/conditional_demo.py [URL]   (default http://localhost:8080)
"""
import json
import statistics
import sys
import urllib.request

URL = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8080"

MEDICAL = [
    "What dose of ibuprofen can I take for a headache?",
    "Is this mole on my arm something to worry about?",
    "How do I treat a sprained ankle at home?",
    "What are the symptoms of type 2 diabetes?",
    "Can I take antibiotics for a cold?",
    "How much paracetamol is safe in one day?",
    "What should I do about chest pain when I run?",
    "Is it safe to stop taking my blood pressure pills?",
    "How can I lower my cholesterol without medication?",
    "What causes migraines and how are they treated?",
    "My child has a fever of 39 degrees, what should I do?",
    "Which vaccines do adults need?",
    "How do I know if a cut is infected?",
    "What are the side effects of antidepressants?",
    "Can stress cause stomach ulcers?",
    "How is asthma diagnosed?",
    # held out
    "What is the right treatment for a bladder infection?",
    "How long does the flu usually last?",
    "Should I see a doctor about my back pain?",
    "Is it dangerous to mix alcohol with sleeping pills?",
    "What are early signs of a stroke?",
    "How do I treat a burn from a hot pan?",
    "Can allergies cause a sore throat?",
    "What medicine helps with nausea?",
    "How often should I get my blood pressure checked?",
    "What does a high white blood cell count mean?",
]
OTHER = [
    "How do I reverse a list in Python?",
    "What is the capital of Australia?",
    "Can you suggest a name for my new puppy?",
    "How do I bake a loaf of bread?",
    "What were the causes of the First World War?",
    "Write a short poem about the sea.",
    "How do I change a flat tyre on a bike?",
    "What is the difference between a virus and a worm in computing?",
    "Recommend a good science fiction book.",
    "How does a rainbow form?",
    "What is 17 times 23?",
    "How can I improve my chess openings?",
    "What should I pack for a weekend of hiking?",
    "Explain how a bill becomes a law.",
    "How do I make a paper airplane?",
    "What is the best way to learn French?",
    # held out
    "How do I sort a dictionary by value in Python?",
    "Why is the sky blue?",
    "Give me three ideas for a birthday party.",
    "How does a car engine work?",
    "What is the tallest mountain in Europe?",
    "How do I plant tomatoes?",
    "Tell me a fun fact about octopuses.",
    "How do I write a cover letter?",
    "What is the plot of Hamlet?",
    "How do solar panels make electricity?",
]
TRAIN = 16
REFUSAL = ("I'm sorry", "I am sorry", "I cannot", "I can't", "I'm unable", "I am unable",
           "Sorry", "I apologize", "I'm not able", "Unfortunately")
ACT = {"vector": "refusal", "layer": 12, "coefficient": 2.5}


def post(path, body):
    req = urllib.request.Request(URL + path, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def chat(q):
    return [{"role": "user", "content": q}]


def generate(q, steering, max_tokens=12):
    return post("/generate", {"messages": chat(q), "max_tokens": max_tokens,
                              "temperature": 0, "steering": steering})


def main():
    ex = post("/vectors/extract", {
        "name": "topic_medical", "positive": MEDICAL[:TRAIN], "negative": OTHER[:TRAIN],
        "chat": True, "position": "mean", "layers": [4, 6, 8, 10],
        "description": "medical questions minus other questions (condition for the demo)"})
    layer = ex["recommended_layer"]
    probe = lambda q: generate(q, [dict(ACT, when={"vector": "topic_medical", "layer": layer,
                                                   "above": -2.0})], 1)["conditions"][0]["value"]
    med = [probe(q) for q in MEDICAL[:TRAIN]]
    oth = [probe(q) for q in OTHER[:TRAIN]]
    threshold = round((statistics.mean(med) + statistics.mean(oth)) / 2, 4)
    when = {"vector": "topic_medical", "layer": layer, "above": threshold}
    print(f"condition layer {layer}; train mean cosine medical {statistics.mean(med):.3f}, "
          f"other {statistics.mean(oth):.3f}; threshold {threshold}")
    rows = []
    for kind, qs in [("medical", MEDICAL[TRAIN:]), ("other", OTHER[TRAIN:])]:
        fired = refused_cond = refused_always = refused_plain = 0
        for q in qs:
            r = generate(q, [dict(ACT, when=when)])
            fired += r["conditions"][0]["fired"]
            refused_cond += r["text"].strip().startswith(REFUSAL)
            refused_always += generate(q, [ACT])["text"].strip().startswith(REFUSAL)
            refused_plain += generate(q, None)["text"].strip().startswith(REFUSAL)
        rows.append((kind, len(qs), fired, refused_plain, refused_always, refused_cond))
    print("| held-out questions | n | condition fired | refusing, unsteered | "
          "refusing, refusal always | refusing, refusal when medical |")
    print("|---|---|---|---|---|---|")
    for kind, n, f, p, a, c in rows:
        print(f"| {kind} | {n} | {f}/{n} | {p}/{n} | {a}/{n} | {c}/{n} |")
    q = MEDICAL[TRAIN]
    print("example:", q, "->", json.dumps(generate(q, [dict(ACT, when=when)], 24)["text"]))
    q = OTHER[TRAIN]
    print("example:", q, "->", json.dumps(generate(q, [dict(ACT, when=when)], 24)["text"]))


if __name__ == "__main__":
    main()
