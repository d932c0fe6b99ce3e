"""Load: 50 supervised runs at once on this machine, one agent's daily budget shared by all.

Zero overspend, every run's lines in the audit log with the chain intact, every committed
call in the ledger and in the runs' results, nothing left running (conftest checks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from _helpers import GLOBAL_TIMEOUT, margin, python, supervise

from supervisor.audit import read_events, verify

RUNS = 50
PRICES = {"m1": {"input": 1, "output": 2}}  # a call: 1000 in + 500 out = $0.002, holds $0.003
DAILY = "0.06"  # room for at most 30 calls among the 50 runs: most runs meet a denial

SPEND = """
from supervisor import client
b = client.connect()
while True:
    try:
        with b.reserve(model="m1", input_tokens=1000, max_output_tokens=1000) as r:
            r.commit(input_tokens=1000, output_tokens=500)
    except client.BudgetExceeded:
        break
"""


@pytest.mark.slow
def test_fifty_runs_share_one_daily_budget(fresh_store: str, tmp_path: Path) -> None:
    """50 runs of one agent at once, each spending until denied: the day's spend never
    passes its limit, the runs' own totals add up to the ledger's, every run has its
    run_start and run_end in one intact chain."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        json.dumps(
            {
                "version": 1,
                "agent": "crowd",
                "limits": {"wall_time": f"{margin(120):.0f}s"},
                "budget": {"store": fresh_store, "pricing": PRICES, "daily": {"usd": DAILY}},
            }
        )
    )
    log = tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "supervisor", "-q", "-p", str(policy), "--audit", str(log)]
    procs = [
        subprocess.Popen([*cmd, "--json", "-", *python(SPEND)], stdout=subprocess.PIPE, text=True)
        for _ in range(RUNS)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=margin(GLOBAL_TIMEOUT * 3))
        assert p.returncode == 0, out
        results.append(json.loads(out.splitlines()[-1]))
    spent = sum(Decimal(str(r["usage"]["usd"])) for r in results)
    calls = sum(r["usage"]["api_calls"] for r in results)
    status = supervise("budget", "status", "--agent", "crowd", "--store", fresh_store, "--json")
    day = next(s for s in json.loads(status.stdout)["scopes"] if s["scope"] == "daily")
    used, held = Decimal(str(day["usd"]["used"])), Decimal(str(day["usd"]["held"]))
    assert used <= Decimal(DAILY) and held == 0  # zero overspend, no hold left behind
    assert used == spent == Decimal("0.002") * calls
    assert calls >= 25  # the budget was used, not refused wholesale (30 fit; holds race)
    report = json.loads(supervise("report", "--store", fresh_store, "--json").stdout)
    assert report["total"]["usd_micro"] == int(used * 1_000_000)
    assert verify(log).ok
    records = list(read_events(log))
    for r in results:
        kinds = [e["event"] for e in records if e["run_id"] == r["run_id"]]
        assert kinds[0] == "run_start" and kinds[-1] == "run_end", kinds
    assert len({e["run_id"] for e in records if e["event"] == "run_end"}) == RUNS
