"""The benchmark scripts' arithmetic, arguments and candidates (their timings are not tested)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem.models.layers import conv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "experiments", "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_every_conv_candidate_computes_the_convolution_and_its_gradients():
    lowerings = load_script("conv_lowerings").LOWERINGS
    rng = np.random.default_rng(0)
    x, kernel, target = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                         for shape in ((2, 6, 8, 5), (3, 3, 5, 7), (2, 6, 8, 7)))

    def value_and_grads(conv):  # jitted, as benchmarked: one compile, not one per operation
        return jax.jit(jax.value_and_grad(lambda a, k: jnp.vdot(conv(a, k), target),
                                          (0, 1)))(x, kernel)

    want = value_and_grads(lambda a, k: conv2d(a, k, 1, "xla"))
    for name, conv in lowerings.items():
        np.testing.assert_allclose(jax.jit(conv)(x, kernel), conv2d(x, kernel, 1, "xla"),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        for got, expected in zip(jax.tree.leaves(value_and_grads(conv)),
                                 jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=name)


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


def test_pytorch_baseline_is_skipped_with_its_reason_when_torch_is_missing(bench, monkeypatch,
                                                                          capsys):
    torch_baseline = load_script("torch_baseline")
    monkeypatch.setitem(sys.modules, "torch_baseline", torch_baseline)
    monkeypatch.setattr(torch_baseline, "available", lambda: "torch is not installed")
    fake = type("FakeBench", (), {"args": bench.parse_args(["--arch=small_vgg"]), "jax": jax})()
    assert bench.pytorch_baseline(fake) == {"skipped": "torch is not installed"}
    assert "pytorch: skipped (torch is not installed)" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["small_vgg", "med_vgg"])
def test_pytorch_baseline_has_the_same_parameters_as_the_jaxmem_model(arch):
    pytest.importorskip("torch")
    from jaxmem import models
    from jaxmem.models.vgg import LAYOUTS

    torch_model = load_script("torch_baseline").build_model(LAYOUTS[arch], 3, 10)
    variables = models.create(arch, 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    jax_count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert sum(p.numel() for p in torch_model.parameters()) == jax_count


def test_the_rehearsal_writes_and_loads_its_synthetic_run(tmp_path):
    """experiments/benchmarks/rehearsal.py's write and load steps at a tiny shape, in this
    process: the synthetic run has its planted memorized examples and pairs, and the plan's
    prediction covers what the process held."""
    rehearsal = load_script("rehearsal")
    args = rehearsal.parse_args([f"--out={tmp_path}", "--num-models=48", "--num-train=400",
                                 "--num-test=60", "--evaluations=3"])
    wrote = rehearsal.child_write(args)
    assert wrote["predicted_peak_bytes"] > wrote["rss_holding_result_bytes"] > 0
    assert 0 < wrote["disk_bytes"] <= wrote["planned_disk_bytes"]
    loaded = rehearsal.child_load(args)
    assert 0 < loaded["memorized"] <= 0.1 * 400  # the memorized kind: 5% of the examples
    assert loaded["correct_bits_set"] > 0


def test_the_suite_compile_census_reads_what_jax_logs_of_its_cache(tmp_path, capsys):
    """Through jax's own cache messages (the suite's persistent cache): a program never seen
    before is one miss with its seconds, the same program jitted anew is a hit."""
    import logging
    import time

    census = load_script("suite_compiles")
    logger = logging.getLogger("jax._src.compiler")
    recorder, level = census._Recorder(str(tmp_path / "1.log")), logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(recorder)
    census._current["test"] = "tests/t.py::fresh"
    unique = float(time.time_ns() % 10**9)  # a constant no earlier session compiled
    try:
        for _ in range(2):  # a new function object each time: traced and looked up again
            jax.jit(lambda x: x * unique + 1.0)(jnp.float32(2.0)).block_until_ready()
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(level)
    census.summarise(str(tmp_path))
    printed = capsys.readouterr().out
    # misses, distinct programs and hits of the lambda's program (jnp.float32 may add one)
    assert re.search(r"\n +[0-9.]+ +1 +1 +1  jit__lambda\n", printed), printed
    assert "tests/t.py::fresh" in printed
