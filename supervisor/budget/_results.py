"""What the ledger answers, in exact ``Decimal`` USD: holds, charges, alerts, scope usage.

The stores count integer micro-USD; ``to_usd`` and ``to_micro`` are the only crossings
(rounding up: no spend is free by rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

__all__ = [
    "LIMITS", "MICRO", "Alert", "Amount", "Charge", "Hold", "ScopeUsage", "Settled",
    "scope_usage", "to_micro", "to_usd",
]  # fmt: skip

LIMITS = ("calls", "tokens", "usd")  # the order of every Triple, Row and Limits
MICRO = 1_000_000


def to_usd(micro: int) -> Decimal:
    """Micro-USD (int) as exact Decimal USD."""
    return Decimal(micro).scaleb(-6)


def to_micro(usd: Decimal) -> int:
    """Decimal USD as micro-USD, rounded up (no spend is free by rounding)."""
    from decimal import ROUND_CEILING

    if not isinstance(usd, Decimal) or not usd.is_finite() or usd < 0:
        raise ValueError(f"usd must be a finite Decimal >= 0, got {usd!r}")
    return int((usd * MICRO).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Hold:
    """A granted reservation: what it holds on every scope, until when."""

    id: str
    usd_held: Decimal
    tokens_held: int
    expires_at: float
    replayed: bool = False  # True: an earlier reserve with the same key; nothing new held


@dataclass(frozen=True)
class Amount:
    """One limit of one scope: used, held (by open reservations) and the limit (None: none)."""

    used: int | Decimal
    held: int | Decimal
    limit: int | Decimal | None

    def to_dict(self) -> dict[str, Any]:
        def num(value: int | Decimal | None) -> Any:
            return float(value) if isinstance(value, Decimal) else value

        return {"used": num(self.used), "held": num(self.held), "limit": num(self.limit)}


@dataclass(frozen=True)
class ScopeUsage:
    """A scope's calls, tokens and usd; ``key`` names the period, run or session."""

    scope: str
    key: str
    calls: Amount
    tokens: Amount
    usd: Amount

    def to_dict(self) -> dict[str, Any]:
        """SPEC's shape: ``{"scope", "key", "calls": {used, held, limit}, "tokens", "usd"}``."""
        return {
            "scope": self.scope,
            "key": self.key,
            **{name: getattr(self, name).to_dict() for name in LIMITS},
        }


def scope_usage(scope: str, key: str, row: list[int], limits: list[int | None]) -> ScopeUsage:
    """A store's row of a scope (micro-USD) with its limits, as a ScopeUsage (Decimal USD)."""
    calls, tokens = (Amount(row[i], row[i + 3], limits[i]) for i in range(2))
    money = Amount(to_usd(row[2]), to_usd(row[5]), None if limits[2] is None else to_usd(limits[2]))
    return ScopeUsage(scope, key, calls, tokens, money)


@dataclass(frozen=True)
class Alert:
    """A scope's use crossed ``threshold`` (a fraction) of one of its limits with this charge."""

    scope: str
    key: str
    limit: str
    threshold: float
    used: int | Decimal
    limit_value: int | Decimal


@dataclass(frozen=True)
class Charge:
    """What one commit or record charged, and the run's totals after it."""

    usd: Decimal
    tokens: int
    usage: ScopeUsage  # the run scope after this charge
    price_source: str = ""
    alerts: list[Alert] = field(default_factory=list)
    replayed: bool = False


@dataclass(frozen=True)
class Settled:
    """A hold that was still open when the child exited, charged at its input estimate."""

    hold_id: str
    usd: Decimal
    tokens: int
    model: str
    label: str | None
