"""The audit log: the chain, tamper detection, concurrent writers, reading and filtering."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _helpers import run_together

from supervisor import audit
from supervisor.audit import (
    KEYS,
    AuditLog,
    default_audit_path,
    filter_events,
    format_event,
    parse_since,
    read_events,
    verify,
)
from supervisor.errors import AuditError

GLOBAL_TIMEOUT = 60
REPO = Path(__file__).resolve().parents[1]
ZERO = "0" * 64


def python(code: str, *args: str) -> list[str]:
    """argv that runs ``code`` in a fresh interpreter."""
    return [sys.executable, "-c", code, *args]


def child_env() -> dict[str, str]:
    """The environment for children, with this checkout importable."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def canonical(record: dict[str, Any]) -> bytes:
    """The serialization the spec defines, written out independently of the module."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its hash recomputed, as a forger would."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return {**body, "hash": hashlib.sha256(canonical(body)).hexdigest()}


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Write records as canonical lines."""
    path.write_bytes(b"".join(canonical(r) + b"\n" for r in records))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """A fresh log path in a directory that does not exist yet (conftest checks fd leaks)."""
    return tmp_path / "logs" / "audit.jsonl"


def make_chain(path: Path, n: int = 5) -> list[dict[str, Any]]:
    """Append ``n`` records and return them."""
    with AuditLog(path) as log:
        return [log.append("warning", run_id="r1", agent="bot", observed=i) for i in range(n)]


def test_chain_of_five_verifies(log_path: Path) -> None:
    """Five appends give five canonical, chained lines that verify."""
    records = make_chain(log_path)
    report = verify(log_path)
    assert report.ok and report.count == 5 and report.line is None and report.problem is None
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert [json.loads(line) for line in lines] == records
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == ZERO
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for line, record in zip(lines, records, strict=True):
        assert list(record) == list(KEYS)
        assert line == canonical(record) + b"\n"
        assert seal(record) == record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["ts"])


def test_absent_fields_are_null(log_path: Path) -> None:
    """Fields not given are written as null."""
    with AuditLog(log_path) as log:
        record = log.append("run_start", run_id="r1")
    for key in ("agent", "session", "limit", "observed", "limit_value", "unit", "action", "detail"):
        assert record[key] is None
    assert b'"agent":null' in log_path.read_bytes()


def test_unknown_event_is_refused(log_path: Path) -> None:
    """An event outside the seven kinds is a ValueError and writes nothing."""
    with AuditLog(log_path) as log, pytest.raises(ValueError, match="killed"):
        log.append("killed", run_id="r1")
    assert log_path.read_bytes() == b""


def test_file_and_directory_are_private(log_path: Path) -> None:
    """The log is created 0o600 and its new parent directory 0o700."""
    make_chain(log_path, 1)
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700


def test_decimal_and_detail_round_trip(log_path: Path) -> None:
    """Decimals, structured details and undecodable names are written as JSON and verify."""
    from decimal import Decimal

    with AuditLog(log_path) as log:
        log.append(
            "violation",
            run_id="r1",
            limit="usd",
            observed=Decimal("0.25"),
            limit_value=Decimal("2"),
            unit="USD",
            detail={"z": [1, 2], "a": "é"},
        )
        log.append("warning", run_id="r1", detail=os.fsdecode(b"bad-\xff-name"))
    record, odd = read_events(log_path)
    assert odd["detail"] == "bad-\udcff-name"
    assert record["observed"] == 0.25 and record["limit_value"] == 2
    assert record["detail"] == {"z": [1, 2], "a": "é"}
    assert verify(log_path).ok


def tamper_cases() -> list[tuple[str, Callable[[list[dict[str, Any]]], list[Any]], int, str]]:
    """(name, mutate the list of records, first bad line, phrase in the problem)."""

    def edit_field(r: list[dict[str, Any]]) -> list[Any]:
        r[2] = {**r[2], "agent": "someone-else"}
        return r

    def edit_hash(r: list[dict[str, Any]]) -> list[Any]:
        r[2] = {**r[2], "hash": "f" * 64}
        return r

    def drop_middle(r: list[dict[str, Any]]) -> list[Any]:
        del r[2]
        return r

    def swap(r: list[dict[str, Any]]) -> list[Any]:
        r[1], r[2] = r[2], r[1]
        return r

    def insert_forged(r: list[dict[str, Any]]) -> list[Any]:
        forged = seal({**r[2], "seq": 3, "prev": r[2]["hash"], "detail": "forged"})
        r.insert(3, forged)
        return r

    def delete_first(r: list[dict[str, Any]]) -> list[Any]:
        return r[1:]

    return [
        ("edit a field", edit_field, 3, "line 3 was edited: its hash does not match"),
        ("edit the hash", edit_hash, 3, "line 3 was edited: its hash does not match"),
        ("drop a middle line", drop_middle, 3, "line 3 does not follow line 2"),
        ("swap two lines", swap, 2, "line 2 does not follow line 1"),
        ("insert a forged line", insert_forged, 5, "line 5 does not follow line 4"),
        ("delete the first line", delete_first, 1, "line 1 does not start a chain"),
    ]


