"""The gateway in real runs: ``gateway:`` in the policy, the child's environment, the audit.

supervise holds the key (a key file, or its own environment); the command is a real SDK
child or curl configured only by the environment the run gives it; a fake provider on
loopback records what reached it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
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


# argv[2]: the fake provider's port.  The tree tries every way out but the gateway: the
# provider directly, an address outside, the listening socket among its own fds.
DENY_CALL = (
    """
import os, socket, sys
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "open"
    except OSError:
        return "shut"
rpc, held = os.environ.get("SUPERVISE_RPC_FD"), []
for fd in os.listdir("/proc/self/fd"):
    try:
        if fd != rpc and os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            held.append(fd)
    except OSError:
        pass  # the listing's own fd, closed by now
print("WAYS", reach("127.0.0.1", int(sys.argv[2])), reach("1.1.1.1", 443), len(held), flush=True)
"""
    + SDK_CALL
)


def run_denied(pol: Policy, fake: FakeProvider, tmp_path: Path) -> tuple[Any, str]:
    """Run the SDK child that tries every way out under ``pol``; its result and stdout."""
    out = tmp_path / "out.txt"
    argv = [sys.executable, "-c", DENY_CALL, KEY[::-1], fake.url.rpartition(":")[2]]
    with open(out, "w") as f:
        result = Supervisor(pol).run(argv, stdout=f)
    return result, out.read_text()


def test_network_deny_leaves_the_gateway_as_the_only_way_out(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Under ``network: deny`` the gateway listens in the tree's own network namespace: the
    SDK child is metered exactly through it, while the provider itself, any address outside
    and the listening socket (no fd of the tree) are out of its reach."""
    audit = tmp_path / "audit.jsonl"
    result, out = run_denied(policy(fake, tmp_path / "key", audit, network="deny"), fake, tmp_path)
    assert result.exit_code == 0, (out, result.error)
    assert "WAYS shut shut 0" in out
    assert "USAGE 1200 300" in out
    assert result.usage.api_calls == 1 and result.usage.usd == CHAT
    assert len(fake.seen) == 1 and fake.seen[0][1].get("Authorization") == f"Bearer {KEY}"
    enforced = events(audit, "run_start")[0]["detail"]["enforced"]
    assert enforced["network"] == "namespace"
    assert enforced["gateway"]["listens"] == "netns"
    assert not [e for e in events(audit, "warning") if e["action"] == "fallback"]


def test_network_deny_with_a_fixed_listen_port(fake: FakeProvider, tmp_path: Path) -> None:
    """A fixed ``gateway.listen`` port under ``network: deny`` is the port in the tree's
    namespace (agents read it from a config file); the host's port stays free."""
    port = free_port()
    pol = policy(fake, tmp_path / "key", tmp_path / "a.jsonl", network="deny",
                 gateway__listen=f"127.0.0.1:{port}")  # fmt: skip
    result, out = run_denied(pol, fake, tmp_path)
    assert result.exit_code == 0, (out, result.error)
    assert f"http://127.0.0.1:{port}" in out and "WAYS shut shut 0" in out
    assert result.usage.api_calls == 1 and result.usage.usd == CHAT
    with socket.socket() as s:  # nothing of the run took the port on the host
        s.bind(("127.0.0.1", port))


def test_the_gateway_listens_on_the_host_without_network_deny(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Without ``network: deny`` the gateway listens in supervise's namespace (``host``)."""
    audit = tmp_path / "audit.jsonl"
    result, out = run_sdk(policy(fake, tmp_path / "key", audit), tmp_path)
    assert result.exit_code == 0, out
    assert events(audit, "run_start")[0]["detail"]["enforced"]["gateway"]["listens"] == "host"


def _no_netns_prefix() -> list[str]:
    """argv that runs a command where network namespaces are refused (no capabilities, no
    user namespaces left), so ``network: deny`` takes Landlock's TCP fallback; skips where
    this cannot be set up."""
    from supervisor._linux import landlock_abi

    abi = landlock_abi()
    if abi is None or abi < 4:
        pytest.skip("no Landlock TCP rules (ABI 4) on this kernel: no fallback to force")
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv (util-linux) to refuse network namespaces")
    script = (
        "echo 0 > /proc/sys/user/max_user_namespaces && "
        'exec setpriv --bounding-set=-all --inh-caps=-all -- "$@"'
    )
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh",
         "unshare", "--net", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if "unshare failed" not in probe.stderr:
        pytest.skip(f"cannot make a place without network namespaces: {probe.stderr.strip()}")
    return ["unshare", "--user", "--map-root-user", "sh", "-c", script, "sh"]


def run_without_netns(
    fake: FakeProvider, tmp_path: Path, listen: str = "127.0.0.1:0"
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``supervise`` (the CLI) running the SDK child under ``network: deny`` where network
    namespaces are refused; the finished process and the audit log."""
    prefix = _no_netns_prefix()
    audit, key_file, pol = tmp_path / "audit.jsonl", tmp_path / "key", tmp_path / "policy.yaml"
    key_file.write_text(KEY + "\n")
    pol.write_text(
        "network: deny\n"
        f"audit: {audit}\n"
        "budget: {run: {usd: 1}}\n"
        f"gateway: {{listen: '{listen}', providers: {{openai: {{kind: openai, "
        f"upstream: '{fake.url}/v1', key_file: '{key_file}'}}}}}}\n"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "supervisor", "-q", "-p", str(pol), "--json", "-",
         "--", sys.executable, "-c", DENY_CALL, KEY[::-1], fake.url.rpartition(":")[2]],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done, audit


def test_the_landlock_fallback_lets_the_tree_reach_the_gateway_port_only(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Where the network namespace is refused, Landlock's TCP rules allow a connect to the
    gateway's port alone: the SDK child is metered through it, and the provider's own port
    and any address outside stay shut."""
    done, audit = run_without_netns(fake, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "WAYS shut shut 0" in done.stdout
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["usage"]["api_calls"] == 1
    assert Decimal(str(result["usage"]["usd"])) == CHAT
    enforced = events(audit, "run_start")[0]["detail"]["enforced"]
    assert enforced["network"] == "landlock-tcp"
    assert enforced["gateway"]["listens"] == "landlock port rule"


def test_the_landlock_fallback_with_the_port_taken_leaves_the_tree_without_a_way_out(
    fake: FakeProvider, tmp_path: Path
) -> None:
    """Where the fallback finds the gateway's fixed port taken on the host, the tree gets no
    port at all (not even the taken one): the run says the gateway is unreachable, the keys
    stay out, and nothing reaches the provider."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(8)
        taken.setblocking(False)
        port = taken.getsockname()[1]
        done, audit = run_without_netns(fake, tmp_path, listen=f"127.0.0.1:{port}")
        with pytest.raises(BlockingIOError):
            taken.accept()  # the tree never connected to the port's other owner
    assert done.returncode == 1 and "Permission denied" in done.stderr  # Landlock: EACCES
    assert "gateway is not reachable" in done.stderr
    assert "WAYS shut shut 0" in done.stdout
    assert KEY not in done.stdout and fake.seen == []
    enforced = events(audit, "run_start")[0]["detail"]["enforced"]
    assert enforced["network"] == "landlock-tcp" and enforced["gateway"] is None
    fallbacks = [e["detail"] for e in events(audit, "warning") if e["action"] == "fallback"]
    assert any("gateway is not reachable" in str(d) for d in fallbacks), fallbacks
