"""The audit log's lock under load and under attack (issue 16, item 6).

Other supervisors queueing on the lock (a loaded machine, fsync by fsync) must not fail a
run; a process of the run's own tree holding it fails the run, with a hint that says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _helpers import GLOBAL_TIMEOUT, margin, python, supervise

from supervisor._flock import LOCK_WAIT
from supervisor.audit import AuditLog, verify

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()  # held until the test says
"""


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


def test_another_writer_holding_the_lock_past_lock_wait_does_not_fail_the_run(
    tmp_path: Path,
) -> None:
    """A process outside the run (another supervisor, slow on a loaded disk) holds the log's
    lock longer than LOCK_WAIT: the run waits for it and exits 0, its lines in the chain."""
    log = tmp_path / "audit.jsonl"
    AuditLog(log).close()
    holder = subprocess.Popen(
        [*python(HOLD), str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        run = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "-q", "--audit", str(log), "--", "true"],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + GLOBAL_TIMEOUT
        while not _has_open(run.pid, log):  # it has reached the log, and its lock
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(LOCK_WAIT + 1)  # the fault: the lock stays held past LOCK_WAIT
        assert run.poll() is None  # still waiting, not failed
    finally:
        holder.communicate("go\n", timeout=GLOBAL_TIMEOUT)
    _, err = run.communicate(timeout=GLOBAL_TIMEOUT)
    assert run.returncode == 0, err
    assert verify(log).ok


LOCK_AND_LOOP = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
while True:
    time.sleep(1)
"""


def test_the_runs_own_tree_holding_the_lock_fails_it_saying_so(tmp_path: Path) -> None:
    """The supervised command flocks the audit log and then breaks a limit (warn): the run
    fails closed (125) within seconds, and the message says its own command held the lock."""
    log = tmp_path / "audit.jsonl"
    AuditLog(log).close()
    t = time.monotonic()
    done = supervise(
        "--audit", str(log), "--set", "limits.wall_time=1s", "--set", "on_violation=warn",
        "--", *python(LOCK_AND_LOOP), str(log),
    )  # fmt: skip
    assert done.returncode == 125, done.stderr
    assert "a process of the supervised command" in done.stderr, done.stderr
    assert "check the path" not in done.stderr
    assert time.monotonic() - t < margin(15)