@pytest.mark.parametrize(
    ("mutate", "line", "phrase"),
    [case[1:] for case in tamper_cases()],
    ids=[case[0] for case in tamper_cases()],
)
def test_tampering_is_found_at_the_exact_line(
    log_path: Path, mutate: Callable[[list[dict[str, Any]]], list[Any]], line: int, phrase: str
) -> None:
    """Each kind of tampering is reported at the first line it breaks."""
    records = make_chain(log_path)
    write_lines(log_path, mutate(list(records)))
    report = verify(log_path)
    assert not report.ok
    assert (report.path, report.line) == (str(log_path), line)
    assert report.problem is not None and report.problem.startswith(phrase)
    assert report.count == line - 1


def test_truncated_last_line_is_found(log_path: Path) -> None:
    """A last line cut mid-way is reported as truncated."""
    make_chain(log_path)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-30])
    report = verify(log_path)
    assert (report.ok, report.line) == (False, 5)
    assert report.problem is not None and report.problem.startswith("line 5 is truncated")


def test_reformatted_line_is_found(log_path: Path) -> None:
    """A line whose content and hash still match but whose bytes changed is an edit."""
    records = make_chain(log_path, 3)
    lines = [canonical(r) + b"\n" for r in records]
    lines[1] = json.dumps(records[1]).encode() + b"\n"
    log_path.write_bytes(b"".join(lines))
    report = verify(log_path)
    assert report.line == 2 and report.problem == "line 2 was edited: it is not in canonical form"


def test_garbage_line_is_found(log_path: Path) -> None:
    """A line that is not an audit record is named, whatever it is."""
    make_chain(log_path, 2)
    with open(log_path, "ab") as f:
        f.write(b'{"seq": 2}\n')
    report = verify(log_path)
    assert report.line == 3 and report.problem is not None
    assert report.problem.startswith("line 3 is not an audit record: missing keys ts, run_id")


def test_verify_report_is_a_frozen_value() -> None:
    """A report compares by value, cannot be changed, and has a JSON shape."""
    report = audit.VerifyReport(False, 2, "a.jsonl", 3, "line 3 was edited")
    same = audit.VerifyReport(False, 2, "a.jsonl", 3, "line 3 was edited")
    assert report == same and hash(report) == hash(same) and report != audit.VerifyReport(True, 2)
    assert repr(report) == (
        "VerifyReport(ok=False, count=2, path='a.jsonl', line=3, problem='line 3 was edited',"
        " continues=None)"
    )
    assert report.to_dict() == {
        "ok": False, "count": 2, "path": "a.jsonl", "line": 3, "problem": "line 3 was edited",
        "continues": None,
    }  # fmt: skip
    assert str(report) == "a.jsonl: line 3 was edited"
    with pytest.raises(AttributeError):
        report.ok = True


def test_empty_file_verifies_and_missing_file_raises(tmp_path: Path) -> None:
    """An empty log is ok with count 0; a missing one is an AuditError naming it."""
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert verify(empty) == audit.VerifyReport(True, 0)
    with pytest.raises(AuditError, match=re.escape("missing.jsonl")):
        verify(tmp_path / "missing.jsonl")


def test_verify_follows_a_rotated_file(tmp_path: Path) -> None:
    """A later file chains from the previous file's last hash; a file out of order is found."""
    old, new = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    records = make_chain(old, 3)
    first = seal({**records[-1], "seq": 0, "prev": records[-1]["hash"], "detail": "rotated"})
    second = seal({**first, "seq": 1, "prev": first["hash"]})
    write_lines(new, [first, second])
    assert verify([old, new]) == audit.VerifyReport(True, 5)
    report = verify([new, old])  # new goes on from a file not given first; old cannot follow
    assert (report.path, report.line) == (str(old), 1)
    assert report.problem is not None and "does not follow the end of" in report.problem
    report = verify([old, old])
    assert (report.path, report.line) == (str(old), 1)
    assert report.problem is not None and "does not follow the end of" in report.problem


