"""Statistics over repeated runs: median/min/max/CV, pass-rate and the MLPerf aggregate."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class SeedStats:
    runs: int
    passed: int
    median_s: float | None
    min_s: float | None
    max_s: float | None
    cv: float | None  # sample std / mean of the passing runs' times
    mlperf_s: float | None  # see mlperf_aggregate

    @property
    def pass_rate(self) -> float:
        return self.passed / self.runs if self.runs else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "pass_rate": self.pass_rate}


def mlperf_aggregate(times: Sequence[float | None]) -> float | None:
    """MLPerf Training's score: drop the fastest and slowest run, average the rest.

    ``None`` marks a run that never reached the target; one such run may count as the slowest,
    more invalidate the result (None). Needs at least 3 runs.

    >>> mlperf_aggregate([10.0, 12.0, 11.0, 30.0, 9.0])
    11.0
    >>> mlperf_aggregate([10.0, None, 11.0]) , mlperf_aggregate([None, None, 11.0])
    (11.0, None)
    """
    failed = sum(t is None for t in times)
    if len(times) < 3 or failed > 1:
        return None
    ordered = sorted(t for t in times if t is not None)
    kept = ordered[1:] if failed else ordered[1:-1]
    return sum(kept) / len(kept)


def seed_stats(times: Sequence[float | None]) -> SeedStats:
    """``times``: time-to-accuracy per run, None for a run that did not reach the target."""
    ok = [t for t in times if t is not None]
    cv = statistics.stdev(ok) / statistics.fmean(ok) if len(ok) >= 2 else None
    return SeedStats(len(times), len(ok), statistics.median(ok) if ok else None,
                     min(ok) if ok else None, max(ok) if ok else None, cv, mlperf_aggregate(times))
