"""Any image classification dataset from a prepared TensorFlow Datasets data_dir, read without
TensorFlow: `tfds:NAME` and `tfds:NAME/CONFIG` (optional extra: `pip install 'jaxmem[tfds]'`).

The data dir (`--data-dir`, else `$JAXMEM_DATA`, else `~/.cache/jaxmem`) is a TFDS data_dir
holding `NAME/<version>/` or `NAME/CONFIG/<version>/` (or a `tensorflow_datasets/` folder that
does), prepared once in the `array_record` file format, e.g. on a machine with TensorFlow:
`tfds.builder("mnist", data_dir=DIR, file_format="array_record").download_and_prepare()`.
A data_dir prepared as TFRecord can be converted with
`tfds convert_format --dataset_dir=DIR/mnist --out_file_format=array_record`. The newest version
present is read, from its own metadata (`dataset_info.json`): no dataset code, no download.

Features: the image is the dataset's `supervised_keys` input when that is an `Image` feature,
else its only `Image` feature; the label likewise its `ClassLabel` target, else its only
`ClassLabel`. Splits: `train`, and `test` or the split named by `--test-split` (e.g.
`validation`). Images are read undecoded (`as_data_source` with TFDS's `SkipDecoding`) and
decoded by `jaxmem.data.images`, the rule of every image source: grayscale stays 1 channel, other
images become RGB; one size for all, or `--image-size N`.

Order: TFDS stores examples shuffled. Where it records the original order, it is restored: an
`id` feature of the form `train_16399` (CIFAR's) is the example's position in the official
files, so `tfds:cifar10` equals, array for array, the `cifar10` source built from the official
tarballs; a dataset prepared with shuffling disabled is stored in its original order. Otherwise
the order is TFDS's stored one, fixed by the prepared files. A `file_name` feature (or an `id`
that is not a position) becomes the examples' `file_names`. Known datasets keep their own input
constants and augmentation (CIFAR: flips and 4 px shifts; MNIST family: 2 px shifts, no flips);
any other is scaled by the generic constants and not augmented by default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from jaxmem.data import cifar, images, locate, mnist
from jaxmem.data.dataset import Dataset, normalization
from jaxmem.errors import UserError

PREFIX = "tfds:"
TRAIN_SPLIT, DEFAULT_TEST_SPLIT = "train", "test"
READ_CHUNK = 1024  # records per `__getitems__` call
NAME_FEATURES = ("file_name", "id")  # text features that name an example, first found wins
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
# name -> (flip, translate) for datasets with a known default augmentation
AUGMENTATION = {
    "cifar10": (cifar.FLIP, cifar.TRANSLATE),
    "cifar100": (cifar.FLIP, cifar.TRANSLATE),
    "mnist": (mnist.FLIP, mnist.TRANSLATE),
    "fashion_mnist": (mnist.FLIP, mnist.TRANSLATE),
}


def load(spec: str, data_dir: str | None = None, test_split: str | None = None,
         image_size: int | None = None) -> Dataset:
    """Load `tfds:NAME[/CONFIG]` (`spec` without the prefix) from a TFDS data_dir."""
    where = f"{PREFIX}{spec}"
    name, _, config = spec.partition("/")
    if not name or "/" in config:
        raise UserError(f"{where}: give tfds:NAME or tfds:NAME/CONFIG")
    tfds = _import_tfds()
    root = locate.data_dir(data_dir)
    version_dir = _find_version_dir(name, config, root, where)
    builder = tfds.builder_from_directory(os.fspath(version_dir))
    image_key, label_key = _feature_keys(tfds, builder.info, where)
    splits = _splits(builder.info, test_split, where)
    files = sorted(p for p in version_dir.iterdir() if p.is_file())
    cache = "-".join(["tfds", name, *([config] if config else []),
                      *([f"{image_size}px"] if image_size else []), splits[1]])
    arrays, _ = locate.cached_arrays(
        cache, root, locate.fingerprint(files, extra=f"{where}\n{splits}\n{image_size}"),
        lambda writer: _decode(tfds, builder, (image_key, label_key), splits, image_size, where,
                               writer))
    flip, translate = AUGMENTATION.get(name, (False, 0))
    return Dataset(spec, arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], builder.info.features[label_key].num_classes,
                   *normalization(name, arrays["x_train"].shape[-1]), flip=flip,
                   translate=translate, original_index=arrays["original_index"],
                   file_names=arrays.get("file_names"))


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise UserError(
            f"the tfds:* datasets need tensorflow-datasets and array-record: "
            f"pip install 'jaxmem[tfds]' ({error})"
        ) from error
    return tfds


def _versions(folder: Path) -> list[Path]:
    """Prepared version folders in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if _VERSION.match(p.name) and (p / "dataset_info.json").is_file()]
    return sorted(found, key=lambda p: tuple(int(v) for v in p.name.split(".")))


