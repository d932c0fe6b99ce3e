"""The LLM gateway: real SDKs, curl and Node configured only by the run's environment.

A fake provider on loopback records what reached it; a real ledger (SQLite) behind the
run's backend meters every call; the gateway sits between them holding the real keys.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT
from fake_provider import FakeProvider

from supervisor._backend import RunBackend
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger
from supervisor.budget.pricing import Prices, Tokens
from supervisor.errors import BudgetError, StoreUnavailable
from supervisor.gateway import Gateway, Provider
from supervisor.result import Usage

OPENAI_KEY = "sk-real-openai-key-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-real-anthropic-key-0123456789"
TOKEN = "run-token-abcdefghijklmnopqrstuvwxyz012345"
CHAT = 285  # micro-USD: gpt-4o-mini, 200 + 1000 cached input, 300 output (fake_provider)
RESPONSE = 225  # gpt-4o-mini, 100 + 800 cached input, 250 output
MESSAGE = 138  # claude-3-5-haiku, 25 + 100 cache read + 50 cache write input, 15 output
EMBEDDING = 1  # text-embedding-3-small, 8 tokens (rounded up to a micro-USD)


class Events:
    """The run's side of RunBackend (RunEvents): what it was told."""

    def __init__(self) -> None:
        self.denied: list[BudgetError | StoreUnavailable] = []
        self.breached: list[Any] = []
        self.calls: list[dict[str, Any]] = []

    def budget_denied(self, error: BudgetError | StoreUnavailable) -> None:
        self.denied.append(error)

    def budget_breached(self, error: Any) -> None:
        self.breached.append(error)

    def budget_alert(self, alert: Any) -> None:
        pass

    def usage_changed(self, call: dict[str, Any]) -> None:
        self.calls.append(call)

    def spend_lost(self, error: StoreUnavailable, call: dict[str, Any]) -> None:
        raise AssertionError(f"spend lost: {error}")


@dataclass
class World:
    """A fake provider, a ledger, the run's backend and the gateway between them."""

    fake: FakeProvider
    ledger: Ledger
    backend: RunBackend
    events: Events
    gateway: Gateway
    denials: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The child's environment: supervise's own (holding the keys), scrubbed."""
        mine = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
        return self.gateway.scrub_env(mine)

    def run(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A Python child configured only by the environment; it must succeed."""
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=GLOBAL_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr
        return done

    def micro_usd(self) -> int:
        """Micro-USD the ledger charged this run."""
        usd = self.backend.totals.usd
        assert self.gateway.wait_idle(GLOBAL_TIMEOUT)
        return int(usd * 1_000_000) if usd == self.backend.totals.usd else self.micro_usd()

    def spent(self) -> int:
        """Micro-USD used on the run scope, once every call is settled."""
        assert self.gateway.wait_idle(GLOBAL_TIMEOUT)
        run = next(s for s in self.ledger.usage() if s.scope == "run")
        return int(Decimal(run.usd.used) * 1_000_000)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., World]]:
    """Build a World with the given budget (run scope limits, pricing...)."""
    made: list[World] = []

    def build(**budget: Any) -> World:
        pricing = budget.pop("pricing", {})
        policy = BudgetPolicy.model_validate({"run": budget, "pricing": pricing})
        ledger = Ledger.open(
            policy,
            run_id=f"run{len(made)}",
            agent="agent",
            session=None,
            store=f"sqlite:///{tmp_path}/budget{len(made)}.db",
        )
        events = Events()
        backend = RunBackend(events, Usage(), ledger, None, None)
        fake = FakeProvider()
        providers = [
            Provider("openai", "openai", f"{fake.url}/v1", OPENAI_KEY, "key_env OPENAI_API_KEY"),
            Provider("anthropic", "anthropic", fake.url, ANTHROPIC_KEY, "key_env X"),
        ]
        denials: list[tuple[Any, dict[str, Any]]] = []
        gw = Gateway(
            backend,
            providers,
            token=TOKEN,
            lock=threading.Lock(),
            on_denied=lambda e, d: denials.append((e, d)),
        )
        gw.start()
        world = World(fake, ledger, backend, events, gw, denials)
        made.append(world)
        return world

    yield build
    for world in made:
        world.gateway.close()
        world.fake.close()
        world.ledger.close()


