#!/usr/bin/env bash
# The paper's run path on one GPU, rehearsed small, then the element limit checked, on any CUDA
# machine with no network:
#     bash experiments/benchmarks/gpu_run.sh
# At most 6 minutes. (1) `experiments/run.py --arch=small_vgg` on random CIFAR-shaped data
# (50,000 + 10,000 images of 32x32x3, written as an .npz first) with K=128 models for one epoch
# in bfloat16 at batch 512: the memory plan, the waves it chooses (the element limit caps them
# at 64 small_vgg models per device: jaxmem/train/array_sizes.py), evaluation, the run
# directory. (2) bench.py at M=72 with --no-element-limit: one array of 72 x 512 x 32 x 32 x 64
# elements, above 2^31; where it runs, the limit may be lifted for this jax. Needs the machine's
# own jax (CUDA), flax, optax, orbax-checkpoint, tqdm, pillow, scikit-learn, scipy, matplotlib
# and safetensors; writes gpu_run.log and the run's metrics.json under $OUT (./gpu_run if
# unset).
set -uo pipefail
out="${OUT:-gpu_run}"
mkdir -p "$out"
log="$out/gpu_run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
work=$(mktemp -d)

step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2 status
  shift 2
  echo "# === $name (at most $limit s): $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "cuda_timer.cc" | tee -a "$log"
  status=${PIPESTATUS[0]}
  (( status == 0 )) || echo "# $name: exit status $status" | tee -a "$log"
}

step data 60 "$python" -c "
import numpy as np
rng = np.random.default_rng(0)
images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
np.savez('$work/cifar_shaped.npz', x_train=images(50000), y_train=labels(50000),
         x_test=images(10000), y_test=labels(10000))"
step run 240 "$python" experiments/run.py --arch=small_vgg --dataset="$work/cifar_shaped.npz" \
  --num-models=128 --epochs=1 --no-pilot --batch-size=512 --dtype=bfloat16 \
  --null-permutations=10 --out="$work/run" --no-progress
cp "$work/run/metrics.json" "$out/" 2>/dev/null
step element_limit 100 "$python" experiments/benchmarks/bench.py --arch=small_vgg \
  --dtype=bfloat16 --batch-size=512 --models=72 --seconds=1 --no-element-limit \
  --skip=vmap,matmul,sequential,pytorch,eval --json="$out/bench_element_limit.json"
rm -rf "$work"
