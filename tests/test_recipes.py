"""Recipes: settings a user does not give come from the dataset, and the record says which."""

import numpy as np

from jaxmem import recipes
from jaxmem.config import Config


def test_small_data_gets_enough_steps_and_a_batch_scaled_learning_rate():
    digits = recipes.small_data_recipe(1258, 0.7, 8)  # subsets of 881: 28 batches of 32
    assert digits == {"batch_size": 32, "lr": 0.1, "epochs": 18, "eval_every": 3,
                      "translate": 0}
    tiny = recipes.small_data_recipe(260, 0.5, 8)  # 130: the smallest batch, 9 steps
    assert tiny["batch_size"] == 16 and tiny["epochs"] == 56  # 56 * 9 >= 500 steps
    assert np.isclose(tiny["lr"], 0.4 * np.sqrt(16 / 512))
    assert "translate" not in recipes.small_data_recipe(5000, 0.7, 32)  # 32 px: translated
    assert recipes.small_data_recipe(50_000, 0.7, 32) == {}  # not small: the paper's recipe


def test_flags_win_the_recipe_fills_the_rest_and_every_source_is_recorded(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (1400, 16, 16, 3), np.uint8),
             y_train=rng.integers(0, 10, 1400), x_test=rng.integers(0, 256, (10, 16, 16, 3),
                                                                    np.uint8),
             y_test=rng.integers(0, 10, 10))
    config, sources = recipes.resolve({"dataset": str(path), "epochs": 7})
    assert config.epochs == 7 and sources["epochs"] == "flag"  # given: kept
    assert (config.batch_size, config.lr, config.translate) == (32, 0.1, 0)
    assert sources["batch_size"] == sources["lr"] == "recipe"
    assert sources["momentum"] == "default" and config.momentum == Config.momentum
    assert set(sources) == {f for f in Config.__dataclass_fields__}


def test_the_papers_datasets_get_the_papers_recipe_without_reading_the_data():
    config, sources = recipes.resolve({"dataset": "cifar10", "arch": "small_vgg",
                                       "data_dir": "/nonexistent"})
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (
        100, 512, 0.4, 5e-4)
    assert "recipe" not in sources.values()


def test_the_recipe_recomputes_from_a_given_batch_size_or_epochs():
    # digits (1,258 examples, subsets of 881) with --batch-size 256: 4 steps per epoch, so 125
    # epochs reach the recipe's 500 steps, at the square-root learning rate of batch 256
    big = recipes.small_data_recipe(1258, 0.7, 8, {"batch_size": 256})
    assert "batch_size" not in big and big["epochs"] == 125 and big["eval_every"] == 20
    assert np.isclose(big["lr"], 0.4 * np.sqrt(256 / 512))
    # --epochs 200: about six evaluations, not every 3 epochs (67 evaluations)
    long = recipes.small_data_recipe(1258, 0.7, 8, {"epochs": 200})
    assert "epochs" not in long and long["eval_every"] == 33 and long["batch_size"] == 32
    assert len(Config(epochs=200, eval_every=long["eval_every"]).eval_epochs()) == 7
    given = {"epochs": 200, "eval_every": 5, "lr": 0.3, "batch_size": 64}
    assert recipes.small_data_recipe(1258, 0.7, 8, given) == {"translate": 0}


def test_resolve_records_what_the_recipe_computed_from_a_flag():
    config, sources = recipes.resolve({"dataset": "digits", "batch_size": 256})
    assert (config.batch_size, config.epochs, config.eval_every) == (256, 125, 20)
    assert np.isclose(config.lr, 0.4 * np.sqrt(0.5))
    assert sources["batch_size"] == "flag"
    assert sources["lr"] == sources["epochs"] == sources["eval_every"] == "recipe"