def post(
    world: World,
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str] | None = None,
    *,
    token: str | None = TOKEN,
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request to the gateway: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", world.gateway.port, timeout=GLOBAL_TIMEOUT)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, raw, sent)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


OPENAI_CALLS = """
import asyncio, openai
HI = [{"role": "user", "content": "hi"}]
c = openai.OpenAI()
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
assert r.usage.prompt_tokens == 1200, r
chunks = list(c.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
assert all(ch.usage is None for ch in chunks), "a usage chunk the client did not ask for"
assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
    "Hello world, how are you today?"
with_usage = list(c.chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
    stream_options={"include_usage": True}))
assert with_usage[-1].usage.completion_tokens == 300
r = c.responses.create(model="gpt-4o-mini", input="hi")
assert r.usage.output_tokens == 250
events = list(c.responses.create(model="gpt-4o-mini", input="hi", stream=True))
assert events[-1].type == "response.completed" and events[-1].response.usage.input_tokens == 900
e = c.embeddings.create(model="text-embedding-3-small", input="hi")
assert e.usage.total_tokens == 8
async def main():
    a = openai.AsyncOpenAI()
    r = await a.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert r.usage.completion_tokens == 300
    s = await a.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    async for _ in s:
        pass
asyncio.run(main())
print(len(c.models.list().data))
"""


def test_openai_sdk_every_call_charged_exactly(make: Callable[..., World]) -> None:
    """Sync, streamed, async, Responses and embeddings calls of the OpenAI SDK: exact micro-USD."""
    world = make(usd=1)
    world.run(OPENAI_CALLS)
    assert world.spent() == 5 * CHAT + 2 * RESPONSE + EMBEDDING
    assert world.backend.totals.api_calls == 8
    assert world.backend.totals.by_label["openai"]["calls"] == 8
    posts = [h for path, h, _ in world.fake.seen]
    assert posts and all(h["Authorization"] == f"Bearer {OPENAI_KEY}" for h in posts)
    assert world.fake.seen[-1][0] == "/v1/models"  # forwarded, free


ANTHROPIC_CALLS = """
import asyncio, anthropic
c = anthropic.Anthropic()
m = c.messages.create(model="claude-3-5-haiku-latest", max_tokens=100,
                      messages=[{"role": "user", "content": "hi"}])
assert m.usage.output_tokens == 15
with c.messages.stream(model="claude-3-5-haiku-latest", max_tokens=100,
                       messages=[{"role": "user", "content": "hi"}]) as s:
    text = "".join(s.text_stream)
assert text == "Hello world, how are you today?"
n = c.messages.count_tokens(model="claude-3-5-haiku-latest",
                            messages=[{"role": "user", "content": "hi"}])
assert n.input_tokens == 42
async def main():
    a = anthropic.AsyncAnthropic()
    m = await a.messages.create(model="claude-3-5-haiku-latest", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}])
    assert m.usage.cache_read_input_tokens == 100
asyncio.run(main())
"""


def test_anthropic_sdk_every_call_charged_exactly(make: Callable[..., World]) -> None:
    """Sync, streamed and async Messages calls charged exactly; count_tokens is free."""
    world = make(usd=1)
    world.run(ANTHROPIC_CALLS)
    assert world.spent() == 3 * MESSAGE
    assert all(h["x-api-key"] == ANTHROPIC_KEY for _, h, _ in world.fake.seen)
    assert all("Authorization" not in h for _, h, _ in world.fake.seen)
    assert [p for p, _, _ in world.fake.seen].count("/v1/messages/count_tokens") == 1


