#!/usr/bin/env bash
# Issue 6's GPU measurement as one short prepared run, for a session that is lent a GPU:
#     run(command="bash experiments/gpu_bench.sh", timeout_s=420)    # device tool
#     bash experiments/gpu_bench.sh                                  # any CUDA machine
# At most 6.5 minutes (compiles dominate; each bench has its own time limit, so one that
# hangs cannot take the others' time). Uses the machine's own jax/flax/optax and runs jaxmem from
# this checkout. Writes gpu.txt, bench_*.json and bench_*.log under $OUT (./gpu_bench if unset);
# the projection for 2,000 small_vgg models x 100 epochs on CIFAR-10 is in bench_small_vgg_*.
# BENCH_ARGS is appended to every bench.py call (later flags win), e.g. a smoke test of the
# plumbing on a CPU (bfloat16 convs are very slow there; the time limits cut most of it short):
#     BENCH_ARGS="--dtype=float32 --conv-impl=im2col --batch-size=8 --models=2 --sweep=2" \
#         bash experiments/gpu_bench.sh
set -uo pipefail
out="${OUT:-gpu_bench}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

bench() {  # name, time limit in seconds, extra bench.py arguments
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$python" experiments/bench.py --dtype=bfloat16 --batch-size=512 \
    --seconds=2 --json="$out/bench_$name.json" "$@" ${BENCH_ARGS:-} 2>&1 \
    | tee "$out/bench_$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)
print(jax.devices())"
} 2>&1 | tee "$out/gpu.txt"

# The GPU default (lowering.BEST: lax convs under vmap) with the sequential baseline and the
# matmul peak, then im2col for comparison, then resnet18. Plain vmap (variant c) is skipped:
# with lax convs it is the same program as the ensemble step here.
bench small_vgg_xla 150 --arch=small_vgg --conv-impl=xla --models=64 --sweep=16,64,256 --skip=vmap
bench small_vgg_im2col 90 --arch=small_vgg --conv-impl=im2col --models=64 --sweep=64,256 \
  --skip=vmap,matmul,sequential
bench resnet18_xla 150 --arch=resnet18 --conv-impl=xla --models=8 --sweep=8,32 --skip=vmap,matmul
