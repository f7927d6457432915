"""The pilot: the run's first models, trained at doubling lengths, choose the training length;
they are the run's first models, a capped schedule that cannot fit is said before the ensemble,
and an interrupted pilot resumes without redoing a finished length."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from jaxmem import load_run, recipes
from jaxmem.cli import summary
from jaxmem.config import Config
from jaxmem.data import load
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.train import loop, pilot, waves
from jaxmem.train.runner import run, train_and_evaluate

RECIPE = {"epochs": "recipe"}  # what resolve records when the recipe chose the epochs


def save(path, x_train, y_train, data):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=data.x_test, y_test=data.y_test)
    return str(path)


@pytest.fixture(scope="module")
def data():
    return make(seed=4, sizes=(1, 2, 4, 8))  # 150 train, 40 test, 8x8x1, 10 classes


@pytest.fixture(scope="module")
def npz(data, tmp_path_factory):
    return save(tmp_path_factory.mktemp("data") / "longtail.npz", data.x_train, data.y_train,
                data)


@pytest.fixture(scope="module")
def conflicting(data, tmp_path_factory):
    """The same shapes, but images 75..149 repeat images 0..74 with another label: a subset of
    105 of the 150 holds both copies of at least 30 pairs, so no model gets more than 75 of
    its 105 examples right (0.714), at any length."""
    x = np.concatenate([data.x_train[:75], data.x_train[:75]])
    y = np.concatenate([data.y_train[:75], (data.y_train[:75] + 1) % 10])
    return save(tmp_path_factory.mktemp("data") / "conflicting.npz", x, y, data)


def config_for(npz, **changes):
    # epochs: the recipe's first guess; two waves of 2: the pilot's models, then the rest
    base = Config(arch="tiny_cnn", dataset=npz, num_models=4, models_per_wave=2, epochs=4,
                  batch_size=16, lr=0.1, translate=0, seed=7, min_count=2, fit_threshold=1.0,
                  null_permutations=10)
    return dataclasses.replace(base, **changes)


def test_the_pilot_lengthens_until_the_models_fit_and_its_models_are_the_runs(
        npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pilot, "CAP_EPOCHS", 16)
    out = run(config_for(npz), str(tmp_path / "piloted"), progress=False, sources=RECIPE)
    piloted = load_run(out)
    record = piloted.metrics["pilot"]
    tried = [t["epochs"] for t in record["tried"]]
    fits = [t["train_acc"] for t in record["tried"]]
    # 4 epochs do not fit these subsets; the pilot stops at the first length that does
    assert len(tried) >= 2 and tried == [4, 8, 16][:len(tried)]
    assert all(acc < 1.0 for acc in fits[:-1]) and fits[-1] == 1.0 and record["fits"]
    chosen = tried[-1]
    assert (piloted.config["epochs"], piloted.config["eval_every"]) == (
        chosen, recipes.evaluation_interval(chosen))
    assert piloted.config["setting_sources"]["epochs"] == "pilot"
    assert piloted.metrics["train_acc"] == 1.0 and not piloted.metrics["warnings"]
    assert record["models"] == 2 and 0 < record["share_of_run"] < 1
    assert f": training {chosen} epochs (2 models" in capsys.readouterr().out
    assert f"epochs: trained {chosen} epochs; the pilot (2 models) took" in summary(
        out, piloted.metrics)
    assert not os.path.exists(out + ".pilot") and not os.path.exists(out + ".partial")
    # the pilot's models at the chosen length are the run's models 0 and 1: the run equals one
    # given that length and no pilot, bit for bit
    plain = load_run(run(config_for(npz, epochs=chosen, eval_every=piloted.config["eval_every"],
                                     pilot=False), str(tmp_path / "plain"), progress=False))
    np.testing.assert_array_equal(piloted.model_indices, np.arange(4))
    np.testing.assert_array_equal(piloted.masks, plain.masks)
    for split in ("train", "test"):
        np.testing.assert_array_equal(piloted.correct_by_epoch(split),
                                      plain.correct_by_epoch(split))
    np.testing.assert_array_equal(piloted.memorization_by_epoch, plain.memorization_by_epoch)


def test_on_an_accelerator_the_pilot_is_one_planned_wave_and_every_kill_point_resumes(
        npz, tmp_path, monkeypatch, capsys):
    """On a GPU whose free memory holds 3 models (faked), the pilot trains one planned wave,
    models 0..2, and the run its model 3 as a part of its own in the pilot's work directory.
    Killed before the merge, and again after it (before that directory is removed), it
    resumes each time, to the run that given its length trains without a pilot, bit for bit."""
    monkeypatch.setattr(pilot, "CAP_EPOCHS", 16)
    monkeypatch.setattr(pilot, "accelerator", lambda: "gpu")
    config = config_for(npz, models_per_wave=0)
    per_model = waves.compiled_bytes(loop.Trainer(config, load(npz)), 1)
    free = int(3.5 * per_model / waves.MEMORY_FRACTION)
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda self: {
        "bytes_limit": free + 2**20, "bytes_in_use": 2**20, "peak_bytes_in_use": 2**20})
    out, merge = str(tmp_path / "run"), pilot.merge_runs

    def killed_before(*args, **kwargs):
        raise KeyboardInterrupt

    def killed_after(*args, **kwargs):
        merge(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pilot, "merge_runs", killed_before)
    with pytest.raises(KeyboardInterrupt):
        run(config, out, progress=False, sources=RECIPE)
    assert re.search(r": training \d+ epochs \(one planned wave of 3 models: a wave of 2 would "
                     r"leave the gpu mostly idle; \d+ s, about \d+% of the run\)",
                     capsys.readouterr().out)
    assert not os.path.exists(out)  # the rest is a part of the pilot's work, not --out
    assert load_run(out + ".pilot/rest").model_indices.tolist() == [3]
    monkeypatch.setattr(pilot, "merge_runs", killed_after)
    with pytest.raises(KeyboardInterrupt):
        run(config, out, resume=True, progress=False, sources=RECIPE)
    assert os.path.exists(out) and os.path.exists(out + ".pilot")
    with pytest.raises(UserError, match="pilot was found .* pass --resume"):
        run(config, out, progress=False, sources=RECIPE)
    with pytest.raises(UserError, match="holds 4 models, not 5; add models with --grow"):
        run(config_for(npz, models_per_wave=0, num_models=5), out, resume=True, progress=False,
            sources=RECIPE)
    monkeypatch.setattr(pilot, "merge_runs", merge)
    piloted = load_run(run(config, out, resume=True, progress=False, sources=RECIPE))
    assert not os.path.exists(out + ".pilot")
    record = piloted.metrics["pilot"]
    assert record["models"] == 3 and record["fits"]
    plain = load_run(run(config_for(npz, epochs=piloted.config["epochs"],
                                    eval_every=piloted.config["eval_every"],
                                     pilot=False, models_per_wave=3),
                         str(tmp_path / "plain"), progress=False))
    np.testing.assert_array_equal(piloted.model_indices, np.arange(4))
    for split in ("train", "test"):
        np.testing.assert_array_equal(piloted.correct_by_epoch(split),
                                      plain.correct_by_epoch(split))
    np.testing.assert_array_equal(piloted.margin_units, plain.margin_units)
    np.testing.assert_array_equal(piloted.memorization_by_epoch, plain.memorization_by_epoch)


def test_a_capped_schedule_that_cannot_fit_is_said_before_the_ensemble(
        conflicting, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pilot, "CAP_EPOCHS", 8)
    out = run(config_for(conflicting, fit_threshold=0.999), str(tmp_path / "run"),
              progress=False, sources=RECIPE)
    printed = capsys.readouterr().out
    warning = printed.index("WARNING: The pilot's tiny_cnn models fit")
    assert "plan:" in printed[warning:]  # the ensemble's plan comes after the warning
    assert "after 8 epochs, the longest schedule it tries" in printed
    assert "try a larger --arch (small_vgg)." in printed  # batch 16: the smallest
    run_ = load_run(out)
    record = run_.metrics["pilot"]
    assert [t["epochs"] for t in record["tried"]] == [4, 8] and not record["fits"]
    assert run_.config["epochs"] == 8 and record["warning"] in run_.metrics["warnings"]
    assert all(t["train_acc"] <= 75 / 105 for t in record["tried"])
    # the fit warning says how many examples of its subset a model leaves unfitted
    unfitted = (1 - run_.metrics["train_acc"]) * 105
    assert f"{unfitted:,.0f} of 105 examples unfitted on average" in run_.metrics["warnings"][0]


def test_an_interrupted_pilot_resumes_without_redoing_a_finished_length(
        npz, tmp_path, monkeypatch):
    monkeypatch.setattr(pilot, "CAP_EPOCHS", 16)
    trained = []

    def interrupted(config, out, **options):  # killed when the second length starts
        if trained:
            raise KeyboardInterrupt
        trained.append(config.epochs)
        return train_and_evaluate(config, out, **options)

    out = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        pilot.run_with_pilot(config_for(npz), RECIPE, out, False, False, False, interrupted)
    assert os.path.exists(os.path.join(out + ".pilot", "epochs-004", "metrics.json"))
    with pytest.raises(UserError, match="--resume"):
        run(config_for(npz), out, progress=False, sources=RECIPE)

    def counted(config, out, **options):
        trained.append(config.epochs)
        return train_and_evaluate(config, out, **options)

    monkeypatch.setattr(pilot, "MIN_PILOT_MODELS", 3)  # as if resumed on more devices
    resumed = load_run(pilot.run_with_pilot(config_for(npz), RECIPE, out, False, True, False,
                                            counted))
    chosen = resumed.config["epochs"]
    assert trained[0] == 4 and 4 not in trained[1:]  # the finished length is not redone
    assert chosen > 4 and trained[-1] == chosen  # the run's other models, at that length
    assert [t["epochs"] for t in resumed.metrics["pilot"]["tried"]][0] == 4
    assert resumed.metrics["pilot"]["models"] == 2  # as many as the finished length holds
    np.testing.assert_array_equal(resumed.model_indices, np.arange(4))


def test_given_epochs_or_no_pilot_skip_it_and_a_grown_run_keeps_its_length(tmp_path):
    _, sources = recipes.resolve({"dataset": "digits"})
    config = Config(dataset="digits")
    assert pilot.wanted(config, sources)
    assert not pilot.wanted(config, recipes.resolve({"dataset": "digits", "epochs": 5})[1])
    assert not pilot.wanted(dataclasses.replace(config, pilot=False), sources)
    assert not pilot.wanted(Config(dataset="cifar10"), recipes.resolve(
        {"dataset": "cifar10", "data_dir": "/nonexistent"})[1])  # the paper's 100 epochs
    with pytest.raises(UserError, match="give --epochs"):
        pilot.run_with_pilot(dataclasses.replace(config, model_range="0:4"), sources,
                             str(tmp_path / "part"), False, False, False, train_and_evaluate)
    assert pilot.lengths(18) == [18, 36, 72, 144, 288, 400]
    grown = tmp_path / "grown"
    grown.mkdir()
    (grown / "config.json").write_text(json.dumps({"epochs": 72, "setting_sources": {
        "epochs": "pilot", "eval_every": "pilot"}}))
    kept = pilot.grown_length(config, sources, str(grown))  # --grow without --epochs
    assert (kept.epochs, kept.eval_every) == (72, 12)
    given = recipes.resolve({"dataset": "digits", "epochs": 5})[1]
    assert pilot.grown_length(config, given, str(grown)) == config


def test_the_pilot_record_projects_its_share_from_measured_times():
    config = Config(dataset="digits", epochs=72, num_models=32, fit_threshold=0.999)
    tried = [{"epochs": 18, "train_acc": 0.986, "seconds": 36.0, "waves": 1, "work_seconds": 30.0},
             {"epochs": 36, "train_acc": 0.995, "seconds": 72.0, "waves": 1, "work_seconds": 60.0},
             {"epochs": 72, "train_acc": 0.9993, "seconds": 144.0, "waves": 2,
              "work_seconds": 120.0}]
    cpu = pilot.PilotModels(2, "2 models", by_wave=False)
    record = pilot.pilot_record(config, cpu, tried)
    # a CPU: the other 30 models repeat the chosen length's work per model (60 s: its 2 waves
    # do not matter) and once what it spent besides (24 s): 1,824 s, 252 / (252 + 1,824) = 12%
    assert record["line"] == ("pilot: 0.986 at 18, 0.995 at 36, 0.999 at 72 epochs: training "
                              "72 epochs (2 models; 252 s, about 12% of the run)")
    assert record["unused_seconds"] == 108.0 and record["fits"] and record["warning"] is None
    # a GPU, the chosen length in one wave: the rest repeats its work per wave (120 s) in
    # waves of the pilot's 200 models: the 50 others of K = 250 are one whole wave, 24 + 120 s
    # (64% of the run), 1,800 others 9 waves (19%)
    tried[-1]["waves"] = 1
    gpu = pilot.PilotModels(200, "one planned wave of 200 models", by_wave=True)
    for models, share in ((250, 64), (2000, 19)):
        line = pilot.pilot_record(dataclasses.replace(config, num_models=models), gpu,
                                  tried)["line"]
        assert line.endswith(f"(one planned wave of 200 models; 252 s, about {share}% of the run)")
    short = pilot.pilot_record(dataclasses.replace(config, batch_size=64), cpu, tried[:2])
    assert short["warning"].endswith("fit 0.995 of their own subsets after 72 epochs, the "
                                     "longest schedule it tries, below the fit target 0.999: "
                                     "memorization may not show; try a larger --arch "
                                     "(small_vgg) or a smaller --batch-size (32).")
