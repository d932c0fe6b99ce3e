"""The embedded API's hooks: on_warning, on_violation, on_usage, on_end; none can hold up or
break enforcement."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from _helpers import python

from supervisor import Policy, Supervisor
from supervisor.audit import read_events

PRICES = {"m1": {"input": 1, "output": 2}}

CALLS = """
from supervisor import client
b = client.connect()
for n in (100, 200, 300):
    with b.reserve(model="m1", input_tokens=n, max_output_tokens=n, label="step") as r:
        r.commit(input_tokens=n, output_tokens=n // 2)
b.reserve(model="m1", input_tokens=1000, max_output_tokens=10)  # left open: settled at exit
"""


def budget_policy(tmp_path: Path, **extra: Any) -> Policy:
    return Policy.from_dict(
        {"budget": {"store": f"sqlite:///{tmp_path}/b.db", "pricing": PRICES}, **extra}
    )


def test_on_usage_gets_each_settled_call_with_running_totals(tmp_path: Path) -> None:
    """on_usage: once per settled call (commit, then the hold settled at exit), in order,
    each with the call's tokens and exact USD and the run's totals so far."""
    seen: list[dict[str, Any]] = []
    sup = Supervisor(budget_policy(tmp_path), on_usage=seen.append)
    result = sup.run(python(CALLS), agent="bot")
    assert result.exit_code == 0
    assert [(c["how"], c["input_tokens"], c["output_tokens"]) for c in seen] == [
        ("commit", 100, 50), ("commit", 200, 100), ("commit", 300, 150), ("unsettled", 1000, 0)
    ]  # fmt: skip
    assert [c["usd"] for c in seen] == [Decimal("0.0002"), Decimal("0.0004"), Decimal("0.0006"),
                                        Decimal("0.001")]  # fmt: skip
    assert [c["totals"]["usd"] for c in seen] == [
        Decimal("0.0002"), Decimal("0.0006"), Decimal("0.0012"), Decimal("0.0022")
    ]  # fmt: skip
    assert seen[-1]["totals"]["api_calls"] == 4 and seen[-1]["totals"]["usd"] == result.usage.usd
    assert all(c["agent"] == "bot" and c["run_id"] == result.run_id for c in seen)


def test_on_warning_on_violation_on_end_in_order(audit_log: Path) -> None:
    """A run stopped for wall_time: warnings at 80% and 90%, then the violation, then the end
    with the final result; every hook has run when run() returns."""
    order: list[str] = []
    sup = Supervisor(
        Policy.from_dict({"limits": {"wall_time": "500ms"}, "grace": "100ms"}),
        on_warning=lambda w: order.append(f"warning {w['limit']} {w['fraction']}"),
        on_violation=lambda v: order.append(f"violation {v.limit}"),
        on_end=lambda r: order.append(f"end {r.status} {r.exit_code}"),
    )
    sup.run(python("import time; time.sleep(30)"))
    assert order == [
        "warning wall_time 0.8", "warning wall_time 0.9", "violation wall_time", "end violation 124"
    ]  # fmt: skip


def test_a_hook_that_raises_does_not_stop_a_kill(audit_log: Path) -> None:
    """Every hook raises: the tree is still stopped (124, wall_time), the next hooks still
    run, and each failure is on stderr and an audit warning with action hook_failed."""
    calls: list[str] = []

    def boom(name: str) -> Any:
        def hook(_: object) -> None:
            calls.append(name)
            raise RuntimeError(f"{name} is broken")

        return hook

    sup = Supervisor(
        Policy.from_dict({"limits": {"wall_time": "300ms"}, "grace": "100ms"}),
        on_warning=boom("on_warning"),
        on_violation=boom("on_violation"),
        on_end=boom("on_end"),
    )
    result = sup.run(python("import time; time.sleep(30)"))
    assert result.violation is not None
    assert result.exit_code == 124 and result.violation.limit == "wall_time"
    assert calls == ["on_warning", "on_warning", "on_violation", "on_end"]
    failed = [e for e in read_events(audit_log) if e["action"] == "hook_failed"]
    assert [e["detail"] for e in failed] == [
        "the on_warning hook raised RuntimeError: on_warning is broken",
        "the on_warning hook raised RuntimeError: on_warning is broken",
        "the on_violation hook raised RuntimeError: on_violation is broken",
        "the on_end hook raised RuntimeError: on_end is broken",
    ]
    assert [e["event"] for e in read_events(audit_log)][-1] == "run_end"


def test_a_slow_hook_does_not_delay_the_kill(audit_log: Path) -> None:
    """A warning hook that sleeps 1.5 s: the wall_time kill still lands on time (the hook
    runs on its own thread); run() returns once the hook is done."""
    start = time.monotonic()
    sup = Supervisor(
        Policy.from_dict({"limits": {"wall_time": "400ms"}, "grace": "0"}),
        on_warning=lambda _: time.sleep(0.75),
    )
    result = sup.run(python("import time; time.sleep(30)"))
    assert result.exit_code == 124
    assert result.usage.wall_time < 0.9  # the tree was stopped at 0.4 s, not after the hooks
    assert time.monotonic() - start >= 1.5  # both warnings' hooks ran before run() returned
