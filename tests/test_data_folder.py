"""`folder:PATH` on small generated image folders: class order, file order and names, the
cache and its invalidation, colour modes, sizes, and one-line errors naming the file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxmem.data
from jaxmem.cli import main
from jaxmem.data import folder_source, locate
from jaxmem.data.dataset import GENERIC_MEAN, GENERIC_STD
from jaxmem.errors import UserError


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)


def save(path: Path, pixels: np.ndarray, mode: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    image.save(path)
    return pixels


def gray(seed: int, size=(6, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def test_classes_sorted_files_ordered_names_kept_and_cache_invalidated(tmp_path, monkeypatch):
    top = tmp_path / "pets"
    files = {  # written out of order; classes sorted as torchvision does: bird, cat, dog
        "train/dog/b.png": 1, "train/dog/a.png": 2, "train/cat/x/z.png": 3,
        "train/cat/10.png": 4, "train/cat/9.png": 5, "train/bird/only.png": 6,
        "test/dog/t.png": 7, "test/bird/u.png": 8,  # no cat in test: fine
    }
    pixels = {rel: save(top / rel, gray(seed)) for rel, seed in files.items()}
    (top / "train" / "dog" / "notes.txt").write_text("not an image")
    (top / "train" / "dog" / ".hidden.png").write_bytes(b"not an image either")
    ds = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path / "data"))
    order = ["bird/only.png", "cat/10.png", "cat/9.png", "cat/x/z.png", "dog/a.png",
             "dog/b.png"]
    assert list(ds.file_names) == order
    np.testing.assert_array_equal(ds.y_train, [0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(ds.x_train[..., 0], [pixels[f"train/{r}"] for r in order])
    np.testing.assert_array_equal(ds.y_test, [0, 2])
    np.testing.assert_array_equal(ds.x_test[..., 0], [pixels["test/bird/u.png"],
                                                      pixels["test/dog/t.png"]])
    assert ds.num_classes == 3 and ds.name == "pets" and ds.x_train.shape == (6, 6, 6, 1)
    np.testing.assert_array_equal(ds.original_index, np.arange(6))
    assert ds.mean == (GENERIC_MEAN,) and ds.std == (GENERIC_STD,)
    assert ds.flip is False and ds.translate == 0
    assert not (top / locate.CACHE_FOLDER).exists()  # the user's folder is only read

    decoded = folder_source._decode
    monkeypatch.setattr(folder_source, "_decode", lambda *a: pytest.fail("decoded twice"))
    again = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path / "data"))
    assert isinstance(again.x_train, np.memmap)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    assert list(again.file_names) == order

    # A new file changes the listing: decoded again, with the new image in its place.
    monkeypatch.setattr(folder_source, "_decode", decoded)
    save(top / "train" / "cat" / "11.png", gray(9))
    grown = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path / "data"))
    assert list(grown.file_names) == order[:2] + ["cat/11.png"] + order[2:]
    np.testing.assert_array_equal(grown.x_train[2, ..., 0], gray(9))


def test_colour_modes_are_converted_one_way(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    top = tmp_path / "mixed"
    save(top / "train/a/gray.png", gray(1, (5, 5)))
    save(top / "train/a/onebit.png", gray(2, (5, 5)), mode="1")
    save(top / "test/a/gray.png", gray(3, (5, 5)))
    only_gray = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path))
    assert only_gray.x_train.shape == (2, 5, 5, 1)
    onebit = np.asarray(Image.open(top / "train/a/onebit.png").convert("L"))
    np.testing.assert_array_equal(only_gray.x_train[1, ..., 0], onebit)

    rgba = np.concatenate([rgb, np.full((5, 5, 1), 7, np.uint8)], axis=-1)
    save(top / "train/b/rgba.png", rgba)
    save(top / "train/b/palette.png", rgb, mode="P")
    ds = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path))
    assert ds.x_train.shape == (4, 5, 5, 3)  # one colour image: every image becomes RGB
    gray_as_rgb = ds.x_train[0]
    assert (gray_as_rgb == gray(1, (5, 5))[..., None]).all()
    palette = np.asarray(Image.open(top / "train/b/palette.png").convert("RGB"))
    np.testing.assert_array_equal(ds.x_train[2], palette)
    np.testing.assert_array_equal(ds.x_train[3], rgb)  # alpha dropped, colours kept


def test_sizes_must_agree_or_be_resized(tmp_path):
    top = tmp_path / "sizes"
    save(top / "train/a/small.png", gray(1, (4, 6)))
    save(top / "train/b/large.png", np.full((9, 7), 200, np.uint8))
    save(top / "test/a/t.png", gray(3, (4, 6)))
    with pytest.raises(UserError, match=r"differ in size: train/a/small.png is 6x4 but "
                                        r"train/b/large.png is 7x9; give --image-size N"):
        jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path))
    ds = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path), image_size=5)
    assert ds.x_train.shape == (2, 5, 5, 1) and ds.x_test.shape == (1, 5, 5, 1)
    assert (ds.x_train[1] == 200).all()  # a flat image stays flat under bilinear resizing
    kept = jaxmem.data.load(f"folder:{top}", data_dir=str(tmp_path), image_size=6)
    assert kept.x_train.shape == (2, 6, 6, 1)  # another size: its own cache


@pytest.mark.parametrize("case, message", [
    ("bad_file", r"folder:.*: train/b/broken.png is not a readable image"),
    ("unknown_test_class", r"test/ has classes that train/ lacks: zebra"),
    ("no_test", r"has no test/ folder"),
    ("empty_class", r"class folder .*train/c holds no image files"),
])
def test_bad_folders_are_one_line_errors_naming_the_file(case, message, tmp_path, capsys):
    top = tmp_path / "data"
    save(top / "train/a/1.png", gray(1))
    save(top / "train/b/2.png", gray(2))
    save(top / "test/a/3.png", gray(3))
    if case == "bad_file":
        (top / "train/b/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    elif case == "unknown_test_class":
        save(top / "test/zebra/4.png", gray(4))
    elif case == "no_test":
        for path in (top / "test").rglob("*.png"):
            path.unlink()
        (top / "test" / "a").rmdir()
        (top / "test").rmdir()
    else:
        (top / "train" / "c").mkdir()
    assert main([f"--dataset=folder:{top}", f"--data-dir={tmp_path / 'cache'}",
                 f"--out={tmp_path / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_a_folder_runs_end_to_end(tmp_path, capsys):
    """The CLI on a folder shaped like test_cli's tiny .npz (90 + 20 6x6 gray images, 3
    classes), so the compiled programs are shared."""
    from test_cli import TINY

    from jaxmem import load_run

    rng = np.random.default_rng(0)
    top = tmp_path / "shapes"
    for split, count in (("train", 90), ("test", 20)):
        for i in range(count):
            save(top / split / f"class{i % 3}" / f"{i:03d}.png", gray(int(rng.integers(1e6))))
    out = tmp_path / "run"
    assert main(TINY + [f"--dataset=folder:{top}", f"--data-dir={tmp_path}", f"--out={out}"]) == 0
    run = load_run(str(out))
    expected = [i % 3 for i in sorted(range(90), key=lambda i: (i % 3, i))]
    np.testing.assert_array_equal(run.labels, expected)
    assert run.memorization.shape == (90,) and run.config["dataset"] == f"folder:{top}"


def test_run_folder_names_from_dataset_names():
    assert jaxmem.data.slug("folder:/data/pets/") == "pets"
    assert jaxmem.data.slug("tfds:emnist/letters") == "emnist-letters"
    assert jaxmem.data.slug("/data/mine.npz") == "mine" and jaxmem.data.slug("mnist") == "mnist"
