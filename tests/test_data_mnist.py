"""`mnist` and `fashion_mnist` from small generated idx files in the official format: where they
are found, gzipped or not, checked downloads from a local server, bad files, the recipe."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from test_download import environment, server  # noqa: F401 - fixtures: no network, 127.0.0.1

import jaxmem.data
from jaxmem import recipes
from jaxmem.data import download, mnist
from jaxmem.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes: magic 0x0000080<ndim>, big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def fake_set(seed: int, train: int = 12, test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8)}


def write_set(folder: Path, arrays: dict[str, np.ndarray], gzipped=("train", "t10k-l")) -> None:
    """The four files in `folder`; those whose names start with a `gzipped` prefix as .gz."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if stem.startswith(gzipped):
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / stem).write_bytes(idx_bytes(array))


def check(ds, arrays, name):
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.x_train.shape[1:] == (28, 28, 1) and ds.y_train.dtype == np.int32
    assert ds.name == name and ds.num_classes == 10
    np.testing.assert_array_equal(ds.original_index, np.arange(len(ds.y_train)))
    assert ds.flip is False and ds.translate == mnist.TRANSLATE  # a mirrored digit is no digit
    assert ds.mean == {"mnist": (0.1307,), "fashion_mnist": (0.2860,)}[name]  # fixed constants


@pytest.mark.parametrize("layout", ["own", "torchvision", "data_dir_itself"])
def test_placed_files_are_read_as_they_are(layout, tmp_path):
    arrays = fake_set(0)
    folder = {"own": tmp_path / "fashion_mnist", "torchvision": tmp_path / "FashionMNIST" / "raw",
              "data_dir_itself": tmp_path}[layout]
    write_set(folder, arrays)
    check(jaxmem.data.load("fashion_mnist", str(tmp_path), download=False), arrays,
          "fashion_mnist")
    # the other set is not mistaken for this one unless it is in the data dir itself
    if layout != "data_dir_itself":
        with pytest.raises(UserError, match=r"mnist: no data found .*downloads are off"):
            jaxmem.data.load("mnist", str(tmp_path), download=False)


def test_missing_files_are_downloaded_and_checked(tmp_path, server, monkeypatch):  # noqa: F811
    arrays = fake_set(1)
    base = f"http://127.0.0.1:{server.server_port}/mnist/"
    md5 = {}
    for stem, array in arrays.items():
        body = gzip.compress(idx_bytes(array))
        server.files[f"/mnist/{stem}.gz"] = (body, len(body))
        md5[f"{stem}.gz"] = hashlib.md5(body).hexdigest()
    # One file is already placed (uncompressed): only the other three are fetched.
    write_set(tmp_path / "mnist", {"t10k-labels-idx1-ubyte": arrays["t10k-labels-idx1-ubyte"]},
              gzipped=())
    monkeypatch.setattr(mnist, "MNIST", dataclasses.replace(mnist.MNIST, url=base, md5=md5))
    check(jaxmem.data.load("mnist", str(tmp_path)), arrays, "mnist")
    assert sorted(server.requests) == sorted(f"/mnist/{s}.gz" for s in arrays
                                             if not s.startswith("t10k-l"))

    md5["train-images-idx3-ubyte.gz"] = "0" * 32  # not what the server sends
    monkeypatch.setattr(mnist, "MNIST", dataclasses.replace(mnist.MNIST, url=base, md5=md5))
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz downloaded from .* has "
                                        r"MD5 .*not the published 0{32}"):
        jaxmem.data.load("mnist", str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh" / "mnist" / "train-images-idx3-ubyte.gz").exists()

    # A mirror keeps the data dir's layout: MNIST's files under mnist/, apart from
    # Fashion-MNIST's files of the same names.
    md5["train-images-idx3-ubyte.gz"] = hashlib.md5(server.files[
        "/mnist/train-images-idx3-ubyte.gz"][0]).hexdigest()
    monkeypatch.setattr(mnist, "MNIST", dataclasses.replace(mnist.MNIST, url="http://127.0.0.1:9/",
                                                            md5=md5))
    monkeypatch.setenv(download.MIRROR_VAR, f"http://127.0.0.1:{server.server_port}")
    server.requests.clear()
    check(jaxmem.data.load("mnist", str(tmp_path / "mirrored")), arrays, "mnist")
    assert sorted(server.requests) == sorted(f"/mnist/{s}.gz" for s in arrays)


@pytest.mark.parametrize("damage, message", [
    ("magic", r"t10k-images-idx3-ubyte is not an idx file of unsigned bytes with 3"),
    ("short", r"t10k-images-idx3-ubyte holds 3,919 bytes of data for shape \(5, 28, 28\)"),
    ("gzip", r"cannot read .*train-labels-idx1-ubyte.gz .*corrupt"),
    ("count", r"has 12 images but .*train-labels-idx1-ubyte.gz has 11 labels"),
])
def test_bad_files_are_named(damage, message, tmp_path):
    arrays = fake_set(2)
    if damage == "count":
        arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:11]
    write_set(tmp_path / "mnist", arrays)
    images = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    if damage == "magic":
        images.write_bytes(b"\0\0\x0d\x03" + images.read_bytes()[4:])  # float data
    elif damage == "short":
        images.write_bytes(images.read_bytes()[:-1])
    elif damage == "gzip":
        labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
        labels.write_bytes(labels.read_bytes()[:20])
    with pytest.raises(UserError, match=message):
        jaxmem.data.load("mnist", str(tmp_path), download=False)


def test_sixty_thousand_images_get_the_papers_recipe(tmp_path):
    """The recipe rule counts the set: MNIST's 60,000 are not small data."""
    arrays = {"train-images-idx3-ubyte": np.zeros((60_000, 28, 28), np.uint8),
              "train-labels-idx1-ubyte": np.arange(60_000, dtype=np.uint8) % 10,
              "t10k-images-idx3-ubyte": np.zeros((10, 28, 28), np.uint8),
              "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8)}
    write_set(tmp_path / "mnist", arrays)
    config, sources = recipes.resolve({"dataset": "mnist", "data_dir": str(tmp_path)})
    assert config.epochs == 100 and config.batch_size == 512 and config.lr == 0.4
    assert {sources[k] for k in recipes.RECIPE_SETTINGS} == {"default"}
    write_set(tmp_path / "small" / "fashion_mnist", fake_set(3, train=600))
    small, small_sources = recipes.resolve({"dataset": "fashion_mnist",
                                            "data_dir": str(tmp_path / "small")})
    assert small.batch_size == 16 and small_sources["batch_size"] == "recipe"

