"""Property 2 (docs/design.md): model k's result does not depend on how the ensemble was laid out.

One wave, waves of one model, every mapping of the model axis (vmap, chunked vmap, lax.map,
unrolled), and 4 (simulated) devices with padded waves all give the same masks, losses and
correctness.
"""

import collections
import dataclasses
import functools
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.masks import run_masks
from jaxmem.train import lowering, waves
from jaxmem.train.ensemble import map_models
from jaxmem.train.loop import train_ensemble
from jaxmem.train.waves import WavePlan, padded_size

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples
CONFIG = dict(arch="tiny_cnn", num_models=3, epochs=2, batch_size=64, eval_every=1, seed=3,
              translate=1)


def assert_same_results(a, b):
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.model_indices, b.model_indices)
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-4, atol=1e-5)
    # correctness is an argmax: allow a rare flip of a near tie from float reordering
    for name in ("correct_train", "correct_test"):  # bit-packed: unpacked to compare
        assert (np.asarray(getattr(a, name)) != np.asarray(getattr(b, name))).mean() < 0.01


def train(config, dataset=DATASET, **options):
    masks = run_masks(config, dataset.num_train)
    return train_ensemble(config, dataset, masks, progress=False, **options)


@pytest.fixture(scope="module")
def one_wave():
    return train(Config(**CONFIG))


def test_waves_of_one_model_equal_one_wave(one_wave):
    waves = train(Config(**CONFIG, models_per_wave=1))
    assert_same_results(one_wave, waves)
    assert one_wave.correct_train.shape == (2, 3, DATASET.num_train)


# "map": a loop over the 3 models; "vmap:3": the 3 models vmapped inside a loop (of one chunk).
# Several chunks, a remainder and "unroll" are checked on a cheaper function below (compiles
# dominate).
@pytest.mark.parametrize("strategy", ["map", "vmap:3"])
def test_every_mapping_equals_vmap(one_wave, strategy):
    mapped = train(Config(**CONFIG, ensemble=strategy))
    assert_same_results(one_wave, mapped)


# Over 3 models, "vmap:1": a loop of 3 chunks; "vmap:2": a loop over one chunk of 2, then a
# vmapped remainder of 1; "vmap:4": more than the models (plain vmap).
@pytest.mark.parametrize("strategy", ["unroll", "map", "vmap:1", "vmap:2", "vmap:4"])
def test_every_mapping_passes_mapped_and_shared_arguments_like_vmap(strategy):
    def fn(x, shared, pair):
        return {"sum": x * shared + pair[0], "outer": jnp.outer(x, pair[1])}

    rng = np.random.default_rng(0)
    x, shared, a, b = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                       for shape in ((3, 4), (4,), (3, 4), (3, 2)))
    in_axes = (0, None, 0)
    want = jax.vmap(fn, in_axes=in_axes)(x, shared, (a, b))
    got = jax.jit(map_models(fn, strategy, in_axes))(x, shared, (a, b))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)


@pytest.mark.parametrize("name", ["vmap:0", "vmap:", "vmap:x", "chunk8", "vmap:-2", "scan"])
def test_unknown_strategy_is_a_one_line_user_error(name):
    with pytest.raises(UserError, match=r"unknown --ensemble .*vmap:C") as error:
        lowering.resolve("xla", name, "cpu")
    assert "\n" not in str(error.value)
    assert lowering.resolve("xla", "vmap:8", "cpu") == ("xla", "vmap:8")


def test_an_architecture_measured_apart_gets_its_own_row_else_its_backends(monkeypatch):
    monkeypatch.setitem(lowering.BEST, ("cpu", "tiny_cnn"), ("xla", "map"))
    monkeypatch.setitem(lowering.EVAL_BEST, ("cpu", "tiny_cnn"), ("im2col", "vmap", 64))
    assert lowering.resolve("auto", "auto", "cpu", "tiny_cnn") == ("xla", "map")
    assert lowering.resolve("im2col", "auto", "cpu", "tiny_cnn") == ("im2col", "map")
    assert lowering.resolve("auto", "auto", "cpu", "small_vgg") == lowering.BEST["cpu"]
    assert lowering.resolve("auto", "auto", "rocm", "tiny_cnn") == lowering.BEST["gpu"]
    assert lowering.resolve_eval("auto", "auto", 0, "cpu", "tiny_cnn") == ("im2col", "vmap", 64)
    assert lowering.resolve_eval("auto", "map", 8, "cpu", "tiny_cnn") == ("im2col", "map", 8)


