"""Pictures of examples: the most memorized training images per class, and high-influence
train/test pairs. Images come from the dataset registry (they are not in the run directory).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxmem.analysis import stats
from jaxmem.analysis.figures import save
from jaxmem.analysis.influence import InfluencePairs
from jaxmem.errors import UserError
from jaxmem.rundir import Run
from jaxmem.rundir.store import rank_order

CELL_INCHES = 1.1


def load_dataset(run: Run):
    """The run's dataset (`jaxmem.data.load(config["dataset"], config["data_dir"])`), checked
    against the run: same training and test sizes and the same training labels."""
    from jaxmem import data

    dataset = data.load(run.config["dataset"], run.config.get("data_dir"), download=False,
                        test_split=run.config.get("test_split"),
                        image_size=run.config.get("image_size"))
    labels = run.labels
    real = run.real  # canaries carry a changed label
    if dataset.num_train != len(labels) or not np.array_equal(dataset.y_train[real],
                                                              labels[real]):
        raise UserError(f"{run.path}: dataset {run.config['dataset']!r} has "
                        f"{dataset.num_train} training examples whose labels do not match the "
                        f"run's {len(labels)}")
    if dataset.num_test != len(run.test_labels):
        raise UserError(f"{run.path}: dataset {run.config['dataset']!r} has {dataset.num_test} "
                        f"test examples, the run has {len(run.test_labels)}")
    return dataset


def top_per_class(memorization: np.ndarray, labels: np.ndarray, per_class: int,
                  classes: Sequence[int], tiebreak: np.ndarray | None = None
                  ) -> dict[int, np.ndarray]:
    """{class: indices of its `per_class` highest finite scores, highest first; equal scores
    by the higher `tiebreak` (e.g. the margin estimate), then by index}."""
    memorization = np.asarray(memorization, np.float64)
    tiebreak = np.zeros_like(memorization) if tiebreak is None else tiebreak
    result = {}
    for cls in classes:
        members = np.flatnonzero((labels == cls) & np.isfinite(memorization))
        order = rank_order(memorization[members], np.asarray(tiebreak)[members])
        result[int(cls)] = members[order[:per_class]]
    return result


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.uint8)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def mosaic(cells: list[list[tuple[np.ndarray, str] | None]], row_labels: Sequence[str],
           title: str, lines: int = 1) -> Figure:
    """A grid of images drawn as ONE image on one axes, each cell titled above (`lines` lines of
    text) and each row labelled on the left. One axes instead of one per image: a 10 x 6 grid
    renders in a fraction of a second instead of seconds (tight layouts of many axes are slow).

    cells: rows of (image [H, W, Ch] uint8, title) or None (an empty cell).
    """
    shape = next(c[0].shape for row in cells for c in row if c is not None)
    height, width = shape[:2]
    pad = max(1, width // 8)
    inches_per_px = CELL_INCHES / (width + pad)
    band = int(np.ceil((0.05 + 0.13 * lines) / inches_per_px))  # room for the cell titles
    columns = max(len(row) for row in cells)
    cell_h, cell_w = band + height + pad, width + pad
    canvas = np.full((len(cells) * cell_h, columns * cell_w, 3), 255, np.uint8)
    texts = []
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            top, left = r * cell_h + band, c * cell_w
            canvas[top:top + height, left:left + width] = _rgb(cell[0])
            texts.append((left + width / 2 - 0.5, top - 0.7, cell[1]))
    margin = 0.9 if any(row_labels) else 0.1
    fig_w = canvas.shape[1] * inches_per_px + margin + 0.1
    fig_h = canvas.shape[0] * inches_per_px + 0.4
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((margin / fig_w, 0.05 / fig_h, 1 - (margin + 0.1) / fig_w,
                       1 - 0.4 / fig_h))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, text in texts:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=7)
    for r, label in enumerate(row_labels):
        ax.text(-pad, r * cell_h + band + height / 2, label, ha="right", va="center",
                fontsize=8)
    ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def most_memorized_gallery(run: Run, dataset=None, per_class: int = 6,
                           classes: Sequence[int] | None = None, max_classes: int = 10,
                           epoch: int | None = None, path: str | None = None) -> Figure:
    """One row per class: its most memorized training images (equal scores ordered by the
    margin estimate, as in `Run.ranking`), titled '#index score' and,
    below, the label the models that held the image out suggest with their share of votes
    ('held-out: 3 80%'; a suggestion other than the row's class points at a label to check).

    classes default to the `max_classes` classes whose top score is highest (all classes when
    there are at most max_classes). dataset: a loaded Dataset (default: load_dataset(run)).
    """
    dataset = load_dataset(run) if dataset is None else dataset
    memorization = np.asarray(run.counted_scores(epoch), np.float64)
    labels = np.asarray(dataset.y_train)
    if classes is None:
        present = np.unique(labels)
        best = [np.nanmax(memorization[labels == c], initial=-np.inf) for c in present]
        order = np.argsort(-np.nan_to_num(np.asarray(best), nan=-np.inf), kind="stable")
        classes = sorted(int(c) for c in present[order[:max_classes]])
    top = top_per_class(memorization, labels, per_class, classes,
                        run.memorization_margin_by_epoch[run.epoch_position(epoch)])
    cells = [[(dataset.x_train[i], f"#{i} {memorization[i]:.2f}\n{suggestion(run, i)}")
              for i in indices] for indices in top.values()]
    if not any(cells):
        raise UserError(f"{run.path}: no finite scores to show")
    fig = mosaic(cells, [f"class {cls}" for cls in top],
                 f"Most memorized training examples ({stats.run_label(run)})", lines=2)
    return save(fig, path)


def suggestion(run: Run, index: int) -> str:
    """'held-out: LABEL SHARE%' for one training example ('held-out: none' where no model
    held it out, or the run did not record held-out predictions)."""
    label = int(run.suggested_label[index])
    if label < 0:
        return "held-out: none"
    return f"held-out: {label} {100 * run.suggested_label_share[index]:.0f}%"


def influence_gallery(run: Run, pairs: InfluencePairs, dataset=None, max_pairs: int = 8,
                      path: str | None = None) -> Figure:
    """High-influence pairs, one column each: the training image (top, with its memorization
    score) and the test image it helps (bottom, with the influence)."""
    dataset = load_dataset(run) if dataset is None else dataset
    shown = min(len(pairs), max_pairs)
    title = f"High-influence train/test pairs ({stats.run_label(run)})"
    if not shown:
        fig = Figure(figsize=(4.0, 1.0))
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no high-influence pairs", ha="center", va="center")
        fig.suptitle(title, fontsize=9)
        return save(fig, path)
    train_row, test_row = [], []
    for column in range(shown):
        i, j = int(pairs.train_index[column]), int(pairs.test_index[column])
        train_row.append((dataset.x_train[i], f"train #{i} y={dataset.y_train[i]}\n"
                                              f"mem {pairs.memorization[column]:.2f}"))
        test_row.append((dataset.x_test[j], f"test #{j} y={dataset.y_test[j]}\n"
                                            f"infl {pairs.influence[column]:.2f}"))
    fig = mosaic([train_row, test_row], ["train", "test"], title, lines=2)
    return save(fig, path)
