"""Reports from real runs: ``supervise report`` (the ledger) and ``supervise audit`` (the log).

A few supervised runs of two agents make real LLM-budget calls through the RPC (committed,
recorded, released, left open and settled, denied) and one is stopped for wall_time. The
report's and the summary's numbers are checked against figures computed here from the calls
each run made, and against the ledger's own scopes (``budget status``).
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _helpers import python, supervise

from supervisor import Policy, Supervisor
from supervisor._audit_view import format_summary, summarize
from supervisor.audit import read_events
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger, open_store
from supervisor.report import breakdown, chart_lines, costs, money

PRICES = {"m1": {"input": 1, "output": 2}, "m2": {"input": 3, "output": 15}}  # USD per 1M


def micro(model: str, tokens_in: int, tokens_out: int) -> int:
    """The charge in micro-USD: tokens x USD per million tokens is micro-USD exactly."""
    price = PRICES[model]
    return tokens_in * price["input"] + tokens_out * price["output"]


# The agent: each step is [how, model, label, input, output]; how is commit (reserve, then
# commit), record (after the fact), release (reserve, not used), open (reserve and exit with
# the hold open: settled at its input estimate), sleep (hang until stopped).
AGENT = """
import json, os, sys, time
from supervisor import client
b = client.connect()
for how, model, label, tin, tout in json.loads(sys.argv[1]):
    if how == "sleep":
        time.sleep(60)
    try:
        if how == "record":
            b.record(model=model, input_tokens=tin, output_tokens=tout, label=label)
            continue
        r = b.reserve(model=model, input_tokens=tin, max_output_tokens=max(tout, 1), label=label)
        if how == "commit":
            r.commit(input_tokens=tin, output_tokens=tout)
        elif how == "release":
            r.release()
        elif how == "open":
            os._exit(0)
    except client.BudgetExceeded as e:
        print("denied", e.scope, e.limit, flush=True)
"""

RUNS: list[dict[str, Any]] = [
    {
        "agent": "planner",
        "session": "s1",
        "steps": [
            ["commit", "m1", "plan", 1000, 500],
            ["commit", "m2", "write", 2000, 1000],
            ["record", "m1", "review", 500, 100],
            ["release", "m2", "write", 4000, 4000],
        ],
    },
    {
        "agent": "planner",
        "session": "s2",
        "steps": [["commit", "m2", "write", 3000, 0], ["open", "m1", "plan", 800, 300]],
    },
    {
        "agent": "coder",
        "session": "s1",
        # 60k input of m2 would take the run past its $0.1 limit: denied, nothing spent.
        "steps": [
            ["commit", "m1", "code", 10000, 2000],
            ["commit", "m2", "code", 60000, 1000],
            ["sleep", "-", "-", 0, 0],
        ],
        "set": {"wall_time": "1500ms"},
    },
]


def charged(step: list[Any]) -> tuple[int, int, int, int] | None:
    """(calls, input, output, micro-USD) a step is charged, or None."""
    how, model, _, tin, tout = step
    if how in ("commit", "record"):
        return 1, tin, tout, micro(model, tin, tout)
    if how == "open":  # settled at its input estimate
        return 1, tin, 0, micro(model, tin, 0)
    return None


def expected(by: str) -> dict[str, tuple[int, int, int, int]]:
    """What each group must add up to, computed from RUNS, not from the ledger."""
    sums: dict[str, list[int]] = {}
    for run in RUNS:
        for step in run["steps"]:
            got = charged(step)
            if got is None or (run["agent"] == "coder" and step[1] == "m2"):
                continue  # released, slept, or denied
            name = {"agent": run["agent"], "session": run["session"], "model": step[1]}.get(
                by, step[2]
            )
            row = sums.setdefault(name, [0, 0, 0, 0])
            for i, value in enumerate(got):
                row[i] += value
    return {name: (r[0], r[1], r[2], r[3]) for name, r in sums.items()}


@pytest.fixture
def history(fresh_store: str, tmp_path: Path) -> tuple[str, Path]:
    """The runs of RUNS, supervised for real; (store URL, audit log)."""
    log = tmp_path / "audit.jsonl"
    for run in RUNS:
        policy = Policy.from_dict(
            {
                "limits": run.get("set", {}),
                "grace": "100ms",
                "budget": {"store": fresh_store, "pricing": PRICES, "run": {"usd": "0.1"}},
            }
        )
        result = Supervisor(policy, audit=log).run(
            [*python(AGENT), json.dumps(run["steps"])], agent=run["agent"], session=run["session"]
        )
        assert result.exit_code == (124 if run["agent"] == "coder" else 0), result.violation
    return fresh_store, log


@pytest.mark.parametrize("by", ["agent", "model", "label", "session"])
def test_report_matches_the_calls_made(history: tuple[str, Path], by: str) -> None:
    """supervise report --json: each group's calls, tokens and exact USD are what the runs
    spent (released and denied calls cost nothing; a hold left open costs its estimate)."""
    url, _ = history
    done = supervise("report", "--store", url, "--json", "--by", by)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    got = {
        row["name"]: (row["calls"], row["input_tokens"], row["output_tokens"], row["usd_micro"])
        for row in doc["by"][by]
    }
    assert got == expected(by)
    total = sum(value[3] for value in got.values())
    assert doc["total"]["usd_micro"] == total
    shares = [row["share"] for row in doc["by"][by]]
    assert abs(sum(shares) - 1) < 1e-5 and shares == sorted(shares, reverse=True)


def test_report_total_is_the_ledgers_own(history: tuple[str, Path]) -> None:
    """Per agent, the report's total equals the day's USD used in the ledger's scopes."""
    url, _ = history
    doc = json.loads(supervise("report", "--store", url, "--json").stdout)
    by_agent = {row["name"]: Decimal(row["usd_micro"]) / 1_000_000 for row in doc["by"]["agent"]}
    for agent, usd in by_agent.items():
        status = supervise("budget", "status", "--agent", agent, "--store", url, "--json")
        daily = [s for s in json.loads(status.stdout)["scopes"] if s["scope"] == "daily"]
        assert Decimal(str(daily[0]["usd"]["used"])) == usd


