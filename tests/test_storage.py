"""Storage a cluster can break: durable writes, unreadable checkpoints and finished waves, run
directories copied incompletely, full disks (a real tmpfs where the run writes, ENOSPC at
fsync, as a full network filesystem reports it, elsewhere)."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import fill, temporaries
from test_scale_out import (  # noqa: F401 - npz is a fixture
    RUN_PY,
    assert_same_run,
    config_for,
    contents,
    flags_for,
    npz,
    stop_at,
)

from jaxmem import atomic, cli, export, load_run, report, verify
from jaxmem.analysis.influence import influence
from jaxmem.errors import DiskFull, UserError
from jaxmem.rundir import merge_runs, record
from jaxmem.rundir.manifest import DamagedRun
from jaxmem.train.checkpoint import Checkpoint, WorkDir
from jaxmem.train.runner import run, work_dir_of

RECOPY = "copy the run directory again from where it was written"
EVERY_EPOCH = {"checkpoint_seconds": 0}  # 4 models in waves of 2, 4 epochs of 2 steps
RECORD = {"fingerprints": {}}


def spoil(path: str, how: str) -> None:
    """Damage a file as storage does: cut short, emptied, overwritten, one byte flipped."""
    with open(path, "rb") as f:
        data = f.read()
    middle = len(data) // 2
    spoiled = {"truncated": data[:middle], "empty": b"",
               "garbage": np.random.default_rng(0).bytes(len(data)),
               "flipped": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]}[how]
    with open(path, "wb") as f:
        f.write(spoiled)


# --- durable writes ---------------------------------------------------------------------------

def test_every_file_reaches_the_disk_before_its_rename_and_its_folder_after(
        tmp_path, monkeypatch, fake_run_dir):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", os.path.abspath(source), os.path.abspath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = str(tmp_path / "a.npz")
    atomic.write_npz(target, x=np.arange(3))
    temporary = f"{target}.tmp-{os.getpid()}"
    assert events == [("fsync", temporary), ("rename", temporary, target),
                      ("fsync", str(tmp_path))]

    # a run directory: every file in the staging folder, then the folder, then the rename,
    # then the parent that now holds it
    events.clear()
    path = fake_run_dir("run", num_train=40, num_test=10, dataset="synthetic", num_models=6)
    rename = next(e for e in events if e[0] == "rename")
    staging = rename[1]
    before, after = events[:events.index(rename)], events[events.index(rename) + 1:]
    assert rename == ("rename", staging, path)
    assert sorted(before[:-1]) == [("fsync", os.path.join(staging, name))
                                   for name in sorted(os.listdir(path))]
    assert before[-1] == ("fsync", staging) and after == [("fsync", str(tmp_path))]

    # a checkpoint in a new folder of the work directory
    work = str(tmp_path / "run.partial")
    with WorkDir(work, RECORD, resume=False) as opened:
        events.clear()
        opened.save_checkpoint(range(0, 2), 2, {"w": np.ones((2, 3))}, {"x": np.zeros(2)})
    folder = os.path.join(work, "checkpoint-models-0-2")
    file = os.path.join(folder, "2.npz")
    assert events == [("fsync", work), ("fsync", f"{file}.tmp-{os.getpid()}"),
                      ("rename", f"{file}.tmp-{os.getpid()}", file), ("fsync", folder)]


# Replace the folder argv[2] by argv[1] and die (as by SIGKILL: no cleanup) at step argv[3] of
# the filesystem calls; only jaxmem.atomic is imported (the package's own imports take seconds).
KILLED_REPLACING = """
import os, shutil, sys, types
package = types.ModuleType("jaxmem")
package.__path__ = [sys.argv[4]]
sys.modules["jaxmem"] = package
from jaxmem import atomic
steps = [0]
def step():
    steps[0] += 1
    if steps[0] == int(sys.argv[3]):
        os._exit(9)
def killable(call):
    def run(*args, **kwargs):
        step()
        result = call(*args, **kwargs)
        step()
        return result
    return run
