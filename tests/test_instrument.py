"""Instrumented SDK clients in real runs: pointed at the run's gateway, every entry point
metered once at the wire.

The child is a real Python program using the real openai / anthropic SDKs against the fake
provider on loopback; each call carries its own label (``x-supervise-label``), so the run's
``usage.by_label`` shows what each entry point was charged.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fake_provider import (
    ANTHROPIC_USAGE,
    CHAT_USAGE,
    EMBEDDING_USAGE,
    RESPONSES_USAGE,
    FakeProvider,
)

from supervisor import Policy, Supervisor, instrument
from supervisor.result import RunResult

OWN_KEY = "sk-the-childs-own-key-0123456789"
HELD_KEY = "sk-held-by-supervise-9876543210"
CHAT = (CHAT_USAGE["prompt_tokens"], CHAT_USAGE["completion_tokens"])
RESPONSES = (RESPONSES_USAGE["input_tokens"], RESPONSES_USAGE["output_tokens"])
EMBEDDING = (EMBEDDING_USAGE["prompt_tokens"], 0)
ANTHROPIC = (  # input: 25 uncached + 100 cache reads + 50 cache writes
    175,
    ANTHROPIC_USAGE["output_tokens"],
)

OPENAI_CHILD = """
import asyncio, json, os, sys, openai
from supervisor.client import instrument_openai
base = sys.argv[1]
c = instrument_openai(openai.OpenAI(api_key=os.environ.get("CHILD_KEY", "unset"),
                                    base_url=base, max_retries=2), label="default")
M, MSG = "gpt-4o-mini", [{"role": "user", "content": "Say hello"}]
def h(label, **more):
    return {"extra_headers": {"x-supervise-label": label, **more}}
seen = {}
c.chat.completions.create(model=M, messages=MSG, **h("create"))
for _ in c.chat.completions.create(model=M, messages=MSG, stream=True, **h("stream")):
    pass
c.chat.completions.parse(model=M, messages=MSG, **h("parse"))
with c.chat.completions.stream(model=M, messages=MSG, **h("stream_helper")) as s:
    for _ in s:
        pass
raw = c.chat.completions.with_raw_response.create(model=M, messages=MSG, **h("raw"))
seen["raw"] = [raw.http_response.status_code, raw.parse().usage.prompt_tokens,
               raw.headers.get("content-type")]
with c.chat.completions.with_streaming_response.create(model=M, messages=MSG,
                                                       **h("streaming_response")) as r:
    seen["streaming_response"] = r.parse().usage.completion_tokens
c.with_options(timeout=30).chat.completions.create(model=M, messages=MSG, **h("with_options"))
c.copy().chat.completions.create(model=M, messages=MSG, **h("copy"))
c.responses.create(model="gpt-4.1-mini", input="hi", **h("responses"))
for _ in c.responses.create(model="gpt-4.1-mini", input="hi", stream=True,
                            **h("responses_stream")):
    pass
c.responses.parse(model="gpt-4.1-mini", input="hi", **h("responses_parse"))
c.embeddings.create(model="text-embedding-3-small", input="hi", **h("embeddings"))
c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", **h("legacy"))
c.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", stream=True,
                     **h("legacy_stream"))
seen["retry"] = c.chat.completions.create(model=M, messages=MSG,
                                          **h("retry", **{"x-fake": "flaky"})).id
s = c.chat.completions.create(model=M, messages=MSG, stream=True, **h("broken"))
next(iter(s))
s.close()  # the caller breaks off after the first chunk
c.chat.completions.create(model=M, messages=MSG)  # the label instrument_openai was given
async def main():
    a = instrument_openai(openai.AsyncOpenAI(api_key=os.environ.get("CHILD_KEY", "unset"),
                                             base_url=base, max_retries=0))
    await a.chat.completions.create(model=M, messages=MSG, **h("async"))
    async for _ in await a.chat.completions.create(model=M, messages=MSG, stream=True,
                                                   **h("async_stream")):
        pass
    await a.close()
