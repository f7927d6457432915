"""Shared fixtures. `fake_run_dir` writes small run directories with planted structure through
the trainer's own writer, without training anything."""

from __future__ import annotations

import functools
import os
import subprocess

import numpy as np
import pytest

# Compiled XLA programs are cached on disk and shared by every test and subprocess of the session:
# many tests build the same small ensembles, and compiling dominates their time on a CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite never downloads a dataset (tests/test_download.py lifts this for a local server).
os.environ["JAXMEM_NO_DOWNLOAD"] = "1"

from jaxmem import margins
from jaxmem.config import Config
from jaxmem.rundir import DataInfo, EnsembleResult, write_run
from jaxmem.rundir.heldout import HeldoutSums

DIGITS_TRAIN, DIGITS_TEST = 1258, 539  # jaxmem.data.load("digits")


@functools.lru_cache(maxsize=4)
def _dataset_labels(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    from jaxmem import data

    loaded = data.load(dataset)
    return loaded.y_train, loaded.y_test


def normal(seed: int, shape):
    """A jax array of float32 standard normal values drawn with numpy: test inputs whose values
    do not matter, without compiling a jax.random program for each shape."""
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def write_fake_run(path: str, *, arch: str = "tiny_cnn", dataset: str = "digits",
                   num_models: int = 16, num_train: int | None = None,
                   num_test: int | None = None, num_classes: int = 10,
                   epochs: tuple[int, ...] = (2, 4, 6), num_params: int = 10_000,
                   seed: int = 0, config_seed: int = 0, threshold: float = 0.25,
                   min_count: int = 5, subset_ratio: float = 0.7, strength: float = 1.0,
                   influence_pairs: int = 3, diverged: tuple[int, ...] = (),
                   canaries: int = 0) -> str:
    """Write a run directory with random masks and correctness (drawn from `seed`; the config
    records `config_seed`, which names the run) that has structure:

    easy examples (60%) are learned by every model; memorized ones (20%) only by models that
    train on them, increasingly with the epoch; transient ones (10%) are first learned only by
    in-models and later by held-out models too (a rise then a decline); hard ones never.
    `strength` scales the in-model advantage (a larger "model" memorizes more). The first
    `influence_pairs` memorized examples (with enough in- and held-out models) make one test
    example each correct exactly when they are in the subset (planted high-influence pairs).
    Models `diverged` get a NaN loss, so the run excludes them. `canaries` (>= 2) examples,
    evenly spread, are recorded as canaries: each is correct exactly when in the subset
    (score 1, above every real example), except that the last is held out by only 2 models
    (a NaN score, low count) and the one before is right half the time either way (the
    largest standard error). Each model's margin on an example has a random size and the sign
    of its correctness. Written by the project's own run writer, exactly as a trained run.
    """
    rng = np.random.default_rng(seed)
    if dataset == "digits" and num_train is None:
        labels, test_labels = _dataset_labels("digits")
        num_train, num_test = DIGITS_TRAIN, DIGITS_TEST
    else:
        num_train = num_train or 200
        num_test = num_test or 80
        labels = rng.integers(0, num_classes, num_train).astype(np.int32)
        test_labels = rng.integers(0, num_classes, num_test).astype(np.int32)
    subset = int(round(subset_ratio * num_train))
    masks = np.zeros((num_models, num_train), bool)
    for k in range(num_models):
        masks[k, rng.permutation(num_train)[:subset]] = True

    kind = rng.choice(4, size=num_train, p=[0.6, 0.2, 0.1, 0.1])  # easy, memorized, transient, hard
    progress = np.asarray(epochs, np.float64) / max(epochs)  # [E] in (0, 1]
    p_in = np.empty((len(epochs), num_train))
    p_out = np.empty((len(epochs), num_train))
    for e, t in enumerate(progress):
        p_in[e] = np.select([kind == 0, kind == 1, kind == 2], [
            min(1.0, 0.3 + t), min(1.0, strength * t), min(1.0, strength * 2 * t)], 0.05)
        p_out[e] = np.select([kind == 0, kind == 1, kind == 2], [
            min(1.0, 0.3 + t), 0.1, max(0.05, 2 * t - 1)], 0.05)
    noise = rng.random((len(epochs), num_models, num_train))
    correct = np.where(masks[None], noise < p_in[:, None], noise < p_out[:, None])  # [E,K,N]

    test_p = rng.uniform(0.2, 0.95, num_test) * progress[:, None]  # [E, N_test]
    correct_test = rng.random((len(epochs), num_models, num_test)) < test_p[:, None]
    in_models = masks.sum(axis=0)
    scored = (in_models >= min_count) & (num_models - in_models >= min_count)
    for i, j in zip(np.flatnonzero((kind == 1) & scored)[:influence_pairs],
                    range(influence_pairs), strict=False):
        correct_test[:, :, j] = masks[None, :, i]
        correct[:, :, i] = masks[None, :, i]

    canary_index = np.linspace(0, num_train - 1, canaries).round().astype(np.int64)
    if canaries:
        masks[:, canary_index[-1]] = np.arange(num_models) >= 2
        correct[:, :, canary_index] = masks[None][:, :, canary_index]
        correct[:, :, canary_index[-2]] = (np.arange(num_models) % 2 == 0)[None]
    correct[:, list(diverged)] = False  # a NaN model predicts class 0 for every input
    correct_test[:, list(diverged)] = False
    train_loss = np.tile(np.linspace(2.0, 0.1, max(epochs))[:, None], (1, num_models))
    train_loss[:, list(diverged)] = np.nan
    # held-out predictions: a held-out model that is correct votes for the label, one that
    # is wrong for the next class, each with all its probability on its vote
    predicted = np.where(correct[-1], labels, (labels + 1) % num_classes)  # [K, N]
    heldout = HeldoutSums.zeros(num_train, num_classes)
    heldout.add(0, predicted, np.eye(num_classes, dtype=np.float32)[predicted],
                ~masks & np.isfinite(train_loss).all(0)[:, None])
    # margins: a size drawn per model and example, the sign of the correctness
    units = margins.quantize(np.abs(rng.normal(2.0, 1.5, correct.shape)), correct)
    result = EnsembleResult(np.arange(num_models), masks, list(epochs), correct, correct_test,
                            train_loss, 1.0 - train_loss / 2.0, devices=["cpu"],
                            heldout=heldout, margins=units[-1], margin_sums=margins.MarginSums.of(
                                units, masks, np.isfinite(train_loss).all(0)))
    settings = Config(arch=arch, dataset=dataset, num_models=num_models, epochs=max(epochs),
                      eval_every=epochs[0], seed=config_seed, threshold=threshold,
                      min_count=min_count, subset_ratio=subset_ratio, drop_diverged=True).to_dict()
    info = DataInfo(dataset, num_classes, (8, 8, 1), np.asarray(labels, np.int32),
                    np.asarray(test_labels, np.int32), np.arange(num_train), {},
                    canary_index, np.asarray(labels, np.int64)[canary_index])
    write_run(path, settings, info, result, 1.0,
              {"num_params": num_params, "versions": {"jaxmem": "fake"}})
    return path


def simulated_margins(num_models: int, seed: int, num_examples: int = 3000):
    """Masks and int16 margins of `num_models` models with known per-example normal margin
    distributions (means and variances drawn across examples, the variances from a scaled
    inverse chi-square), and the true score P[m > 0 | in] - P[m > 0 | out]."""
    from scipy.special import ndtr

    rng = np.random.default_rng(seed)
    sd_in, sd_out = (np.sqrt(8 * 4.0 / rng.chisquare(8, num_examples)) for _ in range(2))
    mean_in, mean_out = rng.normal(3, 2, num_examples), rng.normal(0.5, 2.5, num_examples)
    truth = ndtr(mean_in / sd_in) - ndtr(mean_out / sd_out)
    masks = np.zeros((num_models, num_examples), bool)
    for k in range(num_models):
        masks[k, rng.permutation(num_examples)[:round(0.7 * num_examples)]] = True
    drawn = np.where(masks, rng.normal(mean_in, sd_in, masks.shape),
                     rng.normal(mean_out, sd_out, masks.shape))
    return masks, margins.quantize(drawn, drawn > 0), truth


@pytest.fixture
def wave_sizes(monkeypatch) -> list[int]:
    """The number of models of every wave the trainer trains, in order (appended as each
    wave starts)."""
    from jaxmem.train import loop

    sizes, original = [], loop.Trainer.train_wave

    def recorded(self, indices, *args, **kwargs):
        sizes.append(len(indices))
        return original(self, indices, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_wave", recorded)
    return sizes


@pytest.fixture
def fake_run_dir(tmp_path):
    """Factory: fake_run_dir(name="run", **write_fake_run options) -> path of a new run dir
    under tmp_path (digits-sized by default, so galleries and notebooks find the images)."""
    def make(name: str = "run", **options) -> str:
        return write_fake_run(str(tmp_path / name), **options)
    return make


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own 8 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                  str(folder)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small filesystem with")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield str(folder)
    subprocess.run(["umount", "-l", str(folder)], check=True, timeout=60)


def fill(folder: str, leave: int) -> str:
    """Fill the filesystem of `folder` until `leave` bytes are free; returns the filler file."""
    filler, free = os.path.join(folder, "filler"), os.statvfs(folder)
    with open(filler, "wb") as f:
        f.write(bytes(max(free.f_bavail * free.f_frsize - leave, 0)))
    return filler


def temporaries(folder: str) -> list[str]:
    """Files and folders a write left behind: temporary files, staging folders."""
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder)
            for name in dirs + files if ".tmp-" in name or name.startswith(".")]
