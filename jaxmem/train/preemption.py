"""Stopping on the signals clusters send before they kill a job (SIGTERM: SLURM preemption and
time limits, Kubernetes, spot VMs; SIGUSR1: SLURM's `--signal`).

While training, such a signal only sets a flag; the loop finishes the step it is in, checkpoints
the wave in progress at that step and raises `Preempted`, which the CLI turns into one line and
exit status 75 (EX_TEMPFAIL: rerun the same command with --resume).

In a multi-process job the preemption service of `jax.distributed` catches SIGTERM itself and
tells every process; the processes then stop at the sync point they agree on
(`multihost_utils.reached_preemption_sync_point(n)` is true on every process at n = 1 + the
largest n any process had passed when the notice arrived). Every process trains its own models
with its own wave plan and resume state, so their step counts differ: counted in steps, a
process far behind the fastest would train on long past the grace period, and one that has
finished its steps would never get there. So they count a clock instead (`SharedClock`): ticks
of SYNC_TICK_SECONDS since a barrier every process passes when the run starts, which every
process passes alike whatever it trains, checked after every step and epoch and, once its own
part is finished, while it waits for the others. Every process then stops within a tick of the
agreed one (or, busy in an evaluation, once it ends), and each keeps its preemption service
until every part is finished, since the agreement needs all of them.

Outside training (loading data, between the pilot's lengths, writing the run directory) a run
started from the command line remembers the signal instead of dying of it (`remembered`): the
next training loop stops before its first step, and results that are being written are
written to the end and the run exits normally, since writing them takes less time than a
requeue and a resume that would write them again (writes are atomic, so a SIGKILL that follows
leaves the previous state).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Exit status of a run that checkpointed its work on a signal (sysexits.h EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Tests only: "STEP" or "STEP:SIGNAME": the process sends itself SIGTERM (or SIGNAME) after
# this many training steps, so that the signal arrives at a known step.
SIGNAL_AT_STEP = "JAXMEM_TEST_SIGNAL_AT_STEP"
# The shared clock's tick: how late after the agreed point a process may stop. The sync point
# takes a 32-bit count, which at this tick lasts 3.4 years of one run.
SYNC_TICK_SECONDS = 0.05


# The `remembered()` a run is inside, if any: whether a stop signal arrived outside training.
_outside: Remembered | None = None


class Preempted(Exception):  # noqa: N818 (a state the run ends in, not a fault)
    """The run checkpointed its work on a stop signal; the message says how to resume."""


def install_handlers(record: Callable[[str], None]) -> dict:
    """Handle the stop signals; returns the handlers they replace (for `restore_handlers`).
    One process: a stop signal calls record(its name). Several: SIGTERM stays with the
    preemption service, and SIGUSR1 is handed to it as SIGTERM, so that the service tells every
    process and they stop together (`agreed_stop`)."""
    multiprocess = jax.process_count() > 1

    def handle(signum, frame) -> None:
        if multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            record(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS
            if not (multiprocess and sig == signal.SIGTERM)}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class SharedClock:
    """Ticks of SYNC_TICK_SECONDS since `origin` (this process's time.monotonic() when every
    process passed one barrier), each passed to the preemption sync point once and in order, so
    that the processes' counts agree at any moment however differently they train."""

    def __init__(self, origin: float):
        self.origin, self.passed, self.reached = origin, 0, False

    def poll(self) -> bool:
        """Pass the ticks since the last poll; True from the agreed one on."""
        now = int((time.monotonic() - self.origin) / SYNC_TICK_SECONDS)
        while not self.reached and self.passed < now:
            self.passed += 1
            self.reached = multihost_utils.reached_preemption_sync_point(self.passed)
        return self.reached


_clock: SharedClock | None = None


def start_shared_clock() -> None:
    """Every process of a multi-process run calls this at the same point, before training:
    the clock starts when all of them have passed a barrier."""
    global _clock
    multihost_utils.sync_global_devices("jaxmem: shared clock")
    _clock = SharedClock(time.monotonic())


def agreed_stop() -> bool:
    """Multi-process: have the processes reached the stop they agreed on after a notice?
    (Without `start_shared_clock` the clock starts at this process's first poll, so a process
    started later than the others stops that much later.)"""
    global _clock
    if _clock is None:
        _clock = SharedClock(time.monotonic())
    return _clock.poll()


class StopSignals:
    """Whether to stop: `after_step()` is called after every training step of this process,
    `poll()` where else training may stop (an epoch's end); `stopping` stays true once it is.
    Use as a context manager around training: the handlers are installed on entry and the
    previous ones restored on exit."""

    def __init__(self, active: bool = True):
        """active: install the handlers (only the main thread can; without a work directory
        there is nothing to checkpoint, so the default handlers should stay)."""
        self.active = active
        self.received: str | None = None
        self.steps = 0
        self.stopping = False
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        step, _, name = os.environ.get(SIGNAL_AT_STEP, "0").partition(":")
        self._test_signal = int(step), signal.Signals[name or "SIGTERM"]
        if active and _outside and _outside.received:  # it arrived before training
            self.received, self.stopping = _outside.received, True

    def __enter__(self):
        if self.active:
            self._previous = install_handlers(self._record)
        return self

    def __exit__(self, *exc):
        restore_handlers(self._previous)
        self._previous = {}

    def _record(self, name: str) -> None:
        self.received, self.stopping = name, True

    def poll(self) -> bool:
        """`stopping`, made true where the processes of a multi-process job reached the stop
        they agreed on."""
        if not self.stopping and self.active and self._multiprocess and agreed_stop():
            self.received, self.stopping = self.received or "SIGTERM", True
        return self.stopping

    def after_step(self) -> bool:
        """Count a finished step; True once training should stop (here: at this step)."""
        self.steps += 1
        if self.steps == self._test_signal[0]:
            signal.raise_signal(self._test_signal[1])  # handled before it returns
            if self._multiprocess:
                self._await_agreement()
        return self.poll()

    def _await_agreement(self, timeout: float = 60.0) -> None:
        """Tests: the preemption service spreads the notice on its own threads, in up to a
        second or so, while a small test run's steps take milliseconds: wait for the agreed
        stop, so that the signal lands at the step the test names."""
        deadline = time.monotonic() + timeout
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(SYNC_TICK_SECONDS)


class Remembered:
    """What `remembered()` saw: `received`, the stop signal's name (None: none arrived)."""

    def __init__(self):
        self.received: str | None = None

    def record(self, name: str) -> None:
        self.received = name
        print(f"{self.received} received: stopping at the next training step, or once the "
              "results being written are complete", file=sys.stderr, flush=True)


@contextlib.contextmanager
def remembered():
    """Around a whole run: a stop signal that no training loop is listening for is remembered
    (one line says so) rather than fatal; a training loop that starts later stops before its
    first step. Multi-process: SIGTERM stays with the preemption service, SIGUSR1 is handed to
    it as SIGTERM (`install_handlers`). Outside the main thread (no handlers can be installed)
    it does nothing."""
    global _outside
    state = Remembered()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = install_handlers(state.record)
    _outside = state
    try:
        yield state
    finally:
        _outside = None
        restore_handlers(previous)
