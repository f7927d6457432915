"""The whole run's plan, made before its first step: device memory per model, host memory for
everything the run keeps until its directory is written, and disk for the run directory and
the work directory with its checkpoints, each from the settings' shapes and dtypes. A run whose
host budget or free disk cannot hold them is refused before it trains (one line saying what to
change), not killed after its last wave.

Host memory is planned on every backend: on GPU/TPU the results live on the host as on CPU
(where the devices are the host too, so waves get the budget the results leave:
`WavePlan.plan`). What the host holds beyond what the process held when planning (VmRSS: the
runtime, the dataset, the masks), at the largest:
- results, kept until written (train/finished.py): per model the correctness bit-packed
  E * (ceil(N/8) + ceil(N_test/8)), the last evaluation's margins 2 N (int16) and per-epoch
  losses; per run the margin sums E * 4 * N int64 and the held-out sums N * C (float64 +
  int32);
- then the larger of a wave in progress (its correctness and margins at every evaluation,
  E * (3 N + N_test) bytes per model, the evaluation's outputs and its held-out
  probabilities, a checkpoint's copy of the states; on CPU also the compiled programs'
  memory) and the writing of the run directory (the larger of the scores and their tests,
  SCORE_TEMPORARIES [E, N] float64 arrays, and the noise floor: the correctness re-packed on
  the model axis, E * ceil(K/64) * 8 * N bytes, one epoch unpacked, K * N; column blocks).

Axis letters: K models of the run, N training and N_test test examples, E evaluated epochs,
C classes, m models per wave.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from jaxmem.atomic import free_bytes, nearest_existing
from jaxmem.errors import UserError
from jaxmem.margins import SUM_BLOCK_BYTES, SUM_NAMES
from jaxmem.rundir.heldout import ADD_BLOCK_BYTES
from jaxmem.rundir.packed import BLOCK_BYTES, ROW_BLOCK_BYTES, packed_bytes
from jaxmem.significance import null as null_lib
from jaxmem.sizes import gib
from jaxmem.train import host_memory, waves
from jaxmem.train.checkpoint import KEEP_CHECKPOINTS

# [E, N] float64 arrays the scores, their p-values (a cubic solved per example) and the
# false-discovery set hold at once while the run directory is written (measured: 39 at
# K = 2,000, N = 50,000, E = 17), and those the scores keep until written (the scores, their
# standard errors, p-values and false-discovery set, the margin estimate and its error).
SCORE_TEMPORARIES = 40
SCORE_OUTPUTS = 6
# Column blocks one thread of the noise floor holds at once (masks, packed words, results).
NULL_BLOCK_COPIES = 3
# numpy writes an array into an archive in chunks of this size (and zlib a compressed copy).
WRITE_BUFFER = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """The shapes a run's memory and disk follow from. models: K of this run (or part);
    state_bytes: one model's training state (parameters, optimiser state, BatchNorm
    statistics), as checkpoints hold it."""

    models: int
    num_train: int
    num_test: int
    num_classes: int
    evaluations: int
    epochs: int
    state_bytes: int
    eval_batch: int

    @property
    def packed(self) -> int:
        """Bytes of one model's bit-packed correctness at every evaluation."""
        return self.evaluations * (packed_bytes(self.num_train) + packed_bytes(self.num_test))

    @property
    def sums(self) -> int:
        """Bytes of one set of per-example sums: the margins' [E, 4, N] int64 and the held-out
        predictions' [N, C] float64 and int32."""
        return (self.evaluations * len(SUM_NAMES) * self.num_train * 8
                + self.num_train * self.num_classes * 12)

    @property
    def result_per_model(self) -> int:
        """Host bytes one finished model's results take until written."""
        return self.packed + 2 * self.num_train + 16 * self.epochs

    def wave_per_model(self) -> int:
        """Host bytes one model of a wave in progress holds: its correctness (bool) and
        margins at every evaluation, the evaluation's outputs (correct and margins, chunks and
        their concatenation), held-out masks and its probabilities for one batch, a
        checkpoint's copy of its state, its packed correctness at the wave's end."""
        n, e = self.num_train, self.evaluations
        arrays = e * (3 * n + self.num_test) + 16 * self.epochs
        evaluation = 6 * n + 2 * n + self.eval_batch * (4 * self.num_classes + 8)
        return arrays + evaluation + self.state_bytes + self.packed

    def wave_fixed(self, wave: int) -> int:
        """Host bytes of a wave that do not grow per model: its own sums, the margin sums'
        and the held-out sums' model chunks."""
        chunk = min(wave, max(1, SUM_BLOCK_BYTES // (8 * max(1, self.num_train))))
        probs = min(wave * self.eval_batch * self.num_classes * 8, ADD_BLOCK_BYTES)
        return self.sums + 4 * 8 * chunk * self.num_train + 3 * probs

    def writing(self, null_permutations: int, selected: bool = False) -> int:
        """Host bytes the writing of the run directory adds to the results, in the larger of
        its phases (the scores, the noise floor, the files, the split-half reliability):
        the scores (their tests' SCORE_TEMPORARIES [E, N] float64 arrays, the
        per-model counts, column blocks); the noise floor beside the SCORE_OUTPUTS arrays the
        scores keep (the correctness re-packed on the model axis, one epoch unpacked and,
        `selected` (canaries planted, or diverged models dropped), its selection; each
        thread's column blocks); the files (numpy's write buffers, rows of correct_*.npy)."""
        k, n, e, c = self.models, self.num_train, self.evaluations, self.num_classes
        scores = (SCORE_TEMPORARIES * e * n * 8 + 3 * c * n * 8 + 3 * k * packed_bytes(n)
                  + 2 * min(BLOCK_BYTES, k * n))
        words = math.ceil(k / 64)
        per_column = max(words * 64, e * words * 8, (null_permutations + 1) * e)
        threads = min(null_lib.MAX_WORKERS, null_lib.cpus())
        kept = SCORE_OUTPUTS * e * n * 8 + 2 * c * n * 8
        null = (kept + e * words * 8 * (-(-n // 8) * 8) + e * n * 8 + (1 + selected) * k * n
                + threads * NULL_BLOCK_COPIES * min(null_lib.BLOCK_BYTES, per_column * n))
        files = kept + 2 * WRITE_BUFFER + 2 * min(ROW_BLOCK_BYTES, k * n)
        # the split-half reliability: the last epoch unpacked, and per half its rows of the
        # masks, correctness and margins and the plain estimator's counting temporaries
        split = kept + k * n + 2 * k * n + k * n
        return max(scores, null, files, split)

    def run_directory(self, null_permutations: int) -> dict[str, int]:
        """Disk bytes of the run directory by file (correct_by_epoch.npz uncompressed: at
        most that)."""
        k, n, e, c = self.models, self.num_train, self.evaluations, self.num_classes
        return {"masks, correctness and margins": k * (4 * n + self.num_test),
                "correct_by_epoch.npz": k * self.packed,
                "scores.npz": (73 * e * n + 20 * c * n + 136 * n + 24 * e * k
                               + 16 * self.epochs * k + 8 * null_permutations * e)}

    def checkpoint(self, models: int) -> int:
        """Disk bytes of one checkpoint of a wave in progress."""
        per_model = (self.state_bytes + self.evaluations * (3 * self.num_train + self.num_test)
                     + 16 * self.epochs)
        return models * per_model + self.sums


def state_bytes(trainer) -> int:
    """Bytes of one model's training state, from the shapes `ensemble.init` gives."""
    ensemble = trainer.ensemble
    shapes = jax.eval_shape(ensemble.init, jax.ShapeDtypeStruct((ensemble.num_devices, 2),
                                                                jnp.uint32))
    return sum(leaf.size * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(shapes)) // ensemble.num_devices


def shapes_of(trainer, num_models: int) -> RunShapes:
    dataset, config = trainer.dataset, trainer.config
    return RunShapes(num_models, dataset.num_train, dataset.num_test, dataset.num_classes,
                     len(trainer.eval_epochs), config.epochs, state_bytes(trainer),
                     trainer.eval_batch_size)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What the run needs and what it has, in bytes. memory: the wave plan (device part);
    host: the bytes the run adds to `host_in_use` by item, their largest sum `host_more`
    against `host_budget`; disk: bytes still to write under `disk_path` by item (at the
    largest, with what is on disk already subtracted) against `disk_free` (None: no work
    directory, nothing planned)."""

    memory: waves.MemoryPlan
    shapes: RunShapes
    device_dataset: int
    waves: int
    host_in_use: int
    host: dict[str, int]
    host_budget: host_memory.Budget
    disk: dict[str, int]
    disk_path: str | None
    disk_free: int | None
    finished_at_plan: int

    def held_since(self, finished: int) -> int:
        """Host bytes the results of the models finished since the plan hold, `finished` now
        (on CPU inside a later wave's resident peak, not that wave's cost)."""
        if not self.memory.shared:
            return 0
        return (finished - self.finished_at_plan) * self.shapes.result_per_model

    @property
    def host_more(self) -> int:
        return self.host["results"] + max(self.host["wave"], self.host["writing"])

    @property
    def host_peak(self) -> int:
        """The process's predicted peak resident memory."""
        return self.host_in_use + self.host_more

    @property
    def disk_need(self) -> int:
        return max(0, self.disk["total"] - self.disk["present"])

    def check(self) -> None:
        """Refuse (one line) a run the host budget or the free disk cannot hold."""
        if self.host_more > self.host_budget.bytes:
            phase = "a wave" if self.host["wave"] >= self.host["writing"] else "the writing"
            raise UserError(
                f"the run needs about {gib(self.host_more)} of host memory beyond the "
                f"{gib(self.host_in_use)} it holds ({gib(self.host['results'])} of results kept "
                f"until written, {gib(max(self.host['wave'], self.host['writing']))} for "
                f"{phase}), but {self.host_budget.source} leaves {gib(self.host_budget.bytes)}; "
                "give it more memory (a larger job memory limit or --host-memory) or train "
                "fewer models per run (--model-range parts, merged with "
                "experiments/cluster/merge.py)")
        if self.disk_free is not None and self.disk_need > self.disk_free:
            raise UserError(
                f"the run needs about {gib(self.disk_need)} of disk under {self.disk_path} "
                f"(run directory {gib(self.disk['run directory'])}, work directory "
                f"{gib(self.disk['work directory'])} with checkpoints), but "
                f"{gib(self.disk_free)} is free there; free some space or give another --out")

    def line(self) -> str:
        """The plan's memory and disk line, printed before the first step."""
        memory = self.memory
        per = "" if memory.shared else " per device"
        device = (f"{gib(memory.planned_bytes_per_model)} per model" if
                  memory.planned_bytes_per_model else "--models-per-wave given")
        disk = ("" if self.disk_free is None else
                f"; disk {gib(self.disk_need)} under {self.disk_path} ({gib(self.disk_free)} "
                "free)")
        cap = memory.per_device_cap
        capped = ("" if cap is None or memory.wave_size < cap * memory.devices else
                  f", {cap} per device so that no array exceeds what its kernels can index")
        return (f"plan: device {device} + {gib(self.device_dataset)} of data{per}, waves of "
                f"up to {memory.wave_size} models{capped} (budget {gib(memory.budget_bytes)}"
                f"{per} from {memory.budget.source}); host {gib(self.host_peak)} at most "
                f"({gib(self.host_in_use)} held + {gib(self.host['results'])} results + "
                f"{gib(max(self.host['wave'], self.host['writing']))} for a wave or the "
                f"writing; {gib(self.host_budget.bytes)} free from {self.host_budget.source})"
                f"{disk}")

    def record(self) -> dict:
        """metrics.json's `memory_plan` entries of the whole-run plan."""
        return {"device_dataset_bytes": self.device_dataset,
                "host_in_use_bytes": self.host_in_use, "host_bytes": self.host,
                "host_peak_bytes_planned": self.host_peak,
                "host_budget_bytes": self.host_budget.bytes,
                "host_budget_source": self.host_budget.source, "disk_bytes": self.disk,
                "disk_free_bytes": self.disk_free}


def plan_run(trainer, sizes: waves.WavePlan, num_models: int, remaining: int,
             work: str | None, out: str | None) -> RunPlan:
    """The plan of a run (or part) of `num_models` models with `remaining` still to train (the
    others' results are held on the host already: resumed), its work directory `work` (None:
    no disk is planned) and run directory `out`; plans the waves (`sizes`). With
    --models-per-wave nothing is compiled to size a model's programs, so on CPU a wave counts
    its models' host arrays only."""
    shapes, config = shapes_of(trainer, num_models), trainer.config
    in_use = host_memory.kib_field("/proc/self/status", "VmRSS:") or 0  # as the budget reads it
    finished = num_models - remaining
    results = remaining * shapes.result_per_model + (0 if finished else shapes.sums)
    memory = sizes.plan(trainer, remaining, results, shapes.wave_per_model())
    wave = min(memory.wave_size, remaining)
    count = math.ceil(remaining / max(wave, 1))
    per_model = shapes.wave_per_model()
    if memory.shared:  # CPU: the devices' memory is the host's (planned_bytes_per_model
        # counts the model's host arrays too)
        budget = host_memory.Budget(memory.budget_bytes, memory.budget.source)
        per_model = memory.planned_bytes_per_model or per_model
    else:
        budget = host_memory.host_budget(trainer.config.host_memory)
    wave_host = wave * per_model + shapes.wave_fixed(wave)
    host = {"results": results, "wave": wave_host,
            "writing": shapes.writing(config.null_permutations,
                                      config.canaries > 0 or config.drop_diverged)}
    disk, path, free = disk_needs(shapes, trainer.config.null_permutations, remaining, wave,
                                  count, work, out)
    return RunPlan(memory, shapes, waves.dataset_bytes(trainer), count, in_use, host, budget,
                   disk, path, free, finished)


def disk_needs(shapes: RunShapes, null_permutations: int, remaining: int, wave: int,
               count: int, work: str | None, out: str | None
               ) -> tuple[dict[str, int], str | None, int | None]:
    """(Disk bytes by item, the folder they are checked under, its free bytes): the work
    directory's finished files and, while a wave trains, KEEP_CHECKPOINTS checkpoints and the
    one being written; then the run directory beside them (and a run directory it replaces,
    kept until the new one is in place). `present`: what the work directory holds already."""
    if work is None:
        return {}, None, None
    finished = remaining * shapes.result_per_model + count * shapes.sums
    checkpoints = (KEEP_CHECKPOINTS + 1) * shapes.checkpoint(wave)
    run_dir = sum(shapes.run_directory(null_permutations).values())
    replaced = folder_bytes(out) if out and os.path.isdir(out) else 0
    items = {"work directory": finished + checkpoints, "run directory": run_dir,
             "replaced run directory": replaced, "present": folder_bytes(work)}
    items["total"] = finished + max(checkpoints, run_dir + replaced)
    path = nearest_existing(os.path.dirname(os.path.abspath(out or work)))
    return items, path, free_bytes(path)


def folder_bytes(path: str) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:  # removed meanwhile
                pass
    return total