WRITER = """
import sys
from supervisor.audit import AuditLog
with AuditLog(sys.argv[1]) as log:
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(int(sys.argv[3])):
        log.append("warning", run_id=sys.argv[2], observed=i, detail="x" * (i % 50))
"""


def test_concurrent_writers_keep_one_chain(log_path: Path) -> None:
    """Four processes appending 200 lines each at once give 800 whole, chained lines."""
    log_path.parent.mkdir()
    run_together([python(WRITER, str(log_path), f"w{i}", "200") for i in range(4)], child_env())
    report = verify(log_path)
    assert report.ok, report
    assert report.count == 800
    records = list(read_events(log_path))
    assert [r["seq"] for r in records] == list(range(800))
    for writer in ("w0", "w1", "w2", "w3"):
        assert [r["observed"] for r in records if r["run_id"] == writer] == list(range(200))


def test_threads_sharing_one_log_keep_one_chain(log_path: Path) -> None:
    """Threads appending through one AuditLog (one descriptor, one flock) never fork the chain."""
    import threading

    with AuditLog(log_path) as log:
        threads = [
            threading.Thread(target=lambda: [log.append("warning", run_id="t") for _ in range(100)])
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(GLOBAL_TIMEOUT)
    assert verify(log_path) == audit.VerifyReport(True, 400)


TORN_WRITER = """
import os, signal, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, sys.argv[2].encode())
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_torn_tail_is_skipped_and_reported(log_path: Path) -> None:
    """After a writer dies mid-line, the next line starts afresh, chained to the last whole one."""
    records = make_chain(log_path, 4)
    half = canonical(seal({**records[-1], "seq": 4, "prev": records[-1]["hash"]}))[:40]
    proc = subprocess.run(
        python(TORN_WRITER, str(log_path), half.decode()), timeout=GLOBAL_TIMEOUT, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    assert not log_path.read_bytes().endswith(b"\n")
    with AuditLog(log_path) as log:
        after = log.append("run_end", run_id="r1")
    assert (after["seq"], after["prev"]) == (4, records[-1]["hash"])
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6 and lines[4] == half + b"\n"
    assert json.loads(lines[5]) == after
    report = verify(log_path)
    assert (report.ok, report.line, report.count) == (False, 5, 4)
    assert report.problem is not None and report.problem.startswith("line 5 is not valid JSON")
    assert [r["seq"] for r in read_events(log_path, strict=False)] == [0, 1, 2, 3, 4]


def test_torn_tail_without_newline_at_all(log_path: Path) -> None:
    """A file holding only a torn line restarts the chain at seq 0 on a fresh line."""
    log_path.parent.mkdir()
    log_path.write_bytes(b'{"ts":"2026')
    with AuditLog(log_path) as log:
        record = log.append("run_start", run_id="r1")
    assert (record["seq"], record["prev"]) == (0, ZERO)
    assert log_path.read_bytes().splitlines()[1] == canonical(record)


def test_append_after_another_process_appended(log_path: Path) -> None:
    """A writer whose cached tail is stale rereads it and chains onto the other writer's line."""
    with AuditLog(log_path) as log:
        log.append("run_start", run_id="mine")
        subprocess.run(
            python(WRITER.replace("sys.stdin.readline()", ""), str(log_path), "theirs", "2"),
            env=child_env(),
            stdout=subprocess.DEVNULL,
            timeout=GLOBAL_TIMEOUT,
            check=True,
        )
        record = log.append("run_end", run_id="mine")
    theirs = list(read_events(log_path))[2]
    assert theirs["run_id"] == "theirs"
    assert (record["seq"], record["prev"]) == (3, theirs["hash"])
    assert verify(log_path) == audit.VerifyReport(True, 4)


def test_tail_scan_spans_long_lines(log_path: Path) -> None:
    """Records longer than the tail read-ahead are still found as the chain point."""
    with AuditLog(log_path) as log:
        log.append("run_start", run_id="r1", detail="y" * 50_000)
        log.append("warning", run_id="r1", detail="z" * 30_000)
    with AuditLog(log_path) as log:  # a fresh writer has no cache and must scan back
        record = log.append("run_end", run_id="r1")
    assert record["seq"] == 2
    assert verify(log_path) == audit.VerifyReport(True, 3)


def test_rotated_path_is_reopened(log_path: Path) -> None:
    """When the file is renamed away (logrotate's way), the next append goes to a new file at
    the path, chained from the renamed one; a renamed-away file without a number starts afresh."""
    with AuditLog(log_path) as log:
        first = log.append("run_start", run_id="r1")
        log_path.rename(log_path.with_suffix(".jsonl.1"))
        record = log.append("run_end", run_id="r1")
        assert (record["seq"], record["prev"]) == (0, first["hash"])
        assert verify(log_path.with_suffix(".jsonl.1")).ok
        assert verify([log_path.with_suffix(".jsonl.1"), log_path]) == audit.VerifyReport(True, 2)
        report = verify(log_path)  # alone: it goes on from a file not given
        assert report.ok and report.continues == first["hash"]
        for path in (log_path, log_path.with_suffix(".jsonl.1")):
            path.rename(path.with_suffix(".old"))
        record = log.append("run_end", run_id="r2")
    assert (record["seq"], record["prev"]) == (0, ZERO)
    assert verify(log_path) == audit.VerifyReport(True, 1)


def test_unwritable_path_is_an_audit_error(tmp_path: Path) -> None:
    """A path whose parent is a regular file fails at construction, naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = blocker / "audit.jsonl"
    with pytest.raises(AuditError, match=re.escape(str(path))) as info:
        AuditLog(path)
    assert info.value.hint is not None and "--audit FILE" in info.value.hint


def test_read_only_file_is_an_audit_error(tmp_path: Path) -> None:
    """A log this user may not write is an AuditError that says how to fix it."""
    if os.geteuid() == 0:
        pytest.skip("root can write any file")
    path = tmp_path / "audit.jsonl"
    path.touch(mode=0o400)
    with pytest.raises(AuditError, match="writable"):
        AuditLog(path)


def test_disk_full_is_an_audit_error(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing is an AuditError naming the path; the chain stays intact."""
    with AuditLog(log_path) as log:
        log.append("run_start", run_id="r1")

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(AuditError, match=re.escape(str(log_path))) as info:
            log.append("run_end", run_id="r1")
        assert info.value.hint is not None and "disk space" in info.value.hint
        monkeypatch.undo()
        assert log.append("run_end", run_id="r1")["seq"] == 1
    assert verify(log_path).ok


def test_closed_log_refuses_appends(log_path: Path) -> None:
    """Appending after close is a ValueError."""
    log = AuditLog(log_path)
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append("run_end", run_id="r1")


def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """XDG_STATE_HOME wins when absolute; otherwise ~/.local/state is used."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_audit_path() == tmp_path / "xdg" / "supervise" / "audit.jsonl"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
    expected = tmp_path / "home" / ".local" / "state" / "supervise" / "audit.jsonl"
    assert default_audit_path() == expected
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_audit_path() == expected


def test_read_events_spans_files_in_order(tmp_path: Path) -> None:
    """Records of several files come out file by file, line by line."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_chain(a, 2)
    with AuditLog(b) as log:
        log.append("run_end", run_id="r2")
    events = list(read_events([a, b]))
    assert [(e["run_id"], e["seq"]) for e in events] == [("r1", 0), ("r1", 1), ("r2", 0)]
    assert len(list(read_events(str(a)))) == 2


def test_read_events_names_a_bad_line(tmp_path: Path) -> None:
    """A line that is not JSON raises with file and line number, or is skipped when not strict."""
    path = tmp_path / "a.jsonl"
    make_chain(path, 2)
    with open(path, "ab") as f:
        f.write(b"not json\n[1, 2]\n")
    make_chain(path, 1)
    with pytest.raises(AuditError, match=re.escape(f"{path} line 3 is not valid JSON")):
        list(read_events(path))
    assert len(list(read_events(path, strict=False))) == 3
    with pytest.raises(AuditError, match="no audit log"):
        list(read_events(tmp_path / "missing.jsonl"))


@pytest.fixture
def mixed(tmp_path: Path) -> list[dict[str, Any]]:
    """Records from two agents, sessions and limits, read back from a real log."""
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.append("run_start", run_id="r1", agent="bot", session="s1")
        log.append("warning", run_id="r1", agent="bot", session="s1", limit="memory")
        log.append("violation", run_id="r1", agent="bot", session="s1", limit="wall_time")
        log.append("run_start", run_id="r2", agent="other", session="s2")
        log.append("denied", run_id="r2", agent="other", session="s2", limit="usd")
    return list(read_events(path))


@pytest.mark.parametrize(
    ("criteria", "seqs"),
    [
        ({}, [0, 1, 2, 3, 4]),
        ({"agent": "bot"}, [0, 1, 2]),
        ({"session": "s2"}, [3, 4]),
        ({"event": "run_start"}, [0, 3]),
        ({"limit": "usd"}, [4]),
        ({"agent": "bot", "limit": "memory"}, [1]),
        ({"agent": "nobody"}, []),
    ],
)
def test_filter_by_field(
    mixed: list[dict[str, Any]], criteria: dict[str, Any], seqs: list[int]
) -> None:
    """Each filter keeps exactly the records whose field matches; filters combine with and."""
    assert [r["seq"] for r in filter_events(mixed, **criteria)] == seqs


def test_filter_since(mixed: list[dict[str, Any]]) -> None:
    """``since`` keeps records at or after the given time, aware or naive (UTC)."""
    records = [{**r, "ts": f"2026-11-24T0{i}:00:00.000000Z"} for i, r in enumerate(mixed)]
    since = datetime(2026, 11, 24, 2, tzinfo=UTC)
    assert [r["seq"] for r in filter_events(records, since=since)] == [2, 3, 4]
    assert [r["seq"] for r in filter_events(records, since=since.replace(tzinfo=None))] == [2, 3, 4]
    assert list(filter_events(mixed, since=datetime.now(UTC) - timedelta(hours=1))) == mixed
    assert list(filter_events(mixed, since=datetime.now(UTC) + timedelta(hours=1))) == []


def test_filter_rejects_unknown_event(mixed: list[dict[str, Any]]) -> None:
    """A misspelled event kind is an error, not an empty result."""
    with pytest.raises(ValueError, match="violaton"):
        filter_events(mixed, event="violaton")


NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("15m", NOW - timedelta(minutes=15)),
        ("1h", NOW - timedelta(hours=1)),
        (" 7d ", NOW - timedelta(days=7)),
        ("2026-11-24", datetime(2026, 11, 24, tzinfo=UTC)),
        ("2026-11-24T10:00:00Z", datetime(2026, 11, 24, 10, tzinfo=UTC)),
        ("2026-11-24T12:00:00+02:00", datetime(2026, 11, 24, 10, tzinfo=UTC)),
    ],
)
def test_parse_since_accepts(text: str, expected: datetime) -> None:
    """ISO 8601 dates and times and relative 30s/15m/1h/7d parse to aware UTC times."""
    assert parse_since(text, now=NOW) == expected
    assert parse_since(text, now=NOW).tzinfo is UTC