CUSTODY = """
import os, sys
keys = sys.argv[1:]
found = []
for name, value in os.environ.items():
    if any(k in value for k in keys):
        found.append(name)
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    for part in ("environ", "cmdline"):
        try:
            data = open(f"/proc/{pid}/{part}", "rb").read()
        except OSError:
            continue
        if any(k.encode() in data for k in keys):
            found.append(f"{pid}/{part}")
print(" ".join(found))
"""


def test_real_keys_never_reach_the_child(make: Callable[..., World]) -> None:
    """The child's environment holds the run token, and no key is in any /proc it can read."""
    world = make(usd=1)
    env = world.env()
    assert env["OPENAI_API_KEY"] == env["ANTHROPIC_API_KEY"] == env["ANTHROPIC_AUTH_TOKEN"] == TOKEN
    assert env["OPENAI_BASE_URL"] == env["OPENAI_API_BASE"] == f"{world.gateway.url}/openai/v1"
    assert env["ANTHROPIC_BASE_URL"] == f"{world.gateway.url}/anthropic"
    assert env["SUPERVISE_GATEWAY"].startswith("http://127.0.0.1:")
    assert "127.0.0.1" in env["NO_PROXY"].split(",") and "127.0.0.1" in env["no_proxy"]
    # The keys are in the test's argv only in a form the child cannot match: split in two.
    halves = [OPENAI_KEY[:20], ANTHROPIC_KEY[:20]]
    code = CUSTODY.replace("keys = sys.argv[1:]", f"keys = [h + t for h, t in zip({halves!r}, "
                           f"{[OPENAI_KEY[20:], ANTHROPIC_KEY[20:]]!r})]")  # fmt: skip
    assert world.run(code).stdout.strip() == ""
    assert OPENAI_KEY not in repr(world.gateway.providers)