os.replace, os.fsync, shutil.rmtree = map(killable, (os.replace, os.fsync, shutil.rmtree))
atomic.exchange = killable(atomic.exchange)
atomic.replace_folder(sys.argv[1], sys.argv[2])
"""


def test_a_run_directory_replaced_under_a_kill_at_any_step_is_the_old_or_the_new(tmp_path):
    """A finished run written over an older one: killed at any step of putting it in place,
    its path holds the old folder or the new one, never nothing (the two renames of old left
    a moment with neither, where the filesystem can swap two names in one step)."""
    package = os.path.dirname(atomic.__file__)
    path, staging = str(tmp_path / "run"), str(tmp_path / ".run.staging")
    seen = set()
    for kill_at in range(1, 100):
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        for folder, content in ((path, "old"), (staging, "new")):
            os.makedirs(folder)
            for name in ("config.json", "scores.npz"):
                with open(os.path.join(folder, name), "w") as f:
                    f.write(content)
        done = subprocess.run([sys.executable, "-c", KILLED_REPLACING, staging, path,
                               str(kill_at), package], timeout=60).returncode == 0
        held = {open(os.path.join(path, name)).read() for name in os.listdir(path)}
        assert sorted(os.listdir(path)) == ["config.json", "scores.npz"] and len(held) == 1
        seen |= held
        if done:
            break
    assert held == {"new"} and seen == {"old", "new"} and kill_at > 5
    assert sorted(os.listdir(tmp_path)) == ["run"]


# --- unreadable checkpoints and finished waves -------------------------------------------------

PROBLEM = {"truncated": r"[\d,]+ bytes: File is not a zip file", "empty": "empty",
           "garbage": r"[\d,]+ bytes: File is not a zip file",
           "flipped": r"its member \w+\.npy is damaged"}


@pytest.mark.parametrize("how", sorted(PROBLEM))
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, how):
    work = str(tmp_path / "w")
    states = {"w": np.arange(600.0).reshape(2, 300)}
    with WorkDir(work, RECORD, resume=False) as opened:
        for position in (2, 4):
            opened.save_checkpoint(range(0, 2), position, states, {"x": np.full(2, position)})
    folder = os.path.join(work, "checkpoint-models-0-2")
    newest, previous = os.path.join(folder, "4.npz"), os.path.join(folder, "2.npz")
    spoil(newest, how)
    with WorkDir(work, RECORD, resume=True) as opened:
        assert opened.checkpoints() == [Checkpoint(previous, range(0, 2), 2)]
        assert opened.checkpoints() == [Checkpoint(previous, range(0, 2), 2)]  # said once
        _, partial = opened.restore_checkpoint(opened.checkpoints()[0], states, ["x"])
        np.testing.assert_array_equal(partial["x"], [2, 2])
    line = capsys.readouterr().err
    assert re.fullmatch(rf"resume: {re.escape(newest)} is unreadable \({PROBLEM[how]}\); models "
                        r"0\.\.1 continue from the previous checkpoint, 2\.npz \(2 steps\)\n",
                        line), line
    assert os.path.exists(newest + ".unreadable")  # kept aside, never read again

    spoil(previous, how)
    with WorkDir(work, RECORD, resume=True) as opened:
        assert opened.checkpoints() == []
    assert capsys.readouterr().err.endswith("; models 0..1 train from the start\n")


@pytest.mark.parametrize("how", sorted(PROBLEM))
def test_an_unreadable_finished_wave_is_set_aside_for_its_models_to_train_again(
        tmp_path, capsys, how):
    work = str(tmp_path / "w")
    with WorkDir(work, RECORD, resume=False) as opened:
        for first in (0, 2):
            opened.save_finished({"model_indices": np.arange(first, first + 2),
                                  "correct": np.ones((2, 300), bool)})
    damaged = os.path.join(work, "models-0-2.npz")
    spoil(damaged, how)
    with WorkDir(work, RECORD, resume=True) as opened:
        assert [w["model_indices"].tolist() for w in opened.finished()] == [[2, 3]]
        assert [w["model_indices"].tolist() for w in opened.finished()] == [[2, 3]]
    line = capsys.readouterr().err
    problem = "empty" if how == "empty" else r"[\d,]+ bytes: .+"
    assert re.fullmatch(rf"resume: {re.escape(damaged)} is unreadable \({problem}\); models "
                        r"0\.\.1 train again \(each model is determined by the seed: the result "
                        r"is the same\)\n", line), line
    assert os.path.exists(damaged + ".unreadable")


def test_an_unreadable_record_of_the_work_is_one_line(tmp_path):
    work = str(tmp_path / "w")
    WorkDir(work, RECORD, resume=False).close()
    spoil(os.path.join(work, "record.json"), "truncated")
    with pytest.raises(UserError, match=r"record\.json is unreadable \(.*\), so the work in .* "
                                        r"cannot be checked against this run; start again with "
                                        r"--overwrite$"):
        WorkDir(work, RECORD, resume=True)


def test_work_without_its_record_is_refused_not_adopted(tmp_path):
    """A checkpoint that a dying run wrote after its folder was removed carries no record of
    the settings and data it belongs to: a new run must not continue it."""
    work = str(tmp_path / "w")
    with WorkDir(work, RECORD, resume=False) as opened:
        opened.save_checkpoint(range(0, 2), 2, {"w": np.ones((2, 3))}, {"x": np.zeros(2)})
    os.remove(os.path.join(work, "record.json"))
    for resume in (False, True):
        with pytest.raises(UserError, match=r"w holds checkpoint-models-0-2 but no record\.json, "
                                            r"so that work cannot be checked against this run; "
                                            r"start again with --overwrite$"):
            WorkDir(work, RECORD, resume=resume)
    with WorkDir(work, RECORD, resume=False, overwrite=True) as opened:
        assert opened.checkpoints() == []


@pytest.fixture(scope="module")
def uninterrupted(npz, tmp_path_factory):  # noqa: F811
    return load_run(run(config_for(npz, **EVERY_EPOCH),
                        str(tmp_path_factory.mktemp("whole") / "run"), progress=False))


@pytest.fixture(scope="module")
def stopped(npz, tmp_path_factory):  # noqa: F811
    """A work directory stopped at step 14: wave 0 (models 0, 1) finished, wave 1 checkpointed
    after its epochs 2 and 3 (positions 4 and 6)."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    with pytest.MonkeyPatch.context() as patch:
        assert "models 2..3 checkpointed after epoch 3" in stop_at(
            patch, 14, config_for(npz, **EVERY_EPOCH), out)
    assert contents(work_dir_of(out)) == (["models-0-2.npz"], {"checkpoint-models-2-4": 6})
    return work_dir_of(out)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_resume_past_unreadable_files_equals_the_uninterrupted_run(
        npz, uninterrupted, stopped, tmp_path, capsys, how):  # noqa: F811
    """The finished wave and the newest checkpoint damaged (for "empty" both checkpoints): the
    finished models train again, the wave in progress continues from the previous checkpoint
    (or from the start), each said in one line, and the result is the uninterrupted run's."""
    out = str(tmp_path / "run")
    work = work_dir_of(out)
    shutil.copytree(stopped, work)
    folder = os.path.join(work, "checkpoint-models-2-4")
    spoil(os.path.join(work, "models-0-2.npz"), how)
    for position in (6, 4) if how == "empty" else (6,):
        spoil(os.path.join(folder, f"{position}.npz"), how)
    resumed = load_run(run(config_for(npz, **EVERY_EPOCH), out, resume=True, progress=False))
    assert_same_run(resumed, uninterrupted)
    lines = capsys.readouterr().err.splitlines()
    assert sum(f"resume: {work}/models-0-2.npz is unreadable" in line
               and line.endswith("; models 0..1 train again (each model is determined by the "
                                 "seed: the result is the same)") for line in lines) == 1
    instead = ("train from the start" if how == "empty" else
               "continue from the previous checkpoint, 4.npz (4 steps)")
    assert sum(line.startswith(f"resume: {folder}/6.npz is unreadable")
               and line.endswith(f"; models 2..3 {instead}") for line in lines) == 1


