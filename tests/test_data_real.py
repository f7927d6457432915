"""Real-dataset sources (CIFAR tarballs/folders, Tiny ImageNet, TFDS) on tiny fake copies.

The fakes use the exact official formats: pickled batch dicts with the real keys inside
`cifar-10-python.tar.gz`, a `tiny-imagenet-200` tree of JPEG files, and a TFDS data_dir prepared
by TFDS's own cifar builder (only its TensorFlow file reader swapped for a NumPy/Pillow one).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import fill, temporaries
from PIL import Image

import jaxmem.data
from jaxmem.data import cifar, locate, tfds_source, tiny_imagenet
from jaxmem.data.dataset import NORMALIZATION
from jaxmem.errors import UserError

BATCH = 6  # images per fake CIFAR batch file


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """The default cache folder (~/.cache/jaxmem) lives in the test's temp dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(locate.ENV_VAR, raising=False)
    return home


# ----------------------------------------------------------------------------- CIFAR fakes


def fake_cifar(spec: cifar.CifarSpec, seed: int = 0):
    """Per official file: HWC images [n,32,32,3] and the batch dict in the official layout."""
    rng = np.random.default_rng(seed)
    files = {}
    for number, name in enumerate(spec.train_files + spec.test_files):
        images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, spec.num_classes, BATCH)
        # Row layout of the official files: 1024 red, then 1024 green, then 1024 blue values,
        # each plane row-major. Built element by element, independently of the loader's reshape.
        data = np.empty((BATCH, 3072), np.uint8)
        for c in range(3):
            for r in range(32):
                data[:, c * 1024 + r * 32:c * 1024 + r * 32 + 32] = images[:, r, :, c]
        batch = {b"batch_label": f"batch {number}".encode(), b"data": data,
                 b"filenames": [f"img_{number}_{i}.png".encode() for i in range(BATCH)]}
        if spec.label_key == b"labels":
            batch[b"labels"] = [int(v) for v in fine]
            coarse = None
        else:
            coarse = (fine + 7) % 20  # differs from fine, so using the wrong key is caught
            batch[b"fine_labels"] = [int(v) for v in fine]
            batch[b"coarse_labels"] = [int(v) for v in coarse]
        files[name] = {"images": images, "labels": fine.astype(np.int32), "coarse": coarse,
                       "batch": batch}
    return files


def meta_pickle(spec: cifar.CifarSpec) -> tuple[str, bytes]:
    if spec is cifar.CIFAR10:
        return "batches.meta", pickle.dumps(
            {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": BATCH,
             b"num_vis": 3072}, protocol=2)
    return "meta", pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                 b"coarse_label_names": [f"k{i}".encode() for i in range(20)]},
                                protocol=2)


