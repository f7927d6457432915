"""The whole run's plan (jaxmem/train/plan.py): host memory planned on every backend and disk
under --out, a run they cannot hold refused before its first step in one line, with fake
device memory stats and fake free disk."""

import os

import jax
import numpy as np
import pytest

from jaxmem import cli
from jaxmem.config import Config
from jaxmem.data.synthetic import make
from jaxmem.errors import UserError
from jaxmem.masks import run_masks
from jaxmem.rundir.packed import packed_bytes
from jaxmem.train import loop, plan
from jaxmem.train.loop import train_ensemble
from jaxmem.train.runner import work_dir_of

DATASET = make(seed=2, sizes=(1, 2, 4, 8))  # 150 examples
# test_ensemble.py's runs, so that the programs the plan compiles are shared with them
CONFIG = dict(arch="tiny_cnn", num_models=3, epochs=1, batch_size=64, eval_every=1, seed=3,
              translate=1)


def test_the_papers_results_take_a_fraction_of_their_bools():
    """K = 2,000, CIFAR-10's 50,000 + 10,000 images, 17 evaluations: as bools the correctness
    is 2.0 GB (and was held about five times over at the end of a run); the results the host
    keeps until written are 0.49 GB (packed correctness, margins, sums), the writing adds
    0.47 GB, so the end of the run holds about 1 GB beyond the runtime and the dataset; its
    run directory takes at most 0.76 GB of disk."""
    shapes = plan.RunShapes(models=2000, num_train=50_000, num_test=10_000, num_classes=10,
                            evaluations=17, epochs=100, state_bytes=4_000_000, eval_batch=1024)
    bools = 17 * 2000 * 60_000
    assert shapes.packed == 17 * (packed_bytes(50_000) + packed_bytes(10_000))
    results = 2000 * shapes.result_per_model + shapes.sums
    assert results == pytest.approx(0.49e9, rel=0.01) and results < 0.25 * bools
    assert shapes.writing(100) == pytest.approx(0.47e9, rel=0.01)
    disk = shapes.run_directory(100)
    assert sum(disk.values()) == pytest.approx(0.76e9, rel=0.01)


def fake_device_memory(monkeypatch, **stats):
    monkeypatch.setattr(type(jax.devices()[0]), "memory_stats", lambda self: dict(stats))


def never_trained(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("a wave trained although the plan could not hold the run")

    monkeypatch.setattr(loop.Trainer, "train_wave", refused)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_a_run_the_host_cannot_hold_is_refused_before_its_first_step(monkeypatch, capsys,
                                                                      backend):
    """--host-memory counts on a GPU too (it was ignored there: only the device was planned):
    with 100 MB, less than the process holds already, nothing is left for the results."""
    if backend == "gpu":  # a device with room for every wave
        fake_device_memory(monkeypatch, bytes_limit=2**40, bytes_in_use=0,
                           peak_bytes_in_use=0)
    never_trained(monkeypatch)
    config = Config(**CONFIG, host_memory="100M")
    with pytest.raises(UserError) as refused:
        train_ensemble(config, DATASET, run_masks(config, DATASET.num_train), progress=False)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the run needs about ")
    assert "of host memory" in message and "leaves 0.0 MiB" in message
    assert "--host-memory" in message and "--model-range" in message
    line = capsys.readouterr().out.splitlines()[0]  # the plan is printed first, in one line
    assert line.startswith("plan: device ") and "; host " in line and "from --host-memory" in line


def test_a_run_the_disk_cannot_hold_exits_2_in_one_line(tmp_path, monkeypatch, capsys):
    """Free disk under --out is planned for the work directory (finished waves, checkpoints)
    and the run directory written beside it: half a MiB free is refused before any step, and
    the refused run leaves no work directory behind (the same command runs once there is
    room, without --resume)."""
    data = tmp_path / "data.npz"
    np.savez(data, x_train=DATASET.x_train, y_train=DATASET.y_train, x_test=DATASET.x_test,
             y_test=DATASET.y_test)
    asked = []

    def free_bytes(path):
        asked.append(path)
        return 2**19

    monkeypatch.setattr(plan, "free_bytes", free_bytes)
    never_trained(monkeypatch)
    out = tmp_path / "runs" / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]
    assert cli.main([*flags, f"--dataset={data}", f"--out={out}", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: the run needs about ")
    assert f"of disk under {tmp_path / 'runs'} (run directory " in error
    assert "0.5 MiB is free there; free some space or give another --out" in error
    assert asked == [str(tmp_path / "runs")]
    assert not os.path.exists(work_dir_of(str(out)))
