"""Budgets in real runs: the ledger behind the RPC, denials, violations, settling, steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, python, supervise

from supervisor import Policy, Supervisor
from supervisor.audit import read_events

PRICES = {"m1": {"input": 1, "output": 2}}  # USD per million tokens


def budget_policy(tmp_path: Path, **budget: Any) -> Policy:
    """A policy whose budget lives in a SQLite file of this test, priced for model m1."""
    extra: dict[str, Any] = {
        k: budget.pop(k) for k in ("limits", "grace", "on_violation") if k in budget
    }
    budget.setdefault("pricing", PRICES)
    budget.setdefault("store", f"sqlite:///{tmp_path}/budget.db")
    return Policy.from_dict({"budget": budget, **extra})


def events(log: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(log) if e["event"] == kind]


CALLS = """
import sys
from supervisor import client
b = client.connect()
n, label = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    try:
        with b.reserve(model="m1", input_tokens=1000, max_output_tokens=1000, label=label) as r:
            r.commit(input_tokens=900, output_tokens=500)
        print("ok", flush=True)
    except client.BudgetExceeded as e:
        print("denied", e.scope, e.limit, flush=True)
"""


def test_spend_is_metered_exactly_into_the_run_result(tmp_path: Path, audit_log: Path) -> None:
    """Three calls through the RPC: calls, tokens and exact USD by model and by label."""
    policy = budget_policy(tmp_path, run={"usd": 1})
    result = Supervisor(policy).run([*python(CALLS), "3", "triage"])
    assert result.exit_code == 0
    u = result.usage
    assert (u.api_calls, u.input_tokens, u.output_tokens) == (3, 2700, 1500)
    assert u.usd == Decimal("0.0057")  # 3 x (900 x 1 + 500 x 2) / 1e6
    assert u.by_model["m1"]["calls"] == 3 and u.by_label["triage"]["usd"] == Decimal("0.0057")
    usage: Any = result.to_dict()["usage"]  # Any: the JSON form, as --json writes it
    assert usage["by_label"]["triage"]["usd"] == 0.0057


def test_denied_call_is_logged_and_changes_nothing(tmp_path: Path, audit_log: Path) -> None:
    """Past run.usd the reservation is denied (BudgetExceeded in the child), a `denied` audit
    line names the limit, and the run goes on to its own exit status."""
    policy = budget_policy(tmp_path, run={"usd": "0.004"})
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        result = Supervisor(policy).run([*python(CALLS), "3", "x"], stdout=w)
        os.close(w)
        lines = reader.read().split("\n")
    assert result.exit_code == 0 and result.violation is None
    assert lines[:3] == ["ok", "denied run usd", "denied run usd"]
    denied = events(audit_log, "denied")
    assert len(denied) == 2 and denied[0]["limit"] == "usd" and denied[0]["action"] == "deny"
    assert result.usage.api_calls == 1 and result.usage.usd == Decimal("0.0019")


def test_spend_past_the_limit_is_written_then_a_violation(tmp_path: Path, audit_log: Path) -> None:
    """record() of spend that breaks run.usd: the spend is in the result, then 124, usd."""
    code = (
        "from supervisor import client\nimport time\n"
        "b = client.connect()\n"
        "try:\n    b.record(model='m1', input_tokens=2_000_000, output_tokens=0)\n"
        "except client.BudgetExceeded:\n    pass\n"
        "time.sleep(30)\n"
    )
    policy = budget_policy(tmp_path, run={"usd": 1}, grace="200ms")
    result = Supervisor(policy).run(python(code))
    assert result.violation is not None
    assert result.exit_code == 124 and result.violation.limit == "usd"
    assert result.usage.usd == Decimal(2)
    (line,) = events(audit_log, "violation")
    assert line["limit"] == "usd" and line["limit_value"] == 1


def test_open_hold_at_exit_is_settled_and_logged(tmp_path: Path, audit_log: Path) -> None:
    """A reservation left open when the child exits is charged at its input estimate, logged
    `unsettled`, and nothing stays held in the ledger."""
    code = (
        "from supervisor import client\n"
        "b = client.connect()\n"
        "b.call('reserve', {'model': 'm1', 'input_tokens': 5000, 'max_output_tokens': 9000})\n"
    )
    policy = budget_policy(tmp_path, daily={"usd": 5}, run={"calls": 10})
    result = Supervisor(policy, audit=audit_log).run(python(code), agent="bot")
    assert result.exit_code == 0
    (line,) = events(audit_log, "unsettled")
    assert line["detail"]["tokens"] == 5000 and line["detail"]["usd"] == 0.005
    assert result.usage.usd == Decimal("0.005")
    done = supervise(
        "budget",
        "status",
        "--agent",
        "bot",
        "--store",
        f"sqlite:///{tmp_path}/budget.db",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    daily = next(s for s in json.loads(done.stdout)["scopes"] if s["scope"] == "daily")
    assert daily["usd"]["held"] == 0 and daily["usd"]["used"] == 0.005


def test_killed_child_holding_a_reservation_is_settled(tmp_path: Path, audit_log: Path) -> None:
    """A child stopped by wall_time while holding a reservation: the hold is settled."""
    code = (
        "from supervisor import client\nimport time\n"
        "b = client.connect()\n"
        "with b.reserve(model='m1', input_tokens=1000, max_output_tokens=100):\n"
        "    time.sleep(60)\n"
    )
    policy = budget_policy(tmp_path, run={"usd": 1}, limits={"wall_time": "1s"}, grace=0)
    result = Supervisor(policy, audit=audit_log).run(python(code))
    assert result.exit_code == 124
    (line,) = events(audit_log, "unsettled")
    assert line["detail"]["tokens"] == 1000


def test_unreachable_store_fails_before_the_command(tmp_path: Path, audit_log: Path) -> None:
    """A budget whose store cannot be reached: 125 and the command never runs."""
    marker = tmp_path / "ran"
    policy = budget_policy(tmp_path, run={"usd": 1}, store="redis://127.0.0.1:1/0")
    result = Supervisor(policy).run(python(f"open({str(marker)!r}, 'w')"))
    assert result.exit_code == 125 and result.status == "failed" and result.error is not None
    assert "unavailable" in result.error and not marker.exists()
    done = supervise("--store", "redis://127.0.0.1:1/0", "--", "true")
    assert done.returncode == 125 and "budget store" in done.stderr


def test_children_of_one_tree_share_the_run_budget(tmp_path: Path) -> None:
    """Two children each trying 3 calls under run.calls = 4: exactly 4 are granted (a
    subprocess gets the RPC by inheriting its fd: subprocess closes fds unless passed)."""
    code = (
        "import os, subprocess, sys\n"
        "fd = int(os.environ['SUPERVISE_RPC_FD'])\n"
        f"ps = [subprocess.Popen([sys.executable, '-c', {CALLS!r}, '3', str(i)], "
        "pass_fds=[fd]) for i in range(2)]\n"
        "sys.exit(sum(p.wait() for p in ps))\n"
    )
    policy = budget_policy(tmp_path, run={"calls": 4})
    result = Supervisor(policy).run(python(code))
    assert result.exit_code == 0 and result.usage.api_calls == 4


def test_child_is_told_before_the_kill(tmp_path: Path) -> None:
    """The child gets a `warning` notification at 80% of a budget limit and a `stopping`
    one at SIGTERM, with the limit and the grace."""
    out = tmp_path / "notes.jsonl"
    code = (
        "import json, signal, sys, time\nfrom supervisor import client\n"
        "b = client.connect()\n"
        "log = open(sys.argv[1], 'a')\n"
        "b.on_warning = lambda p: log.write(json.dumps(['warning', p['limit']]) + '\\n')\n"
        "b.on_stopping = lambda p: log.write(\n"
        "    json.dumps(['stopping', p['limit'], float(p['grace'])]) + '\\n')\n"
        "signal.signal(signal.SIGTERM, lambda *a: (b.poll(), log.close(), sys.exit(0)))\n"
        "for i in range(4):\n"
        "    with b.reserve(model='m1', input_tokens=10, max_output_tokens=10) as r:\n"
        "        r.commit(input_tokens=10, output_tokens=10)\n"
        "b.poll()\n"
        "while True: time.sleep(0.05)\n"
    )
    policy = budget_policy(tmp_path, run={"calls": 5}, limits={"wall_time": "1s"}, grace="2s")
    result = Supervisor(policy).run([*python(code), str(out)])
    assert result.violation is not None
    assert result.exit_code == 124 and result.violation.limit == "wall_time"
    notes = [json.loads(line) for line in out.read_text().splitlines()]
    assert ["warning", "calls"] in notes
    assert [n for n in notes if n[0] == "stopping"] == [["stopping", "wall_time", 2.0]]


@pytest.mark.parametrize(("step_time", "code"), [("300ms", 124), ("5s", 0), (None, 0)])
def test_step_time(step_time: str | None, code: int, tmp_path: Path, audit_log: Path) -> None:
    """A declared step longer than limits.step_time is stopped (124, step_time); raised or
    off, it passes."""
    child = (
        "import time\nfrom supervisor import client\n"
        "b = client.connect()\n"
        "with b.step('search'):\n    time.sleep(1)\n"
    )
    policy = Policy.from_dict(
        {"limits": {"step_time": step_time}, "workspace": {}, "grace": "200ms"}
    )
    result = Supervisor(policy).run(python(child))
    assert result.exit_code == code
    if code:
        assert result.violation is not None
        assert result.violation.limit == "step_time" and "'search'" in result.violation.message
        (line,) = events(audit_log, "violation")
        assert line["limit"] == "step_time"


def test_open_steps_are_bounded(tmp_path: Path) -> None:
    """A child opening ever-new steps gets an error past 1024 open ones (its memory is not
    ours to grow), and the run goes on."""
    child = (
        "from supervisor import client\n"
        "b = client.connect()\n"
        "for i in range(1024):\n    b.call('step_begin', {'name': f's{i}'})\n"
        "try:\n    b.call('step_begin', {'name': 'one more'})\n"
        "except client.RpcError as e:\n    print(e.code, 'open already' in str(e))\n"
    )
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        result = Supervisor(Policy.from_dict({"workspace": {}})).run(python(child), stdout=w)
        os.close(w)
        assert reader.read().split() == ["-32602", "True"]
    assert result.exit_code == 0


def test_check_write_over_the_rpc(tmp_path: Path) -> None:
    """check_write answers through the RPC from the run's workspace."""
    out = tmp_path / "answers.json"
    code = (
        "import json, sys\nfrom supervisor import client\n"
        "b = client.connect()\n"
        "answers = [b.check_write('a.txt', 10), b.check_write('/etc/x', 1),"
        " b.check_write('big', 10 << 20)]\n"
        "print(json.dumps(answers))\n"
    )
    policy = Policy.from_dict({"workspace": {"max_file_size": "1MiB", "jail": "off"}})
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        result = Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        answers = json.loads(reader.read())
    assert result.exit_code == 0
    assert answers[0] == {"allowed": True, "reason": "ok"}
    assert not answers[1]["allowed"] and answers[1]["reason"].startswith("outside the workspace")
    assert not answers[2]["allowed"] and answers[2]["reason"].startswith("over the file size")
    del out


