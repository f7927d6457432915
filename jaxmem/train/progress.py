"""The training progress bar (tqdm over optimiser steps)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """The run's progress bar over training steps. It starts drawing only once the plan line
    is out (or the first epoch ends), so the plan has a line of its own."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.count, self.total = enabled, None, 0, 0

    def start(self) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=self.count, unit="step",
                            disable=not self.enabled, dynamic_ncols=True)

    def expect(self, more: int) -> None:
        """The steps still to come (from the current count on)."""
        self.total = self.count + more
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def update(self, steps: int) -> None:
        self.count += steps
        if self.bar is not None:
            self.bar.update(steps)

    def write(self, line: str) -> None:
        tqdm.write(line)
        sys.stdout.flush()

    def set_postfix(self, **values) -> None:
        self.start()
        self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
