"""experiments/bench.py's arithmetic and arguments (the timings themselves are not tested)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench", os.path.join(ROOT, "experiments", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_counts_each_models_subset_in_whole_batches_and_every_evaluation(bench):
    args = bench.parse_args(["--batch-size=512", "--project=2000,100"])
    sweep = [{"models": 16, "model_examples_per_s": 1e5, "eval_model_examples_per_s": 4e5},
             {"models": 64, "model_examples_per_s": 2e5, "eval_model_examples_per_s": 8e5}]
    result = bench.projection(args, sweep)
    # 35,000 of 50,000 CIFAR-10 images per model: ceil(35000 / 512) = 69 batches of 512.
    assert result["at_models_per_wave"] == 64
    assert result["train_hours"] == pytest.approx(2000 * 100 * 69 * 512 / 2e5 / 3600)
    # Evaluated after epochs 6, 12, ..., 96 and 100: 17 times, on 50,000 + 10,000 images.
    assert result["evaluations"] == 17
    assert result["eval_hours"] == pytest.approx(2000 * 17 * 60_000 / 8e5 / 3600)
    assert result["total_hours"] == pytest.approx(result["train_hours"] + result["eval_hours"])


def test_sweep_is_ascending_and_holds_models(bench):
    args = bench.parse_args(["--models=8", "--sweep=64,1,16"])
    assert bench.Bench.sweep_sizes(args) == [1, 8, 16, 64]


@pytest.mark.parametrize("project", ["2000", "2000,x", "1,2,3"])
def test_bad_projection_is_refused(bench, project, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([f"--project={project}"])
    assert "--project must be K,E" in capsys.readouterr().err
