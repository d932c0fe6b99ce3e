"""Reading the audit log for people: select, one line per record, the summary, following.

``parse_since`` and ``filter_events`` select records; ``format_event`` writes one as a
terminal line; ``summarize`` folds records into one row per agent (runs, violations by
limit, warnings, denials, spend); ``follow`` yields records as writers append them, across
rotations, the way ``tail -F`` does. Imported by ``supervise audit`` (and through
``supervisor.audit``'s lazy names), never on a run's path.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from ._audit_chain import EVENTS, log_files
from ._audit_read import read_events
from ._units import format_money, show_value

__all__ = [
    "AgentSummary", "filter_events", "follow", "format_event", "format_summary", "parse_since",
    "summarize",
]  # fmt: skip

NO_AGENT = "-"  # the row of runs that named no agent
# A flood of denials is logged 5 a second; the next line logged counts the rest.
_MORE_DENIALS = re.compile(r"\((\d+) more denials not logged one by one\)")
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime: ISO 8601 (naive means UTC), or now minus 30s, 15m, 1h, 7d."""
    value = text.strip()
    unit = _UNITS.get(value[-1:])
    if unit is not None and value[:-1].isdigit() and value[:-1].isascii():
        now = now if now is not None else datetime.now(UTC)
        return now.astimezone(UTC) - timedelta(seconds=int(value[:-1]) * unit)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f'"{text}" is not a time (try 1h, 7d or 2026-11-24T10:00:00Z)') from None
    # Naive times are UTC, because every time the log shows is UTC.
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def filter_events(
    events: Iterable[dict[str, Any]],
    *,
    agent: str | None = None,
    session: str | None = None,
    event: str | None = None,
    limit: str | None = None,
    since: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The records that match every given field (exact match) and are not older than ``since``."""
    if event is not None and event not in EVENTS:
        raise ValueError(f"{event!r} is not an audit event (one of {', '.join(EVENTS)})")
    wanted = {"agent": agent, "session": session, "event": event, "limit": limit}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    floor = None
    if since is not None:
        aware = since.replace(tzinfo=UTC) if since.tzinfo is None else since
        # ts strings share one fixed UTC format, so they compare in time order as text.
        floor = aware.astimezone(UTC).strftime(_TS_FORMAT)
    return (
        r
        for r in events
        if all(r.get(k) == v for k, v in wanted.items())
        and (floor is None or str(r.get("ts", "")) >= floor)
    )


def format_event(record: dict[str, Any]) -> str:
    """One line for a terminal: time, event, run, agent, session, limit, action, detail."""
    ts = str(record.get("ts") or "?")
    if len(ts) > 20 and ts.endswith("Z"):
        ts = ts[:19] + "Z"  # seconds are enough on a terminal; --json has the rest
    parts = [ts, str(record.get("event")), f"run={record.get('run_id')}"]
    for key in ("agent", "session"):
        if record.get(key) is not None:
            parts.append(f"{key}={record[key]}")
    if record.get("limit") is not None:
        unit = record.get("unit")
        unit = unit if isinstance(unit, str) else None if unit is None else str(unit)
        shown = [show_value(unit, record.get(k)) for k in ("observed", "limit_value")]
        sign = ">" if record.get("event") in ("violation", "denied") else "/"
        parts.append(f"{record['limit']} {f' {sign} '.join(s for s in shown if s)}".rstrip())
    if record.get("action") is not None:
        parts.append(str(record["action"]))
    detail = record.get("detail")
    if detail is not None:
        parts.append(detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True))
    return "  ".join(parts)


class AgentSummary:
    """What the log says one agent did: runs, how they ended, what was stopped, what it cost."""

    __slots__ = (
        "agent",
        "api_calls",
        "denied",
        "rpc_errors",
        "runs",
        "stopped",
        "unsettled",
        "usd",
        "violations",
        "warnings",
    )

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.runs = 0  # run_start lines
        self.stopped = 0  # runs that ended with status violation
        self.violations: dict[str, int] = {}  # limit -> violation lines
        self.warnings = 0
        self.denied = 0
        self.rpc_errors = 0
        self.unsettled = 0
        self.api_calls = 0
        self.usd = Decimal(0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "runs": self.runs,
            "stopped": self.stopped,
            "violations": dict(sorted(self.violations.items())),
            "warnings": self.warnings,
            "denied": self.denied,
            "rpc_errors": self.rpc_errors,
            "unsettled": self.unsettled,
            "api_calls": self.api_calls,
            "usd": f"{self.usd:f}",
        }


def _usd(value: object) -> Decimal:
    """The exact USD a run_end wrote (a decimal string); 0 for anything else."""
    try:
        return Decimal(str(value)) if isinstance(value, (str, int)) else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def summarize(records: Iterable[dict[str, Any]]) -> list[AgentSummary]:
    """One row per agent, sorted by agent; spend is summed exactly from each run's end."""
    rows: dict[str, AgentSummary] = {}
    for record in records:
        agent = record.get("agent")
        name = agent if isinstance(agent, str) and agent else NO_AGENT
        row = rows.get(name)
        if row is None:
            row = rows[name] = AgentSummary(name)
        event = record.get("event")
        if event == "run_start":
            row.runs += 1
        elif event == "violation":
            limit = str(record.get("limit"))
            row.violations[limit] = row.violations.get(limit, 0) + 1
        elif event == "warning":
            row.warnings += 1
        elif event == "denied":
            more = _MORE_DENIALS.search(str(record.get("detail") or ""))
            own = 0 if record.get("action") == "suppressed" else 1  # the count at a run's end
            row.denied += own + (int(more.group(1)) if more else 0)
        elif event == "rpc_error":
            row.rpc_errors += 1
        elif event == "unsettled":
            row.unsettled += 1
        elif event == "run_end":
            if record.get("action") == "violation":
                row.stopped += 1
            detail = record.get("detail")
            usage = detail.get("usage") if isinstance(detail, dict) else None
            if isinstance(usage, dict):
                calls = usage.get("api_calls")
                row.api_calls += calls if type(calls) is int else 0
                row.usd += _usd(usage.get("usd"))
    return [rows[name] for name in sorted(rows)]


def format_summary(rows: list[AgentSummary]) -> str:
    """The summary as an aligned text table with a total line."""
    if not rows:
        return "no events match"
    header = ("agent", "runs", "stopped", "violations", "warnings", "denied", "calls", "spend")
    total = AgentSummary("total")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        total.runs += row.runs
        total.stopped += row.stopped
        for limit, n in row.violations.items():
            total.violations[limit] = total.violations.get(limit, 0) + n
        total.warnings += row.warnings
        total.denied += row.denied
        total.api_calls += row.api_calls
        total.usd += row.usd
    for row in [*rows, total] if len(rows) > 1 else rows:
        by_limit = ", ".join(f"{k} {n}" for k, n in sorted(row.violations.items())) or "-"
        lines.append(
            (
                row.agent,
                str(row.runs),
                str(row.stopped),
                by_limit,
                str(row.warnings),
                str(row.denied),
                str(row.api_calls),
                format_money(row.usd),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {1, 2, 4, 5, 6, 7}
    out = []
    for line in lines:
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def follow(
    path: str,
    *,
    replay: bool = False,
    interval: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records appended to the log at ``path`` from now on, until ``stop()``.

    With ``replay``, every record already in the log (rotated files included) comes first.
    A rotation is followed: the old file is read to its end, then the new one from its
    start. A line is yielded only once its newline is written (a torn line never is).
    """
    fd, ino, pos = -1, 0, 0
    if replay:
        yield from read_events([f for f in log_files(path) if f != path], strict=False)
    from_end = not replay  # only the file there now, and only at the start, is skipped
    buf = b""
    try:
        while stop is None or not stop():
            if fd < 0:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1
                if fd >= 0:
                    st = os.fstat(fd)
                    ino, pos, buf = st.st_ino, st.st_size if from_end else 0, b""
                from_end = False
            if fd >= 0:
                chunk = os.pread(fd, 1 << 20, pos)
                if chunk:
                    pos += len(chunk)
                    *lines, buf = (buf + chunk).split(b"\n")
                    yield from filter(None, map(_parse, lines))
                    continue
                try:
                    moved = os.stat(path).st_ino != ino
                except FileNotFoundError:
                    moved = True
                if moved:  # rotated (or removed): read what it got last, then the new file
                    while chunk := os.pread(fd, 1 << 20, pos):
                        pos += len(chunk)
                        *lines, buf = (buf + chunk).split(b"\n")
                        yield from filter(None, map(_parse, lines))
                    os.close(fd)
                    fd = -1
                    continue
            time.sleep(interval)
    finally:
        if fd >= 0:
            os.close(fd)