def write_cifar_tarball(spec, files, folder: Path) -> Path:
    """`folder/<official archive name>` with the batches pickled as the originals (protocol 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.archive
    members = {name: pickle.dumps(f["batch"], protocol=2) for name, f in files.items()}
    meta_name, meta_bytes = meta_pickle(spec)
    members[meta_name] = meta_bytes
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{spec.folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_cifar_folder(spec, files, folder: Path) -> Path:
    top = folder / spec.folder
    top.mkdir(parents=True)
    for name, f in files.items():
        (top / name).write_bytes(pickle.dumps(f["batch"], protocol=2))
    meta_name, meta_bytes = meta_pickle(spec)
    (top / meta_name).write_bytes(meta_bytes)
    return top


def expected_split(spec, files, split):
    names = spec.train_files if split == "train" else spec.test_files
    return (np.concatenate([files[n]["images"] for n in names]),
            np.concatenate([files[n]["labels"] for n in names]))


def check_cifar(ds, spec, files):
    n_train = BATCH * len(spec.train_files)
    x_train, y_train = expected_split(spec, files, "train")
    x_test, y_test = expected_split(spec, files, "test")
    assert ds.x_train.shape == (n_train, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (BATCH, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.num_classes == spec.num_classes
    assert 0 <= ds.y_train.min() and ds.y_train.max() < spec.num_classes
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    # One pixel by hand: row 0 of the first file, green plane (offset 1024), row 2, column 5.
    first = files[spec.train_files[0]]["batch"][b"data"]
    assert ds.x_train[0, 2, 5, 1] == first[0, 1024 + 2 * 32 + 5]
    assert ds.original_index.dtype == np.int64
    np.testing.assert_array_equal(ds.original_index, np.arange(n_train))
    assert (ds.mean, ds.std) == NORMALIZATION[spec.name]  # fixed, not from the images
    assert ds.flip is True and ds.translate == 4


def test_cifar10_tarball_cache_and_memory_map(tmp_path, monkeypatch):
    spec = cifar.CIFAR10
    files = fake_cifar(spec)
    data = tmp_path / "data"
    write_cifar_tarball(spec, files, data)

    first = jaxmem.data.load("cifar10", data_dir=str(data))
    check_cifar(first, spec, files)
    cache = data / locate.CACHE_FOLDER / "cifar10"
    assert (cache / "meta.json").is_file() and (cache / "x_train.npy").is_file()
    assert not list(cache.glob(".*tmp"))  # no temp files left behind

    # A second load must not decode again: it memory-maps the cache.
    monkeypatch.setattr(cifar, "_decode", lambda *a: pytest.fail("decoded twice"))
    second = jaxmem.data.load("cifar10", data_dir=str(data))
    assert isinstance(second.x_train, np.memmap) and isinstance(second.x_test, np.memmap)
    check_cifar(second, spec, files)
    assert second.mean == first.mean and second.std == first.std


def test_cifar100_extracted_folder_uses_fine_labels(tmp_path):
    spec = cifar.CIFAR100
    files = fake_cifar(spec, seed=1)
    write_cifar_folder(spec, files, tmp_path)
    ds = cifar.load_cifar100(str(tmp_path))
    check_cifar(ds, spec, files)
    assert not np.array_equal(ds.y_train, files["train"]["coarse"])
    # The data dir may also be the extracted folder itself.
    again = cifar.load_cifar100(str(tmp_path / spec.folder))
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_source_change_invalidates_cache(tmp_path):
    spec = cifar.CIFAR10
    write_cifar_tarball(spec, fake_cifar(spec, seed=0), tmp_path)
    cifar.load_cifar10(str(tmp_path))
    new_files = fake_cifar(spec, seed=5)
    os.remove(tmp_path / spec.archive)
    path = write_cifar_tarball(spec, new_files, tmp_path)
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse-clock file systems
    check_cifar(cifar.load_cifar10(str(tmp_path)), spec, new_files)


def test_data_dir_resolution(tmp_path, monkeypatch, isolated_home):
    assert locate.data_dir(None) == isolated_home / ".cache" / "jaxmem"
    monkeypatch.setenv(locate.ENV_VAR, str(tmp_path / "env"))
    assert locate.data_dir(None) == tmp_path / "env"
    assert locate.data_dir(str(tmp_path / "arg")) == tmp_path / "arg"

    spec = cifar.CIFAR10
    files = fake_cifar(spec)
    write_cifar_tarball(spec, files, tmp_path / "env")
    check_cifar(jaxmem.data.load("cifar10"), spec, files)  # found through $JAXMEM_DATA


def test_unwritable_data_dir_falls_back_to_default_cache(tmp_path, isolated_home):
    spec = cifar.CIFAR10
    files = fake_cifar(spec)
    write_cifar_tarball(spec, files, tmp_path / "data")
    # A file where the cache folder should go makes the data dir unusable for caching (works
    # even as root, unlike chmod).
    (tmp_path / "data" / locate.CACHE_FOLDER).write_text("not a folder")
    ds = cifar.load_cifar10(str(tmp_path / "data"))
    check_cifar(ds, spec, files)
    fallback = list((isolated_home / ".cache" / "jaxmem" / locate.CACHE_FOLDER).glob("cifar10-*"))
    assert len(fallback) == 1 and (fallback[0] / "meta.json").is_file()
    assert isinstance(cifar.load_cifar10(str(tmp_path / "data")).x_train, np.memmap)


def test_a_full_disk_moves_the_cache_elsewhere_or_into_memory(small_disk, isolated_home,
                                                              monkeypatch, caplog):
    """The decoded arrays are memory-mapped files: on a full disk their first page without a
    block would kill the process (SIGBUS). The room is taken first, so a full disk is one
    warning naming the file, and the data load from the next cache folder, or from memory."""
    spec = cifar.CIFAR10
    files = fake_cifar(spec)
    data = os.path.join(small_disk, "data")
    write_cifar_tarball(spec, files, Path(data))
    fill(small_disk, 8192)  # the cache's folders fit, its arrays do not
    ds = cifar.load_cifar10(data)
    check_cifar(ds, spec, files)
    full = [r.getMessage() for r in caplog.records if "no space left on device" in r.getMessage()]
    assert len(full) == 1 and os.path.join(data, locate.CACHE_FOLDER, "cifar10") in full[0]
    assert temporaries(small_disk) == []
    fallback = list((isolated_home / ".cache" / "jaxmem" / locate.CACHE_FOLDER).glob("cifar10-*"))
    assert len(fallback) == 1 and (fallback[0] / "meta.json").is_file()

    monkeypatch.setenv("HOME", os.path.join(small_disk, "home"))  # both places full
    caplog.clear()
    ds = cifar.load_cifar10(data)
    check_cifar(ds, spec, files)
    assert not isinstance(ds.x_train, np.memmap)
    assert any("keeping the data in memory" in r.getMessage() for r in caplog.records)
    assert [path for path in temporaries(small_disk) if not os.path.isdir(path)] == []


def test_missing_data_says_what_to_place_where(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as error:
        jaxmem.data.load("cifar10", data_dir=str(empty))
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and str(empty) in message
    assert "\n" not in message
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        jaxmem.data.load("cifar100", data_dir=str(empty))
    with pytest.raises(UserError, match="tiny-imagenet-200.zip"):
        jaxmem.data.load("tiny_imagenet", data_dir=str(empty))
    assert list(empty.iterdir()) == []  # nothing downloaded or created


def test_corrupt_archives_name_the_bad_file(tmp_path):
    spec = cifar.CIFAR10
    good = write_cifar_tarball(spec, fake_cifar(spec), tmp_path / "good").read_bytes()

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / spec.archive).write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=rf"{truncated / spec.archive}.*corrupt"):
        cifar.load_cifar10(str(truncated))
    assert sorted(p.name for p in truncated.iterdir()) == [spec.archive]  # no cache debris

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / spec.archive).write_bytes(b"this is not a gzip file at all" * 10)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        cifar.load_cifar10(str(garbage))

    # A folder whose batch is not a pickle, and one whose pickle tries to call os.system.
    files = fake_cifar(spec)
    top = write_cifar_folder(spec, files, tmp_path / "folder")
    (top / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="data_batch_3"):
        cifar.load_cifar10(str(tmp_path / "folder"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    (top / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(UserError, match="data_batch_3.*not a readable CIFAR batch"):
        cifar.load_cifar10(str(tmp_path / "folder"))

    (top / "data_batch_3").unlink()  # incomplete folder, no archive
    with pytest.raises(UserError, match="incomplete.*data_batch_3"):
        cifar.load_cifar10(str(tmp_path / "folder"))


# ------------------------------------------------------------------------ Tiny ImageNet fakes

WNIDS = ["n01443537", "n01629819", "n01641577"]
TRAIN_NUMBERS = [0, 1, 10, 2]  # sorted as strings: _0, _1, _10, _2


def colour_image(colour, gray=False) -> Image.Image:
    """A 64x64 image of one colour (JPEG keeps flat colours almost exactly)."""
    if gray:
        return Image.new("L", (64, 64), int(colour[0]))
    return Image.new("RGB", (64, 64), tuple(int(c) for c in colour))


def fake_tiny_imagenet(root: Path) -> dict:
    """A `tiny-imagenet-200` tree in `root`; returns the expected colours in dataset order."""
    top = root / tiny_imagenet.FOLDER
    (top / "val" / "images").mkdir(parents=True)
    (top / "test" / "images").mkdir(parents=True)  # unlabelled official test split: ignored
    (top / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    colours = {}
    for label, wnid in enumerate(WNIDS):
        folder = top / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in TRAIN_NUMBERS:
            colour = (40 * label + 10 * k + 20, 200 - 30 * label, 15 * k + 50)
            gray = label == 1 and k == 10
            if gray:
                colour = (90, 90, 90)
            colour_image(colour, gray).save(folder / f"{wnid}_{k}.JPEG", quality=95)
            colours[(label, k)] = colour
    val_labels = [2, 0, 1, 0, 2]
    lines = []
    for i, label in enumerate(val_labels):
        colour = (30 * i + 10, 100, 250 - 40 * i)
        colour_image(colour).save(top / "val" / "images" / f"val_{i}.JPEG", quality=95)
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
        colours[("val", i)] = colour
    colour_image((1, 2, 3)).save(top / "test" / "images" / "test_0.JPEG")
    # Annotation lines out of file-name order: the test split follows this file.
    order = [3, 0, 4, 1, 2]
    (top / "val" / "val_annotations.txt").write_text("".join(lines[i] + "\n" for i in order))
    return {"colours": colours, "val_order": order, "val_labels": val_labels}


def check_tiny(ds, fake):
    n_train = len(WNIDS) * len(TRAIN_NUMBERS)
    assert ds.x_train.shape == (n_train, 64, 64, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (5, 64, 64, 3) and ds.x_test.dtype == np.uint8
    assert ds.num_classes == len(WNIDS) and ds.flip is True and ds.translate == 8
    sorted_numbers = sorted(TRAIN_NUMBERS, key=str)  # 0, 1, 10, 2
    expected_labels, expected_colours = [], []
    for label in range(len(WNIDS)):
        for k in sorted_numbers:
            expected_labels.append(label)
            expected_colours.append(fake["colours"][(label, k)])
    np.testing.assert_array_equal(ds.y_train, expected_labels)
    assert ds.y_train.dtype == np.int32
    mean_colours = ds.x_train.reshape(n_train, -1, 3).mean(axis=1)
    np.testing.assert_allclose(mean_colours, expected_colours, atol=3)
    gray = ds.x_train[len(sorted_numbers) + sorted_numbers.index(10)]  # class 1, file _10
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    np.testing.assert_array_equal(ds.original_index, np.arange(n_train))
    np.testing.assert_array_equal(ds.y_test, [fake["val_labels"][i] for i in fake["val_order"]])
    test_colours = ds.x_test.reshape(5, -1, 3).mean(axis=1)
    np.testing.assert_allclose(test_colours, [fake["colours"][("val", i)]
                                              for i in fake["val_order"]], atol=3)
    assert (ds.mean, ds.std) == NORMALIZATION["tiny_imagenet"]


def test_tiny_imagenet_folder_and_zip(tmp_path, monkeypatch):
    fake = fake_tiny_imagenet(tmp_path / "folder")
    ds = jaxmem.data.load("tiny_imagenet", data_dir=str(tmp_path / "folder"))
    check_tiny(ds, fake)
    assert (tmp_path / "folder" / locate.CACHE_FOLDER / "tiny_imagenet" / "meta.json").is_file()

    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / tiny_imagenet.ARCHIVE, "w") as archive:
        for path in sorted((tmp_path / "folder" / tiny_imagenet.FOLDER).rglob("*")):
            archive.write(path, path.relative_to(tmp_path / "folder"))
    from_zip = tiny_imagenet.load(str(zipped))
    np.testing.assert_array_equal(from_zip.x_train, ds.x_train)
    np.testing.assert_array_equal(from_zip.x_test, ds.x_test)
    np.testing.assert_array_equal(from_zip.y_test, ds.y_test)

    monkeypatch.setattr(tiny_imagenet, "_decode", lambda *a: pytest.fail("decoded twice"))
    second = tiny_imagenet.load(str(tmp_path / "folder"))
    assert isinstance(second.x_train, np.memmap)
    np.testing.assert_array_equal(second.x_train, ds.x_train)
    np.testing.assert_array_equal(second.y_train, ds.y_train)


def test_tiny_imagenet_bad_files_are_named(tmp_path):
    fake_tiny_imagenet(tmp_path)
    top = tmp_path / tiny_imagenet.FOLDER
    bad = top / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.JPEG"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(UserError, match=f"{WNIDS[2]}_1.JPEG"):
        tiny_imagenet.load(str(tmp_path))
    bad.unlink()
    (top / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(UserError, match="val_4.JPEG.*missing"):
        tiny_imagenet.load(str(tmp_path))

    (tmp_path / "z").mkdir()
    (tmp_path / "z" / tiny_imagenet.ARCHIVE).write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(UserError, match="tiny-imagenet-200.zip.*corrupt"):
        tiny_imagenet.load(str(tmp_path / "z"))


# ----------------------------------------------------------------------------------- TFDS


def prepare_tfds(spec, files, tfds_dir: Path, tmp_path: Path):
    """Prepare a real TFDS data_dir (array_record) with TFDS's own cifar builder, offline.

    The builder reads the official *binary* CIFAR files; those are written from the same fake
    arrays. Two TensorFlow-only steps are swapped: the download manager (returns the local
    folder) and the `.bin` reader, which here yields PNG bytes (encoded by Pillow) instead of
    arrays TFDS would encode with TensorFlow. IDs, keys, shuffling and the shard format are
    TFDS's own.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar as tfds_cifar

    extracted = tmp_path / "tfds-src"
    if spec is cifar.CIFAR10:
        binary = extracted / "cifar-10-batches-bin"
        names = {f: f + ".bin" for f in spec.train_files + spec.test_files}
        label_files = {"batches.meta.txt": 10}
    else:
        binary = extracted / "cifar-100-binary"
        names = {"train": "train.bin", "test": "test.bin"}
        label_files = {"coarse_label_names.txt": 20, "fine_label_names.txt": 100}
    binary.mkdir(parents=True)
    for name, bin_name in names.items():
        f = files[name]
        labels = [f["labels"][:, None]]
        if f["coarse"] is not None:
            labels.insert(0, f["coarse"][:, None])
        rows = np.concatenate([np.concatenate(labels, 1).astype(np.uint8), f["batch"][b"data"]], 1)
        rows.tofile(binary / bin_name)
    for label_file, count in label_files.items():
        (binary / label_file).write_text("\n".join(f"name{i}" for i in range(count)) + "\n")

    def load_data_as_png(path, labels_number=1):
        rows = np.fromfile(path, np.uint8).reshape(-1, labels_number + 3072)
        for row in rows:
            image = row[labels_number:].reshape(3, 32, 32).transpose(1, 2, 0)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            yield row[:labels_number], buffer.getvalue()

    class LocalDownloads:
        downloaded_size = 0

        @staticmethod
        def download_and_extract(url):
            return os.fspath(extracted)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.core.DatasetBuilder, "_make_download_manager",
                      lambda self, **kwargs: LocalDownloads())
        patch.setattr(tfds_cifar, "_load_data", load_data_as_png)
        builder = tfds.builder(spec.name, data_dir=os.fspath(tfds_dir),
                               file_format="array_record")
        builder.download_and_prepare()
    return tfds