def test_curl_with_the_environment(make: Callable[..., World]) -> None:
    """curl using $OPENAI_BASE_URL and $OPENAI_API_KEY is metered like an SDK."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    world = make(usd=1)
    data = """'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'"""
    script = ('curl -sS --fail-with-body "$OPENAI_BASE_URL/chat/completions" '
              '-H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json" '
              f"-d {data}")  # fmt: skip
    done = subprocess.run(["sh", "-c", script], env=world.env(), capture_output=True, text=True,
                          timeout=GLOBAL_TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 300
    assert world.spent() == CHAT


NODE = """
const base = process.env.ANTHROPIC_BASE_URL;
(async () => {
  const r = await fetch(base + "/v1/messages", {method: "POST", headers: {
    "x-api-key": process.env.ANTHROPIC_API_KEY, "anthropic-version": "2023-06-01",
    "content-type": "application/json"}, body: JSON.stringify({model: "claude-3-5-haiku-latest",
    max_tokens: 50, stream: true, messages: [{role: "user", content: "hi"}]})});
  const text = await r.text();
  if (r.status !== 200 || !text.includes("message_stop")) { console.error(text); process.exit(1); }
  const o = await fetch(process.env.OPENAI_BASE_URL + "/chat/completions", {method: "POST",
    headers: {authorization: "Bearer " + process.env.OPENAI_API_KEY,
    "content-type": "application/json"}, body: JSON.stringify({model: "gpt-4o-mini",
    messages: [{role: "user", content: "hi"}]})});
  console.log((await o.json()).usage.completion_tokens);
})();
"""


def test_node_fetch_with_the_environment(make: Callable[..., World]) -> None:
    """A Node program's plain fetch reaches the gateway at 127.0.0.1 and is metered."""
    if shutil.which("node") is None:
        pytest.skip("no node on this machine")
    world = make(usd=1)
    done = subprocess.run(["node", "-e", NODE], env=world.env(), capture_output=True, text=True,
                          timeout=GLOBAL_TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "300"
    assert world.spent() == MESSAGE + CHAT


@pytest.mark.parametrize("token", [None, "sk-wrong", TOKEN[:-1]])
def test_no_token_is_401_and_nothing_forwarded(
    make: Callable[..., World], token: str | None
) -> None:
    """A request without the run's token is refused in OpenAI's shape; nothing is charged."""
    world = make(usd=1)
    body = {"model": "gpt-4o-mini", "messages": []}
    status, _, raw = post(world, "/openai/v1/chat/completions", body, token=token)
    assert status == 401 and "run's token" in json.loads(raw)["error"]["message"]
    status, _, raw = post(world, "/anthropic/v1/messages", body, token=token)
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    assert world.fake.seen == [] and world.spent() == 0


@pytest.mark.parametrize(
    "path",
    ["/openai/v1/files", "/openai/v1/chat/completions/x", "/anthropic/v1/complete",
     "/nosuch/v1/chat/completions", "/", "/openai/v1/../../v1/chat/completions"],
)  # fmt: skip
def test_other_paths_are_404_and_never_forwarded(make: Callable[..., World], path: str) -> None:
    """Only the metered endpoints (and the free lists) are served: the rest is 404, naming it."""
    world = make(usd=1)
    status, _, raw = post(world, path, {"model": "gpt-4o-mini"})
    assert status == 404 and "not an endpoint" in raw.decode()
    assert world.fake.seen == []


SPENT = """
import anthropic, openai, time
t = time.monotonic()
try:
    openai.OpenAI().chat.completions.create(model="gpt-4o-mini", max_tokens=10,
                                            messages=[{"role": "user", "content": "hi"}])
except openai.RateLimitError as e:
    print("openai", e.status_code, e.body["message"])
try:
    anthropic.Anthropic().messages.create(model="claude-3-5-haiku-latest", max_tokens=10,
                                          messages=[{"role": "user", "content": "hi"}])
except anthropic.BadRequestError as e:
    print("anthropic", e.status_code, e.body["error"]["message"])
print(round(time.monotonic() - t, 3))
"""


def test_spent_budget_is_the_sdks_own_error_at_once(make: Callable[..., World]) -> None:
    """A spent budget: each SDK raises its own error, with the RPC's message and no retry."""
    world = make(calls=0)
    lines = world.run(SPENT).stdout.splitlines()
    assert lines[0].startswith("openai 429 supervise: run run0 budget exceeded: calls 0 used")
    assert lines[1].startswith("anthropic 400 supervise: run run0 budget exceeded: calls")
    assert float(lines[2]) < 5  # the SDKs' back-off would take seconds
    assert world.gateway.requests == 2 and world.fake.seen == []
    assert [d["via"] for _, d in world.denials] == ["gateway", "gateway"]
    assert world.denials[0][1]["model"] == "gpt-4o-mini"


def test_rate_limit_says_when_to_retry(make: Callable[..., World], tmp_path: Path) -> None:
    """A rate limit is a 429 with retry-after, so clients wait rather than give up."""
    world = make(usd=1)
    world.ledger._rate = [0, None]  # calls_per_minute: 0
    status, headers, raw = post(
        world, "/openai/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 5}
    )
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert "x-should-retry" not in headers and "rate limited" in raw.decode()


def _max_affordable(limit: int, input_tokens: int, model: str = "gpt-4o-mini") -> int:
    prices = Prices()
    best = 0
    for out in range(0, 200_000, 1):
        priced = prices.price(model, "openai", Tokens(input_tokens, out))
        assert priced is not None
        if priced.micro_usd > limit:
            return best
        best = out
    return best


def test_request_without_max_tokens_goes_upstream_clamped(make: Callable[..., World]) -> None:
    """No max tokens and a $0.002 budget: the gateway adds the most the budget can pay."""
    world = make(usd="0.002")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    status, _, _ = post(world, "/openai/v1/chat/completions", body.encode())
    assert status == 200
    sent = json.loads(world.fake.seen[0][2])
    assert sent["max_completion_tokens"] == _max_affordable(2000, len(body)) < 16384


def test_too_large_max_tokens_is_clamped(make: Callable[..., World]) -> None:
    """A max tokens the budget cannot pay is lowered to what it can, never forwarded as asked."""
    world = make(usd="0.002")
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 100_000, "messages": []})
    post(world, "/openai/v1/chat/completions", body.encode())
    sent = json.loads(world.fake.seen[0][2])
    assert sent["max_tokens"] == _max_affordable(2000, len(body))
    assert "max_completion_tokens" not in sent


