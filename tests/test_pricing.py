"""Price tests: the maintained table for both providers' token kinds, overrides, rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from supervisor.budget._policy import ModelPricing
from supervisor.budget.pricing import Prices, Tokens, source_version

# Anthropic reports input_tokens WITHOUT cache reads/writes; OpenAI's prompt_tokens include
# cached tokens. SPEC's input_tokens always includes them: these are the conversions.
ANTHROPIC_RAW = {"input_tokens": 3000, "cache_read_input_tokens": 5000,
                 "cache_creation_input_tokens": 2000, "output_tokens": 700}  # fmt: skip
OPENAI_RAW = {"prompt_tokens": 10000, "cached_tokens": 6000, "completion_tokens": 900,
              "reasoning_tokens": 400}  # fmt: skip


def anthropic_tokens(raw: dict[str, int]) -> Tokens:
    """SPEC's tokens from an Anthropic usage block."""
    cached, written = raw["cache_read_input_tokens"], raw["cache_creation_input_tokens"]
    return Tokens(raw["input_tokens"] + cached + written, raw["output_tokens"], cached, written)


def openai_tokens(raw: dict[str, int]) -> Tokens:
    """SPEC's tokens from an OpenAI usage block."""
    return Tokens(raw["prompt_tokens"], raw["completion_tokens"], raw["cached_tokens"], 0,
                  raw["reasoning_tokens"])  # fmt: skip


def test_anthropic_cache_reads_and_writes_are_priced_apart() -> None:
    """claude-3-5-haiku: $0.8 input, $0.08 cache read, $1 cache write, $4 output per million."""
    priced = Prices().price("claude-3-5-haiku-latest", "anthropic", anthropic_tokens(ANTHROPIC_RAW))
    assert priced is not None
    # 3000 x 0.8 + 5000 x 0.08 + 2000 x 1 + 700 x 4 micro-USD
    assert priced.micro_usd == 2400 + 400 + 2000 + 2800
    assert priced.source == "genai-prices" and priced.version == source_version()


def test_anthropic_uncached_is_input_price() -> None:
    """Without cache tokens an Anthropic call is input x input price + output x output price."""
    priced = Prices().price("claude-3-5-haiku-latest", "anthropic", Tokens(1000, 100))
    assert priced is not None and priced.micro_usd == 800 + 400


def test_openai_cached_tokens_are_part_of_prompt_tokens() -> None:
    """gpt-4o-mini: cached tokens at $0.075, the rest of the prompt at $0.15, output at $0.6."""
    priced = Prices().price("gpt-4o-mini", "openai", openai_tokens(OPENAI_RAW))
    assert priced is not None
    # 4000 x 0.15 + 6000 x 0.075 + 900 x 0.6 (reasoning is billed as output)
    assert priced.micro_usd == 600 + 450 + 540


def test_openai_uncached() -> None:
    """Uncached OpenAI tokens: prompt x input + completion x output."""
    priced = Prices().price("gpt-4o-mini", None, Tokens(10000, 1000))
    assert priced is not None and priced.micro_usd == 1500 + 600


@pytest.mark.parametrize(
    ("model", "provider"),
    [("gpt-4o", "openai"), ("o3", None), ("claude-sonnet-4-5", "anthropic"),
     ("gemini-2.5-pro", None), ("claude-3-5-haiku-latest", None)],
)  # fmt: skip
def test_agrees_with_genai_prices_calc_price(model: str, provider: str | None) -> None:
    """Our exact computation equals genai-prices' own calc_price (tiers included), rounded up."""
    tokens = Tokens(300_000, 20_000, 100_000, 50_000, 5_000)
    ours = Prices().price(model, provider, tokens)
    theirs = calc_price(
        Usage(input_tokens=tokens.input, output_tokens=tokens.output,
              cache_read_tokens=tokens.cached_input, cache_write_tokens=tokens.cache_write,
              output_reasoning_tokens=tokens.reasoning),
        model, provider_id=provider,
    ).total_price  # fmt: skip
    assert ours is not None and Decimal(ours.micro_usd) == (theirs * 1_000_000).to_integral_value(
        rounding="ROUND_CEILING"
    )


