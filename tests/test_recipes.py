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
