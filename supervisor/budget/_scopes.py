"""The scopes a run charges: their periods, their limits in store units, their usage now.

A scope id is ``scope:key``: ``run:ID``, ``session:ID``, ``daily:2026-11-23``,
``monthly:2026-11`` (days and months in UTC unless ``budget.timezone``). Limits are
``[calls, tokens, micro-USD]``, None where the policy sets none.
"""

from __future__ import annotations

import time
from decimal import Decimal

from supervisor.budget._results import Amount, ScopeUsage, scope_usage, to_micro

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeAlias

    from supervisor.budget._policy import BudgetPolicy
    from supervisor.budget._store import Limits, ScopeName, Store

    # (scope id, scope, key, limits) of one scope a run charges
    ScopeSpec: TypeAlias = tuple[str, ScopeName, str, Limits]

__all__ = ["limits_of", "periods", "usage_of"]


def periods(now: float, timezone: str | None) -> tuple[str, str]:
    """(day, month) keys of ``now``: ``2026-11-23``, ``2026-11``, in UTC or ``timezone``."""
    if timezone in (None, "UTC"):
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        return day, day[:7]
    from datetime import datetime
    from zoneinfo import ZoneInfo

    day = datetime.fromtimestamp(now, ZoneInfo(timezone)).strftime("%Y-%m-%d")
    return day, day[:7]


def limits_of(budget: BudgetPolicy, scope: str) -> Limits:
    """The policy's limits of ``scope`` as the stores count them (micro-USD)."""
    limits = budget.scope(scope)
    usd = None if limits.usd is None else to_micro(limits.usd)
    return [limits.calls, limits.tokens, usd]


def usage_of(
    store: Store,
    agent: str,
    scopes: list[ScopeSpec],
    rate: Limits,
    now: float | None,
) -> list[ScopeUsage]:
    """Used, held and limit of each scope, then of the rate window (the last 60 s)."""
    answer = store.usage({"agent": agent, "scopes": [s[0] for s in scopes], "now": now})
    rows = answer["scopes"]
    found = [
        scope_usage(scope, key, rows.get(sid) or [0] * 6, limits)
        for sid, scope, key, limits in scopes
    ]
    calls, tokens = answer["rate"]
    found.append(
        ScopeUsage(
            "rate",
            "60s",
            Amount(calls, 0, rate[0]),
            Amount(tokens, 0, rate[1]),
            Amount(Decimal(0), Decimal(0), None),
        )
    )
    return found