def test_policy_overrides_come_first_with_fallbacks() -> None:
    """budget.pricing wins; cached_input defaults to input and reasoning to output."""
    prices = Prices({"gpt-4o-mini": ModelPricing(input=Decimal("10"), output=Decimal("20"),
                                                 cached_input=Decimal("1"))})  # fmt: skip
    priced = prices.price("GPT-4o-mini", None, Tokens(1000, 100, 400, 100, 50))
    assert priced is not None and priced.source == "policy"
    assert priced.micro_usd == 500 * 10 + 400 * 1 + 100 * 10 + 100 * 20


def test_a_fraction_of_a_micro_dollar_rounds_up() -> None:
    """One token at $0.075 per million costs 0.075 micro-USD: charged 1, never free."""
    prices = Prices({"tiny": ModelPricing(input=Decimal("0.075"), output=Decimal("0"))})
    priced = prices.price("tiny", None, Tokens(1, 0))
    assert priced is not None and priced.micro_usd == 1


def test_unknown_model_has_no_price() -> None:
    """A model neither the policy nor the table knows has no price (the ledger denies it)."""
    assert Prices().price("no-such-model-anywhere", None, Tokens(1, 1)) is None
    assert not Prices().knows("no-such-model-anywhere")


def test_bad_token_counts() -> None:
    """Parts may not exceed their whole; counts may not be negative."""
    for tokens in (Tokens(10, 0, 8, 3), Tokens(0, 5, 0, 0, 6), Tokens(-1, 0)):
        with pytest.raises(ValueError):
            tokens.check()


def test_table_filters_by_glob_or_substring() -> None:
    """models PATTERN: a glob matches model or provider/model; a plain word is a substring."""
    rows = Prices().table("anthropic/claude-3-5-haiku*")
    assert rows and all(r.provider == "anthropic" for r in rows)
    assert any(r.model == "gpt-4o-mini" for r in Prices().table("4o-mini"))


def test_anthropic_one_hour_cache_writes_at_their_own_price() -> None:
    """claude-sonnet-4-0: 10000 1-hour cache writes at $6, not the 5-minute $3.75 ($0.06195)."""
    hour = Tokens(10000, 130, 0, 10000, cache_write_1h=10000)
    priced = Prices().price("claude-sonnet-4-0", "anthropic", hour)
    assert priced is not None and priced.micro_usd == 61950
    five = Prices().price("claude-sonnet-4-0", "anthropic", Tokens(10000, 130, 0, 10000))
    assert five is not None and five.micro_usd == 39450


def test_anthropic_web_searches_are_ten_dollars_a_thousand() -> None:
    """Three server-side web searches add $0.03 to a $0.0045 call."""
    priced = Prices().price("claude-sonnet-4-0", "anthropic", Tokens(1000, 100, web_searches=3))
    assert priced is not None and priced.micro_usd == 34500


@pytest.mark.parametrize(
    ("model", "tier", "micro"),
    [("gpt-4.1", None, 28000), ("gpt-4.1", "default", 28000), ("gpt-4.1", "priority", 49000),
     ("gpt-5", None, 22500), ("gpt-5", "flex", 11250), ("gpt-5", "auto", 22500)],
)  # fmt: skip
def test_openai_service_tier_prices(model: str, tier: str | None, micro: int) -> None:
    """OpenAI's service_tier picks its price row: priority costs more, flex half."""
    priced = Prices().price(model, "openai", Tokens(10000, 1000), service_tier=tier)
    assert priced is not None and priced.micro_usd == micro


def test_one_hour_writes_are_part_of_cache_writes() -> None:
    """More 1-hour cache writes than cache writes is refused, like any part above its whole."""
    with pytest.raises(ValueError, match="cache_write_1h"):
        Tokens(10, 0, 0, 3, cache_write_1h=4).check()


def test_models_table_has_the_extra_price_columns() -> None:
    """The table's rows carry the 1-hour cache write and web search prices."""
    row = next(
        r for r in Prices().table("anthropic/claude-sonnet-4-0") if r.model == "claude-sonnet-4-0"
    )
    assert row.cache_write_1h == Decimal(6) and row.web_searches == Decimal(10)