# --- run directories copied incompletely --------------------------------------------------------

def size_of(path: str, name: str) -> int:
    return os.path.getsize(os.path.join(path, name))


@pytest.mark.parametrize("how", ["missing", "cut short", "damaged"])
def test_an_incomplete_run_directory_is_refused_naming_its_first_bad_file(
        npz, uninterrupted, tmp_path, capsys, how):  # noqa: F811
    """A copy with margins.npy missing, masks.npy cut short or correct_by_epoch.npz damaged
    in place: load_run, merge, --grow and the verify command refuse it in one line naming the
    file; an intact copy verifies."""
    copy = str(tmp_path / "copy")
    shutil.copytree(uninterrupted.path, copy)
    name = {"missing": "margins.npy", "cut short": "masks.npy",
            "damaged": "correct_by_epoch.npz"}[how]
    file, size = os.path.join(copy, name), size_of(copy, name)
    if how == "missing":
        os.remove(file)
        message = (f"{file}: missing (expected {size:,} bytes): the directory is incomplete; "
                   f"{RECOPY}")
    elif how == "cut short":
        os.truncate(file, 100)
        message = f"{file}: 100 bytes, expected {size:,}: the directory is incomplete; {RECOPY}"
    else:
        spoil(file, "flipped")
        message = (f"{file}: {size:,} bytes as recorded, but its SHA-256 differs from the "
                   f"recorded one: the file is damaged; {RECOPY}")
    for attempt in (lambda: load_run(copy),
                    lambda: merge_runs([copy], str(tmp_path / "merged")),
                    lambda: run(config_for(npz, num_models=6), copy, grow=True, progress=False)):
        with pytest.raises(DamagedRun) as refused:
            attempt()
        assert str(refused.value) == message
    assert not os.path.exists(tmp_path / "merged")
    assert verify.main([copy]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_verify_command_checks_copies_and_runs_written_before_checksums(
        uninterrupted, tmp_path):
    intact, legacy, broken = (str(tmp_path / name) for name in ("intact", "legacy", "broken"))
    for copy in (intact, legacy, broken):
        shutil.copytree(uninterrupted.path, copy)
    for copy in (legacy, broken):  # as written before config.json recorded the files
        with open(os.path.join(copy, "config.json")) as f:
            config = json.load(f)
        del config["files"]
        with open(os.path.join(copy, "config.json"), "w") as f:
            json.dump(config, f)
    os.truncate(os.path.join(broken, "masks.npy"), 200)  # its header whole, its data not
    child = subprocess.run([sys.executable, "-m", "jaxmem.verify", intact, legacy, broken,
                            str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 2
    files = sorted(name for name in os.listdir(intact) if name.endswith((".npy", ".npz")))
    total = sum(size_of(intact, name) for name in files)
    assert child.stdout.splitlines() == [
        f"{intact}: {len(files)} array files, {total:,} bytes, match the sizes and SHA-256 "
        "checksums recorded in config.json",
        f"{legacy}: written before jaxmem recorded checksums; its {len(files)} array files are "
        "whole as far as they show (.npy sizes match their headers, .npz CRC-32s match)"]
    masks = size_of(intact, "masks.npy")
    assert child.stderr.splitlines() == [
        f"error: {broken}/masks.npy: 200 bytes, expected {masks:,} from its header: the "
        f"directory is incomplete; {RECOPY}",
        f"error: {tmp_path} is not a run directory (it has no config.json)"]
    assert_same_run(load_run(legacy), uninterrupted)  # an old run still loads, silently


# --- full disks ---------------------------------------------------------------------------------

FULL = r"no space left on device \(needs about [\d,]+ bytes, [\d,]+ free\)"


def test_a_disk_that_fills_during_a_checkpoint_stops_with_75_and_loses_nothing(
        npz, uninterrupted, small_disk, monkeypatch, capsys):  # noqa: F811
    out = os.path.join(small_disk, "run")
    work = work_dir_of(out)
    config = config_for(npz, **EVERY_EPOCH)
    stop_at(monkeypatch, 12, config, out)  # wave 1 checkpointed after its epochs 1 and 2
    folder = os.path.join(work, "checkpoint-models-2-4")
    kept = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    filler = fill(small_disk, size_of(folder, "4.npz") // 2)
    # Another job fills the disk after the plan's check: the plan saw room, the write finds none.
    monkeypatch.setattr("jaxmem.train.plan.free_bytes", lambda path: 1 << 30)
    flags = [*flags_for(npz, **EVERY_EPOCH), f"--out={out}", "--no-progress", "--resume"]
    assert cli.main(flags) == 75  # the checkpoint after epoch 3 does not fit
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(folder)}/6\.npz: {FULL}; the work so far is kept in "
                        rf"{re.escape(work)}: free space, then rerun the same command with "
                        r"--resume", error), error
    assert "Traceback" not in error and temporaries(small_disk) == []
    assert {name: open(os.path.join(folder, name), "rb").read()
            for name in os.listdir(folder)} == kept
    os.remove(filler)
    assert cli.main(flags) == 0
    assert_same_run(load_run(out), uninterrupted)


def test_a_disk_that_fills_during_the_final_write_keeps_the_old_run_and_the_work(
        npz, uninterrupted, small_disk, monkeypatch, capsys):  # noqa: F811
    """--overwrite of a finished run, the disk full when the new run directory is written:
    exit 75, the old run directory intact, the work kept; --resume writes the new one."""
    out = os.path.join(small_disk, "run")
    shutil.copytree(uninterrupted.path, out)
    write = record.save_run
    fillers = []

    def full_then_write(*args):
        if not fillers:  # the first final write finds the disk full
            fillers.append(fill(small_disk, 4096))
        write(*args)

    monkeypatch.setattr(record, "save_run", full_then_write)
    flags = [*flags_for(npz, **EVERY_EPOCH), f"--out={out}", "--no-progress"]
    assert cli.main([*flags, "--overwrite"]) == 75
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(out)}: {FULL}; the work so far is kept in "
                        rf"{re.escape(work_dir_of(out))}: free space, then rerun the same command "
                        r"with --resume in place of --overwrite", error), error
    assert temporaries(small_disk) == []
    assert verify.verify(out) and load_run(out).metrics == uninterrupted.metrics  # the old run
    assert contents(work_dir_of(out))[0] == ["models-0-2.npz", "models-2-4.npz"]
    os.remove(fillers[0])
    assert cli.main([*flags, "--resume"]) == 0
    assert_same_run(load_run(out), uninterrupted)
    assert load_run(out).metrics["wall_time_s"] != uninterrupted.metrics["wall_time_s"]
    assert not os.path.exists(work_dir_of(out))