def _find_version_dir(name: str, config: str, root: Path, where: str) -> Path:
    """The newest prepared `name[/config]/<version>/` under `root` (or its tensorflow_datasets/)."""
    for tfds_dir in (root, root / "tensorflow_datasets"):
        folder = tfds_dir / name
        if not folder.is_dir():
            continue
        versions = _versions(folder / config if config else folder)
        if versions:
            return versions[-1]
        configs = sorted(p.name for p in folder.iterdir() if _versions(p))
        if configs:
            raise UserError(f"{where}: {folder} holds the configs {', '.join(configs)}"
                            + (f", not {config!r}" if config else "")
                            + f": give tfds:{name}/CONFIG")
    raise UserError(
        f"{where}: no prepared TFDS dataset in {root}: expected {root / name}/<version>/ "
        f"with dataset_info.json and array_record shards; prepare it once where TensorFlow is "
        f"installed with tfds.builder({name!r}, data_dir=DIR, file_format='array_record')"
        f".download_and_prepare() and copy DIR/{name} into {root}; nothing is downloaded here"
    )


def _feature_keys(tfds, info, where: str) -> tuple[str, str]:
    """(image feature, label feature): supervised_keys if they name an Image and a ClassLabel,
    else the only Image and the only ClassLabel feature."""
    features = dict(info.features.items())
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    label_keys = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    supervised = info.supervised_keys
    if (isinstance(supervised, tuple) and len(supervised) == 2
            and supervised[0] in image_keys and supervised[1] in label_keys):
        keys = supervised
    elif len(image_keys) == 1 and len(label_keys) == 1:
        keys = image_keys[0], label_keys[0]
    else:
        listed = ", ".join(f"{k} ({type(f).__name__})" for k, f in sorted(features.items()))
        raise UserError(f"{where}: cannot tell the image and the label apart: an image "
                        f"classification dataset has one Image and one ClassLabel feature (or "
                        f"supervised_keys naming them); this one has {listed}")
    if features[keys[0]].np_dtype != np.uint8:
        raise UserError(f"{where}: the image feature {keys[0]!r} holds "
                        f"{np.dtype(features[keys[0]].np_dtype).name} images, not uint8")
    return keys


def _splits(info, test_split: str | None, where: str) -> tuple[str, str]:
    """(train split, test split), both present in the prepared data."""
    available = list(info.splits)
    test = test_split or DEFAULT_TEST_SPLIT
    if TRAIN_SPLIT not in available:
        raise UserError(f"{where}: no {TRAIN_SPLIT!r} split to train on; it has "
                        f"{', '.join(available)}")
    if test == TRAIN_SPLIT or test not in available:
        raise UserError(f"{where}: no split {test!r} to test on besides {TRAIN_SPLIT!r}; it has "
                        f"{', '.join(available)}: choose one with --test-split")
    return TRAIN_SPLIT, test


def _data_sources(tfds, builder, image_key: str, splits: tuple[str, str], where: str) -> list:
    """Random-access sources of the splits, images left undecoded (bytes)."""
    try:
        return builder.as_data_source(split=list(splits),
                                      decoders={image_key: tfds.decode.SkipDecoding()})
    except ImportError as error:
        raise UserError(f"{where}: reading needs array-record: pip install "
                        f"'jaxmem[tfds]' ({error})") from error
    except (NotImplementedError, ValueError) as error:
        raise UserError(
            f"{where}: {builder.data_path} cannot be read without TensorFlow ({error}); convert "
            f"it with tfds convert_format --dataset_dir=<data_dir>/{builder.name} "
            f"--out_file_format=array_record"
        ) from error


