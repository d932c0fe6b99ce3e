"""Prices of LLM calls: the policy's ``budget.pricing`` first, then the genai-prices table.

Token counts follow SPEC's definitions, the same ones genai-prices uses: ``input_tokens`` is
every input token (OpenAI's prompt_tokens; Anthropic's input_tokens + cache_read + cache
creation), ``cached_input_tokens`` and ``cache_write_tokens`` are parts of it, and
``reasoning_tokens`` is part of ``output_tokens``. A part without a price of its own is
charged at its parent's price (cache writes at the input price on OpenAI, reasoning at the
output price), which is what both providers bill.

Some calls carry more than tokens, each priced by genai-prices when the model has the price:
Anthropic's 1-hour cache writes (``cache_write_1h``, a part of ``cache_write``; the 5-minute
rate otherwise), server-side web searches (``web_searches``, USD per thousand) and OpenAI's
``service_tier`` (``priority`` and ``flex`` have their own price rows). A call without them
is priced exactly as before.

A charge is rounded *up* to a whole micro-USD, so no call is ever free by rounding. The
table is imported on first use (genai-prices costs ~0.25 s to import); each model's price
is resolved once per hour and then computed here in exact ``Decimal`` (~100x faster than
``genai_prices.calc_price``), except tiered prices, which genai-prices computes itself.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Mapping
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple

from supervisor.budget._policy import ModelPricing

__all__ = ["PriceRow", "Priced", "Prices", "Tokens", "provider_for_url", "source_version"]

_PARTS = ("input", "output", "cached_input", "cache_write", "reasoning")
# Priced by genai-prices only (a policy override has the five parts above).
_EXTRA_KEYS = {"cache_write_1h": "cache_write_1h_mtok", "web_searches": "web_searches_kcount"}
# Our parts -> genai-prices' price keys (USD per million) and usage keys.
_PRICE_KEYS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "reasoning": "output_reasoning_mtok",
}
_RESOLVE_EVERY = 3600.0  # seconds: prices change by date (ConditionalPrice), not by call


class Tokens(NamedTuple):
    """One call's tokens, in SPEC's terms (cached and cache writes are parts of input)."""

    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write: int = 0
    reasoning: int = 0
    cache_write_1h: int = 0  # part of cache_write: Anthropic's 1-hour cache writes
    web_searches: int = 0  # not tokens: server-side web searches (Anthropic, OpenAI tools)

    def check(self) -> None:
        """Raise ValueError when a count is negative or a part is larger than its whole."""
        for name, value in zip(self._fields, self, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}_tokens must be a whole number >= 0, got {value!r}")
        if self.cached_input + self.cache_write > self.input:
            raise ValueError(
                "cached_input_tokens + cache_write_tokens cannot exceed input_tokens "
                "(input_tokens counts every input token, cached ones included)"
            )
        if self.cache_write_1h > self.cache_write:
            raise ValueError(
                "cache_write_1h_tokens cannot exceed cache_write_tokens (a part of them)"
            )
        if self.reasoning > self.output:
            raise ValueError(
                "reasoning_tokens cannot exceed output_tokens (output includes reasoning)"
            )


class Priced(NamedTuple):
    """A price: integer micro-USD, where it came from and that source's version."""

    micro_usd: int
    source: str  # "policy", "genai-prices", "caller" or "free"
    version: str


class PriceRow(NamedTuple):
    """One line of ``supervise models``: USD per million tokens (None: not priced apart)."""

    provider: str
    model: str
    input: Decimal | None
    output: Decimal | None
    cached_input: Decimal | None
    cache_write: Decimal | None
    reasoning: Decimal | None
    tiered: bool
    source: str
    cache_write_1h: Decimal | None = None
    web_searches: Decimal | None = None  # USD per thousand searches


def _micro(total: Decimal) -> int:
    # Prices are USD per million tokens = micro-USD per token: tokens x price is micro-USD.
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def _exact(prices: Mapping[str, Decimal | None], tokens: Tokens) -> int:
    """Micro-USD of ``tokens`` at flat ``prices`` (parts without a price fall to the parent)."""
    inp, out = prices["input"] or Decimal(0), prices["output"] or Decimal(0)
    total = Decimal(0)
    leaf_input = tokens.input
    hour = prices.get("cache_write_1h")
    if hour is not None and tokens.cache_write_1h and prices["cache_write"] is not None:
        # Only with a 5-minute price as well: without one, every write is at the input price.
        total += tokens.cache_write_1h * hour
        leaf_input -= tokens.cache_write_1h
        tokens = tokens._replace(cache_write=tokens.cache_write - tokens.cache_write_1h)
    search = prices.get("web_searches")
    if search is not None and tokens.web_searches:
        total += tokens.web_searches * search * 1000  # USD per thousand = 1000 micro-USD each
    for part, count in (("cached_input", tokens.cached_input), ("cache_write", tokens.cache_write)):
        price = prices[part]
        if price is not None and count:
            total += count * price
            leaf_input -= count
    total += leaf_input * inp
    leaf_output = tokens.output
    price = prices["reasoning"]
    if price is not None and tokens.reasoning:
        total += tokens.reasoning * price
        leaf_output -= tokens.reasoning
    total += leaf_output * out
    return _micro(total)


def source_version() -> str:
    """``genai-prices 0.2.3``: the maintained table's package and version (imports it)."""
    import genai_prices

    return f"genai-prices {genai_prices.__version__}"


