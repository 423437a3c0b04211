"""The time-to-accuracy clock (MLPerf rules): one wall clock, with evaluation time tallied apart.

The clock runs from before the dataset is read until the first evaluation at or above target;
evaluations stay inside it. ``eval_s`` only lets us also report train-only time.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Clock:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync or (lambda: None)  # e.g. torch.cuda.synchronize: count queued GPU work
        self._start: float | None = None
        self._stopped_at: float | None = None
        self.eval_s = 0.0

    def start(self) -> Clock:
        self._start, self._stopped_at, self.eval_s = time.perf_counter(), None, 0.0
        return self

    def carry(self, elapsed_s: float, eval_s: float = 0.0) -> None:
        """Count ``elapsed_s`` seconds, ``eval_s`` of them evaluating, as already run: the time a resumed
        run spent in the processes before this one (the dead time between them is not counted)."""
        if self._start is None:
            raise RuntimeError("clock not started")
        self._start -= elapsed_s
        self.eval_s += eval_s

    def elapsed(self, *, sync: bool = True) -> float:
        """Seconds since start. ``sync=False`` skips waiting for queued device work: cheap enough
        for per-step checks (budgets, progress), exact only at the next synchronizing read."""
        if self._start is None:
            raise RuntimeError("clock not started")
        if self._stopped_at is not None:
            return self._stopped_at - self._start
        if sync:
            self._sync()
        return time.perf_counter() - self._start

    def stop(self) -> float:
        total = self.elapsed()
        self._stopped_at = self._start + total  # type: ignore[operator]
        return total

    @property
    def train_s(self) -> float:
        """Elapsed time less evaluation time."""
        return self.elapsed() - self.eval_s

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.eval_s += time.perf_counter() - t0