def test_garbage_on_the_rpc_is_an_error_reply_and_an_audit_line(
    tmp_path: Path, audit_log: Path
) -> None:
    """Bytes that are not JSON-RPC get an error reply and an `rpc_error` audit line; the run
    and the ledger go on unharmed."""
    code = (
        "import os, socket\n"
        "s = socket.socket(fileno=int(os.environ['SUPERVISE_RPC_FD']))\n"
        's.sendall(b\'this is not json\\n{"jsonrpc": "2.0", "id": 1, "method": "nope"}\\n\')\n'
        "f = s.makefile('rb')\n"
        "print(f.readline().decode().strip()); print(f.readline().decode().strip())\n"
    )
    policy = budget_policy(tmp_path, run={"usd": 1})
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        result = Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        replies = [json.loads(line) for line in reader.read().splitlines()]
    assert result.exit_code == 0 and result.usage.api_calls == 0
    assert [reply["error"]["code"] for reply in replies] == [-32700, -32601]
    assert [e["detail"]["code"] for e in events(audit_log, "rpc_error")] == [-32700, -32601]


def test_no_rpc_without_budget_workspace_or_steps() -> None:
    """A policy with none of budget, workspace or step_time gives the child no RPC fd (and
    `supervise -- true` pays nothing for it)."""
    code = "import os, sys; sys.exit(3 if 'SUPERVISE_RPC_FD' in os.environ else 0)"
    assert Supervisor(Policy.from_dict({})).run(python(code)).exit_code == 0


