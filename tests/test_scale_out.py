"""Fault tolerance and scale-out: kill and resume, refusal on changed inputs, merging parts,
divergence, adaptive ensemble size, two processes on the loopback address."""

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxmem import cli, estimator, load_run, margins
from jaxmem.config import Config
from jaxmem.data import load
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.rundir.merge import busy_seconds, merge_runs
from jaxmem.train import runner, waves
from jaxmem.train.checkpoint import WorkDir
from jaxmem.train.loop import DivergedError
from jaxmem.train.preemption import EXIT_PREEMPTED, SIGNAL_AT_STEP, Preempted
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


BASE = {"arch": "tiny_cnn", "num_models": 4, "models_per_wave": 2, "epochs": 4, "eval_every": 2,
        "batch_size": 64, "lr": 0.4, "translate": 0, "seed": 7, "min_count": 2}


def config_for(npz, **changes):
    return Config(**{**BASE, "dataset": npz, **changes})


def flags_for(npz, **changes) -> list[str]:
    """The command line of config_for(npz, **changes)."""
    return [f"--{name.replace('_', '-')}={value}"
            for name, value in {**BASE, "dataset": npz, **changes}.items()]


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
        # held-out predictions: the sums are exact in any order (jaxmem/rundir/heldout.py);
        # a model evaluated in a wave of another size differs by float32 rounding only
        np.testing.assert_array_equal(a.extra["heldout_votes"], b.extra["heldout_votes"])
        np.testing.assert_allclose(a.extra["heldout_prob_sum"], b.extra["heldout_prob_sum"],
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.heldout_probs, b.heldout_probs, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(a.suggested_label, b.suggested_label)
        np.testing.assert_array_equal(a.suggested_label_share, b.suggested_label_share)
        assert_same_margins(a, b)
    else:
        assert (a.correct_by_epoch("train") != b.correct_by_epoch("train")).mean() < 0.01
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)


def assert_same_margins(a, b, units: int = 1):
    """The runs' margins agree to `units` fixed-point units (models evaluated in waves of
    another size differ by float32 rounding; 0 for the same layout), and each run's stored
    sums are exactly the sums of its own margins."""
    np.testing.assert_allclose(a.margin_units, b.margin_units, rtol=0, atol=units)
    for r in (a, b):
        np.testing.assert_array_equal(
            r.extra["margin_sums"][-1],
            margins.MarginSums.of(r.margin_units[None], r.masks, np.ones(len(r.masks), bool))
            .sums[0])


def rewrite(npz, path, **changes):
    with np.load(npz) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays.update({k: v(arrays) for k, v in changes.items()})
    np.savez(path, **arrays)