def _read_records(source, split: str, where: str, place: str):
    """Yield (first index, records) chunk by chunk; unreadable shards are named."""
    count = len(source)
    for start in range(0, count, READ_CHUNK):
        keys = list(range(start, min(start + READ_CHUNK, count)))
        try:
            records = source.__getitems__(keys)
        except (OSError, RuntimeError) as error:
            # array_record reports every failure as RuntimeError: "open() failed: <reason>" for
            # a missing or unreadable shard, a checksum mismatch or a short file otherwise.
            message = " ".join(str(error).split())
            detail = (f"cannot open a shard ({message})"
                      if isinstance(error, OSError) or "open() failed" in message else
                      f"unreadable ({message}); the data looks corrupt: prepare or copy it again")
            raise UserError(f"{where}: records {keys[0]}..{keys[-1]} of the {split} split in "
                            f"{place}: {detail}") from error
        yield start, records


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _positions(ids: list[str], split: str) -> np.ndarray | None:
    """Positions in the official files from ids `<split>_<n>` (CIFAR's), if every id is one
    and they number 0..count-1 exactly once; else None."""
    prefix = f"{split}_"
    numbers = [i.removeprefix(prefix) for i in ids]
    if not all(i.startswith(prefix) and n.isdigit() for i, n in zip(ids, numbers, strict=True)):
        return None
    positions = np.asarray([int(n) for n in numbers], np.int64)
    if not np.array_equal(np.sort(positions), np.arange(len(ids))):
        return None
    return positions


def _decode(tfds, builder, keys: tuple[str, str], splits: tuple[str, str],
            image_size: int | None, where: str, writer: locate.ArrayWriter) -> dict:
    image_key, label_key = keys
    features = builder.info.features
    num_classes = features[label_key].num_classes
    name_key = next((k for k in NAME_FEATURES if k in features), None)
    sources = _data_sources(tfds, builder, image_key, splits, where)
    place = os.fspath(builder.data_path)
    # Pass 1: labels, names and image headers (no pixels decoded), to fix shape and order.
    scanned = {}
    for split, source in zip(splits, sources, strict=True):
        labels, names, headers = [], [], []
        for start, records in _read_records(source, split, where, place):
            for offset, record in enumerate(records):
                label = int(record[label_key])
                if not 0 <= label < num_classes:
                    raise UserError(f"{where}: example {start + offset} of the {split} split "
                                    f"has label {label}, outside 0..{num_classes - 1}")
                labels.append(label)
                if name_key:
                    names.append(_text(record[name_key]))
                headers.append(images.probe(record[image_key], f"{where}: example "
                                            f"{start + offset} of the {split} split"))
        if not labels:
            raise UserError(f"{where}: the {split} split is empty")
        positions = _positions(names, split) if name_key == "id" else None
        order = np.arange(len(labels)) if positions is None else positions
        scanned[split] = (np.asarray(labels, np.int32), names, headers, order, positions is None)
    every = [h for split in splits for h in scanned[split][2]]
    described = [f"example {i} of the {split} split"
                 for split in splits for i in range(len(scanned[split][2]))]
    channels = images.channels_of(every)
    size = images.common_size(every, described, image_size, where)
    # Pass 2: decode every image into its position.
    for role, split, source in zip(("train", "test"), splits, sources, strict=True):
        labels, names, _, order, keep_names = scanned[split]
        out = writer.empty(f"x_{role}", (len(labels), *size, channels), np.uint8)
        for start, records in _read_records(source, split, where, place):
            decoded = np.empty((len(records), *size, channels), np.uint8)
            labelled = [(r[image_key], f"{where}: example {start + j} of the {split} split")
                        for j, r in enumerate(records)]
            images.fill(decoded, lambda j, labelled=labelled: images.decode(
                *labelled[j], channels, size, resize=image_size is not None))
            out[order[start:start + len(records)]] = decoded
        stored = np.empty_like(labels)
        stored[order] = labels
        writer.put(f"y_{role}", stored)
        if role == "train":
            writer.put("original_index", np.arange(len(labels), dtype=np.int64))
            if name_key and keep_names:  # names that are not positions, in the stored order
                writer.put("file_names", np.asarray(names))
    return {"tfds_version": str(builder.info.version), "features": list(keys)}