def test_cli_run_with_a_budget_and_store(tmp_path: Path) -> None:
    """`supervise --store URL` with a budget policy meters the run; --json shows the spend."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nbudget:\n  run: {usd: 1}\n  pricing: {m1: {input: 1, output: 2}}\n"
    )
    store = f"sqlite:///{tmp_path}/cli.db"
    done = supervise(
        "-q",
        "-p",
        str(policy),
        "--store",
        store,
        "--json",
        "-",
        "--",
        *python(CALLS),
        "2",
        "cli",
        timeout=GLOBAL_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["usage"]["api_calls"] == 2 and result["usage"]["usd"] == 0.0038


def test_sigterm_to_supervise_settles_open_holds(tmp_path: Path) -> None:
    """supervise itself stopped by SIGTERM while the child holds a reservation: settled."""
    audit = tmp_path / "audit.jsonl"
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\ngrace: 200ms\n"
        "budget:\n  run: {usd: 1}\n  pricing: {m1: {input: 1, output: 2}}\n"
    )
    code = (
        "import time\nfrom supervisor import client\n"
        "b = client.connect()\n"
        "with b.reserve(model='m1', input_tokens=100, max_output_tokens=100):\n"
        "    print('holding', flush=True); time.sleep(60)\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "supervisor",
        "-q",
        "-p",
        str(policy),
        "--audit",
        str(audit),
        "--store",
        f"sqlite:///{tmp_path}/b.db",
        "--",
        *python(code),
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"holding\n"  # the hold is granted
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GLOBAL_TIMEOUT) == 128 + signal.SIGTERM
    assert len(events(audit, "unsettled")) == 1


AGENT = """
import sys
import openai
from supervisor import client
oa = client.instrument_openai(
    openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="k", max_retries=0), label="writer"
)
done = 0
for i in range(int(sys.argv[2])):
    try:
        oa.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=500
        )
        done += 1
    except client.BudgetExceeded:
        pass
