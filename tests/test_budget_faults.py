"""Issue 16: the budget's edges that lost an alert, a denial's kind, or spend.

Each test performs the case for real (a real run, a real RPC, a real store) and fails
while the bug is there.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

from _helpers import python

from supervisor import Policy, Supervisor
from supervisor.audit import read_events
from supervisor.result import RunResult
from supervisor.watch import Verdicts

PRICES = {"m1": {"input": 1, "output": 2}}  # USD per million tokens: 1 micro-USD an input token


def budget_policy(tmp_path: Path, **budget: Any) -> Policy:
    """A policy whose budget lives in a SQLite file of this test, priced for model m1."""
    budget.setdefault("pricing", PRICES)
    budget.setdefault("store", f"sqlite:///{tmp_path}/budget.db")
    return Policy.from_dict({"budget": budget})


def events(log: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(log) if e["event"] == kind]


def run_out(policy: Policy, code: str) -> tuple[RunResult, list[str]]:
    """Run ``code`` under ``policy``; its result and the lines it printed."""
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        result = Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        return result, reader.read().splitlines()


def test_spend_exactly_at_90_percent_raises_the_90_percent_alert(
    tmp_path: Path, audit_log: Path
) -> None:
    """$0.00045 spent of a $0.0005 limit is 90% exactly: the 90% alert is raised, with a $."""
    code = (
        "from supervisor import client\n"
        "client.connect().record(model='m1', input_tokens=450, output_tokens=0)\n"
    )
    result, _ = run_out(budget_policy(tmp_path, run={"usd": "0.0005"}), code)
    assert result.exit_code == 0 and result.violation is None
    assert [w["fraction"] for w in result.warnings] == [0.8, 0.9]
    ninety = next(w for w in result.warnings if w["fraction"] == 0.9)
    assert ninety["message"] == "run usd at 90% of its limit: $0.00045 of $0.0005"
    assert len(events(audit_log, "warning")) == 2


def test_no_exact_90_percent_alert_is_lost_over_ten_thousand_limits() -> None:
    """Over 10,000 USD limits, spend landing on exactly 90% of each raises its alert."""
    warned: list[dict[str, Any]] = []
    for micro in range(10, 100_010, 10):
        verdicts = Verdicts(
            None,  # type: ignore[arg-type]  # alerts never look at the plan
            RunResult("r", None, None, []),
            lambda v, kill: None,
            lambda warning, note: warned.append(warning),
        )
        limit, used = Decimal(micro) / 10**6, Decimal(micro * 9 // 10) / 10**6
        verdicts.alert("usd", used, limit, (0.9,), "run")
    assert len(warned) == 10_000


UNKNOWN = """
from supervisor import client
b = client.connect()
for how in ("reserve", "record"):
    try:
        if how == "reserve":
            b.reserve(model="mystery", input_tokens=10, max_output_tokens=10, usd=0)
        else:
            b.record(model="mystery", input_tokens=10, output_tokens=10, usd=1)
        print(how, "granted")
    except client.BudgetExceeded as e:
        print(how, "BudgetExceeded", e.scope, "no price for the model 'mystery'" in str(e))
    except client.RpcError as e:
        print(how, "RpcError", e.code)
"""


def test_unknown_model_under_deny_is_a_budget_denial(tmp_path: Path, audit_log: Path) -> None:
    """unknown_model: deny answers error 1 (BudgetExceeded in the child, naming the model),
    even with usd given; one `denied` line each, no `rpc_error`, nothing charged."""
    result, lines = run_out(budget_policy(tmp_path), UNKNOWN)
    assert lines == [
        "reserve BudgetExceeded model True",
        "record BudgetExceeded model True",
    ]
    assert result.exit_code == 0 and result.usage.api_calls == 0
    assert len(events(audit_log, "denied")) == 2
    assert events(audit_log, "rpc_error") == []
