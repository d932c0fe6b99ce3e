"""``--live``: a gauge for every limit on stderr, refreshed at most 4 times a second.

Drawn with rich (imported only here, only for ``--live``).  Off when stderr is not a
terminal: gauges in a log file are noise.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from .result import format_limit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._plan import LimitName, RunPlan
    from .result import Usage

_GAUGES: tuple[tuple[LimitName, str], ...] = (
    ("wall_time", "wall_time"),
    ("cpu_time", "cpu_time"),
    ("memory", "peak_memory"),
    ("processes", "peak_processes"),
    ("open_files", "peak_open_files"),
)


class LiveGauges:
    """Feeds a rich Live display from the run's samples; a no-op without a terminal."""

    def __init__(self, plan: RunPlan, *, force: bool = False) -> None:
        self.plan = plan
        self.enabled = force or sys.stderr.isatty()
        self.live: Live | None = None
        self.t0 = time.monotonic()
        self.current: dict[str, float] = {}

    def __enter__(self) -> LiveGauges:
        if self.enabled:
            console = Console(file=sys.stderr, force_terminal=True)
            self.live = Live(self._table(), console=console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(None, None, None)

    def update(self, usage: Usage, current: dict[str, float]) -> None:
        """Called after each sample with the running usage and the current values."""
        self.current = dict(current)
        self.current.setdefault("wall_time", time.monotonic() - self.t0)
        if self.live is not None:
            self.live.update(self._table())

    def _table(self) -> Table:
        table = Table.grid(padding=(0, 1))
        table.add_column(justify="right")
        table.add_column(width=30)
        table.add_column()
        gauges: list[tuple[str, Any]] = [(lim, self.plan.max.get(lim)) for lim, _peak in _GAUGES]
        ws = self.plan.workspace
        if ws is not None:
            gauges += [("storage", ws.get("quota")), ("files", ws.get("max_files"))]
        for limit, value in gauges:
            used = self.current.get(limit, 0.0)
            if value is None:
                table.add_row(limit, "", f"{format_limit(limit, used)} (no limit)")
                continue
            style = "red" if used >= 0.9 * value else "yellow" if used >= 0.8 * value else "green"
            bar = ProgressBar(total=float(value), completed=min(used, value), complete_style=style)
            share = used / value if value else 0.0
            table.add_row(
                limit,
                bar,
                f"{format_limit(limit, used)} / {format_limit(limit, value)} {share:.0%}",
            )
        return table