def full_at_fsync(monkeypatch, pattern: str) -> None:
    """Writes to files whose path matches `pattern` fail at fsync with ENOSPC, as a full
    network filesystem reports it."""
    sync = atomic.sync_file

    def failing(path):
        if re.search(pattern, os.fspath(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        sync(path)

    monkeypatch.setattr(atomic, "sync_file", failing)


@pytest.mark.parametrize("where, status", [("checkpoint-models-0-2/2.npz", 2),
                                           ("models-0-2.npz", 75)])
def test_a_full_disk_while_saving_work_is_one_line_and_a_resume_continues(
        npz, uninterrupted, tmp_path, monkeypatch, capsys, where, status):  # noqa: F811
    """The first checkpoint fails (nothing is kept: exit 2) or the first finished wave fails
    (its checkpoints are kept: exit 75); either way --resume gives the uninterrupted run."""
    out = str(tmp_path / "run")
    work = work_dir_of(out)
    full_at_fsync(monkeypatch, re.escape(where) + r"\.tmp-")
    flags = [*flags_for(npz, **EVERY_EPOCH), f"--out={out}", "--no-progress"]
    assert cli.main(flags) == status
    kept = f"; the work so far is kept in {re.escape(work)}" if status == 75 else ""
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(os.path.join(work, where))}: {FULL}{kept}: free "
                        r"space, then rerun the same command with --resume", error), error
    assert temporaries(str(tmp_path)) == []
    monkeypatch.undo()
    assert cli.main([*flags, "--resume"]) == 0
    assert_same_run(load_run(out), uninterrupted)