asyncio.run(main())
print(json.dumps(seen))
"""

OPENAI_LABELS = {
    "create": CHAT,
    "stream": CHAT,
    "parse": CHAT,
    "stream_helper": CHAT,
    "raw": CHAT,
    "streaming_response": CHAT,
    "with_options": CHAT,
    "copy": CHAT,
    "responses": RESPONSES,
    "responses_stream": RESPONSES,
    "responses_parse": RESPONSES,
    "embeddings": EMBEDDING,
    "legacy": CHAT,
    "legacy_stream": CHAT,
    "retry": CHAT,
    "broken": CHAT,
    "default": CHAT,
    "async": CHAT,
    "async_stream": CHAT,
}

ANTHROPIC_CHILD = """
import asyncio, json, os, sys, anthropic
from supervisor.client import instrument_anthropic
base = sys.argv[1]
c = instrument_anthropic(anthropic.Anthropic(api_key=os.environ.get("CHILD_KEY", "unset"),
                                             base_url=base, max_retries=0))
M, MSG = "claude-3-5-haiku-latest", [{"role": "user", "content": "Say hello"}]
def h(label):
    return {"extra_headers": {"x-supervise-label": label}}
seen = {}
c.messages.create(model=M, max_tokens=300, messages=MSG, **h("create"))
for _ in c.messages.create(model=M, max_tokens=300, messages=MSG, stream=True, **h("stream")):
    pass
with c.messages.stream(model=M, max_tokens=300, messages=MSG, **h("stream_helper")) as s:
    seen["text"] = "".join(s.text_stream)
raw = c.messages.with_raw_response.create(model=M, max_tokens=300, messages=MSG, **h("raw"))
seen["raw"] = [raw.http_response.status_code, raw.parse().usage.input_tokens]
c.beta.messages.create(model=M, max_tokens=300, messages=MSG, **h("beta"))
c.messages.count_tokens(model=M, messages=MSG, **h("count_tokens"))
c.with_options(timeout=30).messages.create(model=M, max_tokens=300, messages=MSG,
                                           **h("with_options"))
async def main():
    a = instrument_anthropic(anthropic.AsyncAnthropic(
        api_key=os.environ.get("CHILD_KEY", "unset"), base_url=base, max_retries=0))
    await a.messages.create(model=M, max_tokens=300, messages=MSG, **h("async"))
    await a.close()
asyncio.run(main())
print(json.dumps(seen))
"""

ANTHROPIC_LABELS = {
    label: ANTHROPIC
    for label in ("create", "stream", "stream_helper", "raw", "beta", "with_options", "async")
}


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A fake OpenAI/Anthropic provider on loopback."""
    server = FakeProvider()
    yield server
    server.close()


def policy(fake: FakeProvider, tmp_path: Path, **top: Any) -> Policy:
    """Both providers at the fake, ``gateway: on``: supervise holds no key (unless ``top``
    says otherwise), so the gateway serves instrumented clients only."""
    data: dict[str, Any] = {
        "audit": str(tmp_path / "audit.jsonl"),
        "gateway": {
            "mode": "on",
            "providers": {
                "openai": {"kind": "openai", "upstream": f"{fake.url}/v1"},
                "anthropic": {"kind": "anthropic", "upstream": fake.url},
            },
        },
        "budget": {"run": {"usd": 5}},
        "env": {"set": {"CHILD_KEY": OWN_KEY}},
    }
    data.update(top)
    return Policy.from_dict(data)


def run(pol: Policy, code: str, base: str, tmp_path: Path) -> tuple[RunResult, str, str]:
    """Run the child ``code`` with its base URL; the result, its stdout and stderr."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:
        result = Supervisor(pol).run([sys.executable, "-c", code, base], stdout=o, stderr=e)
    return result, out.read_text(), err.read_text()


def charged(result: RunResult) -> dict[str, tuple[int, int, int]]:
    """Each label's (calls, input tokens, output tokens)."""
    rows = result.usage.by_label
    return {
        k: (int(str(v["calls"])), int(str(v["input_tokens"])), int(str(v["output_tokens"])))
        for k, v in rows.items()
    }


def test_every_openai_entry_point_is_charged_once(fake: FakeProvider, tmp_path: Path) -> None:
    """create, streams, parse, raw and streaming responses, with_options, copy, Responses,
    embeddings, legacy completions, a retry, a broken-off stream, async: each charged once,
    exactly what the fake served; the child's own key is what reached the provider."""
    result, out, err = run(policy(fake, tmp_path), OPENAI_CHILD, f"{fake.url}/v1", tmp_path)
    assert result.exit_code == 0, err
    expected = {label: (1, i, o) for label, (i, o) in OPENAI_LABELS.items()}
    assert charged(result) == expected
    assert result.usage.api_calls == len(OPENAI_LABELS)
    seen = json.loads(out)
    assert seen["raw"] == [200, CHAT[0], "application/json"]  # the raw response, unharmed
    assert seen["streaming_response"] == CHAT[1]
    assert fake.failed == 1  # the retry: a 500 (not charged), then the 200 (charged)
    posts = [h for path, h, body in fake.seen if body]
    assert len(posts) == len(OPENAI_LABELS) + 1
    assert {h.get("Authorization") for h in posts} == {f"Bearer {OWN_KEY}"}  # custody off
    assert not any("x-supervise-token" in {k.lower() for k in h} for _, h, _ in fake.seen)
    assert "warning" not in err


