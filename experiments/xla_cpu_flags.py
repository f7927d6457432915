"""XLA's CPU library paths (oneDNN, XNNPACK, YNNPACK) and one host device per core, each measured
on one convolution layer and on the whole training step, in one run.

    python experiments/xla_cpu_flags.py --json=flags.json

For every flag set a fresh process runs experiments/conv_lowerings.py (a 16x16 64->64 conv,
forward + backward, lax conv and im2col, one model / vmap / unroll over 4 models) and
experiments/bench.py (the small_vgg step at B=128: one model with each conv lowering, and the
ensemble of 4), with XLA_FLAGS set. About 4 minutes per flag set on an idle 2-core CPU.
The flags are those of XLA's debug_options_flags.cc; a flag this jaxlib does not know stops its
process, which the table reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ALL_FUSIONS = ("LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_ELTWISE,"
               "LIBRARY_FUSION_TYPE_REDUCE")
FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_fusions": f"--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type="
                      f"{ALL_FUSIONS}",
    "onednn_custom_call": "--xla_cpu_use_onednn=true "
                          "--xla_cpu_experimental_onednn_custom_call=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn_fusions": f"--xla_cpu_experimental_xnn_fusion_type={ALL_FUSIONS}",
    "ynn_fusions": f"--xla_cpu_experimental_ynn_fusion_type={ALL_FUSIONS}",
    "two_host_devices": "--xla_force_host_platform_device_count=2",
}
HERE = os.path.dirname(os.path.abspath(__file__))


def measure(flags: str, seconds: float, workdir: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    conv_json, step_json = os.path.join(workdir, "conv.json"), os.path.join(workdir, "step.json")
    runs = {
        "conv": [os.path.join(HERE, "conv_lowerings.py"), "--lowerings=xla,im2col",
                 f"--seconds={seconds}", f"--json={conv_json}"],
        "step": [os.path.join(HERE, "bench.py"), "--models=4", "--batch-size=128",
                 "--skip=vmap,pytorch,eval", f"--seconds={seconds}", f"--json={step_json}"],
    }
    result = {}
    for name, argv in runs.items():
        done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
        if done.returncode:
            result[name] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            continue
        with open(conv_json if name == "conv" else step_json) as handle:
            result[name] = json.load(handle)
    return result


def row(name: str, result: dict) -> str:
    conv, step = result["conv"], result["step"]
    if "error" in conv or "error" in step:
        return f"{name:<20} failed: {conv.get('error') or step.get('error')}"
    singles = step["sequential"]["per_impl"]
    rate = {impl: 128 / s["seconds_per_model_step"] for impl, s in singles.items()}
    return (f"{name:<20}{step.get('matmul_peak_gflops', 0):>8.0f}"
            + "".join(f"{conv[impl][v]:>8.1f}" for impl in ("xla", "im2col")
                      for v in ("one model", "vmap"))
            + f"{rate.get('xla', 0):>8.0f}{rate.get('im2col', 0):>8.0f}"
            f"{step['model_examples_per_s']:>8.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(FLAG_SETS),
                        help=f"comma-separated, from: {', '.join(FLAG_SETS)}")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    unknown = [s for s in args.sets.split(",") if s not in FLAG_SETS]
    if unknown:
        parser.error(f"unknown flag sets {unknown}; choose from {', '.join(FLAG_SETS)}")
    print(f"{'':<28}{'conv layer GFLOP/s (16x16 64->64)':^32}{'step model-ex/s (B=128)':^24}")
    print(f"{'flag set':<20}{'matmul':>8}{'xla 1':>8}{'xla vm4':>8}{'i2c 1':>8}{'i2c vm4':>8}"
          f"{'xla 1':>8}{'i2c 1':>8}{'ens 4':>8}", flush=True)
    results = []  # a list: a set may be named twice, to see the spread between runs
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.sets.split(","):
            results.append({"flag_set": name, "xla_flags": FLAG_SETS[name],
                            **measure(FLAG_SETS[name], args.seconds, workdir)})
            print(row(name, results[-1]), flush=True)
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
