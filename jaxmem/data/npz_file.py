"""A user's own arrays: an .npz file with x_train, y_train, x_test, y_test."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from jaxmem.data.dataset import Dataset, normalization, validate_arrays
from jaxmem.errors import UserError

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise UserError(f"dataset file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in REQUIRED_KEYS if k not in archive.files]
            if missing:
                raise UserError(
                    f"{path}: missing keys {', '.join(missing)} (needs {', '.join(REQUIRED_KEYS)})"
                )
            arrays = {k: archive[k] for k in REQUIRED_KEYS}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable .npz file ({err})") from None
    x_train, y_train, x_test, y_test = validate_arrays(path, **arrays)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    name = os.path.splitext(os.path.basename(path))[0]
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes,
                   *normalization("", x_train.shape[-1]),
                   flip=False, translate=0)
