"""Timestamps as the audit log and run results write them: UTC ISO 8601, microseconds, ``Z``.

Stdlib ``time`` only: this is imported on every run, and ``datetime`` is not.
"""

from __future__ import annotations

import time

__all__ = ["iso_time"]


def iso_time(t: float | None = None) -> str:
    """``t`` (seconds since the epoch; None: now, exact to the microsecond) as
    ``2026-11-24T10:00:00.123456Z``, without importing datetime."""
    if t is None:
        whole, micro = divmod(time.time_ns() // 1000, 1_000_000)
    else:
        whole = int(t)
        micro = round((t - whole) * 1_000_000)
        if micro == 1_000_000:
            whole, micro = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micro:06d}Z"