def test_report_text_shows_each_step_and_its_share(history: tuple[str, Path]) -> None:
    """The text report has a row per hand-off step with its cost and share, and a chart."""
    url, _ = history
    done = supervise("report", "--store", url, "--by", "label")
    assert done.returncode == 0, done.stderr
    by_label = expected("label")
    total = sum(v[3] for v in by_label.values())
    for label, (calls, _, _, cost) in by_label.items():
        line = next(x for x in done.stdout.splitlines() if x.startswith(label + " "))
        cells = line.split()
        assert cells[1] == str(calls)
        assert Decimal(cells[4].lstrip("$")) == Decimal(cost) / 1_000_000
        assert cells[5] == f"{cost / total:.1%}"
    assert "spend per day (UTC) by agent" in done.stdout


def test_report_filters_by_agent_and_since(history: tuple[str, Path]) -> None:
    """--agent keeps one agent's spend; --since in the future leaves nothing."""
    url, _ = history
    doc = json.loads(supervise("report", "--store", url, "--json", "--agent", "coder").stdout)
    assert [row["name"] for row in doc["by"]["agent"]] == ["coder"]
    assert doc["total"]["usd_micro"] == expected("agent")["coder"][3]
    later = datetime.now(UTC).replace(year=2100).isoformat()
    doc = json.loads(supervise("report", "--store", url, "--json", "--since", later).stdout)
    assert doc["total"]["usd_micro"] == 0 and doc["by"]["agent"] == []


def test_audit_summary_matches_the_runs(history: tuple[str, Path]) -> None:
    """supervise audit: per agent, runs, runs stopped, violations by limit, denials and the
    spend (exact, from each run_end) agree with the runs and with the report."""
    _, log = history
    rows = {row.agent: row for row in summarize(read_events(log))}
    spend = expected("agent")
    planner, coder = rows["planner"], rows["coder"]
    assert (planner.runs, planner.stopped, planner.violations, planner.denied) == (2, 0, {}, 0)
    assert (coder.runs, coder.stopped, coder.violations, coder.denied) == (
        1,
        1,
        {"wall_time": 1},
        1,
    )
    assert planner.unsettled == 1
    for agent, row in rows.items():
        assert row.usd == Decimal(spend[agent][3]) / 1_000_000
        assert row.api_calls == spend[agent][0]
    done = supervise("audit", str(log))
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert lines["coder"][1:5] == ["1", "1", "wall_time", "1"]
    total = sum(v[3] for v in spend.values())
    shown = lines["total"][-1]
    assert re.fullmatch(r"\$\d+\.\d{2,6}", shown) and Decimal(shown[1:]) * 1_000_000 == total


