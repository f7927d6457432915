"""`Config`: the single source of a run's settings. The CLI only fills it (one flag per field,
help text from the field's metadata); config.json records it."""

from __future__ import annotations

import dataclasses

from jaxmem.errors import UserError
from jaxmem.sizes import parse_bytes


def setting(default, help: str):  # noqa: A002 - mirrors argparse's keyword
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    # what to train
    arch: str = setting("tiny_cnn", "architecture (see --list-archs)")
    dataset: str = setting("digits", "dataset: digits, synthetic, mnist, fashion_mnist, cifar10, "
                           "cifar100, tiny_imagenet, tfds:NAME[/CONFIG] (prepared in the data "
                           "dir), folder:PATH (PATH/train/<class>/*, PATH/test/<class>/*), or a "
                           "path to an .npz with x_train, y_train, x_test, y_test")
    data_dir: str | None = setting(None, "folder holding the dataset files")
    download: bool = setting(True, "download a missing dataset archive on first use (MNIST, "
                             "Fashion-MNIST, CIFAR, Tiny ImageNet)")
    test_split: str | None = setting(None, "tfds: datasets: the split to test on (None: 'test')")
    image_size: int | None = setting(None, "tfds: and folder: datasets: resize every image to "
                                     "NxN, bilinear (None: all must share one size)")
    init_from: str | None = setting(None, "timm-layout .safetensors file to initialise a ViT")
    # the ensemble
    num_models: int = setting(32, "K, the number of models (each on its own random subset)")
    subset_ratio: float = setting(0.7, "r, the fraction of the training set in each subset")
    seed: int = setting(0, "seed of masks, inits, augmentation and batch order")
    canaries: int = setting(0, "plant this many training examples with a changed label (from "
                            "the seed; reported apart, left out of the counts) to check that "
                            "the run can detect memorization")
    # optimisation. The paper ("Back to fundamentals: re-examining memorization in deep learning
    # models"): 100 epochs, batch 512, SGD with momentum, a triangular (one-cycle) schedule
    # peaking at lr 0.4, weight decay 5e-4; these are the defaults (the CLI takes small
    # datasets' epochs, batch, lr and evaluation interval from jaxmem/recipes.py). Ours:
    # Nesterov momentum 0.9, the peak after 25% of training.
    epochs: int = setting(100, "training epochs")
    pilot: bool = setting(True, "where the small-data recipe chooses the epochs, first train "
                          "the run's first models at doubling lengths until they fit "
                          "(--fit-threshold) and train that long (jaxmem/train/pilot.py)")
    batch_size: int = setting(512, "examples per batch, drawn by each model from its own subset")
    lr: float = setting(0.4, "peak learning rate of the triangular schedule")  # the paper's
    lr_peak_fraction: float = setting(0.25, "share of training spent rising to the peak lr")  # ours
    momentum: float = setting(0.9, "SGD (Nesterov) momentum")  # momentum: paper; Nesterov: ours
    weight_decay: float = setting(5e-4, "L2 weight decay")  # the paper's; coupled (ours): optim.py
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    # augmentation; None = the dataset's default (the paper: flip + translate by 4 px at 32x32;
    # the translation of other sizes is ours, see augment.py)
    flip: bool | None = setting(None, "random horizontal flips (default: the dataset's)")
    translate: int | None = setting(None, "random translation in pixels (default: the dataset's)")
    # evaluation: every `eval_every` epochs, and always the last
    eval_every: int = setting(6, "evaluate every model on all examples every this many epochs")
    eval_batch_size: int = setting(0, "examples per evaluation batch (0: the backend's "
                                   "measured best, see train/lowering.py)")
    recalibrate_bn: bool = setting(True, "recompute each model's BatchNorm statistics on its "
                                   "own subset before every evaluation (running averages lag "
                                   "early in training)")
    threshold: float = setting(0.25, "score above which an example counts as memorized")
    min_count: int = setting(5, "fewer in- or held-out models than this: the score is NaN")
    null_permutations: int = setting(100, "shuffles of membership across models for the "
                                     "noise floor reported next to every memorized count")
    fdr: float = setting(0.05, "false discovery rate of the per-example tests behind the "
                         "memorized_fdr set")
    fit_threshold: float = setting(0.999, "warn when the models' mean accuracy on their own "
                                   "subsets at the last evaluated epoch is below this (and the "
                                   "pilot's target); rare examples are a small share of a "
                                   "subset, so 0.99 can leave all of them unfitted")
    # scale-out and fault tolerance
    model_range: str | None = setting(None, "START:END: train only these models (a job-array "
                                      "part; combine parts with experiments/cluster/merge.py)")
    until_se: float | None = setting(None, "add waves until every score's standard error is "
                                     "below this (or --num-models is reached)")
    checkpoint_seconds: float = setting(300.0, "checkpoint a wave in progress after an epoch "
                                        "once this many seconds passed since its last "
                                        "checkpoint (0: after every epoch)")
    drop_diverged: bool = setting(False, "exclude models whose loss became NaN/inf from the "
                                  "scores instead of stopping the run")
    # execution (changes speed, not results beyond float rounding)
    models_per_wave: int = setting(0, "models trained at once (0 = as many as fit the memory "
                                   "budget: the devices' free memory on GPU/TPU, the host's on "
                                   "CPU)")
    host_memory: str | None = setting(None, "the most host memory this run may hold, e.g. 6G or "
                                      "1.5GiB, on CPU as on GPU/TPU (default: what "
                                      "MemAvailable and the memory cgroup's limit minus its "
                                      "usage leave)")
    conv_impl: str = setting("auto", "convolution lowering: auto, xla or im2col")
    ensemble: str = setting("auto", "model-axis mapping: auto, vmap, vmap:C, map or unroll")
    dtype: str = setting("float32", "compute dtype: float32 or bfloat16 (params stay float32)")

    def __post_init__(self):
        if not 0.0 < self.subset_ratio < 1.0:
            raise UserError(f"--subset-ratio must be in (0, 1), got {self.subset_ratio}")
        if self.eval_batch_size < 0:
            raise UserError(f"--eval-batch-size must be >= 0 (0: auto), got "
                            f"{self.eval_batch_size}")
        for name in ("num_models", "epochs", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.canaries < 0:
            raise UserError(f"--canaries must be >= 0, got {self.canaries}")
        if self.models_per_wave < 0:
            raise UserError(f"--models-per-wave must be >= 0, got {self.models_per_wave}")
        if self.host_memory is not None:
            parse_bytes(self.host_memory)
        if self.min_count < 2:
            raise UserError(f"--min-count must be >= 2 (a standard error needs two in- and two "
                            f"held-out models), got {self.min_count}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise UserError("--lr must be > 0, --weight-decay >= 0 and --momentum in [0, 1)")
        if not 0.0 <= self.lr_peak_fraction <= 1.0:
            raise UserError(f"--lr-peak-fraction must be in [0, 1], got {self.lr_peak_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.null_permutations < 1:
            raise UserError(f"--null-permutations must be >= 1, got {self.null_permutations}")
        if not 0.0 < self.fdr < 1.0:
            raise UserError(f"--fdr must be in (0, 1), got {self.fdr}")
        if not -1.0 < self.threshold < 1.0:  # a score is in [-1, 1]; the test needs a margin
            raise UserError(f"--threshold must be in (-1, 1), got {self.threshold}")
        if not 0.0 < self.fit_threshold <= 1.0:
            raise UserError(f"--fit-threshold must be in (0, 1], got {self.fit_threshold}")
        if self.until_se is not None and self.until_se <= 0:
            raise UserError(f"--until-se must be > 0, got {self.until_se}")
        self.model_indices()  # validates --model-range
        if self.image_size is not None and self.image_size < 1:
            raise UserError(f"--image-size must be >= 1, got {self.image_size}")
        if self.translate is not None and self.translate < 0:
            raise UserError(f"--translate must be >= 0, got {self.translate}")

    def eval_epochs(self) -> list[int]:
        """1-based epochs after which every model is evaluated (always includes the last)."""
        epochs = set(range(self.eval_every, self.epochs + 1, self.eval_every))
        return sorted(epochs | {self.epochs})

    def model_indices(self) -> range:
        """The models this run (or part) trains: all K, or the --model-range START:END."""
        if self.model_range is None:
            return range(self.num_models)
        try:
            start, stop = (int(v) for v in self.model_range.split(":"))
        except ValueError:
            raise UserError(f"--model-range must be START:END, got {self.model_range!r}") from None
        if not 0 <= start < stop <= self.num_models:
            raise UserError(f"--model-range {self.model_range} must satisfy 0 <= START < END <= "
                            f"--num-models ({self.num_models})")
        return range(start, stop)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
