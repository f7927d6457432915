"""Held-out predictions (jaxmem/rundir/heldout.py): per training example, the mean softmax and
the majority class of the included models that held it out, kept as exact sums."""

import jax
import numpy as np

from jaxmem import keys
from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.masks import run_masks
from jaxmem.rundir import heldout
from jaxmem.rundir.heldout import QUANTUM, HeldoutSums, combine, suggested_labels
from jaxmem.train import step as step_lib
from jaxmem.train.loop import Trainer

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples, 10 classes, 8x8x1


def test_sums_of_quantized_probabilities_do_not_depend_on_the_order_of_summation(monkeypatch):
    """Waves, parts and grown runs add the same models in other groupings (and a wave adds its
    models a chunk at a time): the quantized sums are equal bit for bit, where plain float sums
    of the same probabilities are not."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 40, 5)) * 4
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    predicted = probs.argmax(-1)
    held = rng.random((12, 40)) < 0.3

    def grouped(groups):
        parts = []
        for group in groups:
            sums = HeldoutSums.zeros(40, 5)
            sums.add(0, predicted[group], probs[group], held[group])
            parts.append(sums.arrays())
        return combine(parts)

    one, waves = grouped([np.arange(12)]), grouped([[7, 3, 11], [0, 1], [2, 4, 5, 6, 8, 9, 10]])
    np.testing.assert_array_equal(one.prob_sum, waves.prob_sum)
    np.testing.assert_array_equal(one.votes, waves.votes)
    monkeypatch.setattr(heldout, "ADD_BLOCK_BYTES", 8 * 40 * 5 * 5)  # 5 models at a time
    chunked = grouped([np.arange(12)])
    np.testing.assert_array_equal(one.prob_sum, chunked.prob_sum)
    np.testing.assert_array_equal(one.votes, chunked.votes)
    plain = sum(np.where(held[k, :, None], probs[k].astype(np.float64), 0) for k in range(12))
    # the quantized sums are the probability sums to within QUANTUM / 2 per model
    np.testing.assert_allclose(one.prob_sum, plain, rtol=0, atol=12 * QUANTUM / 2)
    np.testing.assert_array_equal(one.votes.sum(1), held.sum(0))

    # What the quantization is for: float64 addition is not associative. Three models' float32
    # probabilities of one example, added in two orders: plain sums differ, quantized ones not.
    tiny = np.float32(2.0 ** -54)
    three = np.array([[[0.5, 0.5]], [[tiny, 1.0]], [[tiny, 1.0]]], np.float32)  # [3, 1, 2]
    assert (0.5 + float(tiny)) + float(tiny) != 0.5 + (float(tiny) + float(tiny))
    sums = [HeldoutSums.zeros(1, 2) for _ in range(2)]
    for order, total in zip(([0, 1, 2], [1, 2, 0]), sums, strict=True):
        for k in order:
            total.add(0, three[k].argmax(-1)[None], three[k][None], np.ones((1, 1), bool))
    np.testing.assert_array_equal(sums[0].prob_sum, sums[1].prob_sum)


def test_suggested_label_is_the_majority_with_ties_to_the_larger_probability_sum():
    votes = np.array([[0, 3, 1], [2, 0, 2], [2, 0, 2], [0, 0, 0], [1, 1, 1]])
    prob_sum = np.array([[.5, 2, .5], [1, .5, 1.5], [1.5, .5, 1], [0, 0, 0], [1, 1, 1]])
    label, share = suggested_labels(votes, prob_sum)
    np.testing.assert_array_equal(label, [1, 2, 0, -1, 0])  # last: full tie, lowest class
    np.testing.assert_allclose(share, [0.75, 0.5, 0.5, np.nan, 1 / 3])
    scores = HeldoutSums(prob_sum.astype(float), votes.astype(np.int32)).scores()
    np.testing.assert_allclose(scores["heldout_probs"][0], [.125, .5, .125])
    assert np.isnan(scores["heldout_probs"][3]).all()


def test_a_wave_sums_the_predictions_of_its_included_models_that_held_each_example_out():
    """From first principles: each model applied on its own (no model axis), its softmax and
    argmax added over the models that held the example out; a diverged model adds nothing."""
    config = Config(arch="tiny_cnn", num_models=4, epochs=1, batch_size=64, seed=3,
                    recalibrate_bn=False, eval_batch_size=64)
    trainer = Trainer(config, DATASET)
    indices, masks = np.arange(4), run_masks(config, DATASET.num_train)
    init_keys = jax.random.key_data(keys.model_keys(config.seed, keys.INIT, indices))
    states = trainer.ensemble.init(jax.device_put(init_keys, trainer.ensemble.model_sharding))
    result = trainer.empty_wave(4)
    result["train_loss"][:, 2] = np.nan  # model 2 diverged
    trainer._evaluate(states, None, len(trainer.eval_epochs) - 1, result, masks)

    images = np.asarray(DATASET.x_train)
    one_model = jax.jit(lambda state: step_lib.eval_logits(trainer.ensemble.eval_spec, state,
                                                            images))
    want_sum, want_votes = np.zeros((DATASET.num_train, 10)), np.zeros((DATASET.num_train, 10))
    for k in (0, 1, 3):
        state = jax.tree.map(lambda leaf, k=k: leaf[k], states)
        logits = np.asarray(one_model(state))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = ~masks[k]
        want_sum[out] += probs[out]
        want_votes[np.flatnonzero(out), logits[out].argmax(-1)] += 1
    # float32 forward passes with and without the model axis agree to ~1e-7 per model
    np.testing.assert_allclose(result["heldout_prob_sum"], want_sum, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result["heldout_votes"], want_votes)
    np.testing.assert_array_equal(result["heldout_votes"].sum(1), (~masks[[0, 1, 3]]).sum(0))
    # correctness comes from the same argmax as the votes
    label_votes = result["heldout_votes"][np.arange(DATASET.num_train), DATASET.y_train]
    out_correct = (result["correct_train"][-1] & ~masks)[[0, 1, 3]].sum(0)
    np.testing.assert_array_equal(label_votes, out_correct)
