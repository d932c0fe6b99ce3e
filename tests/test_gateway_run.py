"""The gateway in real runs: ``gateway:`` in the policy, the child's environment, the audit.

supervise holds the key (a key file, or its own environment); the command is a real SDK
child or curl configured only by the environment the run gives it; a fake provider on
loopback records what reached it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _helpers import free_port
from fake_provider import FakeProvider

from supervisor import Policy, Supervisor
from supervisor.audit import read_events

KEY = "sk-real-openai-key-for-the-run-0123456789"
CHAT = Decimal("0.000285")  # gpt-4o-mini: 200 + 1000 cached input, 300 output (fake_provider)

# argv[1]: the real key reversed (argv is in the audit log, which must not hold the key)
SDK_CALL = """
import os, sys, openai
print("ENV", os.environ.get("OPENAI_API_KEY"), os.environ.get("SUPERVISE_GATEWAY"), flush=True)
with open("/proc/self/environ", "rb") as f:
    assert sys.argv[1][::-1].encode() not in f.read(), "the real key reached the tree"
c = openai.OpenAI(max_retries=2)
try:
    r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    print("USAGE", r.usage.prompt_tokens, r.usage.completion_tokens, flush=True)
except openai.APIStatusError as e:
    print("DENIED", e.status_code, e.message, flush=True)
    sys.exit(3)
"""


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A fake OpenAI/Anthropic provider on loopback."""
    server = FakeProvider()
    yield server
    server.close()


def policy(fake: FakeProvider, key_file: Path, audit: Path, **extra: Any) -> Policy:
    """A policy whose gateway sends OpenAI calls to the fake provider, key from a file."""
    key_file.write_text(KEY + "\n")
    data: dict[str, Any] = {
        "audit": str(audit),
        "gateway": {
            "providers": {
                "openai": {
                    "kind": "openai",
                    "upstream": f"{fake.url}/v1",
                    "key_file": str(key_file),
                }
            }
        },
        "budget": {"run": {"usd": 1}},
    }
    for dotted, value in extra.items():
        section, _, name = dotted.partition("__")
        if value is None and not name:
            data.pop(section, None)
        elif name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return Policy.from_dict(data)


def run_sdk(pol: Policy, tmp_path: Path) -> tuple[Any, str]:
    """Run the SDK child under ``pol``; its stdout and the result."""
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        result = Supervisor(pol).run([sys.executable, "-c", SDK_CALL, KEY[::-1]], stdout=f)
    return result, out.read_text()


def events(audit: Path, kind: str) -> list[dict[str, Any]]:
    """The audit log's records of one kind."""
    return [e for e in read_events(str(audit)) if e["event"] == kind]


def test_an_sdk_child_is_metered_and_never_sees_the_key(fake: FakeProvider, tmp_path: Path) -> None:
    """The OpenAI SDK, configured only by the run's environment, is charged exactly; the real
    key is what reached the provider and is nowhere in the tree's environment."""
    audit = tmp_path / "audit.jsonl"
    result, out = run_sdk(policy(fake, tmp_path / "key", audit), tmp_path)
    assert result.exit_code == 0, (out, result.error)
    assert "USAGE 1200 300" in out
    token, url = out.split("ENV ", 1)[1].split()[:2]
    assert token != KEY and url.startswith("http://127.0.0.1:")
    assert result.usage.api_calls == 1 and result.usage.usd == CHAT
    assert fake.seen[-1][1].get("Authorization") == f"Bearer {KEY}"
    start = events(audit, "run_start")[0]["detail"]["enforced"]["gateway"]
    assert start["url"] == url and start["providers"]["openai"]["custody"] is True
    assert KEY not in audit.read_text()


