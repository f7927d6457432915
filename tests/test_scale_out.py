"""Fault tolerance and scale-out: kill and resume, refusal on changed inputs, merging parts,
divergence, adaptive ensemble size, two processes on the loopback address."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxmem import estimator, load_run
from jaxmem.config import Config
from jaxmem.data import load
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.rundir.merge import busy_seconds, merge_runs
from jaxmem.train.loop import DivergedError
from jaxmem.train.runner import run, work_dir_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "experiments", "run.py")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    data = make(seed=4, sizes=(1, 2, 4, 8))  # 150 train, 40 test, 8x8x1
    path = tmp_path_factory.mktemp("data") / "longtail.npz"
    np.savez(path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test,
             y_test=data.y_test)
    return str(path)


def config_for(npz, **changes):
    base = Config(arch="tiny_cnn", dataset=npz, num_models=4, models_per_wave=2, epochs=4,
                  eval_every=2, batch_size=64, translate=0, seed=7, min_count=2)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def uninterrupted(npz, tmp_path_factory):
    return load_run(run(config_for(npz), str(tmp_path_factory.mktemp("whole") / "run"),
                        progress=False))


def assert_same_run(a, b, exact=True):
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.model_indices, b.model_indices)
    if exact:
        np.testing.assert_array_equal(a.correct_by_epoch("train"), b.correct_by_epoch("train"))
        np.testing.assert_array_equal(a.memorization_by_epoch, b.memorization_by_epoch)
        # held-out predictions: exact sums (jaxmem/rundir/heldout.py), so equal bit for bit
        for name in ("heldout_prob_sum", "heldout_votes"):
            np.testing.assert_array_equal(a.extra[name], b.extra[name])
        np.testing.assert_array_equal(a.heldout_probs, b.heldout_probs)
        np.testing.assert_array_equal(a.suggested_label, b.suggested_label)
        np.testing.assert_array_equal(a.suggested_label_share, b.suggested_label_share)
    else:
        assert (a.correct_by_epoch("train") != b.correct_by_epoch("train")).mean() < 0.01
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)


def rewrite(npz, path, **changes):
    with np.load(npz) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update({k: v(arrays) for k, v in changes.items()})
    np.savez(path, **arrays)


def test_killed_run_refuses_changed_inputs_then_resumes_to_the_same_scores(
        npz, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    work = work_dir_of(out)
    args = [sys.executable, RUN_PY, f"--dataset={npz}", "--num-models=4", "--models-per-wave=2",
            "--epochs=4", "--eval-every=2", "--batch-size=64", "--lr=0.4", "--translate=0",
            "--seed=7", "--min-count=2", "--checkpoint-seconds=0", f"--out={out}",
            "--no-progress"]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # SIGKILL as soon as the second wave has an epoch checkpoint: one wave done, one midway.
    while not os.path.isdir(os.path.join(work, "checkpoint-wave-00001")):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not os.path.exists(out) and os.path.exists(os.path.join(work, "wave-00000.npz"))

    with pytest.raises(UserError, match="--resume"):
        run(config_for(npz), out, progress=False)
    changed = str(tmp_path / "changed.npz")
    rewrite(npz, changed, y_train=lambda a: np.where(np.arange(150) == 3, (a["y_train"] + 1) % 10,
                                                     a["y_train"]))
    with pytest.raises(UserError, match="train_labels fingerprint differs"):
        run(config_for(changed), out, resume=True, progress=False)
    reordered = str(tmp_path / "reordered.npz")
    rewrite(npz, reordered, x_train=lambda a: a["x_train"][::-1],
            y_train=lambda a: a["y_train"][::-1])
    with pytest.raises(UserError, match="train_images fingerprint differs"):
        run(config_for(reordered), out, resume=True, progress=False)
    with pytest.raises(UserError, match="masks fingerprint differs"):
        run(config_for(npz, subset_ratio=0.6), out, resume=True, progress=False)

    resumed = load_run(run(config_for(npz), out, resume=True, progress=False))
    assert not os.path.exists(work)
    assert_same_run(resumed, uninterrupted)


def test_merged_parts_equal_a_single_run(npz, uninterrupted, tmp_path):
    """Parts in the single run's waves of 2 give it bit for bit, held-out predictions included;
    the merged run reports with the report settings given now (parts that differ in them are
    refused without), and its wall time is the span of parts that ran side by side."""
    parts = [run(config_for(npz, model_range=r, fdr=fdr), str(tmp_path / r), progress=False)
             for r, fdr in (("0:2", 0.1), ("2:4", 0.05))]
    with pytest.raises(UserError, match="parts differ in --fdr"):
        merge_runs(parts, str(tmp_path / "merged"))
    for path, interval in zip(parts, ([100.0, 200.0], [150.0, 260.0]), strict=True):
        edit_metrics(path, run_intervals_utc=[interval])  # as if they ran side by side
    merged = load_run(merge_runs(parts[::-1], str(tmp_path / "merged"), report={"fdr": 0.05}))
    assert_same_run(merged, uninterrupted)
    assert merged.config["model_range"] is None and merged.metrics["num_models"] == 4
    assert merged.config["fdr"] == merged.metrics["fdr"] == 0.05
    assert merged.metrics["wall_time_s"] == 160.0  # the span 100..260, not 100 + 110
    assert merged.metrics["run_intervals_utc"] == [[100.0, 200.0], [150.0, 260.0]]
    # held-out votes for the true label are the held-out correct counts, model by model
    label_votes = merged.extra["heldout_votes"][np.arange(150), merged.labels]
    np.testing.assert_array_equal(label_votes, (merged.correct_train & ~merged.masks).sum(0))
    np.testing.assert_array_equal(merged.extra["heldout_votes"].sum(1), merged.out_count)

    with pytest.raises(UserError, match="gaps"):
        merge_runs(parts[1:], str(tmp_path / "gap"))
    with pytest.raises(UserError, match="overlap"):
        merge_runs([parts[0], parts[0]], str(tmp_path / "overlap"), report={"fdr": 0.05})
    # a part whose mask was changed
    masks = np.load(os.path.join(parts[0], "masks.npy"))
    masks[0, :3] = ~masks[0, :3]
    np.save(os.path.join(parts[0], "masks.npy"), masks)
    with pytest.raises(UserError, match="masks"):
        merge_runs(parts, str(tmp_path / "tampered"), report={"fdr": 0.05})


def edit_metrics(path, **changes):
    file = os.path.join(path, "metrics.json")
    with open(file) as f:
        metrics = json.load(f)
    with open(file, "w") as f:
        json.dump({**metrics, **changes}, f)


def test_wall_time_of_parts_counts_time_any_part_ran_once():
    assert busy_seconds([[0, 10], [2, 12], [20, 25]]) == 17  # side by side, then later
    assert busy_seconds([[5, 6], [0, 10]]) == 10 and busy_seconds([]) == 0


def test_merge_refuses_parts_of_another_dataset(npz, tmp_path):
    changed = str(tmp_path / "changed.npz")
    rewrite(npz, changed, y_train=lambda a: (a["y_train"] + 1) % 10)
    a = run(config_for(npz, model_range="0:2", models_per_wave=0, epochs=1, eval_every=1),
            str(tmp_path / "a"), progress=False)
    b = run(config_for(changed, model_range="2:4", models_per_wave=0, epochs=1, eval_every=1),
            str(tmp_path / "b"), progress=False)
    with pytest.raises(UserError, match="train_labels fingerprint differs"):
        merge_runs([a, b], str(tmp_path / "merged"))
    reordered = str(tmp_path / "reordered.npz")
    rewrite(npz, reordered, x_train=lambda a: a["x_train"][::-1],
            y_train=lambda a: a["y_train"][::-1])
    c = run(config_for(reordered, model_range="2:4", models_per_wave=0, epochs=1, eval_every=1),
            str(tmp_path / "c"), progress=False)
    with pytest.raises(UserError, match="train_images fingerprint differs"):
        merge_runs([a, c], str(tmp_path / "merged"))
    with pytest.raises(UserError, match="train_labels fingerprint differs"):
        load_run(a, dataset=load(changed))
    assert load_run(a, dataset=load(npz)).config["fingerprints"]["train_labels"]


def test_divergence_stops_with_model_indices_or_is_dropped(npz, tmp_path):
    diverging = config_for(npz, lr=1e30, epochs=2, eval_every=1, models_per_wave=0)
    out = str(tmp_path / "nan")
    with pytest.raises(DivergedError, match=r"models 0, 1, 2, 3 diverged .* checkpoints"):
        run(diverging, out, progress=False)
    assert os.path.exists(os.path.join(work_dir_of(out), "record.json"))
    dropped = load_run(run(dataclasses.replace(diverging, drop_diverged=True), out,
                           overwrite=True, progress=False))
    assert dropped.metrics["diverged_models"] == [0, 1, 2, 3]
    np.testing.assert_array_equal(dropped.excluded_models, [0, 1, 2, 3])
    assert len(dropped.model_indices) == 0 and np.isnan(dropped.memorization).all()
    # excluded models add no held-out predictions either
    assert (dropped.suggested_label == -1).all() and np.isnan(dropped.heldout_probs).all()


def test_until_se_grows_a_run_until_the_standard_errors_are_below_the_target(npz, tmp_path):
    """Grown with --until-se from 2 models: waves of 2 are added until every standard error is
    below 0.3, which the standard errors (not only the counts of models) decide."""
    target, out = 0.3, str(tmp_path / "se")
    config = config_for(npz, num_models=32, epochs=1, eval_every=1, subset_ratio=0.5)
    run(dataclasses.replace(config, num_models=2), out, progress=False)
    with pytest.raises(UserError, match="until-se chooses K"):
        run(dataclasses.replace(config, until_se=target, model_range="0:8"), out + "-part",
            progress=False)
    result = load_run(run(dataclasses.replace(config, until_se=target), out, grow=True,
                          progress=False))
    assert result.config["until_se"] == target  # the rule the added models were trained under
    used = result.metrics["num_models"]
    assert 4 <= used < 32 and used % 2 == 0 and list(result.model_indices) == list(range(used))
    assert result.metrics["max_memorization_se"] < target and not result.low_count.any()
    # with one wave fewer the target was missed; and some earlier wave had enough models for
    # every example, yet a standard error above the target
    masks, correct = np.asarray(result.masks), np.asarray(result.correct_train)
    earlier = [estimator.memorization_scores(masks[:k], correct[:k], 2)
               for k in range(2, used, 2)]
    assert earlier[-1]["low_count"].any() or np.nanmax(earlier[-1]["memorization_se"]) >= target
    assert any(not s["low_count"].any() and np.nanmax(s["memorization_se"]) >= target
               for s in earlier)


def test_a_grown_run_equals_a_fresh_run_with_more_models(npz, uninterrupted, tmp_path):
    """... with the report settings given to the grow, no --until-se the added models were not
    trained under, and as wall time the two runs' own times (not the time between them)."""
    out = str(tmp_path / "grown")
    run(config_for(npz, num_models=2, until_se=5.0), out, progress=False)  # 2 cannot reach it
    with pytest.raises(UserError, match="refusing to add models .* settings fingerprint"):
        run(config_for(npz, lr=0.2), out, grow=True, progress=False)
    before = load_run(out).metrics
    grown = load_run(run(config_for(npz, null_permutations=7, fdr=0.1, fit_threshold=0.5), out,
                         grow=True, progress=False))
    assert_same_run(grown, uninterrupted)  # masks, correctness and scores bit for bit
    assert (grown.config["null_permutations"], grown.config["fdr"],
            grown.config["fit_threshold"]) == (7, 0.1, 0.5)
    assert grown.metrics["noise_floor"]["num_permutations"] == 7 and grown.metrics["fdr"] == 0.1
    assert grown.config["until_se"] is None
    first, added = grown.metrics["run_intervals_utc"]
    assert first == before["run_intervals_utc"][0] and added[0] >= first[1]
    assert grown.metrics["wall_time_s"] == pytest.approx(
        (first[1] - first[0]) + (added[1] - added[0]))
    np.testing.assert_array_equal(grown.memorization_se_by_epoch,
                                  uninterrupted.memorization_se_by_epoch)
    assert grown.config["num_models"] == grown.metrics["num_models"] == 4
    assert not os.path.exists(out + ".grow")
    with pytest.raises(UserError, match="already holds 4 models"):
        run(config_for(npz), out, grow=True, progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_loopback_equal_a_single_process(npz, uninterrupted, tmp_path):
    out, port = str(tmp_path / "two"), free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, RUN_PY, f"--dataset={npz}", "--num-models=4", "--epochs=4",
         "--eval-every=2", "--batch-size=64", "--lr=0.4", "--translate=0", "--seed=7",
         "--min-count=2", f"--out={out}",
         "--no-progress", "--distributed", f"--coordinator-address=127.0.0.1:{port}",
         "--num-processes=2", f"--process-id={p}"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for p in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    merged = load_run(out)
    assert merged.metrics["num_models"] == 4
    assert_same_run(merged, uninterrupted, exact=False)
