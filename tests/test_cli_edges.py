"""Small things a user trips on in ``supervise audit`` and ``supervise budget`` (issue 16,
item 7), through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

from _helpers import spend, supervise

from supervisor.audit import AuditLog


def test_audit_on_a_fresh_machine_says_there_is_nothing_yet(isolated_state: Path) -> None:
    """No run yet: `supervise audit` (and --verify) exit 0 saying so, not 125."""
    done = supervise("audit")
    assert done.returncode == 0, done.stderr
    assert "no audit log yet" in done.stderr
    checked = supervise("audit", "--verify", "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["count"] == 0
    assert supervise("audit", str(isolated_state / "typo.jsonl")).returncode == 125  # named


def test_a_torn_line_does_not_hide_the_rest_of_the_log(tmp_path: Path) -> None:
    """A line cut by a crash: the summary and the list still read every other record and
    name the torn line; --verify flags it (exit 1)."""
    log = tmp_path / "audit.jsonl"
    with AuditLog(log) as audit:
        for i in range(3):
            audit.append("run_start", run_id=f"r{i}", agent="bot")
    with open(log, "ab") as f:
        f.write(b'{"ts":"2026-01-0')  # torn mid-write
    with AuditLog(log) as audit:
        audit.append("run_start", run_id="r3", agent="bot")
    summary = supervise("audit", str(log))
    assert summary.returncode == 0, summary.stderr
    assert "line 4" in summary.stderr and "bot" in summary.stdout
    listed = supervise("audit", str(log), "--json")
    assert listed.returncode == 0
    assert [json.loads(x)["run_id"] for x in listed.stdout.splitlines()] == [
        "r0", "r1", "r2", "r3"
    ]  # fmt: skip
    verified = supervise("audit", "--verify", str(log))
    assert verified.returncode == 1 and "line 4" in verified.stderr


def test_a_store_path_with_a_typo_creates_no_directories(tmp_path: Path) -> None:
    """sqlite:////missing/dir/x.db is an error naming the path (125); no directory appears."""
    missing = tmp_path / "nonexistent" / "dir"
    url = f"sqlite:///{missing}/x.db"
    done = supervise("budget", "status", "--agent", "bot", "--store", url)
    assert done.returncode == 125 and str(missing) in done.stderr
    assert not (tmp_path / "nonexistent").exists()


POLICY = """\
version: 1
agent: bot
budget:
  daily: {usd: 2}
  rate: {calls_per_minute: 60}
"""


def test_status_table_names_its_columns(tmp_path: Path) -> None:
    """The table's header: the metric column is not called "limit" beside "limit value"."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    store = f"sqlite:///{tmp_path}/b.db"
    spend(store, "0.5", rate=True)
    done = supervise("budget", "status", "-p", str(policy), "--store", store)
    header = done.stdout.splitlines()[1].split()
    assert header == ["scope", "key", "of", "used", "held", "limit", "%"]


def test_reset_shows_no_internal_keys_and_fails_for_an_unknown_agent(tmp_path: Path) -> None:
    """reset prints the scopes a user knows (the rate window as one line, no rate:KEY), and
    an agent with nothing to reset exits 1 saying so."""
    store = f"sqlite:///{tmp_path}/b.db"
    spend(store, "1.25", rate=True)
    audit = str(tmp_path / "audit.jsonl")
    done = supervise("budget", "reset", "--agent", "bot", "--store", store, "--audit", audit)
    assert done.returncode == 0, done.stderr
    assert "rate:" not in done.stdout and "reset the rate window" in done.stdout
    assert "reset daily:" in done.stdout
    nobody = supervise("budget", "reset", "--agent", "nobody", "--store", store, "--audit", audit)
    assert nobody.returncode == 1 and "nobody" in nobody.stderr
