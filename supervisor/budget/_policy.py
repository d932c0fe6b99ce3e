"""The policy's ``budget`` section: limits per scope, a rate, prices, the store.

Money is exact: limits are ``Decimal`` USD with at most six decimals (the ledger counts
integer micro-USD), prices are ``Decimal`` USD per million tokens. Every value is checked
here, so a bad section fails at load with the file, line and key path like the rest of the
policy (``policy.yaml:9 budget.daily.usd: "lots" is not an amount of money (try 5 or "$5")``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from supervisor._units import parse_money, parse_whole, show

__all__ = ["BudgetPolicy", "ModelPricing", "RateLimits", "ScopeLimits", "parse_store_url"]

_MICRO = Decimal("0.000001")
_MAX_COUNT = 2**63 - 1  # the ledger's counters are 64-bit integers (SQLite INTEGER)


def _count(value: object) -> int | None:
    if value is None:
        return None
    number = parse_whole(value, "100")
    if number < 0:
        raise ValueError(f"{show(value)} is negative (null means no limit)")
    if number > _MAX_COUNT:
        raise ValueError(f"{show(value)} is too large (the most is {_MAX_COUNT})")
    return number


def _usd_limit(value: object) -> Decimal | None:
    if value is None:
        return None
    amount = parse_money(value)
    if amount != amount.quantize(_MICRO):
        raise ValueError(f"{show(value)} is finer than a micro-dollar (use at most 6 decimals)")
    return amount


def _price(value: object) -> Decimal | None:
    return None if value is None else parse_money(value)


def _money_out(amount: Decimal | None) -> int | float | None:
    # JSON numbers, as SPEC shows money; at most ~15 significant digits, so exact round trip.
    if amount is None:
        return None
    return int(amount) if amount == amount.to_integral_value() else float(amount)


def _fraction(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"{show(value)} is not a fraction of a limit (try 0.8)")


def _timezone(value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{show(value)} is not a time zone (try UTC or Europe/Paris)")
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{show(value)} is not a time zone (try UTC or Europe/Paris)") from None
    return value


_STORE_HINT = "try sqlite:////var/lib/budget.db or redis://localhost:6379/0"


def parse_store_url(url: str) -> tuple[str, str]:
    """(kind, target) of a store URL: ("sqlite", path) or ("redis", the URL as given).

    ``sqlite:///relative/path`` and ``sqlite:////absolute/path`` (SQLAlchemy's convention),
    ``redis://host:port/db``, ``rediss://`` for TLS. Raises ValueError saying what works.
    """
    if not isinstance(url, str):
        raise ValueError(f"{show(url)} is not a store URL ({_STORE_HINT})")
    if "\0" in url:
        raise ValueError(f"{show(url)} has a NUL character in it ({_STORE_HINT})")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path or path.endswith("/"):
            raise ValueError(f"{show(url)} names no database file ({_STORE_HINT})")
        return "sqlite", path
    if url.startswith(("redis://", "rediss://")):
        rest = url.split("://", 1)[1]
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not host:
            raise ValueError(f"{show(url)} names no host ({_STORE_HINT})")
        return "redis", url
    raise ValueError(f"{show(url)} is not a store URL ({_STORE_HINT})")


def _store(value: object) -> object:
    if value is not None:
        parse_store_url(value)  # type: ignore[arg-type]  # non-text values are refused inside
    return value


Count = Annotated[int | None, BeforeValidator(_count)]
UsdLimit = Annotated[
    Decimal | None, BeforeValidator(_usd_limit), PlainSerializer(_money_out, when_used="json")
]
Price = Annotated[
    Decimal | None, BeforeValidator(_price), PlainSerializer(_money_out, when_used="json")
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScopeLimits(_Model):
    """Limits of one scope (run, session, daily, monthly); None = not limited (still counted)."""

    calls: Count = None
    tokens: Count = None
    usd: UsdLimit = None

    def value(self, limit: str) -> int | Decimal | None:
        """The limit named calls, tokens or usd."""
        result: int | Decimal | None = getattr(self, limit)
        return result


class RateLimits(_Model):
    """A sliding window of one minute, per agent."""

    calls_per_minute: Count = None
    tokens_per_minute: Count = None


class ModelPricing(_Model):
    """USD per million tokens. Cache reads and writes default to input, reasoning to output."""

    input: Annotated[Decimal, BeforeValidator(_price), PlainSerializer(_money_out)]
    output: Annotated[Decimal, BeforeValidator(_price), PlainSerializer(_money_out)]
    cached_input: Price = None
    cache_write: Price = None
    reasoning: Price = None


class BudgetPolicy(_Model):
    """The ``budget`` section. Counts are ints; money is Decimal USD."""

    store: Annotated[str | None, BeforeValidator(_store)] = None
    run: ScopeLimits = Field(default_factory=ScopeLimits)
    session: ScopeLimits = Field(default_factory=ScopeLimits)
    daily: ScopeLimits = Field(default_factory=ScopeLimits)
    monthly: ScopeLimits = Field(default_factory=ScopeLimits)
    rate: RateLimits = Field(default_factory=RateLimits)
    pricing: dict[str, ModelPricing] = Field(default_factory=dict)
    unknown_model: Literal["deny", "free"] = "deny"
    alerts: list[Annotated[float, BeforeValidator(_fraction)]] = Field(
        default_factory=lambda: [0.8, 0.9]
    )
    timezone: Annotated[str | None, BeforeValidator(_timezone)] = None

    def scope(self, name: str) -> ScopeLimits:
        """The limits of run, session, daily or monthly."""
        limits: ScopeLimits = getattr(self, name)
        return limits
