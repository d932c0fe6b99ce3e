"""What a run returns: ``RunResult``, its ``Usage`` and its ``Violation``.

Plain classes with ``__slots__`` rather than pydantic or dataclasses: building a result is
on the hot path of every run, and ``supervise -- true`` must not pay for those imports.
``to_dict()`` is the JSON shape that ``--json`` writes (SPEC: RunResult).
"""

from __future__ import annotations

import os
import time
from decimal import Decimal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .errors import SupervisorError

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


def format_limit(limit: str, value: float | Decimal | None) -> str:
    """A value of ``limit`` for people: durations and sizes with units, counts as they are."""
    if value is None:
        return "?"
    from ._units import format_duration, format_size

    unit = UNITS.get(limit)
    if unit == "seconds":
        return format_duration(float(value))
    if unit == "bytes":
        return format_size(int(value))
    if unit == "usd":
        return "$" + format(Decimal(str(value)).normalize(), "f")  # $0.0000001, never 1E-7
    return str(int(value)) if float(value).is_integer() else str(value)


def breach_message(limit: str, observed: float | None, value: float | None, how: str) -> str:
    """``memory limit exceeded: 300.0 MiB > 256.0 MiB (tree RSS)``."""
    cap = format_limit(limit, value)
    if observed is None:
        return f"{limit} limit exceeded: {cap} ({how})"
    shown = format_limit(limit, observed)
    if shown == cap:  # "3.00 s > 3.00 s" reads as no breach at all: be exact
        if UNITS.get(limit) == "seconds":
            shown = f"{observed:.3f}s"  # 1.004s > 1s; 1.000s, never "1s > 1s"
        elif UNITS.get(limit) == "bytes":
            shown, cap = f"{int(observed)} bytes", f"{int(value or 0)} bytes"
    return f"{limit} limit exceeded: {shown} > {cap} ({how})"


def alert_message(
    limit: str, used: float | Decimal, value: float | Decimal, frac: float, scope: str | None
) -> str:
    """``memory at 80% of its limit: 205.0 MiB of 256.0 MiB`` (a budget names its scope)."""
    shown = f"{format_limit(limit, used)} of {format_limit(limit, value)}"
    where = f"{scope} " if scope else ""
    return f"{where}{limit} at {frac:.0%} of its limit: {shown}"


def stop_note(killed: int, ignored: list[int]) -> str:
    """What a kill adds to the violation's message: how many, and who ignored SIGTERM."""
    note = f"; killed {killed} process{'es' if killed != 1 else ''}" if killed else ""
    if ignored:
        shown = ", ".join(map(str, ignored[:10]))
        if len(ignored) > 10:
            shown += f" and {len(ignored) - 10} more"
        note += f" ({shown} ignored SIGTERM)"
    return note


def returncode(wstatus: int) -> int | None:
    """The command's returncode from its wait status (negative: the signal that ended it)."""
    if os.WIFEXITED(wstatus):
        return os.WEXITSTATUS(wstatus)
    if os.WIFSIGNALED(wstatus):
        return -os.WTERMSIG(wstatus)
    return None


def exit_status(
    returncode: int | None,
    violation: Violation | None,
    *,
    killed: bool,
    forwarded: int = 0,
    killed_after_grace: bool = False,
) -> tuple[str, int]:
    """(status, exit code) of a run the supervisor saw to its end (SPEC: exit statuses).

    ``killed``: a violation stopped the tree (124).  A forwarded signal (``forwarded``)
    the tree did not obey within grace is 128 + that signal, as a shell would say it.
    """
    if violation is not None and killed:
        status, code = "violation", 124
    elif returncode is not None and returncode < 0:
        status, code = ("violation" if violation is not None else "signaled"), 128 - returncode
    else:
        status, code = ("violation" if violation is not None else "ok"), returncode or 0
    if forwarded and violation is None and killed_after_grace:
        status, code = "signaled", 128 + forwarded
    return status, code


def conclude(
    res: RunResult,
    wstatus: int | None,
    *,
    kills: bool,
    killed: int = 0,
    ignored: list[int] | None = None,
    forwarded: int = 0,
    killed_after_grace: bool = False,
) -> None:
    """Fill in returncode, status and exit code of a run seen to its end; a violation
    that stopped the tree (``kills``) says how many processes it killed, and who
    ignored SIGTERM."""
    res.returncode = returncode(wstatus if wstatus is not None else 0)
    v = res.violation
    if v is not None and kills:
        v.message += stop_note(killed, ignored or [])
    res.status, res.exit_code = exit_status(
        res.returncode,
        v,
        killed=kills and v is not None,
        forwarded=forwarded,
        killed_after_grace=killed_after_grace,
    )


def fail(res: RunResult, error: SupervisorError) -> None:
    """supervise could not run the command, or not go on safely (it stopped the tree)."""
    res.status, res.exit_code, res.error = "failed", error.exit_code, str(error)


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
        return f"Violation(limit={self.limit!r}, message={self.message!r})"


_USAGE_ORDER = (
    "wall_time",
    "cpu_time",
    "peak_memory",
    "peak_processes",
    "peak_open_files",
    "storage_bytes",
    "files",
    "api_calls",
    "input_tokens",
    "output_tokens",
    "usd",
    "by_model",
    "by_label",
)


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

    def __repr__(self) -> str:
        # What was used, zeros and empty tables left out (a short run's repr fits a line).
        shown = []
        for name in _USAGE_ORDER:
            value = getattr(self, name)
            if not value:
                continue
            if isinstance(value, float):
                value = round(value, 3)
            elif isinstance(value, Decimal):
                value = str(value)
            shown.append(f"{name}={value!r}")
        return f"Usage({', '.join(shown)})"

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
        shown = [
            f"status={self.status!r}",
            f"exit_code={self.exit_code}",
            f"returncode={self.returncode}",
            f"command={self.command!r}",
            f"run_id={self.run_id!r}",
        ]
        if self.violation is not None:
            shown.append(f"violation={self.violation!r}")
        if self.error is not None:
            shown.append(f"error={self.error!r}")
        shown.append(f"usage={self.usage!r}")
        return f"RunResult({', '.join(shown)})"
