"""CIFAR-10/100 from a prepared TensorFlow Datasets data_dir, read without TensorFlow.

Registry names: `tfds:cifar10`, `tfds:cifar100` (optional extra: `pip install 'jaxmem[tfds]'`).
The data dir (`--data-dir`, else `$JAXMEM_DATA`, else `~/.cache/jaxmem`) is a TFDS data_dir holding
`cifar10/<version>/` (or a `tensorflow_datasets/` folder that does), prepared once in the
`array_record` file format, e.g. on a machine with TensorFlow:
`tfds.builder("cifar10", data_dir=DIR, file_format="array_record").download_and_prepare()`.
A data_dir prepared as TFRecord can be converted with
`tfds convert_format --dataset_dir=DIR/cifar10 --out_file_format=array_record`.

Reading uses `builder.as_data_source()` (random access over array_record; images decoded with
Pillow), which needs neither TensorFlow nor a download. TFDS stores the examples shuffled; its
`id` feature (`train_16399`) is the example's position in the official CIFAR files, so the arrays
are put back into that order: the result equals, array for array, the `cifar10` / `cifar100`
sources built from the official tarballs, and `original_index` is the identity. CIFAR-100 uses
the fine labels (TFDS's `label`). Default augmentation as for the tarballs: flip, 4 px translate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from jaxmem.data import cifar, locate
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

SPLITS = ("train", "test")
READ_CHUNK = 1024  # records per `__getitems__` call
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def load_cifar10(data_dir: str | None = None) -> Dataset:
    """CIFAR-10 from a TFDS data_dir, in the official order."""
    return load_tfds_cifar("cifar10", 10, data_dir)


def load_cifar100(data_dir: str | None = None) -> Dataset:
    """CIFAR-100 (fine labels) from a TFDS data_dir, in the official order."""
    return load_tfds_cifar("cifar100", 100, data_dir)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise UserError(
            f"the tfds:* datasets need tensorflow-datasets and array-record: "
            f"pip install 'jaxmem[tfds]' ({error})"
        ) from error
    return tfds


def _find_builder(tfds, name: str, root: Path):
    """A prepared TFDS builder for `name` under `root` (or `root/tensorflow_datasets`)."""
    for tfds_dir in (root, root / "tensorflow_datasets"):
        if not (tfds_dir / name).is_dir():
            continue
        builder = tfds.builder(name, data_dir=os.fspath(tfds_dir))
        if builder.is_prepared():
            return builder
        # Another version than this TFDS release's code: read it from its own metadata.
        versions = sorted(
            (p for p in (tfds_dir / name).iterdir()
             if _VERSION.match(p.name) and (p / "dataset_info.json").is_file()),
            key=lambda p: tuple(int(v) for v in p.name.split(".")))
        if versions:
            return tfds.builder_from_directory(os.fspath(versions[-1]))
    raise UserError(
        f"tfds:{name}: no prepared TFDS dataset in {root}: expected {root / name}/<version>/ "
        f"with dataset_info.json and array_record shards; prepare it once where TensorFlow is "
        f"installed with tfds.builder({name!r}, data_dir=DIR, file_format='array_record')"
        f".download_and_prepare() and copy DIR/{name} into {root}; nothing is downloaded here"
    )


def load_tfds_cifar(name: str, num_classes: int, data_dir: str | None = None) -> Dataset:
    """Load TFDS `name` (cifar10 / cifar100) from a TFDS data_dir, in the official order."""
    tfds = _import_tfds()
    root = locate.data_dir(data_dir)
    builder = _find_builder(tfds, name, root)
    version_dir = Path(os.fspath(builder.data_path))
    files = sorted(p for p in version_dir.iterdir() if p.is_file())
    arrays, meta = locate.cached_arrays(
        f"tfds-{name}", root, locate.fingerprint(files, extra=f"tfds:{name}"),
        lambda writer: _decode(builder, name, num_classes, writer))
    return Dataset(name, arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   num_classes, *normalization(name, 3), flip=cifar.FLIP,
                   translate=cifar.TRANSLATE, original_index=arrays["original_index"])


def _decode(builder, name: str, num_classes: int, writer: locate.ArrayWriter) -> dict:
    where = os.fspath(builder.data_path)
    try:
        sources = builder.as_data_source(split=list(SPLITS))
    except ImportError as error:
        raise UserError(f"tfds:{name}: reading needs array-record: pip install "
                        f"'jaxmem[tfds]' ({error})") from error
    except (NotImplementedError, ValueError) as error:
        raise UserError(
            f"tfds:{name}: {where} cannot be read without TensorFlow ({error}); convert it "
            f"with tfds convert_format --dataset_dir=<data_dir>/{name} "
            f"--out_file_format=array_record"
        ) from error
    stored = {}
    for split, source in zip(SPLITS, sources, strict=True):
        stored[split] = _read_split(source, split, name, num_classes, where, writer)
    writer.put("original_index", np.arange(len(stored["train"]), dtype=np.int64))
    return {"tfds_version": str(builder.info.version)}


def _read_split(source, split, name, num_classes, where, writer) -> np.ndarray:
    """Read one split into `x_{split}`/`y_{split}`, each example at its official position."""
    count = len(source)
    shape = (cifar.IMAGE_SIZE, cifar.IMAGE_SIZE, 3)
    images = writer.empty(f"x_{split}", (count, *shape), np.uint8)
    labels = np.full(count, -1, np.int32)
    prefix = f"{split}_"
    for start in range(0, count, READ_CHUNK):
        keys = list(range(start, min(start + READ_CHUNK, count)))
        try:
            records = source.__getitems__(keys)
        except Exception as error:  # array_record/protobuf/Pillow errors all mean a bad shard
            raise UserError(
                f"tfds:{name}: cannot read records {keys[0]}..{keys[-1]} of the {split} split "
                f"in {where} ({error}); the data looks corrupt") from error
        for record in records:
            example_id = record["id"]
            example_id = example_id.decode() if isinstance(example_id, bytes) else str(example_id)
            digits = example_id.removeprefix(prefix)
            if digits == example_id or not digits.isdigit() or int(digits) >= count:
                raise UserError(f"tfds:{name}: unexpected example id {example_id!r} in the "
                                f"{split} split in {where} (expected {prefix}00000..{count - 1})")
            index = int(digits)
            if labels[index] >= 0:
                raise UserError(f"tfds:{name}: example id {example_id!r} repeats in {where}")
            image = np.asarray(record["image"])
            label = int(record["label"])
            if image.shape != shape or image.dtype != np.uint8 or not 0 <= label < num_classes:
                raise UserError(f"tfds:{name}: example {example_id!r} in {where} has image "
                                f"{image.dtype} {image.shape} and label {label}")
            images[index] = image
            labels[index] = label
    if (labels < 0).any():
        raise UserError(f"tfds:{name}: the {split} split in {where} lacks "
                        f"{int((labels < 0).sum())} example ids")
    writer.put(f"y_{split}", labels)
    return images
