"""``--live``: a gauge for every limit in a footer pinned to the bottom of the terminal.

The child writes to the terminal itself (its stdout and stderr are not piped through
supervise), so the footer cannot be drawn by rewriting the last lines as progress bars
usually are: that would erase what the child printed.  Instead the footer is a region the
child's lines cannot reach, as apt's progress line is: a scrolling region (DECSTBM) over
all rows but the last few, where the child's output scrolls, and the gauges drawn below it
between a cursor save and restore.  Each redraw is one ``write`` (a terminal serialises
whole writes), so the child's bytes never land between our save and restore.

When the run ends the footer is erased, the scrolling region reset, and the gauges are
printed once more as ordinary lines below the child's output: the screen keeps everything
the child printed, then the final gauges, then the summary.

Off when stderr is not a terminal: gauges in a log file are noise.  Only the standard
library (and psutil, for the largest file the tree writes) is imported here.
"""

from __future__ import annotations

import os
import sys
import time

from .result import format_limit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._plan import LimitName, RunPlan
    from .result import Usage

_GAUGES: tuple[LimitName, ...] = (
    "wall_time",
    "cpu_time",
    "memory",
    "processes",
    "open_files",
    "file_size",
)
_REFRESH = 0.25  # seconds between redraws: 4 a second, as rich's default
_BAR = 30  # the widest bar, in cells
_COLOURS = {"green": "\x1b[32m", "yellow": "\x1b[33m", "red": "\x1b[31m"}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; LINES/COLUMNS, then 80x24, where it has none."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        cols = rows = 0
    cols = cols or int(os.environ.get("COLUMNS") or 0) or 80
    rows = rows or int(os.environ.get("LINES") or 0) or 24
    return cols, rows


