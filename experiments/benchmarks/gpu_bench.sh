#!/usr/bin/env bash
# The GPU measurement as one short prepared run, on any CUDA machine:
#     bash experiments/benchmarks/gpu_bench.sh
# At most 7 minutes (compiles dominate; each step has its own time limit, so one that hangs
# cannot take the others' time). Needs no network: it uses the machine's own jax (with CUDA),
# flax, optax, orbax-checkpoint, tqdm and pillow, checks first that they import (else it says
# what to install and exits 1), and runs jaxmem from this checkout. Writes gpu_bench.log (all
# it prints) and one bench_*.json per step under $OUT (./gpu_bench if unset; 6 files, within
# what a remote runner copies back); the projection for 2,000 small_vgg models x 100 epochs on
# CIFAR-10 is in bench_small_vgg_*.
# BENCH_ARGS is appended to every bench.py call (later flags win); ALLOW_CPU=1 skips the CUDA
# check. A smoke test of the plumbing on a CPU (every step's ensemble row, on a tiny model in
# float32; 2-3 minutes on 2 idle cores, and the time limits cut steps short under load):
#     ALLOW_CPU=1 BENCH_ARGS="--arch=tiny_cnn --dtype=float32 --conv-impl=im2col --batch-size=8 \
#         --eval-batch-size=8 --models=2 --sweep=2 --seconds=0.2 --skip=vmap,matmul,sequential" \
#         bash experiments/benchmarks/gpu_bench.sh
set -uo pipefail
out="${OUT:-gpu_bench}"
mkdir -p "$out"
log="$out/gpu_bench.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

# Everything bench.py imports, and a CUDA backend: one line and exit 1 if anything is missing.
timeout 25 "$python" - "${ALLOW_CPU:-}" <<'EOF' 2>&1 | tee "$log"
import importlib, sys
missing = []
for module in ("jax", "flax", "optax", "orbax.checkpoint", "tqdm", "PIL"):
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install
        missing.append(f"{module} ({type(error).__name__})")
if not missing:
    import jax
    if jax.default_backend() != "gpu" and not sys.argv[1]:
        missing.append(f"a CUDA backend for jax {jax.__version__} (it runs on "
                       f"{jax.default_backend()})")
if missing:
    print(f"gpu_bench.sh: {sys.executable} lacks {', '.join(missing)}; install jax[cuda13] or "
          "jax[cuda12], flax, optax, orbax-checkpoint, tqdm and pillow (pip install -e "
          "'.[cuda13]'), or set ALLOW_CPU=1 for a CPU smoke test")
    sys.exit(1)
import flax, optax
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print(jax.devices())
EOF
(( PIPESTATUS[0] == 0 )) || exit 1
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 \
  | tee -a "$log"

bench() {  # name, time limit in seconds, extra bench.py arguments
  local name=$1 limit=$2 status
  shift 2
  echo "# === $name (at most $limit s): bench.py $* ${BENCH_ARGS:-}" | tee -a "$log"
  timeout "$limit" "$python" experiments/benchmarks/bench.py --dtype=bfloat16 --batch-size=512 \
    --seconds=2 --json="$out/bench_$name.json" "$@" ${BENCH_ARGS:-} 2>&1 \
    | tee -a "$log"
  status=${PIPESTATUS[0]}
  if (( status == 124 )); then
    echo "# $name: stopped at its $limit s limit (finished rows are in its JSON)" | tee -a "$log"
  elif (( status != 0 )); then
    echo "# $name: exit status $status" | tee -a "$log"
  fi
}

# Which (conv lowering, model-axis mapping) lowering.BEST["gpu"] should be, all at M=64 small_vgg
# models per step: lax convs under vmap (small_vgg's row; grouped convs, whose backward is slow
# on GPU) with the sequential baseline and the matmul peak (the sweep's M=256 stops at the
# element limit, array_sizes.py), then lax.map over the models (the GPU default)
# (plain convs, one model at a time), vmap in chunks of 8 models, and im2col under vmap.
# resnet18 last. Plain vmap (variant c) is skipped: with lax convs it is the vmap row itself.
# Time limits: 35 s above, 380 s below (415 s in all).
bench small_vgg_xla 110 --arch=small_vgg --conv-impl=xla --models=64 --sweep=64,256 --skip=vmap
only_ensemble=(--arch=small_vgg --models=64 --skip=vmap,matmul,sequential)
bench small_vgg_xla_map 55 "${only_ensemble[@]}" --conv-impl=xla --ensemble=map
bench small_vgg_xla_vmap8 55 "${only_ensemble[@]}" --conv-impl=xla --ensemble=vmap:8
bench small_vgg_im2col 60 "${only_ensemble[@]}" --conv-impl=im2col --ensemble=vmap
bench resnet18_xla 100 --arch=resnet18 --conv-impl=xla --models=8 --sweep=8,32 --skip=vmap,matmul