def test_a_full_disk_while_exporting_reporting_or_merging_keeps_what_was_there(
        uninterrupted, fake_run_dir, tmp_path, monkeypatch, capsys):
    path = fake_run_dir("run", num_train=60, num_test=20, dataset="synthetic", num_models=8)
    table = export.write_table(load_run(path), str(tmp_path / "table.csv"))
    page = str(tmp_path / "report.html")
    with open(page, "w") as f:
        f.write("an older report")
    before = {file: open(file).read() for file in (table, page)}
    merged = str(tmp_path / "merged")
    full_at_fsync(monkeypatch, r"table\.csv|report\.html|/\.merged\.")

    assert export.main([path, "--out", table]) == 2
    assert report.main([path, "--out", page, "--no-galleries"]) == 2
    errors = capsys.readouterr().err.splitlines()
    then = r"; free space there \(or write elsewhere\), then try again"
    assert [re.fullmatch(rf"error: {re.escape(file)}: {FULL}{then}", line) is not None
            for file, line in zip((table, page), errors, strict=True)] == [True, True], errors
    with pytest.raises(DiskFull, match=rf"^{re.escape(merged)}: {FULL}{then}$"):
        merge_runs([uninterrupted.path], merged)
    assert {file: open(file).read() for file in (table, page)} == before
    assert not os.path.exists(merged) and temporaries(str(tmp_path)) == []



def test_an_influence_matrix_written_to_a_full_disk_is_one_error_naming_it(small_disk):
    """`influence(out=...)` fills a memory-mapped file: without its room taken first, a full
    disk kills the process with SIGBUS at the first page that finds no block."""
    rng = np.random.default_rng(0)
    masks, correct = rng.random((8, 300)) < 0.5, rng.random((8, 400)) < 0.5
    out = os.path.join(small_disk, "influence.npy")
    fill(small_disk, 64 << 10)  # the 300 x 400 float32 result takes 469 KiB
    with pytest.raises(DiskFull, match=rf"^{re.escape(out)}: {FULL}"):
        influence(masks, correct, out=out)
    assert os.listdir(small_disk) == ["filler"]
    os.remove(os.path.join(small_disk, "filler"))
    np.testing.assert_array_equal(influence(masks, correct, out=out), influence(masks, correct))
