# Sourced by the side-by-side benchmark scripts (from the repository root): the tiller binary
# (TILLER, default the release build), the model as a file (MODEL: a GGUF file or a name that
# `tiller fetch-model` resolves, fetched on first use), the Python that has llama-cpp-python
# (PYTHON) and the thread count both engines use (THREADS).
TILLER=${TILLER:-./target/release/tiller}
MODEL=${MODEL:-smollm2-135m-instruct}
if [ ! -f "$MODEL" ]; then
  MODEL=$("$TILLER" fetch-model "$MODEL")
fi
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
