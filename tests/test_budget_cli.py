"""The budget and models commands, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

from _helpers import spend, supervise

from supervisor.audit import read_events

POLICY = """\
version: 1
agent: bot
budget:
  daily: {usd: 2, calls: 10}
  monthly: {usd: 20}
  rate: {calls_per_minute: 60}
  pricing:
    my-model: {input: 1, output: 2}
"""


def test_status_json_has_specs_shape(tmp_path: Path) -> None:
    """--json: agent, store and every scope with calls/tokens/usd as used, held, limit."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    store = f"sqlite:///{tmp_path}/b.db"
    spend(store, "0.5", session="s1")
    done = supervise("budget", "status", "--policy", str(policy), "--store", store,
                     "--session", "s1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["agent"], doc["store"]) == ("bot", store)
    assert [s["scope"] for s in doc["scopes"]] == ["session", "daily", "monthly", "rate"]
    daily = doc["scopes"][1]
    assert len(daily["key"]) == 10 and daily["usd"] == {"used": 0.5, "held": 0, "limit": 2}
    assert daily["calls"] == {"used": 1, "held": 0, "limit": 10}
    assert daily["tokens"] == {"used": 150, "held": 0, "limit": None}
    assert doc["scopes"][3]["calls"]["limit"] == 60


def test_status_table_shows_percentages(tmp_path: Path) -> None:
    """The table lists each scope and limit with used, held, limit and %."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    store = f"sqlite:///{tmp_path}/b.db"
    spend(store, "0.5")
    done = supervise("budget", "status", "-p", str(policy), "--store", store)
    assert done.returncode == 0, done.stderr
    daily_usd = next(line for line in done.stdout.splitlines() if line.startswith("daily")
                     and " usd " in line)  # fmt: skip
    assert daily_usd.split()[3:] == ["$0.50", "$0.00", "$2.00", "25.0"]


def test_status_without_agent_is_a_usage_error() -> None:
    """No --agent and a policy without one: 125 and a message saying what to pass."""
    done = supervise("budget", "status")
    assert done.returncode == 125 and "--agent" in done.stderr


def test_unreachable_store_exits_125_naming_it() -> None:
    """A dead Redis or a bad URL: 125, the URL and the fix."""
    for url in ("redis://127.0.0.1:1/0", "ftp://x"):
        done = supervise("budget", "status", "--agent", "bot", "--store", url)
        assert done.returncode == 125 and url in done.stderr and "store" in done.stderr


def test_reset_is_audited(tmp_path: Path) -> None:
    """reset zeroes the period's used and writes a budget_reset audit event saying what it was."""
    store = f"sqlite:///{tmp_path}/b.db"
    audit = tmp_path / "audit.jsonl"
    spend(store, "1.25")
    done = supervise("budget", "reset", "--agent", "bot", "--period", "daily", "--store", store,
                     "--audit", str(audit))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "reset daily:" in done.stdout and "$1.25" in done.stdout
    (event,) = read_events(audit)
    assert (event["event"], event["agent"], event["action"]) == ("budget_reset", "bot", "reset")
    assert event["detail"]["period"] == "daily" and event["detail"]["scopes"][0]["usd"] == "$1.25"
    after = supervise("budget", "status", "--agent", "bot", "--store", store, "--json")
    scopes = {s["scope"]: s for s in json.loads(after.stdout)["scopes"]}
    assert scopes["daily"]["usd"]["used"] == 0 and scopes["monthly"]["usd"]["used"] == 1.25


def test_reset_needs_an_agent() -> None:
    """reset without --agent is refused (125)."""
    assert supervise("budget", "reset").returncode == 125


def test_models_lists_prices_with_the_source(tmp_path: Path) -> None:
    """models PATTERN prints USD per million tokens and the price source's version."""
    done = supervise("models", "gpt-4o-mini")
    assert done.returncode == 0, done.stderr
    assert "genai-prices" in done.stdout.splitlines()[0]
    row = next(
        line.split() for line in done.stdout.splitlines() if line.split()[1:2] == ["gpt-4o-mini"]
    )
    assert row[:5] == ["openai", "gpt-4o-mini", "0.15", "0.6", "0.075"]


def test_models_includes_policy_overrides(tmp_path: Path) -> None:
    """With --policy, its budget.pricing rows come first, marked policy."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    done = supervise("models", "my-model", "-p", str(policy), "--json")
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout.splitlines()[0])
    assert (first["provider"], first["model"], first["input"], first["output"]) == (
        "policy", "my-model", 1.0, 2.0
    )  # fmt: skip


def test_models_without_a_match_exits_1() -> None:
    """A pattern that matches nothing says so."""
    done = supervise("models", "zzz-no-such-model")
    assert done.returncode == 1 and "no model matches" in done.stderr


def test_models_shows_every_price_column() -> None:
    """models: one column per price (1-hour cache writes and web searches too), also in JSON."""
    done = supervise("models", "anthropic/claude-sonnet-4-0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "cache write 1h" in lines[1] and "web searches" in lines[1]
    row = next(line.split() for line in lines if line.split()[1:2] == ["claude-sonnet-4-0"])
    assert row == ["anthropic", "claude-sonnet-4-0", "3", "15", "0.3", "3.75", "6", "-", "10"]
    done = supervise("models", "anthropic/claude-sonnet-4-0", "--json")
    doc = json.loads(done.stdout.splitlines()[0])
    assert (doc["cache_write_1h"], doc["web_searches"]) == (6.0, 10.0)