class LiveGauges:
    """Feeds a pinned footer from the run's samples; a no-op without a terminal.

    ``run`` (optional) is the ``Run``: its process tree and workspace give the largest
    file written (the ``file_size`` gauge)."""

    def __init__(self, plan: RunPlan, *, force: bool = False, run: Any = None, fd: int = 2) -> None:
        self.plan, self.run, self.fd = plan, run, fd
        self.enabled = force or os.isatty(fd)
        self.t0 = time.monotonic()
        self.current: dict[str, float] = {}
        self.usage: Usage | None = None
        self.largest_file: int | None = None  # bytes: the largest file the tree wrote
        self._size: tuple[int, int] | None = None  # (cols, rows) the region was set for
        self._height = 0
        self._drawn_at = 0.0

    # -- the region ------------------------------------------------------------------------

    def __enter__(self) -> LiveGauges:
        if self.enabled:
            sys.stderr.flush()
            self._pin()
            self._draw()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled or self._size is None:
            return
        self._sample_largest()
        self.current.setdefault("wall_time", time.monotonic() - self.t0)
        cols, rows = self._size
        # Erase the footer, give the whole screen back, and leave the final gauges as
        # ordinary lines below the child's output (they scroll away like any output).
        self._write(
            f"\x1b7\x1b[{rows - self._height + 1};1H\x1b[J\x1b[r\x1b8"
            + "".join(line + "\r\n" for line in self._lines(cols, self._height))
        )
        self._size = None

    def _pin(self) -> None:
        """Make room at the bottom and keep the child's output to the rows above it."""
        cols, rows = terminal_size(self.fd)
        wanted = len(self._gauges())
        # A terminal too short for a gauge per line gets one line of them all.
        self._height = wanted if rows >= wanted + 4 else 1
        top = rows - self._height
        # Newlines scroll what is on screen up out of the footer's rows; the cursor then
        # goes back up (DECSTBM homes the cursor, so it is saved and restored around it).
        self._write("\n" * self._height + f"\x1b[{self._height}A\x1b7\x1b[1;{top}r\x1b8")
        self._size = (cols, rows)

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            try:
                data = data[os.write(self.fd, data) :]
            except InterruptedError:
                continue
            except OSError:
                self.enabled = False  # the terminal went away: stop drawing, keep running
                return

    def _draw(self) -> None:
        if self._size is None:
            return
        size = terminal_size(self.fd)
        if size != self._size:  # resized: pin again to the new bottom
            self._write(f"\x1b7\x1b[{self._size[1] - self._height + 1};1H\x1b[J\x1b[r\x1b8")
            self._pin()
        cols, rows = self._size
        top = rows - self._height
        out = ["\x1b7"]
        for i, line in enumerate(self._lines(cols, self._height)):
            out.append(f"\x1b[{top + 1 + i};1H\x1b[2K{line}")
        out.append("\x1b8")
        self._write("".join(out))
        self._drawn_at = time.monotonic()

    # -- the figures -----------------------------------------------------------------------

    def update(self, usage: Usage, current: dict[str, float]) -> None:
        """Called after each sample with the running usage and the current values."""
        self.usage = usage
        self.current = dict(current)
        self.current.setdefault("wall_time", time.monotonic() - self.t0)
        if not self.enabled or time.monotonic() - self._drawn_at < _REFRESH:
            return
        self._sample_largest()
        self._draw()

    def _sample_largest(self) -> None:
        """The largest file the tree has open for writing, or the workspace holds."""
        sizes = [self.largest_file or 0]
        confine = getattr(self.run, "confine", None)
        tracker = getattr(confine, "tracker", None)
        if tracker is not None:
            try:
                sizes.append(tracker.largest()[0])
            except (RuntimeError, OSError):  # folded by the guard thread meanwhile
                pass
        child = getattr(self.run, "child", None)
        pid = getattr(child, "pid", None)
        if pid is not None:
            sizes.append(_largest_open_for_writing(pid))
        largest = max(sizes)
        if largest or self.largest_file is not None:
            self.largest_file = largest
        if self.largest_file is not None:
            self.current["file_size"] = self.largest_file

    def _gauges(self) -> list[tuple[str, float | None]]:
        gauges: list[tuple[str, float | None]] = [(g, self.plan.max.get(g)) for g in _GAUGES]
        ws = self.plan.workspace
        if ws is not None:
            gauges += [("storage", ws.get("quota")), ("files", ws.get("max_files"))]
        run_budget = (self.plan.budget or {}).get("run") or {}
        for name in ("calls", "usd"):
            if run_budget.get(name) is not None:
                gauges.append((name, float(run_budget[name])))
        return gauges

    def _used(self, name: str) -> float | None:
        if name in ("calls", "usd"):
            if self.usage is None:
                return 0.0
            return float(self.usage.api_calls if name == "calls" else self.usage.usd)
        return self.current.get(name)

    def _lines(self, cols: int, height: int) -> list[str]:
        rows = []
        for name, limit in self._gauges():
            used = self._used(name)
            shown = "-" if used is None else _show(name, used)
            rows.append((name, used, limit, shown))
        if height == 1:
            text = " · ".join(
                f"{n} {s}/{'none' if lim is None else _show(n, lim)}" for n, _, lim, s in rows
            )
            return [text[:cols]]
        bar_width = max(0, min(_BAR, cols - 45))
        lines = []
        for name, used, limit, shown in rows:
            if limit is None:
                text = f"{shown} (no limit)"
                bar = " " * bar_width
            else:
                share = (used or 0.0) / limit if limit else 0.0
                text = f"{shown} / {_show(name, limit)} {share:.0%}"
                bar = _bar(share, bar_width)
            plain_len = 12 + bar_width + 1 + len(text)
            if plain_len > cols:  # never wrap: a wrapped footer line scrolls the screen
                text = text[: max(0, cols - 13 - bar_width)]
            lines.append(f"{name:>11} {bar} {text}")
        return lines


def _show(name: str, value: float) -> str:
    if name == "usd":
        from decimal import Decimal

        from ._units import format_money

        return format_money(Decimal(str(value)))
    return format_limit(name, value)


def _bar(share: float, width: int) -> str:
    if width <= 0:
        return ""
    colour = "red" if share >= 0.9 else "yellow" if share >= 0.8 else "green"
    full = round(min(max(share, 0.0), 1.0) * width)
    return f"{_COLOURS[colour]}{'━' * full}{_DIM}{'━' * (width - full)}{_RESET}"


def _largest_open_for_writing(pid: int) -> int:
    """The size of the largest regular file a process of ``pid``'s tree has open to write."""
    import psutil

    best = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            files = proc.open_files()
        except psutil.Error:
            continue
        for f in files:
            if f.mode in ("w", "a", "r+", "a+"):
                try:
                    best = max(best, os.stat(f.path).st_size)
                except OSError:
                    pass
    return best