def test_money_reads_the_same_in_every_report() -> None:
    """The ledger report and the audit summary write money one way: cents at least, exact."""
    assert [money(m) for m in (5_000_000, 100_000, 450, 0, -2_000_000)] == [
        "$5.00", "$0.10", "$0.00045", "$0.00", "-$2.00",
    ]  # fmt: skip
    run_end = {"event": "run_end", "agent": "a", "detail": {"usage": {"usd": "5"}}}
    assert format_summary(summarize([run_end])).splitlines()[1].endswith("  $5.00")


def test_report_by_day_and_chart_over_several_days(tmp_path: Path) -> None:
    """Spend on three days (a ledger clock set to each): the day table and the chart have a
    line per day, bars in proportion, and a late commit after its hold expired counts once."""
    url = f"sqlite:///{tmp_path}/b.db"
    budget = BudgetPolicy.model_validate({"pricing": PRICES})
    days = ["2026-11-28", "2026-11-29", "2026-11-30"]
    for n, day in enumerate(days):
        at = datetime.fromisoformat(day + "T12:00:00+00:00").timestamp()
        for agent in ("a", "b"):
            with Ledger.open(
                budget, run_id=f"{day}-{agent}", agent=agent, session=None, store=url,
                clock=partial(float, at), hold_ttl=60,
            ) as ledger:  # fmt: skip
                hold = ledger.reserve(model="m1", input_tokens=1000 * (n + 1), label="x")
                if agent == "a":
                    ledger.commit(hold.id, input_tokens=1000 * (n + 1), output_tokens=0)
                else:  # expires (charged the estimate), then committed late at a higher price
                    ledger.clock = lambda at=at: at + 120
                    ledger.usage()  # sweeps the expired hold
                    ledger.commit(hold.id, input_tokens=1000 * (n + 1), output_tokens=1000)
    store = open_store(url)
    try:
        charges = costs(store)
    finally:
        store.close()
    rows = {row.name: row.micro_usd for row in breakdown(charges, "day")}
    assert rows == {day: 2 * 1000 * (n + 1) + 2000 for n, day in enumerate(days)}
    agents = {row.name: (row.calls, row.micro_usd) for row in breakdown(charges, "agent")}
    assert agents == {"a": (3, 6000), "b": (3, 12000)}
    chart = chart_lines(charges, width=30)
    bars = [line for line in chart if line[:10] in days]
    assert [len(line[12:42].strip()) for line in bars] == [15, 23, 30]
    assert "# a" in chart[-1] and "= b" in chart[-1]


def test_report_writes_html_and_png(history: tuple[str, Path], tmp_path: Path) -> None:
    """--html writes one page with the tables and an inline SVG chart; --png a PNG image."""
    pytest.importorskip("matplotlib")
    url, _ = history
    page, image = tmp_path / "r.html", tmp_path / "r.png"
    done = supervise("report", "--store", url, "--html", str(page), "--png", str(image))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "<svg" in text and "<script" not in text and "By label" in text
    for label in expected("label"):
        assert f"<td>{label}</td>" in text
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_store_that_is_down_exits_125() -> None:
    """An unreachable store: 125 and a message naming it, never an empty report."""
    done = supervise("report", "--store", "redis://127.0.0.1:1/0")
    assert done.returncode == 125 and "redis://127.0.0.1:1/0" in done.stderr


def test_report_rejects_a_bad_since() -> None:
    """--since that is not a time: 125, naming the option and the fix."""
    done = supervise("report", "--since", "yesterday-ish")
    assert done.returncode == 125 and "try 1h" in done.stderr


def test_plain_report_does_not_import_matplotlib() -> None:
    """matplotlib is imported only when a file is asked for (--html, --png)."""
    code = (
        "import sys\nfrom supervisor.cli import run_cli\nrun_cli(['report'])\n"
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run(python(code), capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("False")
