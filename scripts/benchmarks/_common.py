"""What every area shares: the round counts, the timer and the table's rows."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# The repository: children run ``python -S`` with it on PYTHONPATH (no site-packages hooks).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Config:
    quick: bool = False  # --quick: fewer rounds, smaller data

    @property
    def n(self) -> int:
        """Rounds per median."""
        return 10 if self.quick else 30


CONFIG = Config()
Row = tuple[str, str, str, str]  # figure | baseline (same run) | supervise | ratio / note
rows: list[Row] = []


def median_ms(fn: Callable[[], object], n: int | None = None) -> float:
    """The median wall time of ``fn`` over ``n`` rounds (default ``CONFIG.n``), in ms."""
    fn()  # warm-up: caches, the reaper helper, page cache
    times = []
    for _ in range(CONFIG.n if n is None else n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000