print(done)
"""


def test_instrumented_sdk_in_a_real_run_is_priced_exactly(tmp_path: Path) -> None:
    """The real openai SDK against a fake provider, under a real run and ledger: the usage
    the provider reported (1200 in, 1000 of them cached, 300 out) priced exactly."""
    from fake_provider import FakeProvider

    provider = FakeProvider()
    try:
        prices = {"m1": {"input": 1, "output": 2, "cached_input": "0.5"}}
        policy = budget_policy(tmp_path, run={"usd": 1}, pricing=prices)
        result = Supervisor(policy).run([*python(AGENT), provider.url, "2"])
    finally:
        provider.close()
    assert result.exit_code == 0
    u = result.usage
    assert (u.api_calls, u.input_tokens, u.output_tokens) == (2, 2400, 600)
    # per call: 200 uncached x $1 + 1000 cached x $0.5 + 300 out x $2, per million
    assert u.usd == 2 * Decimal("0.0013")
    assert u.by_label["writer"]["calls"] == 2 and len(provider.requests) == 2


def test_calls_limit_lets_exactly_that_many_requests_reach_the_provider(tmp_path: Path) -> None:
    """run.calls: 5 and an agent trying 8 calls: exactly 5 requests reach the provider."""
    from fake_provider import FakeProvider

    provider = FakeProvider()
    try:
        policy = budget_policy(tmp_path, run={"calls": 5})
        r, w = os.pipe()
        with os.fdopen(r) as reader:
            result = Supervisor(policy).run([*python(AGENT), provider.url, "8"], stdout=w)
            os.close(w)
            made = reader.read().strip()
    finally:
        provider.close()
    assert result.exit_code == 0 and made == "5" and len(provider.requests) == 5


def test_two_runs_of_one_session_racing_never_overspend(tmp_path: Path) -> None:
    """Two supervised runs of one session at once, each trying 6 calls under session.calls
    = 7: exactly 7 granted in all."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nbudget:\n  session: {calls: 7}\n  pricing: {m1: {input: 1, output: 2}}\n"
    )
    store = f"sqlite:///{tmp_path}/shared.db"
    cmd = [
        sys.executable,
        "-m",
        "supervisor",
        "-q",
        "-p",
        str(policy),
        "--store",
        store,
        "--session",
        "s1",
        "--json",
        "-",
        "--",
        *python(CALLS),
        "6",
        "race",
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    calls = []
    for proc in procs:
        out, _ = proc.communicate(timeout=GLOBAL_TIMEOUT)
        assert proc.returncode == 0
        calls.append(json.loads(out.splitlines()[-1])["usage"]["api_calls"])
    assert sum(calls) == 7


@pytest.mark.parametrize(("calls", "granted", "denied"), [(2, 2, 1), (3, 3, 0), (None, 3, 0)])
def test_calls_limit_exceeded_raised_and_off(
    calls: int | None, granted: int, denied: int, tmp_path: Path, audit_log: Path
) -> None:
    """run.calls 2 and 3 calls: the third is denied (a `denied` line naming calls, the
    run's own status); 3 or null: all pass."""
    policy = budget_policy(tmp_path, run={"calls": calls})
    result = Supervisor(policy).run([*python(CALLS), "3", "x"])
    assert result.exit_code == 0 and result.violation is None
    assert result.usage.api_calls == granted
    lines = events(audit_log, "denied")
    assert len(lines) == denied and all(line["limit"] == "calls" for line in lines)
