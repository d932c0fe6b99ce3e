"""The instrumentation's budget RPC fallback (``budget=``), against a fake provider."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from fake_provider import WORDS, FakeProvider
from openai import AsyncOpenAI
from rpc_helpers import Ledger, serving

from supervisor import client
from supervisor.instrument import DEFAULT_MAX_OUTPUT, estimate_input_tokens

# Any: one message for both SDKs, whose TypedDicts for it differ.
CHAT: Any = {"role": "user", "content": "Say hello to the whole world, politely."}
EXACT_CHAT = {
    "input_tokens": 1200,
    "output_tokens": 300,
    "cached_input_tokens": 1000,
    "cache_write_tokens": 0,
    "reasoning_tokens": 100,
}
EXACT_RESPONSES = {
    "input_tokens": 900,
    "output_tokens": 250,
    "cached_input_tokens": 800,
    "cache_write_tokens": 0,
    "reasoning_tokens": 200,
}
EXACT_ANTHROPIC = {  # 25 uncached + 100 read + 50 written; thinking is part of output
    "input_tokens": 175,
    "output_tokens": 15,
    "cached_input_tokens": 100,
    "cache_write_tokens": 50,
    "reasoning_tokens": 5,
}


class World:
    """A served ledger, a Budget and the fake provider, sharing one event log."""

    def __init__(self, ledger: Ledger, budget: client.Budget, provider: FakeProvider) -> None:
        self.ledger, self.budget, self.provider = ledger, budget, provider

    def openai(self, **kw: Any) -> openai.OpenAI:
        c = openai.OpenAI(api_key="test", base_url=f"{self.provider.url}/v1", max_retries=0)
        return client.instrument_openai(c, budget=self.budget, **kw)

    def anthropic(self, **kw: Any) -> anthropic.Anthropic:
        c = anthropic.Anthropic(api_key="test", base_url=self.provider.url, max_retries=0)
        return client.instrument_anthropic(c, budget=self.budget, **kw)

    def aopenai(self) -> AsyncOpenAI:
        c = openai.AsyncOpenAI(api_key="test", base_url=f"{self.provider.url}/v1", max_retries=0)
        return client.instrument_openai(c, budget=self.budget)

    def aanthropic(self) -> AsyncAnthropic:
        c = anthropic.AsyncAnthropic(api_key="test", base_url=self.provider.url, max_retries=0)
        return client.instrument_anthropic(c, budget=self.budget)

    def commit(self) -> dict[str, Any]:
        """The one commit, without the fields the ledger adds."""
        assert len(self.ledger.commits) == 1, self.ledger.commits
        c = dict(self.ledger.commits[0])
        for name in ("reservation", "model", "label", "usd"):
            c.pop(name, None)
        return c

    def kinds(self) -> list[str]:
        """The kinds of the events so far, in order."""
        return [e[0] for e in self.ledger.events]


@contextmanager
def make_world(**limits: Any) -> Iterator[World]:
    """A ledger with these limits, served, with a Budget and a fake provider."""
    events: list[tuple[Any, ...]] = []
    ledger = Ledger(events=events, **limits)
    provider = FakeProvider(events)
    try:
        with serving(ledger) as s, client.Budget(s.server.child_fd) as b:
            yield World(ledger, b, provider)
            assert not s.errors
    finally:
        provider.close()


@pytest.fixture
def world() -> Iterator[World]:
    """A metered world with no limits."""
    with make_world() as w:
        yield w


def test_chat_completion_reserves_first_and_commits_the_exact_usage(world: World) -> None:
    """chat.completions.create: reserve (estimate, max tokens, label) -> request -> exact commit."""
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [CHAT], "max_completion_tokens": 500}
    with world.openai(label="triage") as oa:
        resp = oa.chat.completions.create(**kw)
    assert resp.choices[0].message.content == "".join(WORDS)
    estimate = estimate_input_tokens(kw)
    assert world.ledger.events[:2] == [
        ("reserve", "gpt-4o-mini", "triage", estimate, 500),
        ("http", "/v1/chat/completions"),
    ]
    assert world.kinds() == ["reserve", "http", "commit"]
    assert world.commit() == EXACT_CHAT
    assert world.ledger.commits[0]["label"] == "triage"


def test_chat_stream_asks_for_usage_and_commits_it(world: World) -> None:
    """A chat stream gets stream_options.include_usage and settles from the final usage chunk."""
    options: Any = {"x": 1}  # Any: a key the SDK does not know, which must be kept
    with world.openai() as oa:
        stream = oa.chat.completions.create(
            model="gpt-4o-mini", messages=[CHAT], stream=True, stream_options=options
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(WORDS)
    body = world.provider.requests[0][1]
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    assert world.ledger.events[0][4] == DEFAULT_MAX_OUTPUT  # no max tokens given
    assert world.commit() == EXACT_CHAT


def test_chat_stream_closed_early_settles_from_what_was_seen(world: World) -> None:
    """A stream closed after two chunks is charged the input estimate plus the text seen / 4."""
    kw: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [CHAT],
        "max_tokens": 100,
        "stream": True,
    }
    with world.openai() as oa:
        stream = oa.chat.completions.create(**kw)
        next(stream), next(stream)  # the role chunk, then "Hello"
        assert not world.ledger.commits
        stream.close()
    assert world.commit()["input_tokens"] == estimate_input_tokens(kw)
    assert world.commit()["output_tokens"] == math.ceil(len("Hello") / 4)


def test_chat_stream_abandoned_in_a_loop_settles_when_dropped(world: World) -> None:
    """Breaking out of the loop and dropping the stream settles it (never a free call)."""
    with world.openai() as oa:
        for chunk in oa.chat.completions.create(model="m", messages=[CHAT], stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                break
        del chunk
        assert world.commit()["output_tokens"] == 2


def test_a_response_without_usage_raises_and_is_charged_its_reservation(world: World) -> None:
    """No usage in the response: UsageMissing, and the whole hold is charged."""
    kw: dict[str, Any] = {"model": "no-usage", "messages": [CHAT], "max_tokens": 64}
    with world.openai() as oa, pytest.raises(client.UsageMissing):
        oa.chat.completions.create(**kw)
    assert world.commit()["input_tokens"] == estimate_input_tokens(kw)
    assert world.commit()["output_tokens"] == 64


def test_a_finished_stream_without_usage_raises_and_is_charged(world: World) -> None:
    """A stream that ends without any usage raises UsageMissing at its end; charged the hold."""
    with world.openai() as oa:
        stream = oa.chat.completions.create(
            model="no-usage", max_tokens=10, messages=[CHAT], stream=True
        )
        with pytest.raises(client.UsageMissing):
            for _ in stream:
                pass
    assert world.commit()["output_tokens"] == 10


def test_a_denied_call_never_reaches_the_network() -> None:
    """BudgetExceeded from the reservation: the provider gets zero requests."""
    with make_world(tokens=10) as w:
        with w.openai() as oa, pytest.raises(client.BudgetExceeded):
            oa.chat.completions.create(model="gpt-4o-mini", messages=[CHAT])
        with w.anthropic() as a, pytest.raises(client.BudgetExceeded):
            a.messages.create(model="claude", max_tokens=5, messages=[CHAT])
        with (
            w.anthropic() as a,
            pytest.raises(client.BudgetExceeded),
            a.messages.stream(model="claude", max_tokens=5, messages=[CHAT]),
        ):
            pass
        assert w.provider.requests == []


def test_a_calls_limit_of_5_lets_exactly_5_requests_through() -> None:
    """calls: 5 -> exactly 5 requests reach the provider; the rest are denied."""
    with make_world(calls=5) as w:
        denied = 0
        with w.openai() as oa:
            for _ in range(8):
                try:
                    oa.chat.completions.create(model="gpt-4o-mini", messages=[CHAT])
                except client.BudgetExceeded:
                    denied += 1
        assert len(w.provider.requests) == 5 and denied == 3


def test_an_http_error_releases_the_hold(world: World) -> None:
    """A provider error before any response releases the reservation: nothing charged."""
    with world.openai() as oa, pytest.raises(openai.InternalServerError):
        oa.chat.completions.create(model="fail-500", messages=[CHAT])
    assert world.kinds() == ["reserve", "http", "release"]
    assert not world.ledger.holds and not world.ledger.commits


def test_responses_api_plain_and_streamed(world: World) -> None:
    """responses.create, plain and stream=True (response.completed), commit the exact usage."""
    with world.openai() as oa:
        resp = oa.responses.create(model="gpt-4.1-mini", input="Say hello", max_output_tokens=400)
        assert resp.output_text == "".join(WORDS)
        events = list(oa.responses.create(model="gpt-4.1-mini", input="Say hello", stream=True))
    assert events[-1].type == "response.completed"
    assert [e[4] for e in world.ledger.events if e[0] == "reserve"] == [400, DEFAULT_MAX_OUTPUT]
    commits = [{k: c[k] for k in EXACT_RESPONSES} for c in world.ledger.commits]
    assert commits == [EXACT_RESPONSES, EXACT_RESPONSES]


def test_anthropic_message_counts_cache_reads_and_writes_as_input(world: World) -> None:
    """messages.create: input = input + cache read + cache creation; cached/write are subsets."""
    kw: dict[str, Any] = {
        "model": "claude-test",
        "max_tokens": 300,
        "messages": [CHAT],
        "system": "Be kind",
    }
    with world.anthropic(label="writer") as a:
        msg = a.messages.create(**kw)
    assert msg.content[0].text == "".join(WORDS)
    assert world.ledger.events[0] == (
        "reserve",
        "claude-test",
        "writer",
        estimate_input_tokens(kw),
        300,
    )
    assert world.commit() == EXACT_ANTHROPIC


def test_anthropic_raw_stream_uses_start_and_cumulative_delta_usage(world: World) -> None:
    """messages.create(stream=True): usage from message_start plus the cumulative message_delta."""
    with world.anthropic() as a:
        stream = a.messages.create(model="claude", max_tokens=300, messages=[CHAT], stream=True)
        kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert world.commit() == EXACT_ANTHROPIC


def test_anthropic_stream_helper_settles_exactly(world: World) -> None:
    """messages.stream(...) as a context manager settles from the accumulated message."""
    with world.anthropic() as a:
        with a.messages.stream(model="claude", max_tokens=300, messages=[CHAT]) as stream:
            text = "".join(stream.text_stream)
        assert text == "".join(WORDS)
    assert world.commit() == EXACT_ANTHROPIC


def test_anthropic_stream_helper_cut_short_keeps_the_input_it_saw(world: World) -> None:
    """Leaving messages.stream after the first word: the reported input, output from the text."""
    with (
        world.anthropic() as a,
        a.messages.stream(model="claude", max_tokens=300, messages=[CHAT]) as stream,
    ):
        next(iter(stream.text_stream))
    got = world.commit()
    assert got["input_tokens"] == 175 and got["cached_input_tokens"] == 100
    assert got["output_tokens"] == max(1, math.ceil(len("Hello") / 4))


def test_async_clients_are_metered(world: World) -> None:
    """AsyncOpenAI and AsyncAnthropic: plain, streamed, and messages.stream, all exact."""

    async def main() -> None:
        oa = world.aopenai()
        a = world.aanthropic()
        try:
            await oa.chat.completions.create(model="gpt-4o-mini", messages=[CHAT])
            stream = await oa.chat.completions.create(model="m", messages=[CHAT], stream=True)
            async for _ in stream:
                pass
            await oa.responses.create(model="gpt-4.1-mini", input="hi")
            await a.messages.create(model="claude", max_tokens=300, messages=[CHAT])
            raw = await a.messages.create(
                model="claude", max_tokens=300, messages=[CHAT], stream=True
            )
            async for _ in raw:
                pass
            async with a.messages.stream(model="claude", max_tokens=300, messages=[CHAT]) as s:
                await s.get_final_message()
        finally:
            await oa.close()
            await a.close()

    asyncio.run(main())
    commits = [{k: c[k] for k in EXACT_CHAT} for c in world.ledger.commits]
    exact = [EXACT_CHAT, EXACT_CHAT, EXACT_RESPONSES] + [EXACT_ANTHROPIC] * 3
    assert commits == exact
    assert world.kinds().count("reserve") == 6 and not world.ledger.holds


def test_estimate_is_conservative_and_documented() -> None:
    """ASCII counts a quarter token a character, other characters a whole token, plus overhead."""
    assert estimate_input_tokens({"messages": [{"role": "user", "content": "a" * 400}]}) == (
        math.ceil((400 + len("role") + len("user") + len("content")) / 4) + 4 + 16
    )
    assert estimate_input_tokens({"input": "日本語"}) == 3 + 4 + 16
