#!/usr/bin/env bash
# GPU readiness of a trained package (issue #21): CUDA and TensorRT parity against CPU for every
# graph (TF32 and FP16 on and off), the gate's verdicts on GPU against CPU, and the engine and
# service benchmarks. Details: benchmarks/gpu_check.py and docs/gpu.md.
#
#   benchmarks/gpu_check.sh [DEMO_DIR] [gpu_check.py options]   # DEMO_DIR: default ./demo
#   benchmarks/gpu_check.sh --cpu-only                          # dry run on CPU, no GPU needed
#
# DEMO_DIR is the folder of `ecgx demo` (its packages/seed-0 is checked, validation/ is the data,
# the other seeds the gate's family); when it holds no package, `ecgx demo --quick` makes one.
# Writes DEMO_DIR/gpu_check.md. Exit 3: no GPU execution provider (onnxruntime-gpu not installed).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
demo="demo"
if [[ $# -gt 0 && "$1" != -* ]]; then demo="$1"; shift; fi
cpu_only=0
for a in "$@"; do [[ "$a" == "--cpu-only" ]] && cpu_only=1; done
if [[ $cpu_only -eq 0 ]]; then
  # Before minutes of training: a machine without a GPU provider stops here, saying why.
  if ! "$python" -c 'import sys; from ecgx.service.providers import gpu_providers_available as g; sys.exit(0 if g() else 3)'; then
    exec "$python" "$here/gpu_check.py" --package /nonexistent "$@"   # prints the message, exits 3
  fi
fi
pkg="$demo/packages/seed-0"
if [[ ! -f "$pkg/manifest.json" ]]; then
  echo "gpu_check: no package in $pkg; running ecgx demo --quick --out $demo first"
  "$python" -m ecgx.cli demo --quick --out "$demo"
fi
family=()
for f in "$demo"/packages/seed-*; do [[ "$f" != "$pkg" && -f "$f/manifest.json" ]] && family+=("$f"); done
data=()
[[ -f "$demo/validation/meta.json" ]] && data=(--data "$demo/validation")
exec "$python" "$here/gpu_check.py" --package "$pkg" "${data[@]}" \
  ${family[@]+--family "${family[@]}"} --cache-dir "$demo/trt-cache" --out "$demo/gpu_check.md" "$@"
