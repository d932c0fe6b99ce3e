"""The audit log over time: rotation by size, ``supervise audit`` (summary, --list, --verify,
--follow) on rotated logs, and supervisors appending at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sized
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, python, run_together, supervise, wait_until

from supervisor import audit
from supervisor.audit import AuditLog, log_files, read_events, verify

WRITER = """
import sys
from supervisor.audit import AuditLog
with AuditLog(sys.argv[1], max_size=int(sys.argv[4])) as log:
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(int(sys.argv[3])):
        log.append("warning", run_id=sys.argv[2], observed=i, detail="x" * (i % 50))
"""


def lines_of(paths: list[str]) -> list[dict[str, Any]]:
    return list(read_events(paths))


def test_rotation_at_max_size_keeps_one_chain(tmp_path: Path) -> None:
    """At max_size the file is renamed to the next number; the next file's first line has
    seq 0 and the last hash of the file before; the files verify as one chain."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_size=2000) as log:
        records = [log.append("warning", run_id="r", observed=i) for i in range(40)]
    files = log_files(path)
    assert len(files) > 3 and files[-1] == str(path)
    assert files[:3] == [f"{path}.1", f"{path}.2", f"{path}.3"]
    for name in files[:-1]:
        assert 2000 <= os.path.getsize(name) < 2000 + 400  # one line past the size at most
    assert [r["observed"] for r in lines_of(files)] == list(range(40))
    starts = [next(iter(read_events(name)), None) for name in files]
    for before, first in zip(files, starts[1:], strict=False):
        if first is not None:
            assert first["seq"] == 0
            assert first["prev"] == list(read_events(before))[-1]["hash"]
    assert verify(files) == audit.VerifyReport(True, 40)
    assert records[-1]["hash"] == lines_of(files)[-1]["hash"]


def test_rotation_keep_deletes_the_oldest(tmp_path: Path) -> None:
    """keep=2 leaves the two newest rotated files; what is left verifies, saying it goes on
    from a file that is gone."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_size=1000, keep=2) as log:
        for i in range(40):
            log.append("warning", run_id="r", observed=i)
    rotated = log_files(path)[:-1]
    assert len(rotated) == 2 and rotated[-1].endswith(tuple(f".{n}" for n in range(5, 40)))
    report = verify(log_files(path))
    assert report.ok and report.continues is not None
    assert "goes on from a rotated file" in str(report)


def test_a_missing_rotated_file_is_found(tmp_path: Path) -> None:
    """Deleting a rotated file from the middle breaks the chain at the next file's line 1."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, max_size=1000) as log:
        for i in range(30):
            log.append("warning", run_id="r", observed=i)
    files = log_files(path)
    os.unlink(files[1])
    report = verify(log_files(path))
    assert not report.ok and (report.path, report.line) == (files[2], 1)
    assert "a file is missing or out of order" in (report.problem or "")
    done = supervise("audit", str(path), "--verify")
    assert done.returncode == 1 and files[2] in done.stderr and "line 1" in done.stderr


def test_concurrent_writers_across_rotations_lose_nothing(tmp_path: Path) -> None:
    """Four processes appending at once with rotation every ~8 KiB: every line is written
    once, whole, and the rotated files verify as one chain."""
    path = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run_together([[*python(WRITER), str(path), f"w{i}", "150", "8192"] for i in range(4)], env)
    files = log_files(path)
    assert len(files) > 5
    assert verify(files) == audit.VerifyReport(True, 600)
    records = lines_of(files)
    for writer in ("w0", "w1", "w2", "w3"):
        assert [r["observed"] for r in records if r["run_id"] == writer] == list(range(150))


def test_runs_rotate_by_policy_and_by_option(tmp_path: Path) -> None:
    """audit.max_size in the policy (or --set audit.max_size=...) rotates the log of real
    runs; supervise audit LOG reads every file, and --verify checks them as one chain."""
    log = tmp_path / "audit.jsonl"
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\naudit: {{path: {log}, max_size: 1KiB}}\n")
    for _ in range(3):
        done = supervise("-q", "-p", str(policy), "--", "true")
        assert done.returncode == 0, done.stderr
    for _ in range(2):
        done = supervise("-q", "--audit", str(log), "--set", "audit.max_size=1KiB", "true")
        assert done.returncode == 0, done.stderr
    files = log_files(log)
    assert len(files) >= 4
    done = supervise("audit", str(log), "--verify")
    assert done.returncode == 0 and "ok: 10 records, chain intact" in done.stdout
    done = supervise("audit", str(log), "--json", "--event", "run_end")
    assert len(done.stdout.splitlines()) == 5
    done = supervise("audit", str(log))
    assert done.stdout.splitlines()[1].split()[:3] == ["-", "5", "0"]