@pytest.mark.parametrize("spec", [cifar.CIFAR10, cifar.CIFAR100], ids=lambda s: s.name)
def test_tfds_data_dir_matches_official_order(spec, tmp_path, monkeypatch):
    files = fake_cifar(spec, seed=2)
    tfds = prepare_tfds(spec, files, tmp_path / "tfds", tmp_path)
    # TFDS stores the examples shuffled; the loader must undo that.
    stored = tfds.builder(spec.name, data_dir=str(tmp_path / "tfds")).as_data_source("train")
    stored_ids = [record["id"] for record in stored.__getitems__(list(range(len(stored))))]
    assert stored_ids != sorted(stored_ids)

    ds = jaxmem.data.load(f"tfds:{spec.name}", data_dir=str(tmp_path / "tfds"))
    check_cifar(ds, spec, files)
    write_cifar_tarball(spec, files, tmp_path / "tar")
    from_tarball = cifar.load_cifar(spec, str(tmp_path / "tar"))
    for key in ("x_train", "y_train", "x_test", "y_test", "original_index"):
        np.testing.assert_array_equal(getattr(ds, key), getattr(from_tarball, key))

    monkeypatch.setattr(tfds_source, "_decode", lambda *a: pytest.fail("decoded twice"))
    second = jaxmem.data.load(f"tfds:{spec.name}", data_dir=str(tmp_path / "tfds"))
    assert isinstance(second.x_train, np.memmap)
    np.testing.assert_array_equal(second.x_train, ds.x_train)


def test_tfds_missing_data_message(tmp_path):
    with pytest.raises(UserError, match=rf"no prepared TFDS dataset in {tmp_path}.*array_record"):
        jaxmem.data.load("tfds:cifar10", data_dir=str(tmp_path))
