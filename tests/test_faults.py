"""Faults the product must survive: supervise SIGKILLed mid-run, a full disk under the audit
log or the ledger, Redis restarted mid-run, a jump of the wall clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, RedisServer, free_port, margin, python, supervise

from supervisor import Policy, Supervisor
from supervisor.audit import read_events, verify
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger

PRICES = {"m1": {"input": 1, "output": 2}}  # USD per million tokens: 1 token = 1 micro-USD in

HOLD_AND_HANG = """
import os, sys, time
from supervisor import client
b = client.connect()
b.reserve(model="m1", input_tokens=1000, max_output_tokens=1000)
print(os.environ["SUPERVISE_RUN_ID"], flush=True)
time.sleep(60)
"""


def daily(fresh_store: str, agent: str) -> dict[str, Any]:
    """The daily scope's usd figures that ``supervise budget status --json`` shows for ``agent``."""
    done = supervise("budget", "status", "--agent", agent, "--store", fresh_store, "--json")
    assert done.returncode == 0, done.stderr
    usd: dict[str, Any] = next(
        s for s in json.loads(done.stdout)["scopes"] if s["scope"] == "daily"
    )["usd"]
    return usd


def test_supervise_sigkilled_holds_settled_by_the_next_run(
    fresh_store: str, tmp_path: Path
) -> None:
    """supervise SIGKILLed with a hold open: the tree dies; the hold stays held until the
    next run of the agent starts, which charges it its input estimate (an `unsettled` line
    naming the dead run); the audit chain still verifies."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        json.dumps({"version": 1, "budget": {"store": fresh_store, "pricing": PRICES}})
    )
    log = tmp_path / "audit.jsonl"
    args = [sys.executable, "-m", "supervisor", "-q", "-p", str(policy), "--audit", str(log)]
    proc = subprocess.Popen([*args, "--agent", "a", *python(HOLD_AND_HANG)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    dead_run = proc.stdout.readline().decode().strip()
    assert dead_run
    proc.kill()
    proc.wait(timeout=GLOBAL_TIMEOUT)
    proc.stdout.close()
    assert daily(fresh_store, "a")["held"] == 0.003  # 1000 in + 1000 out, still held
    done = supervise("-q", "-p", str(policy), "--audit", str(log), "--agent", "a", "true")
    assert done.returncode == 0, done.stderr
    usd = daily(fresh_store, "a")
    assert (usd["held"], usd["used"]) == (0, 0.001)  # charged its input estimate
    unsettled = [e for e in read_events(log) if e["event"] == "unsettled"]
    assert len(unsettled) == 1 and unsettled[0]["run_id"] == dead_run
    assert "its supervisor died" in unsettled[0]["detail"]["why"]
    assert verify(log).ok


def test_a_live_run_of_the_same_agent_is_left_alone(tmp_path: Path) -> None:
    """A run whose supervisor is alive keeps its hold while another run of the agent starts."""
    url = f"sqlite:///{tmp_path}/b.db"
    policy = Policy.from_dict({"budget": {"store": url, "pricing": PRICES}})
    r, w = os.pipe()
    holder = threading.Thread(
        target=lambda: Supervisor(policy).run(
            [*python(HOLD_AND_HANG.replace("60", "1.5"))], agent="a", stdout=w
        )
    )
    holder.start()
    try:
        with os.fdopen(r) as reader:
            assert reader.readline().strip()
            assert Supervisor(policy).run(["true"], agent="a").exit_code == 0
            assert daily(url, "a")["held"] == 0.003
    finally:
        holder.join(GLOBAL_TIMEOUT)
        os.close(w)


def tmpfs(path: Path, size: str) -> None:
    """Mount a small tmpfs (a real disk that fills up) or skip."""
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    tmpfs(disk, "1m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` bytes free (whole pages)."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


def test_audit_disk_full_mid_run_stops_the_child(small_disk: Path) -> None:
    """The audit log's disk fills during the run: the command is stopped at once (fail
    closed, 125, the reason named), nothing is left running, the lines written verify."""
    log = small_disk / "audit.jsonl"
    fill(small_disk, 4096)  # one page for the log: run_start fits, the lines after do not
    pad = "x" * 2900  # a long command line makes run_start most of the page
    done = supervise(
        "--audit", str(log), "--set", "limits.wall_time=2s", "--",
        sys.executable, "-c", "import time; time.sleep(30)", pad,
    )  # fmt: skip
    assert done.returncode == 125, done.stderr
    assert "cannot write the audit log" in done.stderr and "No space left" in done.stderr
    events = [e["event"] for e in read_events(log)]
    assert events[0] == "run_start" and verify(log).ok  # no torn line left behind


def test_ledger_disk_full_denies_and_stops_when_spend_cannot_be_written(small_disk: Path) -> None:
    """The ledger's disk fills: a reservation is denied (scope store); spend that happened but
    cannot be written stops the command (125, fail closed), with the call in the audit log
    so nothing is lost; what was committed before is still in the ledger."""
    url = f"sqlite:///{small_disk}/budget.db"
    code = """
