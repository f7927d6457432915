"""The training recipe, pinned: the learning-rate schedule, SGD with Nesterov momentum and coupled
weight decay, flip and translation (padding with black), and evaluation in eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmem import models
from jaxmem.config import Config
from jaxmem.train.augment import augment
from jaxmem.train.optim import Schedule, make_optimizer, schedule_for, triangular_schedule
from jaxmem.train.step import (
    ModelState,
    StepSpec,
    eval_predictions,
    normalize,
    train_inputs,
)

augment_jit = jax.jit(augment, static_argnums=(3, 4))


# ---------------------------------------------------------------- learning-rate schedule


def triangle(peak, total, fraction, step):
    """The closed form: the line through lr 0 just before the first step (x = 0), `peak` at
    x = P = fraction * total, lr 0 just after the last step (x = total + 1); step s is x = s + 1."""
    x, p = step + 1.0, fraction * total
    return peak * x / p if x <= p else peak * (total + 1.0 - x) / (total + 1.0 - p)


def schedule_values(schedule, steps):
    """lr of steps 0..steps-1, each asked for as optax does (an int32 step count)"""
    return np.array([float(schedule(jnp.int32(step))) for step in range(steps)])


def test_schedule_rises_linearly_to_the_peak_then_falls_linearly_to_near_zero():
    peak, total, fraction = 0.4, 100, 0.25  # the peak is step 24 (x = P = 25)
    lr = schedule_values(triangular_schedule(Schedule.triangular(peak, total, fraction)), total)
    assert (lr > 0).all()
    assert lr[0] == pytest.approx(peak / 25, rel=1e-6) and lr[0] < 0.05 * peak
    assert lr[-1] == pytest.approx(peak / 76, rel=1e-6) and lr[-1] < 0.05 * peak
    assert lr.argmax() == 24 and np.float32(lr[24]) == np.float32(peak)
    np.testing.assert_allclose(np.diff(lr[:25]), peak / 25, rtol=1e-5)  # rise over 25 steps
    np.testing.assert_allclose(np.diff(lr[24:]), -peak / 76, rtol=1e-5)  # fall over 76
    for step in (0, 1, 10, 23, 24, 25, 50, 98, 99):
        assert lr[step] == pytest.approx(triangle(peak, total, fraction, step), rel=1e-6)


@pytest.mark.parametrize("total,fraction", [(10, 0.25), (7, 0.5), (12, 0.0), (9, 1.0)])
def test_schedule_matches_the_closed_form(total, fraction):
    lr = schedule_values(triangular_schedule(Schedule.triangular(0.3, total, fraction)), total)
    want = [triangle(0.3, total, fraction, s) for s in range(total)]
    np.testing.assert_allclose(lr, want, rtol=1e-6)
    assert (lr > 0).all()


def test_make_optimizer_spans_epochs_times_steps_per_epoch():
    # Plain SGD (momentum 0, no decay) with gradient 1: each update is -lr_t.
    config = Config(lr=0.4, epochs=3, lr_peak_fraction=0.25, momentum=0.0, weight_decay=0.0)
    tx = make_optimizer(config, schedule_for(config, steps_per_epoch=4))  # 12 steps; peak at 2
    params = {"w": jnp.zeros(())}
    state, update = tx.init(params), jax.jit(tx.update)
    lrs = []
    for _ in range(14):
        updates, state = update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    np.testing.assert_allclose(lrs[:12], [triangle(0.4, 12, 0.25, s) for s in range(12)],
                               rtol=1e-6)
    assert np.argmax(lrs) == 2 and lrs[12:] == [0.0, 0.0]


# ---------------------------------------------------------------- optimiser


def test_sgd_is_nesterov_momentum_with_coupled_weight_decay():
    """optax.sgd(nesterov=True) is trace(nesterov=True) then scale by -lr(count): with
    f(g, t) = g + mu * t it keeps m = f(g, m) and outputs f(g, m_new)."""
    config = Config(lr=0.4, epochs=2, lr_peak_fraction=0.25)  # momentum 0.9, wd 5e-4
    assert (config.momentum, config.weight_decay) == (0.9, 5e-4)
    steps_per_epoch = 5  # 10 steps, P = 2.5 (not a whole step)
    tx = make_optimizer(config, schedule_for(config, steps_per_epoch))
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=3).astype(np.float32),
              "b": {"c": rng.normal(size=(2, 2)).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(3)]

    state = tx.init(params)
    got = params
    for g in grads:
        updates, state = tx.update(g, state, got)
        got = optax.apply_updates(got, updates)

    f32 = np.float32
    mu, wd = f32(config.momentum), f32(config.weight_decay)

    def by_hand(nesterov=True, coupled=True):
        w = jax.tree.map(np.copy, params)
        m = jax.tree.map(np.zeros_like, params)
        for t, g in enumerate(grads):
            lr = f32(triangle(config.lr, 10, config.lr_peak_fraction, t))
            g2 = jax.tree.map(lambda g, w: g + wd * w, g, w) if coupled else g
            m = jax.tree.map(lambda g, m: g + mu * m, g2, m)
            u = jax.tree.map(lambda g, m: g + mu * m, g2, m) if nesterov else m
            w = jax.tree.map(lambda w, u, lr=lr: w - lr * (u if coupled else u + wd * w), w, u)
        return w, m

    want, trace = by_hand()
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6, atol=1e-7)
    for got_leaf, want_leaf in zip(jax.tree.leaves(optax.tree.get(state, "trace")),
                                   jax.tree.leaves(trace), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-6, atol=1e-7)
    # The tolerance tells the alternatives apart: heavy-ball momentum, decoupled decay.
    for other in (by_hand(nesterov=False)[0], by_hand(coupled=False)[0]):
        gap = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(other),
                                                      jax.tree.leaves(want), strict=True))
        assert gap > 1e-4


# ---------------------------------------------------------------- augmentation

HEIGHT, WIDTH, BRIGHT_AT = 6, 9, (2, 3)


def marked_images(count, background=100):
    """[count, 6, 9, 2] uint8: grey (not black, so padding shows) with one bright pixel."""
    images = np.full((count, HEIGHT, WIDTH, 2), background, np.uint8)
    images[:, BRIGHT_AT[0], BRIGHT_AT[1]] = (255, 250)
    return images


def shifted(image, dy, dx, fill=0):
    """image moved down by dy and right by dx, uncovered pixels set to `fill`."""
    out = np.full_like(image, fill)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_flip_is_identity_or_mirror_about_half_the_time():
    count = 1000
    images = marked_images(count)
    out = np.asarray(augment_jit(images, jnp.arange(count), jax.random.key(1), True, 0))
    same = (out == images).all(axis=(1, 2, 3))
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same ^ mirrored).all()
    assert abs(mirrored.mean() - 0.5) < 0.06  # binomial sd 0.016


def test_translate_moves_the_pixel_within_t_and_pads_with_black():
    """What a train step sees (train_inputs): the raw image shifted by up to t px with zero
    (black) padding, then normalised, so the padding is (0 - mean) / std per channel, not 0
    (the mean colour, which padding the normalised image would give)."""
    t, count = 2, 2000
    mean, std = np.array([0.3, 0.6], np.float32), np.array([0.2, 0.25], np.float32)
    spec = StepSpec(None, None, 10, tuple(mean), tuple(std), flip=False, translate=t)
    images = marked_images(count)
    out = np.asarray(jax.jit(train_inputs, static_argnums=0)(
        spec, images, jnp.arange(count), jax.random.key(2)))
    black, bright = -mean / std, (1.0 - mean[0]) / std[0]
    assert np.abs(black).min() > 1.0  # far from 0
    shifts = set()
    for image, result in zip(images, out, strict=True):
        ys, xs = np.nonzero(np.isclose(result[..., 0], bright))
        assert len(ys) == 1
        dy, dx = int(ys[0]) - BRIGHT_AT[0], int(xs[0]) - BRIGHT_AT[1]
        assert abs(dy) <= t and abs(dx) <= t
        shifts.add((dy, dx))
        moved = shifted(image, dy, dx, fill=0)
        np.testing.assert_allclose(result, (moved / np.float32(255) - mean) / std,
                                   rtol=1e-5, atol=1e-5)
        padding = (moved == 0).all(-1)  # the image has no black pixel of its own
        assert padding.sum() == HEIGHT * WIDTH - (HEIGHT - abs(dy)) * (WIDTH - abs(dx))
        np.testing.assert_allclose(result[padding], np.broadcast_to(black, result[padding].shape),
                                   rtol=1e-5)
    assert shifts == {(dy, dx) for dy in range(-t, t + 1) for dx in range(-t, t + 1)}


def test_augmentation_of_an_example_does_not_depend_on_the_batch():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (8, HEIGHT, WIDTH, 2), dtype=np.uint8)
    key = jax.random.key(5)
    batch = np.asarray(augment_jit(images, jnp.arange(100, 108), key, True, 2))
    alone = np.asarray(augment_jit(images[3:4], jnp.array([103]), key, True, 2))
    np.testing.assert_array_equal(alone[0], batch[3])
    # the same example among other images, at another position
    others = rng.integers(0, 256, (8, HEIGHT, WIDTH, 2), dtype=np.uint8)
    others[6] = images[3]
    ids = jnp.array([7, 0, 55, 103000, 1, 2, 103, 3])
    np.testing.assert_array_equal(np.asarray(augment_jit(others, ids, key, True, 2))[6], batch[3])
    # the draws of example i come from fold_in(key, i) alone (the documented derivation: a
    # change to it changes training results, see fingerprint.TRAINING_SCHEME)
    flip_key, shift_key = jax.random.split(jax.random.fold_in(key, 103))
    oy, ox = (int(v) for v in jax.random.randint(shift_key, (2,), 0, 5))  # crop offsets
    want = shifted(images[3], 2 - oy, 2 - ox)
    np.testing.assert_array_equal(batch[3], want[:, ::-1] if jax.random.bernoulli(flip_key)
                                  else want)
    # ... while other example ids draw other flips and shifts of the same image
    draws = augment_jit(np.repeat(images[3:4], 8, 0), jnp.arange(8), key, True, 2)
    assert len({np.asarray(d).tobytes() for d in draws}) >= 5


# ---------------------------------------------------------------- evaluation


def test_eval_uses_running_statistics_and_leaves_them_unchanged():
    model = models.create("tiny_cnn", 10)
    spec = StepSpec(model, None, 10, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    # random parameters and non-trivial running statistics (init has mean 0, var 1), drawn in
    # numpy: compiling model.init's random draws would cost seconds
    rng = np.random.default_rng(7)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                               False))

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
        elif name in ("var", "scale"):
            value = rng.uniform(0.5, 2.0, shape)
        else:  # bias, running mean
            value = rng.normal(scale=0.3, size=shape)
        return jnp.asarray(value, jnp.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    state = ModelState(variables["params"], variables["batch_stats"], None)

    @jax.jit
    def evaluate(images, labels):
        """eval-mode logits, the statistics eval mode writes, eval_predictions' correctness,
        and for contrast the train-mode logits"""
        x = normalize(spec, images)
        logits, written = model.apply(variables, x, False, mutable=["batch_stats"])
        train_logits = model.apply(variables, x, True, mutable=["batch_stats"])[0]
        correct = eval_predictions(spec, state, images, labels)[0]
        return logits, written["batch_stats"], correct, \
            train_logits

    image = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    wild = np.concatenate([np.zeros((3, 8, 8, 3), np.uint8), np.full((2, 8, 8, 3), 255, np.uint8),
                           rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)])
    batch = np.concatenate([wild[:3], image, wild[3:]])  # the image at position 3 of 8

    alone, _, _, _ = evaluate(image, np.zeros(1, np.int32))
    among, written, _, in_batch = evaluate(batch, np.zeros(8, np.int32))
    np.testing.assert_allclose(alone[0], among[3], rtol=1e-5, atol=1e-5)
    decision = int(np.argmax(alone[0]))
    for label in range(10):
        labels = np.full(8, label, np.int32)
        assert bool(evaluate(image, labels[:1])[2][0]) == bool(evaluate(batch, labels)[2][3]) \
            == (label == decision)

    # eval mode writes no statistics (eval_predictions applies without `mutable`, which would fail
    # on a write); asked for them, it returns them unchanged
    for got, want in zip(jax.tree.leaves(written), jax.tree.leaves(state.batch_stats),
                         strict=True):
        np.testing.assert_array_equal(got, want)

    # train mode, by contrast, normalises with the batch's statistics: the other images matter
    other_batch = np.concatenate([255 - wild[:3], image, 255 - wild[3:]])
    in_other_batch = evaluate(other_batch, np.zeros(8, np.int32))[3]
    assert np.abs(in_batch[3] - in_other_batch[3]).max() > 1e-3
    assert np.abs(in_batch[3] - among[3]).max() > 1e-3
