#!/usr/bin/env bash
# The GPU check: build tiller's `cuda` feature on a machine without a GPU, carry the binary and
# the models to a machine with an NVIDIA GPU, and run `tiller device-check` there on cuda:0 for
# each model (load, greedy France answer, a steered answer against the CPU's, decode tokens/s at
# batch 1, 8 and 32, hook calls that saw the device's activations).
#
#   scripts/gpu_check.sh build       here: CUDA 13.0 wheels from PyPI into target/cuda-toolkit,
#                                    a libcuda link stub, `cargo build --release --features cuda`;
#                                    the stripped binary goes to .gpu/tiller
#   scripts/gpu_check.sh parts       here: the binary and the models (MODELS, below) split into
#                                    numbered parts of at most PART_MIB MiB under .gpu/parts/,
#                                    with their SHA-256; prints how many parts there are
#   scripts/gpu_check.sh stage N     here: part N alone in .gpu/carry/ (what one call carries)
#   scripts/gpu_check.sh receive     there: keeps the carried part in $GPU_DIR (it stays while the
#                                    machine is held between calls)
#   scripts/gpu_check.sh join        there: joins the parts and checks each file's SHA-256
#   scripts/gpu_check.sh run         there: join, then the check for each model; JSON reports
#                                    go to $OUT (or $GPU_DIR)
#   scripts/gpu_check.sh local       here, no GPU: the same check on candle's CPU backend
#
# A call to the GPU machine carries at most 64 MiB, so the files travel as parts, one call each:
# `stage N` here, then on the machine `scripts/gpu_check.sh receive`, with `.gpu/carry` carried;
# the last call adds `&& scripts/gpu_check.sh run`. Run-time CUDA libraries (cuBLAS, cuRAND,
# NVRTC, the runtime) come from the machine's own Python packages (PyTorch's nvidia-* wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-"smollm2-135m-instruct gemma3-270m qwen2.5-coder-0.5b-instruct"}
PART_MIB=${PART_MIB:-56}
GPU_DIR=${GPU_DIR:-/tmp/tiller-gpu}
TOOLKIT=target/cuda-toolkit
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35"

model_file() { ./target/release/tiller fetch-model "$1" 2>/dev/null | tail -1; }

build() {
  if [ ! -x "$TOOLKIT/nvidia/cu13/bin/nvcc" ]; then
    python3 -m pip install --quiet --no-deps --target "$TOOLKIT" $WHEELS
  fi
  local cuda="$PWD/$TOOLKIT/nvidia/cu13"
  # The linker wants plain .so names.
  for lib in cudart nvrtc cublas cublasLt curand; do
    local real
    real=$(ls "$cuda/lib/lib$lib.so."* 2>/dev/null | head -1 || true)
    [ -n "$real" ] && ln -sf "$(basename "$real")" "$cuda/lib/lib$lib.so"
  done
  # No wheel ships libcuda (the driver provides it on the GPU machine): link against a stub
  # that exports the driver functions cudarc declares, with the driver's soname.
  if [ ! -f "$cuda/lib/stubs/libcuda.so" ]; then
    mkdir -p "$cuda/lib/stubs"
    local sys
    sys=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)
    grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u |
      awk '{print "int " $1 "(void) { return 0; }"}' > target/cuda-stub.c
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" target/cuda-stub.c
  fi
  CUDA_HOME="$cuda" CUDA_PATH="$cuda" PATH="$cuda/bin:$PATH" CUDA_COMPUTE_CAP=90 \
    LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs" CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo build --release --features cuda --target-dir target/cuda
  mkdir -p .gpu
  cp target/cuda/release/tiller .gpu/tiller
  strip .gpu/tiller
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  ls -l .gpu/tiller
}

parts() {
  [ -x target/release/tiller ] || cargo build --release
  rm -rf .gpu/parts && mkdir -p .gpu/parts
  local files=(.gpu/tiller)
  for m in $MODELS; do files+=("$(model_file "$m")"); done
  : > .gpu/parts/MANIFEST
  for f in "${files[@]}"; do
    local name
    name=$(basename "$f")
    echo "$(sha256sum "$f" | cut -d' ' -f1) $name" >> .gpu/parts/MANIFEST
    split -b "${PART_MIB}M" -d -a 3 "$f" ".gpu/parts/$name.part-"
  done
  ls .gpu/parts/*.part-* | nl -v0 -w3 -s' ' > .gpu/parts/INDEX
  echo "$(wc -l < .gpu/parts/INDEX) parts; stage 0 .. $(($(wc -l < .gpu/parts/INDEX) - 1))"
}

stage() {
  local n=$1
  rm -rf .gpu/carry && mkdir -p .gpu/carry
  local part
  part=$(awk -v n="$n" '$1 == n {print $2}' .gpu/parts/INDEX)
  [ -n "$part" ] || { echo "no part $n" >&2; exit 1; }
  cp "$part" .gpu/parts/MANIFEST .gpu/carry/
  echo "carry .gpu/carry: $(basename "$part")"
}

receive() {
  mkdir -p "$GPU_DIR"
  cp .gpu/carry/* "$GPU_DIR"/
  ls "$GPU_DIR" | grep -c part- | xargs echo "parts held:"
}

# CUDA's run-time libraries from the machine's Python packages.
cuda_libs() {
  python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = set()
for r in roots:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "nvidia/*/lib64"):
        for d in glob.glob(os.path.join(r, pat)):
            dirs.add(d)
print(":".join(sorted(dirs)))
PY
}

join() {
  while read -r sum name; do
    cat "$GPU_DIR/$name".part-* > "$GPU_DIR/$name"
    echo "$sum  $GPU_DIR/$name" | sha256sum -c --quiet || { echo "$name does not match its SHA-256" >&2; exit 1; }
  done < "$GPU_DIR/MANIFEST"
  chmod +x "$GPU_DIR/tiller"
  echo "joined: $(cut -d' ' -f2 "$GPU_DIR/MANIFEST" | tr '\n' ' ')"
}

run() {
  local out=${OUT:-$GPU_DIR}
  join
  export LD_LIBRARY_PATH="$(cuda_libs):${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
  for f in "$GPU_DIR"/*.gguf; do
    local name
    name=$(basename "$f" .gguf)
    TILLER_MODEL_CACHE_DIR="$GPU_DIR" "$GPU_DIR/tiller" device-check --device cuda:0 --model "$f" \
      | tee "$out/device-check-$name.json"
  done
}

local_check() {
  for m in $MODELS; do
    ./target/release/tiller device-check --device cpu --model "$m"
  done
}

case "${1:-}" in
  build) build ;;
  parts) parts ;;
  stage) stage "${2:?part number}" ;;
  receive) receive ;;
  join) join ;;
  run) run ;;
  local) local_check ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