@pytest.mark.parametrize("text", ["yesterday", "", "1w", "-1h", "h", "1.5h", "2026-13-01"])
def test_parse_since_rejects(text: str) -> None:
    """Anything else is a ValueError that shows examples of what works."""
    message = f'"{text}" is not a time (try 1h, 7d or 2026-11-24T10:00:00Z)'
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_since(text, now=NOW)


def test_parse_since_relative_uses_now() -> None:
    """Without ``now``, a relative time is measured back from the current time."""
    before = datetime.now(UTC)
    got = parse_since("1h")
    assert before - timedelta(hours=1) <= got <= datetime.now(UTC) - timedelta(hours=1)


def test_format_event_is_one_readable_line(log_path: Path) -> None:
    """A violation shows time, kind, run, agent, limit with values and unit, action, detail."""
    with AuditLog(log_path) as log:
        record = log.append(
            "violation",
            run_id="ab12cd",
            agent="bot",
            limit="wall_time",
            observed=1.5,
            limit_value=1,
            unit="s",
            action="kill",
            detail="stopped 3 processes",
        )
        start = log.append("run_start", run_id="ab12cd", detail={"landlock": 3})
    line = format_event(record)
    assert line == (
        f"{record['ts'][:19]}Z  violation  run=ab12cd  agent=bot  wall_time 1.5s > 1s"
        "  kill  stopped 3 processes"
    )
    assert format_event(start) == f'{start["ts"][:19]}Z  run_start  run=ab12cd  {{"landlock": 3}}'
    warning = {**record, "event": "warning", "observed": None, "action": None, "detail": None}
    assert format_event(warning).endswith("agent=bot  wall_time 1s")
