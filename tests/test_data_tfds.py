"""`tfds:NAME[/CONFIG]` on small datasets prepared here by TFDS itself (array_record, no
TensorFlow, no download): features found from the dataset's metadata, splits, order, image
rules, and errors that say what is wrong."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import jaxmem.data
from jaxmem import recipes
from jaxmem.config import Config
from jaxmem.data import locate, tfds_source
from jaxmem.data.dataset import GENERIC_MEAN, GENERIC_STD
from jaxmem.errors import UserError


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)


def prepare(data_dir: Path, dataset_name: str, rows: dict[str, list[dict]], features: dict,
            supervised_keys=("image", "label"), config: str | None = None,
            disable_shuffling: bool = False) -> Path:
    """Prepare `dataset_name` (optionally as config `config`) in `data_dir` with TFDS's own
    GeneratorBasedBuilder and array_record writer; returns the version folder."""

    class TinyBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        def _info(self):
            return tfds.core.DatasetInfo(builder=self,
                                         features=tfds.features.FeaturesDict(features),
                                         supervised_keys=supervised_keys,
                                         disable_shuffling=disable_shuffling)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(examples) for split, examples in rows.items()}

        def _generate_examples(self, examples):
            yield from enumerate(examples)

    builder = TinyBuilder(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare()
    return Path(os.fspath(builder.data_path))


def stored(version_dir: Path, split: str) -> list[dict]:
    """The split's records in TFDS's stored order, decoded by TFDS itself."""
    source = tfds.builder_from_directory(os.fspath(version_dir)).as_data_source(split)
    return source.__getitems__(list(range(len(source))))


def colour_rows(split: str, count: int, seed: int, with_id: bool = True) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        row = {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 3,
               "coarse": i % 2}
        if with_id:
            row["id"] = f"{split}_{i}"
        rows.append(row)
    return rows


def rgb_features(with_id: bool = True) -> dict:
    features = {"image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
                "coarse": tfds.features.ClassLabel(num_classes=2)}
    if with_id:
        features["id"] = tfds.features.Text()
    return features


def as_pil(rows):
    return [{**r, "image": Image.fromarray(r["image"])} for r in rows]


def test_ids_restore_the_official_order_and_supervised_keys_pick_the_label(tmp_path,
                                                                           monkeypatch):
    rows = {"train": colour_rows("train", 12, 0), "test": colour_rows("test", 5, 1)}
    # TFDS's own default layout: a tensorflow_datasets/ folder inside the data dir.
    version = prepare(tmp_path / "tensorflow_datasets", "shapes",
                      {k: as_pil(v) for k, v in rows.items()}, rgb_features())
    kept = stored(version, "train")
    assert [r["id"] for r in kept] != [r["id"].encode() for r in rows["train"]]  # shuffled
    ds = jaxmem.data.load("tfds:shapes", str(tmp_path))
    np.testing.assert_array_equal(ds.x_train, np.stack([r["image"] for r in rows["train"]]))
    np.testing.assert_array_equal(ds.y_train, [r["label"] for r in rows["train"]])
    np.testing.assert_array_equal(ds.x_test, np.stack([r["image"] for r in rows["test"]]))
    np.testing.assert_array_equal(ds.y_test, [r["label"] for r in rows["test"]])
    assert ds.num_classes == 3 and ds.name == "shapes" and ds.file_names is None
    np.testing.assert_array_equal(ds.original_index, np.arange(12))
    assert ds.flip is False and ds.translate == 0  # an unknown set: not augmented by default
    assert ds.mean == (GENERIC_MEAN,) * 3 and ds.std == (GENERIC_STD,) * 3
    # A second load memory-maps the cache instead of reading the shards again.
    monkeypatch.setattr(tfds_source, "_decode", lambda *a: pytest.fail("decoded twice"))
    again = jaxmem.data.load("tfds:shapes", str(tmp_path))
    assert isinstance(again.x_train, np.memmap)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_without_ids_the_stored_order_is_kept_and_names_come_along(tmp_path):
    features = {"image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
                "file_name": tfds.features.Text()}
    rows = {split: [{"image": Image.fromarray(r["image"]), "label": r["label"],
                     "file_name": f"{split}/img{i:02d}.png"}
                    for i, r in enumerate(colour_rows(split, n, seed, with_id=False))]
            for split, n, seed in (("train", 10, 2), ("test", 4, 3))}
    version = prepare(tmp_path, "named", rows, features, supervised_keys=None)
    kept = stored(version, "train")
    ds = jaxmem.data.load("tfds:named", str(tmp_path))
    np.testing.assert_array_equal(ds.x_train, np.stack([r["image"] for r in kept]))
    np.testing.assert_array_equal(ds.y_train, [r["label"] for r in kept])
    assert list(ds.file_names) == [r["file_name"].decode() for r in kept]
    assert list(ds.file_names) != sorted(ds.file_names)  # TFDS's order, not ours

    # Prepared with shuffling disabled, the stored order is the original one.
    prepare(tmp_path, "ordered", rows, features, supervised_keys=None, disable_shuffling=True)
    ordered = jaxmem.data.load("tfds:ordered", str(tmp_path))
    assert list(ordered.file_names) == [f"train/img{i:02d}.png" for i in range(10)]


def gray_rows(sizes: list[tuple[int, int]], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)),
             "label": i % 2} for i, (h, w) in enumerate(sizes)]


def test_configs_splits_gray_images_and_sizes(tmp_path):
    features = {"image": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["left", "right"])}
    same = {"train": gray_rows([(6, 5)] * 6, 4), "validation": gray_rows([(6, 5)] * 3, 5)}
    prepare(tmp_path, "letters", same, features, config="upper")
    with pytest.raises(UserError, match=r"holds the configs upper: give tfds:letters/CONFIG"):
        jaxmem.data.load("tfds:letters", str(tmp_path))
    with pytest.raises(UserError, match=r"no split 'test'.*train, validation.*--test-split"):
        jaxmem.data.load("tfds:letters/upper", str(tmp_path))
    ds = jaxmem.data.load("tfds:letters/upper", str(tmp_path), test_split="validation")
    assert ds.x_train.shape == (6, 6, 5, 1) and ds.x_test.shape == (3, 6, 5, 1)
    assert ds.name == "letters/upper" and ds.num_classes == 2
    version = tmp_path / "letters" / "upper" / "1.0.0"
    np.testing.assert_array_equal(ds.x_test, np.stack([r["image"] for r in stored(
        version, "validation")]))
    with pytest.raises(UserError, match="--test-split"):
        jaxmem.data.load("tfds:letters/upper", str(tmp_path), test_split="train")

    mixed = {"train": gray_rows([(6, 6), (6, 6), (9, 7), (6, 6)], 6),
             "test": gray_rows([(6, 6)], 7)}
    prepare(tmp_path, "mixed", mixed, features)
    with pytest.raises(UserError, match=r"differ in size: example 0 of the train split is 6x6 "
                                        r"but example \d of the train split is 7x9.*--image-size"):
        jaxmem.data.load("tfds:mixed", str(tmp_path))
    resized = jaxmem.data.load("tfds:mixed", str(tmp_path), image_size=4)
    assert resized.x_train.shape == (4, 4, 4, 1) and resized.x_test.shape == (1, 4, 4, 1)


def test_features_that_do_not_say_which_is_the_image_are_listed(tmp_path):
    features = {"photo": tfds.features.Image(shape=(4, 4, 3)),
                "sketch": tfds.features.Image(shape=(4, 4, 3)),
                "label": tfds.features.ClassLabel(num_classes=2)}
    pixels = Image.new("RGB", (4, 4))  # TFDS encodes numpy images with TensorFlow, PIL's not
    row = {"photo": pixels, "sketch": pixels, "label": 0}
    prepare(tmp_path, "pairs", {"train": [row], "test": [row]}, features, supervised_keys=None)
    with pytest.raises(UserError, match=r"cannot tell the image and the label apart.*"
                                        r"label \(ClassLabel\), photo \(Image\), sketch \(Image\)"):
        jaxmem.data.load("tfds:pairs", str(tmp_path))


def test_corrupt_and_missing_shards_are_told_apart(tmp_path):
    rows = {"train": as_pil(colour_rows("train", 40, 8)), "test": as_pil(colour_rows("test", 3,
                                                                                     9))}
    version = prepare(tmp_path / "good", "shapes", rows, rgb_features())
    for case in ("corrupt", "missing"):
        copy = tmp_path / case / "shapes"
        shutil.copytree(version.parent, copy / "")
        shard = next((copy / "1.0.0").glob("*-train.array_record*"))
        if case == "corrupt":
            data = bytearray(shard.read_bytes())
            data[200:220] = bytes(b ^ 0xFF for b in data[200:220])
            shard.write_bytes(bytes(data))
            with pytest.raises(UserError, match=r"train split .*unreadable .*Corrupted.*looks "
                                                r"corrupt"):
                jaxmem.data.load("tfds:shapes", str(tmp_path / case))
        else:
            shard.unlink()
            with pytest.raises(UserError, match=r"cannot open a shard") as caught:
                jaxmem.data.load("tfds:shapes", str(tmp_path / case))
            assert "looks corrupt" not in str(caught.value)


def test_a_tfds_set_gets_its_recipe_by_size(tmp_path):
    rows = {"train": as_pil(colour_rows("train", 30, 10)), "test": as_pil(colour_rows("test", 3,
                                                                                      11))}
    prepare(tmp_path, "shapes", rows, rgb_features())
    chosen = recipes.recipe(Config(dataset="tfds:shapes", data_dir=str(tmp_path)))
    assert chosen == recipes.small_data_recipe(30, 0.7, 8) and chosen["batch_size"] == 16
    assert recipes.recipe(Config(dataset="tfds:cifar10")) == {}  # the paper's, nothing loaded


def test_malformed_names_and_misplaced_settings_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"tfds:NAME or tfds:NAME/CONFIG"):
        jaxmem.data.load("tfds:a/b/c", str(tmp_path))
    with pytest.raises(UserError, match=r"--test-split applies to tfds: datasets only"):
        jaxmem.data.load("digits", test_split="validation")
    with pytest.raises(UserError, match=r"--image-size applies to tfds: and folder:"):
        jaxmem.data.load("digits", image_size=8)


def test_a_tfds_set_runs_end_to_end(tmp_path):
    """The CLI on a TFDS set shaped like test_cli's tiny .npz (90 + 20 6x6 gray images, 3
    classes), so the compiled programs are shared."""
    from test_cli import TINY

    from jaxmem import load_run
    from jaxmem.cli import main

    features = {"image": tfds.features.Image(shape=(6, 6, 1)),
                "label": tfds.features.ClassLabel(num_classes=3),
                "id": tfds.features.Text()}
    rng = np.random.default_rng(12)
    rows = {split: [{"image": Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)),
                     "label": int(rng.integers(3)), "id": f"{split}_{i}"} for i in range(count)]
            for split, count in (("train", 90), ("test", 20))}
    prepare(tmp_path, "tiny", rows, features)
    out = tmp_path / "run"
    assert main(TINY + ["--dataset=tfds:tiny", f"--data-dir={tmp_path}", f"--out={out}"]) == 0
    run = load_run(str(out))
    np.testing.assert_array_equal(run.labels, [r["label"] for r in rows["train"]])
    assert run.memorization.shape == (90,)