class Prices:
    """Prices calls: overrides first (exact name, then lowercase), then genai-prices."""

    def __init__(self, overrides: Mapping[str, ModelPricing] | None = None) -> None:
        self._overrides = {
            name: {part: getattr(price, part) for part in _PARTS}
            for name, price in (overrides or {}).items()
        }
        self._lower = {name.lower(): prices for name, prices in self._overrides.items()}
        self._resolved: dict[tuple[str, str | None, str | None], tuple[float, Any]] = {}
        self._version: str | None = None

    @property
    def version(self) -> str:
        if self._version is None:
            self._version = source_version()
        return self._version

    def price(
        self,
        model: str,
        provider: str | None,
        tokens: Tokens,
        *,
        service_tier: str | None = None,
    ) -> Priced | None:
        """The price of a call, or None when neither the policy nor the table knows the model.

        ``service_tier`` is OpenAI's (``priority``, ``flex``...): the table's price for that
        tier when it has one, else the standard price.
        """
        override = self._overrides.get(model) or self._lower.get(model.lower())
        if override is not None:
            return Priced(_exact(override, tokens), "policy", "policy")
        resolved = self._resolve(model, provider, service_tier or None)
        if resolved is None:
            return None
        flat, model_price = resolved
        if flat is not None:
            return Priced(_exact(flat, tokens), "genai-prices", self.version)
        from genai_prices import Usage

        usage = Usage(
            input_tokens=tokens.input,
            output_tokens=tokens.output,
            cache_read_tokens=tokens.cached_input,
            cache_write_tokens=tokens.cache_write,
            output_reasoning_tokens=tokens.reasoning,
            cache_write_1h_tokens=tokens.cache_write_1h,
            web_searches=tokens.web_searches,
        )
        total = model_price.calc_price(usage)["total_price"]
        return Priced(_micro(total * 1_000_000), "genai-prices", self.version)

    def knows(self, model: str, provider: str | None = None) -> bool:
        """Whether ``model`` has a price (from the policy or the table)."""
        if model in self._overrides or model.lower() in self._lower:
            return True
        return self._resolve(model, provider) is not None

    def _resolve(self, model: str, provider: str | None, tier: str | None = None) -> Any:
        """(flat prices or None, genai-prices ModelPrice), cached an hour; None: unknown."""
        now = time.monotonic()
        cached = self._resolved.get((model, provider, tier))
        if cached is not None and now - cached[0] < _RESOLVE_EVERY:
            return cached[1]
        from datetime import UTC, datetime

        from genai_prices import data_snapshot, types

        try:
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
        except LookupError:
            result = None
        else:
            context = None if tier is None else {"service_tier": tier}
            model_price = info.get_prices(datetime.now(UTC), context)
            keys = {**_PRICE_KEYS, **_EXTRA_KEYS}
            raw = {part: getattr(model_price, key, None) for part, key in keys.items()}
            tiered = any(isinstance(value, types.TieredPrices) for value in raw.values())
            result = (None if tiered else raw, model_price)
        self._resolved[model, provider, tier] = (now, result)
        return result

    def table(self, pattern: str | None = None) -> list[PriceRow]:
        """Every priced model matching ``pattern`` (a glob, else a substring), overrides first."""

        def matches(*names: str) -> bool:
            if not pattern:
                return True
            glob = any(ch in pattern for ch in "*?[")
            for name in names:
                low, pat = name.lower(), pattern.lower()
                if fnmatch.fnmatchcase(low, pat) if glob else pat in low:
                    return True
            return False

        rows = [
            PriceRow(
                "policy",
                name,
                p["input"],
                p["output"],
                p["cached_input"],
                p["cache_write"],
                p["reasoning"],
                False,
                "policy",
            )
            for name, p in self._overrides.items()
            if matches(name)
        ]
        from datetime import UTC, datetime

        from genai_prices import data_snapshot, types

        now = datetime.now(UTC)
        for provider in data_snapshot.get_snapshot().providers:
            for info in provider.models:
                if not matches(info.id, f"{provider.id}/{info.id}"):
                    continue
                price = info.get_prices(now)
                raw = [getattr(price, _PRICE_KEYS[part]) for part in _PARTS]
                tiered = any(isinstance(value, types.TieredPrices) for value in raw)
                values = [v.base if isinstance(v, types.TieredPrices) else v for v in raw]
                if values[0] is None and values[1] is None:
                    continue  # priced per image, per second...: not a token model
                inp, out, cached, write, reasoning = values
                extra = [getattr(price, key, None) for key in _EXTRA_KEYS.values()]
                tiered = tiered or any(isinstance(value, types.TieredPrices) for value in extra)
                hour, search = [v.base if isinstance(v, types.TieredPrices) else v for v in extra]
                row = PriceRow(provider.id, info.id, inp, out, cached, write, reasoning, tiered,
                               self.version, hour, search)  # fmt: skip
                rows.append(row)
        return rows


def provider_for_url(url: str) -> str | None:
    """The genai-prices provider whose API lives at ``url`` (an upstream), or None.

    An OpenAI-compatible endpoint of another provider (OpenRouter, Groq...) is priced as
    that provider's model, not as ``openai:<model>``.
    """
    import re

    from genai_prices import data_snapshot

    for provider in data_snapshot.get_snapshot().providers:
        pattern = getattr(provider, "api_pattern", None)
        if pattern and re.match(pattern, url):
            return str(provider.id)
    return None