import sys
from supervisor import client
b = client.connect()
with b.reserve(model="m1", input_tokens=100, max_output_tokens=100) as r:
    r.commit(input_tokens=100, output_tokens=50)
r = b.reserve(model="m1", input_tokens=100, max_output_tokens=100)
print("full?", flush=True)
sys.stdin.readline()
try:
    b.reserve(model="m1", input_tokens=100, max_output_tokens=100)
except client.BudgetExceeded as e:
    print("denied", e.scope, flush=True)
r.commit(input_tokens=100, output_tokens=100)
print("not stopped", flush=True)
"""
    policy = Policy.from_dict(
        {"budget": {"store": url, "pricing": PRICES}, "grace": "1s"}
    )  # fmt: skip
    log = small_disk.parent / "audit.jsonl"
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    result: list[Any] = []

    def supervised() -> None:
        try:
            sup = Supervisor(policy, audit=log)
            result.append(sup.run(python(code), agent="a", stdin=in_r, stdout=out_w))
        finally:
            os.close(out_w)  # the reader sees the end even if the run fails early

    run = threading.Thread(target=supervised)
    run.start()
    with os.fdopen(out_r) as reader:
        assert reader.readline() == "full?\n", result
        fill(small_disk, 0)
        os.write(in_w, b"go\n")
        run.join(GLOBAL_TIMEOUT)
        lines = reader.read().splitlines()
    os.close(in_r)
    os.close(in_w)
    res = result[0]
    assert lines[:1] == ["denied store"] and "not stopped" not in lines
    assert res.exit_code == 125 and res.status == "failed"
    assert "could not be written" in res.error and "full" in res.error
    os.unlink(small_disk / "filler")
    used = daily(url, "a")["used"]
    assert Decimal(str(used)) >= Decimal("0.0002")  # the first call is still there
    lost = [
        e["detail"]
        for e in read_events(log)
        if e["event"] == "unsettled" and e["action"] == "failed" and isinstance(e["detail"], dict)
    ]
    assert [(d["how"], d["model"], d["input_tokens"], d["output_tokens"]) for d in lost] == [
        ("commit", "m1", 100, 100)
    ]
    assert "database or disk is full" in lost[0]["error"]


@pytest.mark.redis
def test_redis_restarted_mid_run_serves_again(tmp_path: Path) -> None:
    """Redis restarts between two calls of a run: the call after the restart goes through
    (the client reconnects and reloads its scripts); during the outage calls are denied."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = RedisServer.on_port(port)
    code = """
import sys
from supervisor import client
b = client.connect()
for _ in range(3):
    sys.stdin.readline()
    try:
        with b.reserve(model="m1", input_tokens=10, max_output_tokens=10) as r:
            r.commit(input_tokens=10, output_tokens=10)
        print("ok", flush=True)
    except client.BudgetExceeded as e:
        print("denied", e.scope, flush=True)
"""
    policy = Policy.from_dict({"budget": {"store": url, "pricing": PRICES}})
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    result: list[Any] = []
    run = threading.Thread(
        target=lambda: result.append(
            Supervisor(policy).run(python(code), agent="a", stdin=in_r, stdout=out_w)
        )
    )
    run.start()
    try:
        with os.fdopen(out_r) as reader:
            os.write(in_w, b"1\n")
            assert reader.readline() == "ok\n"
            server.stop()
            os.write(in_w, b"2\n")
            assert reader.readline() == "denied store\n"
            server = RedisServer.on_port(port)
            os.write(in_w, b"3\n")
            assert reader.readline() == "ok\n"
            os.close(out_w)
            run.join(GLOBAL_TIMEOUT)
    finally:
        server.stop()
        os.close(in_r)
        os.close(in_w)
    assert result[0].exit_code == 0 and result[0].usage.api_calls == 2


def test_wall_clock_jump_does_not_move_the_wall_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock jumps an hour ahead mid-run: wall_time still stops the run after 1 s
    of real time, not at once (limits use the monotonic clock)."""
    real = time.time
    jumped = threading.Event()

    def jump(_: object) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + 3600)
        jumped.set()

    policy = Policy.from_dict({"limits": {"wall_time": "1s"}, "grace": "0"})
    start = time.monotonic()
    result = Supervisor(policy, on_warning=jump).run(python("import time; time.sleep(30)"))
    took = time.monotonic() - start
    assert result.violation is not None
    assert jumped.is_set() and result.exit_code == 124 and result.violation.limit == "wall_time"
    assert 0.95 <= result.usage.wall_time < margin(1.5) and took < margin(5)


@pytest.mark.redis
def test_budget_day_follows_the_redis_server_not_the_local_clock(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """This machine's wall clock jumps a day ahead after the ledger opened: the daily scope
    is still the Redis server's day."""
    redis_server.flush()
    budget = BudgetPolicy.model_validate({"pricing": PRICES, "daily": {"usd": 1}})
    with Ledger.open(budget, run_id="r", agent="a", session=None, store=redis_server.url) as led:
        today = next(s.key for s in led.usage() if s.scope == "daily")
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 86400)
        led.record(model="m1", input_tokens=10, output_tokens=0)
        assert next(s.key for s in led.usage() if s.scope == "daily") == today
