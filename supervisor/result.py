"""What a run returns: ``RunResult``, its ``Usage`` and its ``Violation``.

Plain classes with ``__slots__`` rather than pydantic or dataclasses: building a result is
on the hot path of every run, and ``supervise -- true`` must not pay for those imports.
``to_dict()`` is the JSON shape that ``--json`` writes (SPEC: RunResult).
"""

from __future__ import annotations

import time
from decimal import Decimal

STATUSES = ("ok", "violation", "failed", "signaled")

# The unit each limit is measured in, for messages, the audit log and the JSON result.
UNITS = {
    "wall_time": "seconds",
    "cpu_time": "seconds",
    "step_time": "seconds",
    "memory": "bytes",
    "address_space": "bytes",
    "file_size": "bytes",
    "storage": "bytes",
    "max_file_size": "bytes",
    "open_files": "count",
    "processes": "count",
    "files": "count",
    "calls": "count",
    "tokens": "count",
    "rate": "count",
    "usd": "usd",
}


def format_limit(limit: str, value: float | None) -> str:
    """A value of ``limit`` for people: durations and sizes with units, counts as they are."""
    if value is None:
        return "?"
    from ._units import format_duration, format_size

    unit = UNITS.get(limit)
    if unit == "seconds":
        return format_duration(float(value))
    if unit == "bytes":
        return format_size(int(value))
    return str(int(value)) if float(value).is_integer() else str(value)


def iso_time(t: float) -> str:
    """UTC ISO-8601 with microseconds and ``Z``, without importing datetime."""
    whole = int(t)
    micro = round((t - whole) * 1_000_000)
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micro:06d}Z"


class Violation:
    """The limit that was broken: its name, what was observed, the limit, and a message."""

    __slots__ = ("limit", "limit_value", "message", "observed", "unit")

    def __init__(
        self,
        limit: str,
        observed: float | int | None,
        limit_value: float | int | None,
        message: str,
    ) -> None:
        self.limit = limit
        self.observed = observed
        self.limit_value = limit_value
        self.unit = UNITS.get(limit, "")
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {
            "limit": self.limit,
            "observed": self.observed,
            "limit_value": self.limit_value,
            "unit": self.unit,
            "message": self.message,
        }

    def __repr__(self) -> str:
        return f"Violation({self.message!r})"


class Usage:
    """What the run used; peaks are over the whole process tree."""

    __slots__ = (
        "api_calls",
        "by_label",
        "by_model",
        "cpu_time",
        "files",
        "input_tokens",
        "output_tokens",
        "peak_memory",
        "peak_open_files",
        "peak_processes",
        "storage_bytes",
        "usd",
        "wall_time",
    )

    def __init__(self) -> None:
        self.wall_time = 0.0
        self.cpu_time = 0.0
        self.peak_memory = 0
        self.peak_processes = 0
        self.peak_open_files = 0
        self.storage_bytes = 0
        self.files = 0
        self.api_calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.usd = Decimal(0)
        self.by_model: dict[str, dict[str, object]] = {}
        self.by_label: dict[str, dict[str, object]] = {}

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in sorted(self.__slots__)}
        out["usd"] = float(self.usd)  # JSON has no decimals; the ledger keeps exact micro-USD
        for table in ("by_model", "by_label"):
            out[table] = {
                name: {k: float(v) if k == "usd" else v for k, v in row.items()}
                for name, row in getattr(self, table).items()
            }
        return out


class RunResult:
    """The outcome of one supervised run (also what ``--json`` writes)."""

    __slots__ = (
        "agent",
        "command",
        "ended_at",
        "error",
        "exit_code",
        "returncode",
        "run_id",
        "session",
        "started_at",
        "status",
        "usage",
        "violation",
        "warnings",
    )

    def __init__(self, run_id: str, agent: str | None, session: str | None, command: list[str]):
        self.run_id = run_id
        self.agent = agent
        self.session = session
        self.command = command
        self.status = "failed"
        self.exit_code = 125
        self.returncode: int | None = None
        self.violation: Violation | None = None
        self.warnings: list[dict[str, object]] = []
        self.usage = Usage()
        self.started_at = ""
        self.ended_at = ""
        self.error: str | None = None  # supervise's own failure (exit 125, 126, 127)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "agent": self.agent,
            "session": self.session,
            "command": self.command,
            "status": self.status,
            "exit_code": self.exit_code,
            "returncode": self.returncode,
            "violation": None if self.violation is None else self.violation.to_dict(),
            "warnings": self.warnings,
            "usage": self.usage.to_dict(),
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
        }

    def __repr__(self) -> str:
        return (
            f"RunResult(status={self.status!r}, exit_code={self.exit_code}, run_id={self.run_id!r})"
        )
