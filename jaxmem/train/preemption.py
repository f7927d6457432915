"""Stopping on the signals clusters send before they kill a job (SIGTERM: SLURM preemption and
time limits, Kubernetes, spot VMs; SIGUSR1: SLURM's `--signal`).

While training, such a signal only sets a flag; the loop finishes the step it is in, checkpoints
the wave in progress at that step and raises `Preempted`, which the CLI turns into one line and
exit status 75 (EX_TEMPFAIL: rerun the same command with --resume). In a multi-process job the
processes agree on the step to stop at through JAX's preemption sync point (the preemption
service of `jax.distributed` catches SIGTERM itself and tells every process).

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

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Exit status of a run that checkpointed its work on a signal (sysexits.h EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Tests only: "STEP" or "STEP:SIGNAME": the process sends itself SIGTERM (or SIGNAME) after
# this many training steps, so that the signal arrives at a known step.
SIGNAL_AT_STEP = "JAXMEM_TEST_SIGNAL_AT_STEP"


# The `remembered()` a run is inside, if any: whether a stop signal arrived outside training.
_outside: Remembered | None = None


class Preempted(Exception):  # noqa: N818 (a state the run ends in, not a fault)
    """The run checkpointed its work on a stop signal; the message says how to resume."""


class StopSignals:
    """Whether to stop: `after_step()` is called after every training step of this process (in
    a multi-process job every process must call it at every step); `stopping` stays true once
    it is. Use as a context manager around training: the handlers are installed on entry and
    the previous ones restored on exit."""

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
        for sig in STOP_SIGNALS if self.active else ():
            # Multi-process: the preemption service's own SIGTERM handler stays in place;
            # SIGUSR1 is handed to it as SIGTERM.
            if not (self._multiprocess and sig == signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if self._multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.stopping = True

    def after_step(self) -> bool:
        """Count a finished step; True once training should stop (here: at this step)."""
        self.steps += 1
        if self.steps == self._test_signal[0]:
            signal.raise_signal(self._test_signal[1])  # handled before it returns
        if self.active and self._multiprocess and not self.stopping:
            self.stopping = multihost_utils.reached_preemption_sync_point(self.steps)
            self.received = self.received or ("SIGTERM" if self.stopping else None)
        return self.stopping


class Remembered:
    """What `remembered()` saw: `received`, the stop signal's name (None: none arrived)."""

    def __init__(self):
        self.received: str | None = None
        self.multiprocess = jax.process_count() > 1

    def handle(self, signum, frame) -> None:
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: stopping at the next training step, or once the "
              "results being written are complete", file=sys.stderr, flush=True)


@contextlib.contextmanager
def remembered():
    """Around a whole run: a stop signal that no training loop is listening for is remembered
    (one line says so) rather than fatal; a training loop that starts later stops before its
    first step. Multi-process: SIGTERM stays with the preemption service, SIGUSR1 is handed to
    it as SIGTERM. Outside the main thread (no handlers can be installed) it does nothing."""
    global _outside
    state = Remembered()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {sig: signal.signal(sig, state.handle) for sig in STOP_SIGNALS
                if not (state.multiprocess and sig == signal.SIGTERM)}
    _outside = state
    try:
        yield state
    finally:
        _outside = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