def test_two_supervisors_at_once_leave_whole_chained_lines(tmp_path: Path) -> None:
    """Two supervise processes writing warnings, violations and ends into one log at once:
    no torn or interleaved line, one chain, each run's lines all there and in order."""
    log = tmp_path / "audit.jsonl"
    # A busy tree: every watched limit crosses 80% and 90% (warnings), then wall_time stops it.
    code = (
        "import time\nx = bytearray(30 << 20)\nt = time.time()\nwhile time.time() - t < 5: pass\n"
    )
    args = ["-q", "--audit", str(log), "--set", "limits.wall_time=1s", "--set"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "supervisor", *args, "limits.memory=34MiB", *python(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        p.communicate(timeout=GLOBAL_TIMEOUT)
    assert verify(log).ok
    records = lines_of([str(log)])
    runs = {r["run_id"] for r in records}
    assert len(runs) == 2
    for run in runs:
        kinds = [r["event"] for r in records if r["run_id"] == run]
        assert kinds[0] == "run_start" and kinds[-1] == "run_end" and "violation" in kinds


def has_length(items: Sized, n: int) -> bool:
    """Whether ``items`` holds exactly ``n`` entries."""
    return len(items) == n


def test_summary_list_and_json_agree(tmp_path: Path) -> None:
    """The default summary, --list and --json read the same events, filters included."""
    log = tmp_path / "audit.jsonl"
    for agent, cmd in (("a", ["true"]), ("b", ["sleep", "5"]), ("a", ["false"])):
        supervise("-q", "--audit", str(log), "--agent", agent, "--set", "limits.wall_time=300ms",
                  "--", *cmd)  # fmt: skip
    summary = supervise("audit", str(log)).stdout.splitlines()
    assert summary[0].split() == [
        "agent", "runs", "stopped", "violations", "warnings", "denied", "calls", "spend"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in summary[1:]}
    assert rows["a"][1:4] == ["2", "0", "-"] and rows["b"][1:5] == ["1", "1", "wall_time", "1"]
    assert rows["total"][1] == "3"
    listed = supervise("audit", str(log), "--list", "--agent", "b").stdout.splitlines()
    as_json = supervise("audit", str(log), "--json", "--agent", "b").stdout.splitlines()
    assert len(listed) == len(as_json) >= 3
    assert all(json.loads(line)["agent"] == "b" for line in as_json)
    none = supervise("audit", str(log), "--agent", "nobody")
    assert none.returncode == 0 and none.stdout.strip() == "no events match"


def test_follow_prints_events_as_they_are_written_across_a_rotation(tmp_path: Path) -> None:
    """--follow prints only new events, as they land, and keeps following after the file
    rotates; --since first prints the matching events already there."""
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("run_start", run_id="old")
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "audit", str(path), "--follow", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    got: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            got.append(json.loads(line))

    def following() -> bool:  # it has opened the log (and gone to its end)
        try:
            fds = os.listdir(f"/proc/{proc.pid}/fd")
            return any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(path) for fd in fds)
        except OSError:
            return False

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert wait_until(following, timeout=GLOBAL_TIMEOUT)
        with AuditLog(path, max_size=600) as log:
            for i in range(3):
                log.append("warning", run_id="new", observed=i)
                assert wait_until(partial(has_length, got, i + 1), timeout=10), got
        assert len(log_files(path)) > 2  # it rotated while followed
    finally:
        proc.terminate()
        proc.wait(timeout=GLOBAL_TIMEOUT)
        reader.join(GLOBAL_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()
    assert [(r["run_id"], r["observed"]) for r in got] == [("new", 0), ("new", 1), ("new", 2)]
    replay = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "audit", str(path), "-f", "--since", "1h", "--list"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert replay.stdout is not None
        first = [replay.stdout.readline() for _ in range(4)]
    finally:
        replay.terminate()
        replay.communicate(timeout=GLOBAL_TIMEOUT)
    assert "run_start  run=old" in first[0] and all("run=new" in x for x in first[1:])


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--since", "soon"], "try 1h"),
        (["--event", "explosion"], "is not an audit event"),
        (["--verify", "--follow"], "drop --follow"),
    ],
)
def test_bad_audit_options_exit_125(tmp_path: Path, args: list[str], phrase: str) -> None:
    """A bad option: 125 and a message that names it and the fix."""
    log = tmp_path / "a.jsonl"
    with AuditLog(log) as w:
        w.append("run_start", run_id="r")
    done = supervise("audit", str(log), *args)
    assert done.returncode == 125 and phrase in done.stderr