def test_killed_run_refuses_changed_inputs_then_resumes_to_the_same_scores(
        npz, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    work = work_dir_of(out)
    args = [sys.executable, RUN_PY, *flags_for(npz, checkpoint_seconds=0), f"--out={out}",
            "--no-progress"]
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    # SIGKILL as soon as the second wave (models 2, 3) has committed its checkpoint after
    # epoch 1 (2 steps): one wave done, one midway.
    while not os.path.isfile(os.path.join(work, "checkpoint-models-2-4", "2.npz")):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not os.path.exists(out) and os.path.exists(os.path.join(work, "models-0-2.npz"))

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
    assert_same_margins(merged, uninterrupted, units=0)  # the same waves: bit for bit
    np.testing.assert_array_equal(merged.extra["margin_sums"],
                                  uninterrupted.extra["margin_sums"])
    np.testing.assert_array_equal(merged.memorization_margin_by_epoch,
                                  uninterrupted.memorization_margin_by_epoch)
    assert merged.metrics["reliability"] == uninterrupted.metrics["reliability"]
    assert merged.config["model_range"] is None and merged.metrics["num_models"] == 4
    timed = [sum(load_run(p).metrics[f"{part}_seconds"] for p in parts)
             for part in ("compile", "train", "eval", "checkpoint")]
    assert merged.metrics["eval_share"] == pytest.approx(timed[2] / sum(timed))
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
    small = load_run(out)
    before = small.metrics
    grown = load_run(run(config_for(npz, null_permutations=7, fdr=0.1, fit_threshold=0.5), out,
                         grow=True, progress=False))
    # the scores of the grown run's first two models are those of the run of them alone, and
    # of all its models its own scores (both estimators)
    for chosen, alone in (([0, 1], small), (None, grown)):
        scores = grown.scores(chosen)
        for name in ("memorization", "memorization_se", "memorization_margin",
                     "memorization_margin_se", "in_count", "low_count"):
            np.testing.assert_array_equal(scores[name], getattr(alone, name))
    with pytest.raises(UserError, match="included models"):
        grown.scores([0, 0])
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


def test_two_processes_whose_steps_differ_stop_together_and_resume(
        npz, uninterrupted, tmp_path, monkeypatch):
    """Process 1 resumes its part 2 steps before its end while process 0 trains its own from
    the start (8 steps), and SIGTERM reaches process 0 after its first step. Counted in steps,
    the stop they would agree on lies past process 1's last step (and a process that finished
    would leave before the agreement); on their shared clock both stop with exit status 75,
    each part checkpointed or finished, and resumed, the merged run equals a single
    process's."""
    out = str(tmp_path / "two")
    flags = flags_for(npz, models_per_wave=0)
    # what an earlier job of process 1 left: its part checkpointed after 6 of its 8 steps
    stop_at(monkeypatch, 6, config_for(npz, models_per_wave=0, model_range="2:4"),
            runner.part_of(out, 1))
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def both(hook="0"):
        port = free_port()
        procs = [subprocess.Popen(
            [sys.executable, RUN_PY, *flags, f"--out={out}", "--no-progress", "--resume",
             "--distributed", f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2",
             f"--process-id={p}"], env=dict(env, **{SIGNAL_AT_STEP: hook if p == 0 else "0"}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(2)]
        outputs = [p.communicate(timeout=600) for p in procs]
        return [p.returncode for p in procs], [o[1] for o in outputs]

    codes, errors = both(hook="1")
    assert codes == [EXIT_PREEMPTED] * 2, [e[-2000:] for e in errors]
    for p, first in enumerate((0, 2)):
        part = re.escape(runner.part_of(out, p))
        assert re.fullmatch(
            rf"stopped: SIGTERM received: models {first}\.\.{first + 1} (checkpointed (at "
            rf"epoch \d, step 1 of 2|after epoch \d) in {part}\.partial|are finished in "
            rf"{part}, the other parts are checkpointed or finished in their own folders); "
            r"rerun .*",
            errors[p].strip().splitlines()[-1]), errors[p][-2000:]
    # it had 7 steps to go, and the stop was agreed before it trained on
    assert "checkpointed at epoch 1, step 1 of 2" in errors[0].strip().splitlines()[-1]
    codes, errors = both()
    assert codes == [0, 0], [e[-2000:] for e in errors]
    assert_same_run(load_run(out), uninterrupted)


# Interrupted runs below: 6 models in waves of 3, 2 epochs of 2 steps, evaluated after each.
# Steps are counted per process from 1: wave 0 (models 0..2) is steps 1..4, wave 1 3..5: 5..8.
LAYOUT = {"num_models": 6, "models_per_wave": 3, "epochs": 2, "eval_every": 1,
          "checkpoint_seconds": 0}
STEPS = 2  # per epoch: ceil(round(0.7 * 150) / 64)


@pytest.fixture(scope="module")
def six(npz, tmp_path_factory):
    return load_run(run(config_for(npz, **LAYOUT), str(tmp_path_factory.mktemp("six") / "run"),
                        progress=False))


def contents(work: str) -> tuple[list[str], dict[str, int]]:
    """(finished wave files, {checkpoint directory: its newest position in steps})."""
    with WorkDir(work, {"fingerprints": {}}, resume=True) as opened:
        checkpoints = {os.path.basename(os.path.dirname(c.path)): c.position
                       for c in opened.checkpoints()}
    return sorted(f for f in os.listdir(work) if f.endswith(".npz")), checkpoints


def test_saving_a_finished_wave_reads_no_finished_file(tmp_path):
    """Which models are finished is in the files' names: saving a wave opens none of them
    (each wave re-read every earlier one, quadratic in the waves), and deletes the checkpoints
    whose models are all finished, as those names say."""
    with WorkDir(str(tmp_path / "work"), {"fingerprints": {}}, resume=False) as work:
        with open(os.path.join(work.path, "models-0-2.npz"), "wb") as f:
            f.write(b"unreadable: a wave that must not be opened")
        for held in ("0-4", "2-6"):
            os.makedirs(os.path.join(work.path, f"checkpoint-models-{held}"))
        work.save_finished({"model_indices": np.arange(2, 4), "train_loss": np.zeros((1, 2))})
    assert contents(work.path) == (["models-0-2.npz", "models-2-4.npz"], {})
    assert sorted(f for f in os.listdir(work.path) if f.startswith("checkpoint")) == [
        "checkpoint-models-2-6"]


def stop_at(monkeypatch, step, config: Config, out: str, **options) -> str:
    """Run in this process; SIGTERM arrives at `step` ("STEP:SIGNAME": that signal);
    returns the stop message."""
    monkeypatch.setenv(SIGNAL_AT_STEP, str(step))
    with pytest.raises(Preempted) as stopped:
        run(config, out, progress=False, **options)
    monkeypatch.delenv(SIGNAL_AT_STEP)
    # the default handlers are back
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    return str(stopped.value)


def resume_in_layouts(npz, six, out: str, sizes: tuple[int, ...]) -> None:
    """Resume copies of out's work directory with each wave size: each equals `six`."""
    targets = [out] + [f"{out}-{size}" for size in sizes[1:]]
    for target in targets[1:]:
        shutil.copytree(work_dir_of(out), work_dir_of(target))
    for target, size in zip(targets, sizes, strict=True):
        resumed = load_run(run(config_for(npz, **{**LAYOUT, "models_per_wave": size}), target,
                               resume=True, progress=False))
        assert_same_run(resumed, six)
        assert not os.path.exists(work_dir_of(target))


def test_waves_replanned_from_their_measured_peak_change_no_result(npz, six, tmp_path,
                                                                   monkeypatch, capsys):
    """The memory plan changes the wave size after every wave (here 3, then 1, then 2): the
    run equals the one trained in two waves of 3, and the log says why the size changed."""
    sizes = iter([1, 2])
    monkeypatch.setattr(waves.MemoryPlan, "wave_size_after",
                        lambda self, peak, padded, remaining, held=0: min(next(sizes),
                                                                          remaining))
    out = run(config_for(npz, **LAYOUT), str(tmp_path / "run"), progress=True)
    assert_same_run(load_run(out), six)
    log = "".join(capsys.readouterr())
    assert "-> waves of up to 1 models" in log and "-> waves of up to 2 models" in log
    plan = load_run(out).metrics["memory_plan"]
    assert plan["models_per_wave"] == 3 and plan["budget_bytes"] > 0


def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_in_any_layout(npz, six, tmp_path,
                                                                          monkeypatch):
    """A real SIGTERM in a child run at step 5: exit 75 with one line, wave 1 checkpointed at
    its first epoch's step 1, nothing else trained; resumed with waves of 2 (the checkpoint is
    continued in chunks: models 3, 4 then 5) and of 6, each equals the uninterrupted run."""
    out = str(tmp_path / "run")
    child = subprocess.run([sys.executable, RUN_PY, *flags_for(npz, **LAYOUT), f"--out={out}"],
                           env=dict(os.environ, **{SIGNAL_AT_STEP: "5"}), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    output = child.stdout
    assert child.returncode == EXIT_PREEMPTED, output[-2000:]
    assert output.strip().splitlines()[-1] == (
        f"stopped: SIGTERM received: models 3..5 checkpointed at epoch 1, step 1 of {STEPS} in "
        f"{work_dir_of(out)}; rerun the same command with --resume to continue (exit status "
        "75)")
    # the plan has a line of its own, before the progress bar draws anything, with the
    # training and evaluation time it projects
    plan = output.index("plan: 6 models in 2 wave(s)")
    assert re.match(r"plan: [^\n]* -> about \d+ s of training and \d+ s of evaluation "
                    r"\(\d+% of them\)\n", output[plan:])
    assert plan == 0 or output[plan - 1] == "\n"
    assert "%|" not in output[:plan] and "%|" in output[plan:]
    assert contents(work_dir_of(out)) == (["models-0-3.npz"], {"checkpoint-models-3-6": 1})

    # stopped again while continuing it in chunks of 2: models 3, 4 then hold a newer
    # checkpoint of their own, which a resume with waves of 6 continues (model 5: the old one)
    chunked = str(tmp_path / "chunked")
    shutil.copytree(work_dir_of(out), work_dir_of(chunked))
    message = stop_at(monkeypatch, 2, config_for(npz, **{**LAYOUT, "models_per_wave": 2}),
                      chunked, resume=True)
    assert f"models 3..4 checkpointed at epoch 2, step 1 of {STEPS}" in message
    assert contents(work_dir_of(chunked)) == (
        ["models-0-3.npz"], {"checkpoint-models-3-5": STEPS + 1, "checkpoint-models-3-6": 1})
    resume_in_layouts(npz, six, chunked, (6,))
    resume_in_layouts(npz, six, out, (2, 6))


# The command line with SIGTERM sent at argv[1]: "load" (the dataset is loaded, no model has
# trained) or "write" (the run directory is being written).
SIGNAL_OUTSIDE_TRAINING = """
import signal, sys
from jaxmem import cli
from jaxmem.train import runner
name = {"load": "run_masks", "write": "write_run"}[sys.argv[1]]
original = getattr(runner, name)
def signalled(*args, **kwargs):
    signal.raise_signal(signal.SIGTERM)
    return original(*args, **kwargs)
setattr(runner, name, signalled)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["load", "write"])
def test_a_stop_signal_outside_training_loses_nothing(npz, six, tmp_path, where):
    """SIGTERM before any model trains: exit 75 with nothing trained, and --resume gives the
    uninterrupted run. SIGTERM while the run directory is written: it is written to the end,
    exit 0, equal to the uninterrupted run. (Either signal used to kill the process.)"""
    out = str(tmp_path / "run")
    child = subprocess.run([sys.executable, "-c", SIGNAL_OUTSIDE_TRAINING, where,
                            *flags_for(npz, **LAYOUT), f"--out={out}", "--no-progress"],
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=600)
    output = child.stdout
    assert "SIGTERM received: stopping at the next training step" in output, output[-2000:]
    if where == "load":
        assert child.returncode == EXIT_PREEMPTED, output[-2000:]
        assert output.strip().splitlines()[-1].startswith("stopped: SIGTERM received: ")
        assert contents(work_dir_of(out)) == ([], {})
        resume_in_layouts(npz, six, out, (3,))
    else:
        assert child.returncode == 0, output[-2000:]
        assert output.strip().splitlines()[-1] == (
            "SIGTERM arrived while no model was training; the run directory was completed")
        assert_same_run(load_run(out), six)
        assert not os.path.exists(work_dir_of(out))


def test_every_checkpoint_kind_resumes_with_other_wave_sizes(npz, six, tmp_path, monkeypatch):
    config = config_for(npz, **LAYOUT)
    # SIGTERM at the last step of epoch 1: the epoch ends and is evaluated, then checkpointed
    out = str(tmp_path / "boundary")
    assert "models 0..2 checkpointed after epoch 1" in stop_at(monkeypatch, STEPS, config, out)
    assert contents(work_dir_of(out)) == ([], {"checkpoint-models-0-3": STEPS})
    with pytest.raises(UserError, match="settings fingerprint differs"):
        run(dataclasses.replace(config, lr=0.2), out, resume=True, progress=False)
    resume_in_layouts(npz, six, out, (3,))

    # SIGUSR1 at the last step of wave 0: it finishes, then the run stops between waves;
    # resumed with waves of 2 and of 6, only models 3..5 train
    out = str(tmp_path / "between")
    message = stop_at(monkeypatch, f"{2 * STEPS}:SIGUSR1", config, out)
    assert message.startswith("SIGUSR1 received: finished models are saved")
    assert contents(work_dir_of(out)) == (["models-0-3.npz"], {})
    with pytest.raises(UserError, match="masks fingerprint differs"):
        run(dataclasses.replace(config, subset_ratio=0.6), out, resume=True, progress=False)
    resume_in_layouts(npz, six, out, (2, 6))


def stopped_state(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_second_run_on_one_output_is_refused_until_the_first_dies(npz, six, tmp_path):
    """The first run holds its work directory's lock: a second is refused in one line (exit
    2); SIGKILLed, it leaves a lock that does not block --resume, which continues its last
    checkpoint."""
    out = str(tmp_path / "run")
    work = work_dir_of(out)
    args = [sys.executable, RUN_PY, *flags_for(npz, **LAYOUT), f"--out={out}", "--no-progress"]
    # the child stops itself (SIGSTOP) at step 7: alive, holding its lock, wave 1 checkpointed
    # after its first epoch
    child = subprocess.Popen(args, env=dict(os.environ, **{SIGNAL_AT_STEP: "7:SIGSTOP"}),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not stopped_state(child.pid):
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: another run is writing {work} (it holds its "
                                     "lock); wait for it to finish or stop it first")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.exists(os.path.join(work, "lock"))
    assert contents(work) == (["models-0-3.npz"], {"checkpoint-models-3-6": STEPS})
    assert_same_run(load_run(run(config_for(npz, **LAYOUT), out, resume=True, progress=False)),
                    six)


@pytest.mark.parametrize("then", ["resume", "overwrite"])
def test_an_interrupted_grow_is_kept_until_resumed_or_overwritten(npz, six, tmp_path,
                                                                  monkeypatch, then):
    out = str(tmp_path / "grown")
    config = config_for(npz, **LAYOUT)
    run(dataclasses.replace(config, num_models=3), out, progress=False)
    message = stop_at(monkeypatch, STEPS + 1, config, out, grow=True)
    grow_work = work_dir_of(out + ".grow")
    assert f"checkpointed at epoch 2, step 1 of {STEPS} in {grow_work};" in message
    with pytest.raises(UserError, match=f"interrupted run was found in {grow_work}; pass "
                                        "--resume to continue it, or --overwrite"):
        run(config, out, grow=True, progress=False)
    assert contents(grow_work) == ([], {"checkpoint-models-3-6": STEPS + 1})
    if then == "overwrite":  # --overwrite with --grow discards the grow's work (here made
        # unreadable), never the run it grows
        with open(os.path.join(grow_work, "checkpoint-models-3-6", f"{STEPS + 1}.npz"),
                  "wb") as f:
            f.write(b"not a checkpoint")
    grown = run(config, out, grow=True, progress=False, **{then: True})
    assert_same_run(load_run(grown), six)


@pytest.mark.parametrize("grow", [False, True])
def test_ctrl_c_names_the_work_directory_it_keeps(npz, tmp_path, monkeypatch, capsys, grow):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    out = str(tmp_path / "run")
    assert cli.main([*flags_for(npz), f"--out={out}", *(["--grow"] if grow else [])]) == 130
    kept = f"{out}.grow.partial" if grow else f"{out}.partial"
    assert capsys.readouterr().err == ("interrupted; no run directory was written; its "
                                       f"checkpoints are kept in {kept}: rerun with --resume\n")