def test_a_spent_budget_is_the_sdks_own_error_and_an_audit_line(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Over budget: the SDK raises its own error at once (no retries reach anyone), the
    provider sees nothing, and the audit has a ``denied`` line via the gateway."""
    audit = tmp_path / "audit.jsonl"
    pol = policy(fake, tmp_path / "key", audit, budget={"run": {"usd": "0.000001"}})
    result, out = run_sdk(pol, tmp_path)
    assert result.exit_code == 3, out
    assert "DENIED 429" in out and "usd" in out
    assert fake.seen == []
    denied = events(audit, "denied")
    assert len(denied) == 1, denied  # one request: x-should-retry false stopped the SDK
    assert denied[0]["detail"]["via"] == "gateway"
    assert denied[0]["detail"]["model"] == "gpt-4o-mini"
    assert denied[0]["limit"] == "usd"


def test_gateway_off_passes_the_environment_as_it_is(
    fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gateway: off``: no endpoint, and the key the user passes stays theirs to pass."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-users-own")
    pol = policy(fake, tmp_path / "key", tmp_path / "a.jsonl", gateway="off")
    out = tmp_path / "env.txt"
    code = "import os; print(os.environ.get('OPENAI_API_KEY'), os.environ.get('SUPERVISE_GATEWAY'))"
    with open(out, "w") as f:
        result = Supervisor(pol).run([sys.executable, "-c", code], stdout=f)
    assert result.exit_code == 0
    assert out.read_text().split() == ["sk-users-own", "None"]


def test_auto_is_off_without_a_budget_or_without_a_key(
    fake: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gateway: auto`` needs both a budget and a key supervise holds."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code = "import os; print(os.environ.get('SUPERVISE_GATEWAY'))"
    no_budget = policy(fake, tmp_path / "key", tmp_path / "a.jsonl", budget=None)
    no_key = Policy.from_dict({"budget": {"run": {"usd": 1}}, "audit": str(tmp_path / "b")})
    for pol in (no_budget, no_key):
        out = tmp_path / "env.txt"
        with open(out, "w") as f:
            assert Supervisor(pol).run([sys.executable, "-c", code], stdout=f).exit_code == 0
        assert out.read_text().strip() == "None"


def test_on_without_a_budget_counts_usage(fake: FakeProvider, tmp_path: Path) -> None:
    """``gateway: on`` with no budget section: the call goes through and is counted."""
    pol = policy(fake, tmp_path / "key", tmp_path / "a.jsonl", budget=None, gateway__mode="on")
    result, out = run_sdk(pol, tmp_path)
    assert result.exit_code == 0, out
    assert result.usage.api_calls == 1 and result.usage.usd == CHAT


def test_a_fixed_listen_port(fake: FakeProvider, tmp_path: Path) -> None:
    """``gateway.listen: 127.0.0.1:PORT`` serves on that port (agents that read a config)."""
    port = free_port()
    pol = policy(fake, tmp_path / "key", tmp_path / "a.jsonl", gateway__listen=f"127.0.0.1:{port}")
    result, out = run_sdk(pol, tmp_path)
    assert result.exit_code == 0, out
    assert f"http://127.0.0.1:{port}" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_without_the_token_is_refused(fake: FakeProvider, tmp_path: Path) -> None:
    """A request without the run's token gets 401 and is never forwarded; with it, 200."""
    pol = policy(fake, tmp_path / "key", tmp_path / "a.jsonl")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    script = (
        'u="$OPENAI_BASE_URL/chat/completions"; '
        f"curl -s -o /dev/null -w '%{{http_code}} ' \"$u\" -d '{body}'; "
        f'curl -s -o /dev/null -w \'%{{http_code}}\' "$u" -H "Authorization: Bearer '
        f"$OPENAI_API_KEY\" -H 'content-type: application/json' -d '{body}'"
    )
    out = tmp_path / "codes.txt"
    with open(out, "w") as f:
        result = Supervisor(pol).run(["sh", "-c", script], stdout=f)
    assert result.exit_code == 0
    assert out.read_text().split() == ["401", "200"]
    assert len(fake.seen) == 1
    assert result.usage.api_calls == 1


def test_the_cli_caps_any_agent_with_one_set(fake: FakeProvider, tmp_path: Path) -> None:
    """``supervise --set budget.run.usd=... -- CMD``: the gateway is on by itself when
    supervise holds a key (here from its environment)."""
    import subprocess

    env = {**os.environ, "OPENAI_API_KEY": KEY, "XDG_STATE_HOME": str(tmp_path)}
    providers = f"{{openai: {{kind: openai, upstream: '{fake.url}/v1', key_env: OPENAI_API_KEY}}}}"
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "-q", "--set", "budget.run.usd=2",
         "--set", f"gateway.providers={providers}", "--json", "-",
         "--", sys.executable, "-c", SDK_CALL, KEY[::-1]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["usage"]["api_calls"] == 1
    assert Decimal(str(result["usage"]["usd"])) == CHAT


def test_network_deny_keeps_the_keys_out_and_says_the_gateway_is_unreachable(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Under ``network: deny`` the gateway is not yet served inside the tree's namespace: the
    run says so (a fallback warning in the audit), and the key still stays out of the tree."""
    audit = tmp_path / "audit.jsonl"
    pol = policy(fake, tmp_path / "key", audit, network="deny")
    out = tmp_path / "env.txt"
    code = "import os; print(os.environ.get('OPENAI_API_KEY'))"
    with open(out, "w") as f:
        result = Supervisor(pol).run([sys.executable, "-c", code], stdout=f)
    assert result.exit_code == 0
    assert out.read_text().strip() not in ("None", KEY)
    fallbacks = [e["detail"] for e in events(audit, "warning") if e["action"] == "fallback"]
    assert any("gateway is not reachable" in str(d) for d in fallbacks), fallbacks
