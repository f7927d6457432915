"""experiments/run.py end to end on a tiny configuration, and every bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxmem import load_run
from jaxmem.cli import main
from jaxmem.train.host_memory import kib_field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch=tiny_cnn", "--num-models=6", "--epochs=2", "--batch-size=256", "--eval-every=1",
        "--min-count=2", "--no-progress"]


@pytest.fixture(scope="module")
def user_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (90, 6, 6), dtype=np.uint8),
             y_train=rng.integers(0, 3, 90), x_test=rng.integers(0, 256, (20, 6, 6), np.uint8),
             y_test=rng.integers(0, 3, 20))
    return str(path)


def test_cli_end_to_end_writes_the_run_directory(tmp_path, user_npz, capsys):
    out = str(tmp_path / "run")
    # 1 GiB beyond what this test process already holds (it grows with the tests run before)
    held = kib_field("/proc/self/status", "VmRSS:") * 1024
    given = held + 2**30
    assert main(TINY + [f"--dataset={user_npz}", f"--out={out}", f"--host-memory={given}"]) == 0
    printed = capsys.readouterr().out
    assert "memorized:" in printed and out in printed
    plan = next(line for line in printed.splitlines() if line.startswith("plan: device "))
    assert "; host " in plan and "; disk " in plan and f"under {tmp_path} (" in plan
    run = load_run(out)
    # the budget: --host-memory less what the process held when planning, unless the host
    # leaves less; on a CPU the waves' and the results' budget are one
    memory = run.metrics["memory_plan"]
    assert memory["budget_bytes"] < given and f"from {memory['budget_source']}" in printed
    if memory["budget_source"] == "--host-memory":
        assert memory["budget_bytes"] + memory["host_in_use_bytes"] == pytest.approx(given,
                                                                                  rel=0.05)
    assert memory["host_budget_source"] == memory["budget_source"]
    assert memory["host_peak_bytes_planned"] > memory["host_in_use_bytes"] > 0
    assert memory["measured_peak_bytes_per_model"] > 0 and memory["planned_bytes_per_model"] > 0
    # two epochs on random labels: the models cannot fit their subsets, and the run says so
    assert run.metrics["train_acc"] < 0.99 and "WARNING: The models fit only" in printed
    assert run.metrics["warnings"][0].startswith("The models fit only")
    k, n, n_test = 6, 90, 20
    assert run.masks.shape == (k, n) and run.masks.dtype == bool
    assert (run.masks.sum(1) == 63).all()
    assert run.correct_train.shape == (k, n) and run.correct_test.shape == (k, n_test)
    assert run.memorization.shape == (n,) and run.memorization_se.shape == (n,)
    assert run.memorization_by_epoch.shape == (2, n)
    np.testing.assert_array_equal(run.epochs, [1, 2])
    assert run.train_acc.shape == (2, k) and run.test_acc.shape == (2, k)
    np.testing.assert_array_equal(run.correct_by_epoch("train")[-1], run.correct_train)
    np.testing.assert_array_equal(run.memorization_by_epoch[-1], run.memorization)
    assert run.labels.shape == (n,)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["num_models"] == k and config["versions"]["jax"] and config["devices"]
    assert run.metrics["memorized_count"] == len(run.memorized(0.25))
    top = run.most_memorized(5)
    assert np.all(np.diff(np.nan_to_num(run.memorization[top], nan=-9)) <= 0)


def test_existing_output_is_not_overwritten_without_flag(tmp_path, user_npz, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(TINY + [f"--dataset={user_npz}", f"--out={out}"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,message", [
    (["--arch=resnet7"], "unknown arch 'resnet7'; choose one of"),
    (["--dataset=imagenet22k"], "unknown dataset 'imagenet22k'; choose one of"),
    (["--subset-ratio=1.0"], "--subset-ratio must be in (0, 1)"),
    (["--subset-ratio=0"], "--subset-ratio must be in (0, 1)"),
    (["--num-models=0"], "--num-models must be >= 1"),
    (["--dataset=/nonexistent/arrays.npz"], "does not exist"),
    (["--conv-impl=fft"], "unknown --conv-impl 'fft'"),
    (["--threshold=1"], "--threshold must be in (-1, 1)"),
    (["--host-memory=lots"], "--host-memory must be a size such as 6G"),
])
def test_bad_input_is_one_line_error(flags, message, tmp_path, capsys):
    assert main(TINY + flags + [f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bfloat16_on_cpu_says_it_is_slower(tmp_path, capsys):
    flags = ["--dtype=bfloat16", "--dataset=/nonexistent/arrays.npz"]
    assert main(TINY + flags + [f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "bfloat16 trains about 1.5x slower than float32 on CPU" in err
    assert "does not exist" in err


def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8),
                  y_train=np.arange(10) % 2, x_test=np.zeros((4, 4, 4, 1), np.uint8),
                  y_test=np.zeros(4, int))
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


@pytest.mark.parametrize("overrides,message", [
    (dict(y_train=np.arange(9)), "x_train has 10 images but y_train has 9 labels"),
    (dict(x_test=None), "missing keys x_test"),
    (dict(x_train=np.zeros((10, 4, 4, 1), np.float32)), "must be uint8"),
    (dict(x_test=np.zeros((4, 5, 5, 1), np.uint8)), "differ in shape"),
    (dict(y_train=-np.ones(10, int)), "negative labels"),
])
def test_inconsistent_npz_is_rejected(overrides, message, tmp_path, capsys):
    path = tmp_path / "bad.npz"
    write_npz(path, **overrides)
    assert main(TINY + [f"--dataset={path}", f"--out={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_npz_and_script_exit_code(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip file at all")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"),
                           f"--dataset={path}", f"--out={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "not a readable .npz file" in done.stderr and "Traceback" not in done.stderr


def test_list_archs_prints_every_arch_with_counts(capsys):
    assert main(["--list-archs"]) == 0
    printed = capsys.readouterr().out
    assert "small_vgg" in printed and "487,882" in printed and "vit_small" in printed


@pytest.mark.parametrize("included", [0, 1])
def test_summary_of_a_run_with_fewer_than_two_included_models(fake_run_dir, included):
    """Every model (or all but one) diverged under --drop-diverged: the run directory holds no
    scores and a noise floor of no permutations (no samples, no mean), and the summary says so
    instead of failing."""
    from jaxmem.cli import summary

    path = fake_run_dir("dropped", num_models=6, num_train=40, num_test=10, dataset="synthetic",
                        diverged=tuple(range(6 - included)))
    run = load_run(path)
    null = run.metrics["noise_floor"]
    assert null["num_permutations"] == 0 and run.extra["null_samples_by_epoch"].shape == (0, 3)
    assert null["mean"] == [None, None, None] and null["p95"] == [None, None, None]
    text = summary(path, run.metrics)
    assert "noise floor: none (fewer than 2 included models to shuffle)" in text
    assert "memorized: 0 examples" in text
    if included:
        assert "(mean over 1 included models)" in text
    else:
        assert "every one of the 6 models diverged and was excluded" in text