RACE = """
import openai, sys, threading
c = openai.OpenAI(default_headers={"x-fake": "honor"})
ok, denied = [], []
def work():
    for _ in range(4):
        try:
            c.chat.completions.create(model="gpt-4o-mini", max_tokens=300,
                                      messages=[{"role": "user", "content": "hi"}])
            ok.append(1)
        except openai.RateLimitError:
            denied.append(1)
threads = [threading.Thread(target=work) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(len(ok), len(denied))
"""


def test_sixteen_threads_racing_one_budget(make: Callable[..., World]) -> None:
    """16 threads x 4 calls on $0.003: the ledger equals what was served, under the limit."""
    world = make(usd="0.003")
    ok, denied = map(int, world.run(RACE).stdout.split())
    assert ok + denied == 64 and ok == len(world.fake.served) and denied > 0
    prices = Prices()
    served = 0
    for u in world.fake.served:
        cached = u["prompt_tokens_details"]["cached_tokens"]
        tokens = Tokens(u["prompt_tokens"], u["completion_tokens"], cached, 0,
                        u["completion_tokens_details"]["reasoning_tokens"])  # fmt: skip
        priced = prices.price("gpt-4o-mini", "openai", tokens)
        assert priced is not None
        served += priced.micro_usd
    assert world.spent() == served <= 3000
    assert world.events.breached == []


def test_hang_up_mid_stream_is_charged(make: Callable[..., World]) -> None:
    """A client that hangs up halfway: the gateway reads on to the usage and charges it."""
    world = make(usd=1)
    conn = http.client.HTTPConnection("127.0.0.1", world.gateway.port, timeout=GLOBAL_TIMEOUT)
    body = {"model": "gpt-4o-mini", "stream": True, "messages": []}
    headers = {"Authorization": f"Bearer {TOKEN}", "x-fake": "gate"}
    conn.request("POST", "/openai/v1/chat/completions", json.dumps(body), headers)
    answer = conn.getresponse()
    assert answer.status == 200 and answer.read1(100)
    assert world.fake.halfway.wait(GLOBAL_TIMEOUT)
    conn.close()  # gone before the usage chunk
    world.fake.gate.set()
    assert world.fake.finished.wait(GLOBAL_TIMEOUT)
    assert world.spent() == CHAT


GZIP = """
import openai
c = openai.OpenAI(default_headers={"x-fake": "gzip"})
chunks = list(c.chat.completions.create(model="gpt-4o-mini", stream=True,
                                         messages=[{"role": "user", "content": "hi"}]))
print("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices))
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
print(r.usage.prompt_tokens)
"""


def test_gzip_answers_are_parsed(make: Callable[..., World]) -> None:
    """A gzip-compressed stream and JSON answer are read for their usage and passed on."""
    world = make(usd=1)
    out = world.run(GZIP).stdout.splitlines()
    assert out == ["Hello world, how are you today?", "1200"]
    assert world.spent() == 2 * CHAT


def test_anthropic_web_searches_and_repeated_deltas(make: Callable[..., World]) -> None:
    """A server tool's repeated cumulative message_delta: the last counts, searches are priced."""
    world = make(usd=1)
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 50, "stream": True, "messages": []}
    status, _, raw = post(world, "/anthropic/v1/messages", body, {"x-fake": "search"})
    assert status == 200 and raw.count(b"event: message_delta") == 2
    assert world.spent() == MESSAGE + 30000  # 3 searches at $10 per thousand


def test_service_tier_is_priced(make: Callable[..., World]) -> None:
    """An answer served at the priority tier is charged the priority price."""
    world = make(usd=1)
    body = {"model": "gpt-4.1", "max_tokens": 300, "messages": []}
    status, _, _ = post(world, "/openai/v1/chat/completions", body, {"x-fake": "priority"})
    assert status == 200 and world.spent() == 5775


