"""No wave holds an array larger than its backend's kernels can index (2^31 elements on GPU):
the largest array of one model's programs, how it grows with the models of a wave under each
mapping of the model axis, and the memory plan that caps the wave by it."""

import jax
import numpy as np
import pytest

from jaxmem.config import Config
from jaxmem.data.dataset import Dataset
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.masks import run_masks
from jaxmem.train import array_sizes, loop, waves
from jaxmem.train.array_sizes import PerModel, largest_array, most_models_per_device

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples of 8x8x1
CONFIG = dict(arch="tiny_cnn", num_models=5, epochs=1, batch_size=64, eval_every=1, seed=3,
              conv_impl="xla", ensemble="vmap")


def cifar_shaped(count: int) -> Dataset:
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), np.uint8)  # noqa: E731
    labels = lambda n: rng.integers(0, 10, n).astype(np.int32)  # noqa: E731
    return Dataset("random", images(count), labels(count), images(16), labels(16), 10,
                   (0.5,) * 3, (0.25,) * 3, True, 4)


def test_the_largest_array_is_the_first_convolutions_output_and_its_gradient():
    """small_vgg on 32x32 images: its widest activation is the first conv's, B x 32 x 32 x 64
    (its gradient and BatchNorm's are the same size); the evaluation's is the same at its
    own batch; the largest stacked row is the 512-wide conv's kernel (3 x 3 x 64 x 512)."""
    config = Config(arch="small_vgg", batch_size=8, eval_batch_size=16, conv_impl="xla",
                    ensemble="vmap", epochs=1)
    trainer = loop.Trainer(config, cifar_shaped(40))
    sizes = array_sizes.per_model(trainer.ensemble, trainer.x_train, trainer.y_train,
                                  trainer.steps, trainer.eval_batch_size, trainer.schedule)
    assert sizes == PerModel(train=8 * 32 * 32 * 64, forward=16 * 32 * 32 * 64,
                             row=3 * 3 * 64 * 512)


def test_what_grows_with_the_wave_depends_on_how_the_models_are_mapped():
    sizes = PerModel(train=1000, forward=3000, row=10)
    # vmap: every array of every model at once
    assert largest_array(sizes, 7, "vmap", "vmap") == 21_000
    assert most_models_per_device(sizes, "vmap", "vmap", 21_000) == 7
    assert most_models_per_device(sizes, "vmap", "vmap", 20_999) == 6
    # the forward passes on their own mapping: one model at a time
    assert most_models_per_device(sizes, "vmap", "map", 21_000) == 21
    # lax.map: one model's arrays at a time; only the stacked rows grow
    assert largest_array(sizes, 500, "map", "map") == 5000
    assert most_models_per_device(sizes, "map", "unroll", 21_000) == 2100
    # chunks of 4 models: 4 models' arrays at most, then the rows
    assert largest_array(sizes, 3, "vmap:4", "map") == 3000
    assert largest_array(sizes, 600, "vmap:4", "map") == 6000
    assert most_models_per_device(sizes, "vmap:4", "map", 21_000) == 2100
    with pytest.raises(UserError, match=r"array of 3,000 elements, above the 2,999 .* "
                                        r"--batch-size or --eval-batch-size"):
        most_models_per_device(sizes, "map", "map", 2999)


def element_limit(monkeypatch, per_device: int) -> PerModel:
    """Make the CPU's element limit hold exactly `per_device` models of CONFIG under vmap."""
    trainer = loop.Trainer(Config(**CONFIG), DATASET)
    sizes = array_sizes.per_model(trainer.ensemble, trainer.x_train, trainer.y_train,
                                  trainer.steps, trainer.eval_batch_size, trainer.schedule)
    largest = max(sizes.train, sizes.forward)
    monkeypatch.setitem(array_sizes.ELEMENT_LIMIT, "cpu", per_device * largest + largest - 1)
    return sizes


def test_the_memory_plan_caps_the_wave_and_refuses_a_given_wave_above_it(monkeypatch):
    """Memory for 50 models, the element limit for 3: waves of 3, also when replanned from a
    measured peak; a --models-per-wave above the cap is refused before any work."""
    element_limit(monkeypatch, 3)
    monkeypatch.setattr(waves, "compiled_bytes", lambda trainer, count: 10 * count)
    monkeypatch.setattr(waves.host_memory, "host_budget",
                        lambda limit: waves.host_memory.Budget(1 << 30, "test"))
    plan = waves.plan_memory(loop.Trainer(Config(**CONFIG), DATASET), 50)
    assert (plan.wave_size, plan.per_device_cap) == (3, 3)
    assert plan.wave_size_after(plan.baseline + 30, 3, remaining=40) == 3
    assert plan.record([], [])["models_per_device_cap"] == 3
    given = loop.Trainer(Config(**CONFIG, models_per_wave=4), DATASET)
    with pytest.raises(UserError, match=r"--models-per-wave=4 puts 4 models on a device.* "
                                        r"give at most 3 \(or 0"):
        waves.plan_memory(given, 50)
    given = loop.Trainer(Config(**CONFIG, models_per_wave=3), DATASET)
    assert waves.plan_memory(given, 50).wave_size == 3


def test_a_run_trains_in_waves_of_the_capped_size(monkeypatch, capsys, wave_sizes):
    """A device with room for every model (as an H200 has for small_vgg) and an element limit
    of 2 models: the run trains 5 models in waves of 2, 2 and 1, says why and records it."""
    element_limit(monkeypatch, 2)
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda self: {
        "bytes_limit": 1 << 40, "bytes_in_use": 0, "peak_bytes_in_use": 0})
    config = Config(**CONFIG)
    result = loop.train_ensemble(config, DATASET, run_masks(config, DATASET.num_train),
                                 progress=False)
    assert wave_sizes == [2, 2, 1]
    assert result.memory_plan["models_per_device_cap"] == 2
    assert ("waves of up to 2 models, 2 per device so that no array exceeds what its kernels "
            "can index" in capsys.readouterr().out)
    assert result.correct_train.shape == (1, 5, DATASET.num_train)
