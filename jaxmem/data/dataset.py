"""The `Dataset` record every source returns."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxmem.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels of one dataset, in the order the scores will be indexed by.

    x_train: [N, H, W, Ch] uint8      y_train: [N] int32
    x_test:  [N_test, H, W, Ch] uint8 y_test:  [N_test] int32
    mean, std: per-channel constants in [0, 1] units that normalise inputs (`normalization`).
    flip, translate: the default augmentation (horizontal flip; shift by up to `translate` px).
    original_index: [N] int64, position of each training example in the official file order.
    subpop_size: [N] int64 or None; ground-truth sub-population size (synthetic data only).
    file_names: [N] str or None; each training example's file (sources that read image files),
      so a score can be traced back to the image it belongs to.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    translate: int
    original_index: np.ndarray | None = None
    subpop_size: np.ndarray | None = None
    file_names: np.ndarray | None = None

    def __post_init__(self):
        if self.original_index is None:
            object.__setattr__(self, "original_index", np.arange(len(self.y_train)))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


# Input normalisation constants (per channel, in [0, 1] units), fixed per dataset and never
# computed from the images a run trains on, so a held-out image cannot change any model's input
# scaling. CIFAR, Tiny ImageNet, MNIST and Fashion-MNIST: the usual published training-set
# statistics (Fashion-MNIST's checked on the official files: 0.28604, 0.35302); digits: the
# statistics of all 1,797 images, computed once; anything else (a user's file or folder,
# synthetic data): GENERIC_MEAN and GENERIC_STD in every channel.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "digits": ((0.3053,), (0.3759,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
GENERIC_MEAN, GENERIC_STD = 0.5, 0.25


def normalization(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for dataset `name` with `channels` channels."""
    if name in NORMALIZATION and len(NORMALIZATION[name][0]) == channels:
        return NORMALIZATION[name]
    return (GENERIC_MEAN,) * channels, (GENERIC_STD,) * channels


def validate_arrays(name: str, x_train, y_train, x_test, y_test) -> tuple[np.ndarray, ...]:
    """Check and normalise array shapes/dtypes; [N, H, W] images gain a channel axis.

    Raises UserError naming the problem.
    """
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for key in ("x_train", "x_test"):
        x = np.asarray(arrays[key])
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise UserError(f"{name}: {key} must be [N,H,W,C] or [N,H,W], got shape {x.shape}")
        if x.dtype != np.uint8:
            raise UserError(f"{name}: {key} must be uint8 images, got dtype {x.dtype}")
        arrays[key] = x
    for key in ("y_train", "y_test"):
        y = np.asarray(arrays[key])
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{name}: {key} must be a 1-d integer array, got {y.dtype} {y.shape}")
        if y.size and y.min() < 0:
            raise UserError(f"{name}: {key} has negative labels")
        arrays[key] = y.astype(np.int32)
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise UserError(f"{name}: x_{split} has {nx} images but y_{split} has {ny} labels")
        if nx == 0:
            raise UserError(f"{name}: the {split} split is empty")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(
            f"{name}: train images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in shape"
        )
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
