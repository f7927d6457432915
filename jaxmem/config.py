"""`Config`: the single source of a run's settings. The CLI only fills it; config.json records it."""

from __future__ import annotations

import dataclasses

from jaxmem.errors import UserError


@dataclasses.dataclass(frozen=True)
class Config:
    # what to train
    arch: str = "tiny_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    # the ensemble
    num_models: int = 32
    subset_ratio: float = 0.7
    seed: int = 0
    # optimisation (the paper: SGD + momentum, triangular schedule peaking at 0.4, wd 5e-4, b 512)
    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.4
    lr_peak_fraction: float = 0.25  # share of training spent warming up to the peak
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # augmentation; None = the dataset's default
    flip: bool | None = None
    translate: int | None = None
    # evaluation: every `eval_every` epochs, and always the last
    eval_every: int = 5
    eval_batch_size: int = 1024
    threshold: float = 0.25
    min_count: int = 5
    # execution (does not change results beyond float rounding)
    models_per_wave: int = 0  # 0 = all models in one wave
    conv_impl: str = "auto"  # "auto" = the measured best for the backend (jaxmem/train/lowering.py)
    dtype: str = "float32"

    def __post_init__(self):
        if not 0.0 < self.subset_ratio < 1.0:
            raise UserError(f"--subset-ratio must be in (0, 1), got {self.subset_ratio}")
        for name in ("num_models", "epochs", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.models_per_wave < 0:
            raise UserError(f"--models-per-wave must be >= 0, got {self.models_per_wave}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError("--lr must be > 0, --weight-decay >= 0 and --momentum in [0, 1)")
        if not 0.0 <= self.lr_peak_fraction <= 1.0:
            raise UserError(f"--lr-peak-fraction must be in [0, 1], got {self.lr_peak_fraction}")
        if self.translate is not None and self.translate < 0:
            raise UserError(f"--translate must be >= 0, got {self.translate}")

    def eval_epochs(self) -> list[int]:
        """1-based epochs after which every model is evaluated (always includes the last)."""
        epochs = set(range(self.eval_every, self.epochs + 1, self.eval_every))
        return sorted(epochs | {self.epochs})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
