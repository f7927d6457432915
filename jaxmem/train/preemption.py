"""Stopping on the signals clusters send before they kill a job (SIGTERM: SLURM preemption and
time limits, Kubernetes, spot VMs; SIGUSR1: SLURM's `--signal`).

While training, such a signal only sets a flag; the loop finishes the step it is in, checkpoints
the wave in progress at that step and raises `Preempted`, which the CLI turns into one line and
exit status 75 (EX_TEMPFAIL: rerun the same command with --resume). In a multi-process job the
processes agree on the step to stop at through JAX's preemption sync point (the preemption
service of `jax.distributed` catches SIGTERM itself and tells every process).
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Exit status of a run that checkpointed its work on a signal (sysexits.h EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Tests only: "STEP" or "STEP:SIGNAME": the process sends itself SIGTERM (or SIGNAME) after
# this many training steps, so that the signal arrives at a known step.
SIGNAL_AT_STEP = "JAXMEM_TEST_SIGNAL_AT_STEP"


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