def test_every_anthropic_entry_point_is_charged_once(fake: FakeProvider, tmp_path: Path) -> None:
    """messages.create, streams, stream helper, raw response, beta.messages, with_options,
    async: each charged once; count_tokens is free; the child's own key went upstream."""
    result, out, err = run(policy(fake, tmp_path), ANTHROPIC_CHILD, fake.url, tmp_path)
    assert result.exit_code == 0, err
    expected = {label: (1, i, o) for label, (i, o) in ANTHROPIC_LABELS.items()}
    assert charged(result) == expected
    seen = json.loads(out)
    assert seen["raw"] == [200, ANTHROPIC_USAGE["input_tokens"]]
    assert {h.get("X-Api-Key") or h.get("x-api-key") for _, h, b in fake.seen if b} == {OWN_KEY}


def test_a_held_key_client_from_the_environment_is_charged_once(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """supervise holds the key: OpenAI() reads the gateway from the environment; instrumenting
    it adds only the label, and a with_raw_response call is charged once, exactly."""
    key = tmp_path / "key"
    key.write_text(HELD_KEY)
    providers = {"openai": {"kind": "openai", "upstream": f"{fake.url}/v1", "key_file": str(key)}}
    pol = policy(fake, tmp_path, gateway={"mode": "auto", "providers": providers})
    code = """
import os, openai
from supervisor.client import instrument_openai
assert os.environ["OPENAI_BASE_URL"].startswith(os.environ["SUPERVISE_GATEWAY"])
c = instrument_openai(openai.OpenAI(), label="env")
raw = c.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
print(raw.parse().usage.prompt_tokens)
"""
    result, out, err = run(pol, code, "", tmp_path)
    assert result.exit_code == 0, err
    assert out.strip() == str(CHAT[0])
    assert charged(result) == {"env": (1, *CHAT)}
    assert fake.seen[0][1]["Authorization"] == f"Bearer {HELD_KEY}"


def test_a_spent_budget_is_the_sdks_own_error_at_once(fake: FakeProvider, tmp_path: Path) -> None:
    """Custody off too: a budget too small for the call gives the SDK's 429 at once."""
    pol = policy(fake, tmp_path, budget={"run": {"usd": 0.000001}})
    code = """
import openai, sys
from supervisor.client import instrument_openai
c = instrument_openai(openai.OpenAI(api_key="k", base_url=sys.argv[1], max_retries=2))
try:
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
except openai.RateLimitError as e:
    print("DENIED", e.status_code)
"""
    result, out, err = run(pol, code, f"{fake.url}/v1", tmp_path)
    assert out.strip() == "DENIED 429", err
    assert fake.seen == [] and result.usage.api_calls == 0


def test_no_budget_with_gateway_on_counts_usage(fake: FakeProvider, tmp_path: Path) -> None:
    """A policy without a budget and ``gateway: on``: no limit, the usage is counted."""
    pol = Policy.from_dict(
        {
            "audit": str(tmp_path / "audit.jsonl"),
            "gateway": {
                "mode": "on",
                "providers": {"openai": {"kind": "openai", "upstream": f"{fake.url}/v1"}},
            },
        }
    )
    code = """
import openai, sys
from supervisor.client import instrument_openai
c = instrument_openai(openai.OpenAI(api_key="k", base_url=sys.argv[1]), label="on")
c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
"""
    result, _, err = run(pol, code, f"{fake.url}/v1", tmp_path)
    assert result.exit_code == 0, err
    assert charged(result) == {"on": (1, *CHAT)}


UNMETERED_CHILD = """
import openai, sys
from supervisor.client import instrument_openai
c = openai.OpenAI(api_key="k", base_url=sys.argv[1])
assert instrument_openai(c) is c and instrument_openai(c) is c
print(c.chat.completions.create(model="gpt-4o-mini",
      messages=[{"role": "user", "content": "hi"}]).usage.prompt_tokens)
"""


def test_no_budget_meters_nothing_and_says_so_once(fake: FakeProvider, tmp_path: Path) -> None:
    """No budget, gateway auto, a budget RPC open for steps: the call goes straight to the
    provider, nothing is charged, one warning, never NotSupervised."""
    pol = Policy.from_dict({"audit": str(tmp_path / "a.jsonl"), "limits": {"step_time": "1h"}})
    result, out, err = run(pol, UNMETERED_CHILD, f"{fake.url}/v1", tmp_path)
    assert result.exit_code == 0, err
    assert out.strip() == str(CHAT[0]) and result.usage.api_calls == 0
    assert err.count("not supervised: nothing metered") == 1


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_no_gateway_falls_back_to_the_budget_rpc(
    fake: FakeProvider, tmp_path: Path, mode: str
) -> None:
    """``gateway: off``, or ``auto`` with no key held, and a budget: create is metered over
    the RPC, and a warning says what that way does not meter."""
    pol = policy(fake, tmp_path, gateway=mode)
    result, _, err = run(pol, UNMETERED_CHILD, f"{fake.url}/v1", tmp_path)
    assert result.exit_code == 0, err
    assert result.usage.api_calls == 1 and result.usage.input_tokens == CHAT[0]
    assert err.count("the run's gateway is off") == 1


def test_outside_supervise_nothing_breaks(
    fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No run: the client comes back unchanged, works, and one warning says nothing is metered."""
    for name in ("SUPERVISE_RPC_FD", "SUPERVISE_GATEWAY_URL", "SUPERVISE_GATEWAY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(instrument, "_said", set())
    c = openai.OpenAI(api_key="k", base_url=f"{fake.url}/v1", max_retries=0)
    with pytest.warns(RuntimeWarning, match="nothing metered"):
        assert instrument.instrument_openai(c) is c
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert instrument.instrument_openai(c) is c  # said once
    r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.usage is not None and r.usage.prompt_tokens == CHAT[0]
    c.close()


ENV_CHILD = """
import json, os
names = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY",
         "SUPERVISE_GATEWAY", "SUPERVISE_GATEWAY_URL", "SUPERVISE_GATEWAY_PROVIDERS")
print(json.dumps({n: os.environ.get(n) for n in names}))
"""


def test_only_the_kinds_whose_key_supervise_holds_are_redirected(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """``gateway: on``, no key held: the SDK variables stay as they were (the child's own key
    included) and the instrumentation gets the gateway; ``auto`` with an OpenAI key held:
    only OpenAI's are redirected."""
    own = {"OPENAI_API_KEY": OWN_KEY, "ANTHROPIC_API_KEY": OWN_KEY}
    pol = policy(fake, tmp_path, env={"set": own})
    result, out, err = run(pol, ENV_CHILD, "", tmp_path)
    env = json.loads(out)
    assert result.exit_code == 0, err
    assert env["OPENAI_BASE_URL"] is None and env["SUPERVISE_GATEWAY"] is None
    assert env["OPENAI_API_KEY"] == OWN_KEY and env["ANTHROPIC_API_KEY"] == OWN_KEY
    assert env["SUPERVISE_GATEWAY_URL"].startswith("http://127.0.0.1:")
    assert json.loads(env["SUPERVISE_GATEWAY_PROVIDERS"]) == {
        "openai": ["openai", f"{fake.url}/v1"],
        "anthropic": ["anthropic", fake.url],
    }
    key = tmp_path / "key"
    key.write_text(HELD_KEY)
    providers = {
        "openai": {"kind": "openai", "upstream": f"{fake.url}/v1", "key_file": str(key)},
        "anthropic": {"kind": "anthropic", "upstream": fake.url},
    }
    pol = policy(fake, tmp_path, env={"set": own}, gateway={"mode": "auto", "providers": providers})
    result, out, err = run(pol, ENV_CHILD, "", tmp_path)
    env = json.loads(out)
    assert env["OPENAI_BASE_URL"] == f"{env['SUPERVISE_GATEWAY']}/openai/v1"
    assert env["OPENAI_API_KEY"] not in (OWN_KEY, HELD_KEY)  # the run token
    assert env["ANTHROPIC_BASE_URL"] is None and env["ANTHROPIC_API_KEY"] == OWN_KEY
