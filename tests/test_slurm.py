"""experiments/cluster/ensemble_array.sh without SLURM: its part and merge commands on one machine
(SLURM_ARRAY_TASK_ID set by hand), and its requeue after a checkpointed exit (status 75) with a
stand-in for the run and for scontrol."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from jaxmem import load_run
from jaxmem.config import Config
from jaxmem.masks import run_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "cluster", "ensemble_array.sh")
# test_cli's TINY run on data of its shape, in parts of its 6 models: the parts' programs are
# those test_cli and test_data_folder compile (read from the suite's compilation cache)
RUN_ARGS = ("--arch=tiny_cnn --epochs=2 --batch-size=256 --eval-every=1 --min-count=2 "
            "--null-permutations=2")


def script(mode: str, env: dict, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, mode], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_parts_and_merge_on_one_machine(tmp_path):
    rng = np.random.default_rng(0)
    data = str(tmp_path / "tiny.npz")
    np.savez(data, x_train=rng.integers(0, 256, (90, 6, 6), np.uint8),
             y_train=rng.integers(0, 3, 90), x_test=rng.integers(0, 256, (20, 6, 6), np.uint8),
             y_test=rng.integers(0, 3, 20))
    out = str(tmp_path / "run")
    env = {"JAXMEM_OUT": out, "JAXMEM_NUM_MODELS": "12", "JAXMEM_NUM_PARTS": "2",
           "JAXMEM_RUN_ARGS": f"{RUN_ARGS} --dataset={data}", "JAXMEM_PYTHON": sys.executable}
    for part in ("0", "1"):
        done = script("part", {**env, "SLURM_ARRAY_TASK_ID": part})
        assert done.returncode == 0, done.stderr[-2000:]
    assert load_run(f"{out}.parts/part-1").model_indices.tolist() == list(range(6, 12))
    again = script("part", {**env, "SLURM_ARRAY_TASK_ID": "0"})  # a requeued finished part
    assert again.returncode == 0 and "is finished" in again.stdout
    done = script("merge", env)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = load_run(out)
    assert merged.model_indices.tolist() == list(range(12))
    np.testing.assert_array_equal(merged.masks, run_masks(Config(num_models=12), 90))


FAKE_RUN = """#!/bin/bash
echo "$@" > "$FAKE_LOG"
trap 'exit 75' USR1 TERM  # the run: checkpoint, exit 75
touch "$FAKE_LOG.started"
while true; do sleep 0.05; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" > "$FAKE_LOG.scontrol"
"""


def test_a_signalled_part_checkpoints_requeues_and_resumes(tmp_path):
    """SLURM signals the batch shell (--signal=B:USR1@120); the script forwards the signal to
    the run, and on its status 75 requeues the job; started again, it passes --resume."""
    bin_dir, log = tmp_path / "bin", str(tmp_path / "args")
    bin_dir.mkdir()
    for name, text in (("run", FAKE_RUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = str(tmp_path / "run")
    env = {**os.environ, "JAXMEM_OUT": out, "JAXMEM_NUM_MODELS": "10",
           "JAXMEM_NUM_PARTS": "3", "JAXMEM_RUN_ARGS": "--arch=tiny_cnn",
           "JAXMEM_PYTHON": str(bin_dir / "run"), "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_JOB_ID": "4242", "FAKE_LOG": log, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    shell = subprocess.Popen(["bash", SCRIPT, "part"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{log}.started") and time.monotonic() < deadline:
        time.sleep(0.02)
    shell.send_signal(signal.SIGUSR1)
    assert shell.wait(timeout=60) == 75
    with open(log) as f:
        assert f.read().split() == ["experiments/run.py", "--arch=tiny_cnn", "--num-models=10",
                                    "--model-range=3:6", f"--out={out}.parts/part-1",
                                    "--no-progress"]
    with open(f"{log}.scontrol") as f:
        assert f.read().split() == ["requeue", "4242"]
    os.makedirs(f"{out}.parts/part-1.partial")  # what the run leaves when it checkpoints
    os.remove(f"{log}.started")
    shell = subprocess.Popen(["bash", SCRIPT, "part"], env=env, stdout=subprocess.PIPE, text=True)
    while not os.path.exists(f"{log}.started") and time.monotonic() < deadline:
        time.sleep(0.02)
    shell.send_signal(signal.SIGTERM)  # preemption
    assert shell.wait(timeout=60) == 75
    with open(log) as f:
        assert f.read().split()[-1] == "--resume"