def test_label_header_is_used_and_stripped(make: Callable[..., World]) -> None:
    """x-supervise-label names the call in the usage and never reaches the provider."""
    world = make(usd=1)
    body = {"model": "gpt-4o-mini", "max_tokens": 300, "messages": []}
    post(world, "/openai/v1/chat/completions", body, {"x-supervise-label": "triage"})
    assert world.spent() == CHAT
    assert world.backend.totals.by_label["triage"]["calls"] == 1
    assert "x-supervise-label" not in {k.lower() for k in world.fake.seen[0][1]}


def test_answer_without_usage_is_charged_its_hold(make: Callable[..., World]) -> None:
    """No usage in a successful answer: the hold is charged; a provider error releases it."""
    world = make(usd=1, pricing={"no-usage": {"input": 1, "output": 1},
                                 "fail-500": {"input": 1, "output": 1}})  # fmt: skip
    raw = json.dumps({"model": "no-usage", "max_tokens": 100, "messages": []}).encode()
    status, _, _ = post(world, "/openai/v1/chat/completions", raw)
    assert status == 200 and world.spent() == len(raw) + 100  # $1 per million: 1 per token
    status, _, _ = post(world, "/openai/v1/chat/completions", {"model": "fail-500"})
    assert status == 500 and world.spent() == len(raw) + 100


def test_close_leaves_no_thread(make: Callable[..., World]) -> None:
    """close() stops the gateway's thread and frees its port."""
    before = threading.active_count()
    world = make(usd=1)
    post(world, "/openai/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 3})
    world.gateway.close()
    world.fake.close()
    assert threading.active_count() <= before
    with pytest.raises(ConnectionRefusedError):
        post(world, "/openai/v1/models", b"")


def test_serves_an_already_listening_socket(make: Callable[..., World]) -> None:
    """Given a listening socket (as made in the child's namespace), the gateway serves it."""
    import socket

    world = make(usd=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    gw = Gateway(world.backend, list(world.gateway.providers.values()), token=TOKEN, sock=sock)
    with gw:
        assert gw.port == sock.getsockname()[1] and gw.url == f"http://127.0.0.1:{gw.port}"
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=GLOBAL_TIMEOUT)
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 300, "messages": []})
        conn.request("POST", "/openai/v1/chat/completions", body, {"x-api-key": TOKEN})
        assert conn.getresponse().status == 200
        conn.close()
        assert gw.wait_idle(GLOBAL_TIMEOUT)
    assert world.spent() == CHAT


def test_custody_off_passes_the_clients_own_key(make: Callable[..., World]) -> None:
    """A provider without a key: the client's own key goes upstream, the token beside it."""
    world = make(usd=1)
    keyless = Provider("openai", "openai", f"{world.fake.url}/v1")
    gw = Gateway(world.backend, [keyless], token=TOKEN)
    with gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=GLOBAL_TIMEOUT)
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 300, "messages": []})
        headers = {"Authorization": "Bearer sk-clients-own", "x-supervise-token": TOKEN}
        conn.request("POST", "/openai/v1/chat/completions", body, headers)
        assert conn.getresponse().status == 200
        conn.close()
        assert gw.wait_idle(GLOBAL_TIMEOUT)
    assert world.fake.seen[0][1]["Authorization"] == "Bearer sk-clients-own"
    assert "x-supervise-token" not in {k.lower() for k in world.fake.seen[0][1]}
    assert world.spent() == CHAT


def test_previous_response_counts_in_the_next_estimate(make: Callable[..., World]) -> None:
    """A Responses turn naming previous_response_id holds the earlier turn's tokens too."""
    world = make(usd=1)
    post(world, "/openai/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    assert world.gateway.wait_idle(GLOBAL_TIMEOUT)
    raw = json.dumps({"model": "gpt-4o-mini", "input": "more", "max_output_tokens": 10,
                      "previous_response_id": "resp_1"}).encode()  # fmt: skip
    post(world, "/openai/v1/responses", raw)
    grants = [e for e in world.ledger.store.events("agent") if e["kind"] == "grant"]
    assert grants[-1]["input_tokens"] == len(raw) + 900 + 250