def test_forward_passes_take_explicit_choices_else_their_own_measured_best(monkeypatch):
    monkeypatch.setitem(lowering.EVAL_BEST, "cpu", ("xla", "map", 96))
    assert lowering.resolve_eval("auto", "auto", 0, "cpu") == ("xla", "map", 96)
    assert lowering.resolve_eval("im2col", "vmap:2", 512, "cpu") == ("im2col", "vmap:2", 512)
    assert lowering.resolve_eval("auto", "unroll", 0, "cpu") == ("xla", "unroll", 96)
    with pytest.raises(UserError, match="--eval-batch-size must be >= 0"):
        Config(eval_batch_size=-1)


def test_forward_passes_on_their_own_lowering_equal_the_training_lowering():
    from jaxmem import keys
    from jaxmem.train.ensemble import Ensemble, make_mesh
    from jaxmem.train.loop import build_spec
    from jaxmem.train.orders import model_orders

    config, indices = Config(**CONFIG), np.arange(3)
    masks = run_masks(config, DATASET.num_train)
    spec = build_spec(config, DATASET, "im2col")
    same = Ensemble(spec, DATASET.image_shape, 64, make_mesh(), "vmap")
    own = Ensemble(spec, DATASET.image_shape, 64, make_mesh(), "vmap",
                   build_spec(config, DATASET, "xla"), "map")
    states = same.init(jax.random.key_data(keys.model_keys(3, keys.INIT, indices)))
    orders = model_orders(3, indices, masks, 0, 2, 64)
    x, y = jnp.asarray(DATASET.x_train), jnp.asarray(DATASET.y_train)
    recalibrated = [e.recalibrate(states, orders, x, y) for e in (same, own)]
    for a, b in zip(*(jax.tree.leaves(r.batch_stats) for r in recalibrated), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    correct = [e.predict_on(r, x, y, 64)[0] for e, r in zip((same, own), recalibrated,
                                                              strict=True)]
    assert correct[0].shape == (3, DATASET.num_train)
    assert (correct[0] != correct[1]).mean() < 0.01
    # ... and they did run on their own lowering: lax convs in a loop over the models
    ids = jnp.arange(64, dtype=jnp.int32)
    texts = [e.evaluate.lower(states, x, y, ids).as_text() for e in (same, own)]
    assert "convolution" not in texts[0] and "while" not in texts[0]
    assert "convolution" in texts[1] and "while" in texts[1]


def test_only_the_last_evaluation_computes_classes_and_probabilities():
    """Every evaluation records correctness and margins; only the last one's training split
    also the classes and probabilities of the held-out predictions, from its own program
    (`evaluate`). The other program (`evaluate_margins`) gives the same correctness and margins,
    bit for bit."""
    from jaxmem import keys
    from jaxmem.train.loop import Trainer
    from jaxmem.train.orders import model_orders
    from jaxmem.train.preemption import StopSignals
    from jaxmem.train.progress import Progress

    config = Config(**CONFIG)  # 2 epochs, both evaluated
    trainer = Trainer(config, DATASET)
    ensemble, calls = trainer.ensemble, collections.Counter()
    programs = {name: getattr(ensemble, name) for name in ("evaluate", "evaluate_margins")}
    for name, program in programs.items():
        setattr(ensemble, name, lambda *args, name=name, program=program: (
            calls.update([name]), program(*args))[1])
    masks = run_masks(config, DATASET.num_train)
    with StopSignals(active=False) as stop:
        trainer.train_wave(np.arange(3), masks, Progress(False), stop)
    train_chunks, test_chunks = (math.ceil(n / trainer.eval_batch_size)
                                 for n in (DATASET.num_train, DATASET.num_test))
    assert calls == {"evaluate": train_chunks,
                     "evaluate_margins": train_chunks + 2 * test_chunks}
    states = ensemble.init(jax.random.key_data(keys.model_keys(3, keys.INIT, np.arange(3))))
    states = ensemble.recalibrate(states, model_orders(3, np.arange(3), masks, 0, 2, 64),
                                  trainer.x_train, trainer.y_train)
    ids = jnp.arange(trainer.eval_batch_size, dtype=jnp.int32)
    correct, _, probs, units = programs["evaluate"](states, trainer.x_train, trainer.y_train, ids)
    lean = programs["evaluate_margins"](states, trainer.x_train, trainer.y_train, ids)
    assert len(lean) == 2 and probs.shape == (*correct.shape, DATASET.num_classes)
    np.testing.assert_array_equal(lean[0], correct)
    np.testing.assert_array_equal(lean[1], units)


def test_waves_pad_to_the_device_count_and_keep_their_planned_size():
    assert [padded_size(n, 4) for n in (4, 2, 1)] == [4, 4, 4]
    assert padded_size(5, 2) == 6 and padded_size(3, 1) == 3
    plan = WavePlan()
    plan.memory = waves.MemoryPlan(wave_size=4, budget=waves.host_memory.Budget(1000, "test"),
                                   devices=1, shared=True, baseline=None,
                                   planned_bytes_per_model=None)
    plan.size = 4
    assert [plan(None, n) for n in (10, 6, 2)] == [4, 4, 2]
    assert plan.finished(None, 4, remaining=6) is None  # nothing measured: the plan stands
    assert plan(None, 6) == 4 and plan.record()["measured_peak_bytes_per_model"] is None


FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jaxmem.config import Config
    from jaxmem.data.synthetic import make
    from jaxmem.masks import run_masks
    from jaxmem.train.loop import train_ensemble, build_spec
    from jaxmem.train.optim import schedule_for
    from jaxmem.train.ensemble import Ensemble, make_mesh
    from jaxmem import keys
    assert len(jax.devices()) == 4
    dataset = make(seed=2, sizes=(1, 2, 4, 8))
    config = dict(arch="tiny_cnn", num_models=4, epochs=1, batch_size=64, eval_every=1,
                  seed=3, translate=1)
    masks = run_masks(Config(**config), dataset.num_train)
    four = train_ensemble(Config(**config), dataset, masks, progress=False)
    padded_waves = train_ensemble(Config(**config, models_per_wave=2), dataset, masks,
                                  progress=False)
    np.testing.assert_array_equal(four.masks, padded_waves.masks)
    np.testing.assert_allclose(four.train_loss, padded_waves.train_loss, rtol=1e-4, atol=1e-5)
    assert (np.asarray(four.correct_train) != np.asarray(padded_waves.correct_train)).mean() < 0.01
    # the test compares these with the run on one device in its own process
    np.savez(sys.argv[1], masks=four.masks, train_loss=four.train_loss,
             correct_train=np.asarray(four.correct_train))
    # The compiled step keeps each model on its device: no weight is gathered across devices
    # (the run's own program: 2 steps of 64 per epoch).
    spec = build_spec(Config(**config), dataset)
    ens = Ensemble(spec, dataset.image_shape, 64, make_mesh(), "vmap")
    per_model = jax.device_put((  # laid out as a run lays them out, so the run's program
        jax.random.key_data(keys.model_keys(3, keys.INIT, np.arange(4))),
        np.zeros((4, 128), np.int32),
        jax.random.key_data(keys.model_keys(3, keys.AUGMENT, np.arange(4)))), ens.model_sharding)
    shared = jax.device_put((dataset.x_train, dataset.y_train, schedule_for(Config(**config), 2)),
                            ens.replicated)  # the schedule too, as the Trainer places it
    hlo = ens.train_step.lower(ens.init(per_model[0]), ens.zero_totals(4), *per_model[1:],
                               *shared[:2], 0, shared[2]).compile().as_text()
    # (the run compiled this very program: it is read from the compilation cache)
    assert "all-gather" not in hlo and "all-reduce" not in hlo, "cross-device traffic"
    # Each device draws its own models' batch orders (the same orders as on one device).
    from jaxmem.train import orders as loop
    plain = loop.model_orders(3, np.arange(4), four.masks, 0, 2, 64)
    sharded = loop.model_orders(3, np.arange(4), four.masks, 0, 2, 64, ens.model_sharding)
    np.testing.assert_array_equal(plain, sharded)
    assert sharded.sharding.is_equivalent_to(ens.model_sharding, 2)
    order_keys, masks = jax.device_put(
        (keys.model_keys(3, keys.ORDER, np.arange(4)), four.masks), ens.model_sharding)
    hlo = loop._orders.lower(order_keys, masks, 0, size=int(four.masks[0].sum()),
                             length=128).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo, "orders gathered"
    print("FOUR_DEVICES_OK")
""")


def test_four_simulated_devices_equal_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    results = str(tmp_path / "four.npz")
    done = subprocess.run([sys.executable, "-c", FOUR_DEVICES, results], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FOUR_DEVICES_OK" in done.stdout
    # The same run on one device, here: a wave of 4 of this module's shapes (the GPU peak test
    # below trains one), so its programs are compiled once for the suite.
    config = Config(**{**CONFIG, "num_models": 4, "epochs": 1, "models_per_wave": 4})
    assert len(jax.devices()) == 1
    one_device = train(config)
    with np.load(results) as four:
        np.testing.assert_array_equal(four["masks"], one_device.masks)
        np.testing.assert_allclose(four["train_loss"], one_device.train_loss, rtol=1e-4,
                                   atol=1e-5)
        assert (four["correct_train"] != np.asarray(one_device.correct_train)).mean() < 0.01


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def fake_host_budget(monkeypatch, available: int):
    monkeypatch.setattr(waves.host_memory, "host_budget",
                        lambda limit: waves.host_memory.Budget(available, "test"))


def test_free_memory_is_the_devices_or_the_hosts_shared(monkeypatch):
    gpus = [FakeDevice({"bytes_limit": 100, "bytes_in_use": 30}), FakeDevice({"bytes_limit": 90})]
    budget, shared = waves.free_memory(gpus)
    assert budget.bytes == 70 and not shared  # the smallest device's free memory
    fake_host_budget(monkeypatch, 1001)
    budget, shared = waves.free_memory([FakeDevice(None), FakeDevice(None)])
    assert (budget.bytes, budget.source, shared) == (500, "test", True)  # CPUs share the host


def test_runs_of_other_lengths_and_learning_rates_lower_to_one_train_step():
    """The schedule's numbers are arguments of the step, not constants of its program: the
    pilot's lengths, and runs that differ only in epochs or lr, compile one program."""
    from jaxmem.train import loop

    def lowered(**changes):
        trainer = loop.Trainer(Config(**{**CONFIG, **changes}), DATASET)
        return trainer, trainer.ensemble.train_step.lower(
            *waves.probe_arguments(trainer, 1)).as_text()

    (short, text), (long, other) = lowered(), lowered(epochs=7, lr=0.05, lr_peak_fraction=0.5)
    assert text == other
    assert short.schedule != long.schedule  # what tells them apart: the values passed
    assert float(long.schedule.total_steps) == 7 * long.steps


def test_the_memory_probe_compiles_the_program_a_wave_runs():
    """The probe's train step is lowered from the arguments a wave passes (laid out over the
    model axis), so it measures that program, and a wave of its size reuses the compile (its
    states used to be unplaced: a program no wave runs)."""
    from jaxmem import keys
    from jaxmem.train import loop
    from jaxmem.train.orders import model_orders

    trainer = loop.Trainer(Config(**CONFIG), DATASET)
    ensemble, indices = trainer.ensemble, np.arange(1)
    place = lambda a: jax.device_put(a, ensemble.model_sharding)  # noqa: E731
    masks = run_masks(Config(**CONFIG), DATASET.num_train)[:1]
    wave = (ensemble.init(place(jax.random.key_data(keys.model_keys(3, keys.INIT, indices)))),
            ensemble.zero_totals(1),
            model_orders(3, indices, place(masks), 0, trainer.steps, 64, ensemble.model_sharding),
            place(jax.random.key_data(keys.model_keys(3, keys.AUGMENT, indices))),
            trainer.x_train, trainer.y_train, 0, trainer.schedule)
    assert (ensemble.train_step.lower(*waves.probe_arguments(trainer, 1)).as_text()
            == ensemble.train_step.lower(*wave).as_text())


def test_waves_are_planned_from_the_compiled_memory_use(monkeypatch):
    """A model costs its compiled programs (on CPU HOST_RESIDENT_FACTOR times, plus its
    host arrays) out of the budget the run's results leave; the dataset is on the device
    once, so it is no cost per model: 40 times the training images add (almost) nothing per
    model (the old plan counted every byte of them for every model)."""
    from jaxmem.train import loop

    trainer = loop.Trainer(Config(**CONFIG), DATASET)
    measure = functools.cache(waves.compiled_bytes)  # each size compiled once
    compiled = measure(trainer, 1)
    tiled = dataclasses.replace(DATASET, x_train=np.tile(DATASET.x_train, (40, 1, 1, 1)),
                                y_train=np.tile(DATASET.y_train, 40), original_index=None)
    larger = waves.compiled_bytes(loop.Trainer(Config(**CONFIG), tiled), 1)
    added = tiled.x_train.nbytes - DATASET.x_train.nbytes  # 374 KB of images
    assert abs(larger - compiled) < 0.1 * added  # orders grow by 17 KB, nothing else
    # On CPU a wave of all the models (3: one_wave's program, compiled once for the module) is
    # compiled first; where it does not fit, one model alone too, and a model costs the larger
    # share (a model's share grows with the wave). Where it fits, the wave runs the programs
    # measured.
    cost = lambda compiled: int(waves.HOST_RESIDENT_FACTOR * compiled) + 1000  # noqa: E731
    sizes = []
    monkeypatch.setattr(waves, "compiled_bytes",
                        lambda trainer, count: sizes.append(count) or measure(trainer, count))
    in_whole = cost(measure(trainer, 3) // 3)
    per_model = max(cost(compiled), in_whole)
    for fits, whole in ((1, False), (3, True)):  # waves between: the test after this one
        # room for exactly `fits` models (and a half) at the larger share
        available = int((fits + 0.5) * (in_whole if whole else per_model)
                        / waves.MEMORY_FRACTION) + 5000
        fake_host_budget(monkeypatch, available)
        plan = waves.plan_memory(trainer, 3, reserved=5000, host_per_model=1000)
        assert plan.wave_size == fits and sizes == ([3] if whole else [3, 1])
        assert plan.planned_bytes_per_model == (in_whole if whole else per_model)
        assert plan.record([], [])["budget_bytes"] == available and plan.reserved == 5000
        sizes.clear()
    fake_host_budget(monkeypatch, 1)
    assert waves.plan_memory(trainer, 3).wave_size == 1  # at least one model per device
    # A GPU's autotuner runs kernels on the device with a program's buffers: only one model
    # per device is compiled to measure, however much room the device has.
    fake_device_memory(monkeypatch, bytes_limit=1 << 40, bytes_in_use=0, peak_bytes_in_use=0)
    sizes.clear()
    assert waves.plan_memory(trainer, 3).wave_size == 3 and sizes == [1, 3]
    given = loop.Trainer(Config(**CONFIG, models_per_wave=7), DATASET)
    assert waves.plan_memory(given, 50).wave_size == 7


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_a_wave_whose_programs_do_not_fit_is_made_smaller_before_it_runs(monkeypatch, device):
    """A model's share of a wave's compiled bytes grows with the wave (BENCHMARKS.md): sized
    from one model alone (on CPU from the larger of that and a share of all the models), the
    wave's own programs are compiled, and where they do not fit the wave shrinks until they
    do; the last size compiled is the wave's."""
    from jaxmem.train import loop

    sizes = []
    monkeypatch.setattr(waves, "compiled_bytes", lambda trainer, count: sizes.append(count)
                        or 100 * (10 + count) * count)  # a share of 100 (10 + count)
    if device == "gpu":
        fake_device_memory(monkeypatch, bytes_limit=int(22_500 / waves.MEMORY_FRACTION) + 1000,
                           bytes_in_use=1000, peak_bytes_in_use=1000)
        # one model: 1,100 -> 20 fit; 20 models: 3,000 each -> 7; 7 models: 1,700 (< 3,000)
        expected = [1, 20, 7], 7, 3000
    else:  # a model costs HOST_RESIDENT_FACTOR times its share on CPU
        fake_host_budget(monkeypatch, int(31_500 / waves.MEMORY_FRACTION))
        # all 50: 8,571 each -> 3 fit; one model: 1,571; 3 models: 1,857 (< 8,571)
        expected = [50, 1, 3], 3, int(6000 * waves.HOST_RESIDENT_FACTOR)
    plan = waves.plan_memory(loop.Trainer(Config(**CONFIG), DATASET), 50)
    assert (sizes, plan.wave_size, plan.planned_bytes_per_model) == expected


@pytest.mark.parametrize("shared,models_per_pool", [(True, 8), (False, 4)])
def test_waves_are_replanned_from_a_measured_peak(shared, models_per_pool):
    """CPU devices share one process's resident memory (the peak counts all 8 models of the
    wave); a GPU's peak counts the 4 models on that device."""
    budget = waves.host_memory.Budget(1000, "test")
    plan = waves.MemoryPlan(wave_size=8, budget=budget, devices=2, shared=shared, baseline=100,
                            planned_bytes_per_model=10)
    peak = 100 + models_per_pool * 17  # 17 bytes per model over the baseline
    assert plan.measured_bytes_per_model(peak, 8) == 17
    fits = int(waves.MEASURED_FRACTION * 1000 // 17) * 2  # per device, on 2 devices
    assert plan.wave_size_after(peak, 8, remaining=500) == fits
    assert plan.wave_size_after(peak, 8, remaining=30) == 30
    assert plan.wave_size_after(None, 8, remaining=30) == 8  # no peak: the plan stands
    assert plan.record([peak, None, 100 + models_per_pool * 12], [8, 8, 8])[
        "measured_peak_bytes_per_model"] == 17


def fake_device_memory(monkeypatch, **stats):
    """Every device reports these memory stats, as a GPU's do (bytes_limit, bytes_in_use,
    peak_bytes_in_use: the process's highest, never reset)."""
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda self: dict(stats))


def test_a_gpu_peak_that_cannot_be_reset_does_not_shrink_the_waves(monkeypatch, wave_sizes):
    """A device's peak lasts the process: after a first wave of 4 set it (2,250 bytes per
    model, 9,000 over the baseline), later waves stay below it and tell nothing new. Planned
    from the wave that set the peak, the waves stay at 3; divided by each later wave's size,
    the same peak made every wave smaller than the last (4, 3, 2, 1). A wave whose own
    peak is unknown records none, not the earlier wave's."""
    fake_device_memory(monkeypatch, bytes_limit=11_000, bytes_in_use=1000,
                       peak_bytes_in_use=10_000)
    monkeypatch.setattr(waves, "compiled_bytes", lambda trainer, count: 1750 * count)  # 4 fit
    result = train(Config(**{**CONFIG, "num_models": 10, "epochs": 1}))
    assert wave_sizes == [4, 3, 3]
    assert result.peak_memory_bytes == [10_000, None, None]
    assert result.memory_plan["measured_peak_bytes_per_model"] == 2250
