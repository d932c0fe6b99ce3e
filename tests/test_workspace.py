"""The workspace: the Landlock jail, the storage quota, check_write and network: deny."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import (
    GLOBAL_TIMEOUT,
    HAS_LANDLOCK,
    LANDLOCK_ABI,
    needs_landlock,
    python,
    supervise,
    wait_until,
)

from supervisor import Policy, Supervisor, Workspace, WorkspaceError
from supervisor._quota import QuotaTracker
from supervisor.audit import read_events

KiB, MiB = 1 << 10, 1 << 20


def run(code: str, ws: Path | None = None, audit: Path | None = None, **spec: Any) -> Any:
    """Run Python ``code`` in a workspace (``ws``, else a temporary one) under ``spec``."""
    extra: dict[str, Any] = {
        k: spec.pop(k) for k in ("on_violation", "network", "limits") if k in spec
    }
    if ws is not None:
        spec["path"] = str(ws)
    policy = Policy.from_dict(
        {"limits": {"wall_time": "20s"}, "grace": "300ms", "workspace": spec, **extra}
    )
    return Supervisor(policy, audit=audit).run(python(code))


def attempt(code: str) -> str:
    """Python code that prints the errno name of ``code``'s OSError, or 'ok'."""
    return (
        "import errno, os\n"
        f"try:\n    {code}\n    print('ok')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    )


# -- the jail: every way out is refused by the kernel ------------------------------------


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """A workspace and a directory outside it, holding one file."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    ws.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("untouched")
    return ws, outside


ESCAPES = {
    "absolute path": "open({out!r} + '/x', 'w').write('x')",
    "dot-dot": "open('../outside/x', 'w').write('x')",
    "proc cwd": "open('/proc/self/cwd/../outside/x', 'w').write('x')",
    "symlink to a dir outside": ("os.symlink({out!r}, 'link'); open('link/x', 'w').write('x')"),
    "hard link of a file outside": (
        "os.link({out!r} + '/secret', 'hl'); open('hl', 'w').write('changed')"
    ),
    "rename out": "open('mine', 'w').write('x'); os.rename('mine', {out!r} + '/x')",
    "overwrite a file outside": "open({out!r} + '/secret', 'w').write('changed')",
    "delete a file outside": "os.unlink({out!r} + '/secret')",
    "mkdir outside": "os.mkdir({out!r} + '/d')",
    "/tmp": "open('/tmp/supervise-escape-test', 'w').write('x')",
    "/dev/shm": "open('/dev/shm/supervise-escape-test', 'w').write('x')",
}


@needs_landlock
@pytest.mark.parametrize("how", sorted(ESCAPES))
def test_jail_refuses_every_way_out(how: str, places: tuple[Path, Path]) -> None:
    """Each escape is refused by the kernel (EACCES, or EXDEV for cross-tree links and
    renames) and nothing outside the workspace changes."""
    ws, outside = places
    result = run(attempt(ESCAPES[how].format(out=str(outside))), ws=ws)
    code = result.exit_code
    assert code == 0, result.violation
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "untouched"
    assert not os.path.exists("/tmp/supervise-escape-test")
    assert not os.path.exists("/dev/shm/supervise-escape-test")


@needs_landlock
def test_jail_errors_are_eacces_or_exdev(places: tuple[Path, Path], capfd: Any) -> None:
    """The refusals read as permission errors: EACCES, EXDEV for link/rename (Landlock's
    answer to a reference across hierarchies), EROFS (the host read-only in the jail)."""
    ws, outside = places
    for how, code in ESCAPES.items():
        policy = Policy.from_dict({"workspace": {"path": str(ws)}})
        Supervisor(policy).run(python(attempt(code.format(out=str(outside)))))
        printed = capfd.readouterr().out.split()[-1]
        assert printed in ("EACCES", "EXDEV", "EROFS"), (how, printed)
        for leftover in ("link", "hl", "mine"):
            if os.path.lexists(ws / leftover):
                os.unlink(ws / leftover)


@needs_landlock
def test_no_fd_of_the_parent_leaks_into_the_jail(places: tuple[Path, Path]) -> None:
    """An inheritable fd the embedding program holds on a directory outside never reaches
    the command: only 0, 1 and 2 are open in it."""
    ws, outside = places
    fd = os.open(outside, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(fd, True)
    code = (
        "import os\n"
        "fds = os.listdir('/proc/self/fd')\n"
        "links = []\n"
        "for f in fds:\n"
        "    try: links.append(os.readlink('/proc/self/fd/' + f))\n"
        "    except OSError: pass  # listdir's own fd, closed since\n"
        "open('fds.txt', 'w').write(repr(sorted(int(f) for f in fds)) + repr(links))\n"
    )
    try:
        result = run(code, ws=ws)
    finally:
        os.close(fd)
    assert result.exit_code == 0
    text = (ws / "fds.txt").read_text()
    assert str(outside) not in text
    numbers = json.loads(text[: text.index("]") + 1])
    assert numbers[:3] == [0, 1, 2] and fd not in numbers  # the others: listdir's, the RPC


@needs_landlock
def test_jail_allows_the_workspace_devices_and_writable_extras(places: tuple[Path, Path]) -> None:
    """Inside the workspace everything works; /dev/null and a `writable` extra too; TMPDIR
    points into the workspace."""
    ws, outside = places
    code = (
        "import os, tempfile\n"
        "os.makedirs('a/b'); open('a/b/f', 'w').write('x'); os.rename('a/b/f', 'g')\n"
        "os.link('g', 'h'); os.symlink('g', 's'); os.unlink('h'); os.truncate('g', 0)\n"
        "open('/dev/null', 'w').write('x')\n"
        f"open({str(outside)!r} + '/extra', 'w').write('ok')\n"
        "tempfile.NamedTemporaryFile(delete=False).write(b'x')\n"
        "assert os.environ['TMPDIR'] == os.getcwd()\n"
    )
    result = run(code, ws=ws, writable=[str(outside)])
    assert result.exit_code == 0, result
    assert (outside / "extra").read_text() == "ok"


@needs_landlock
def test_readable_list_hides_everything_else(tmp_path: Path) -> None:
    """With `readable`, the command still starts (system paths, its prefix) and reads the
    listed paths, but nothing else: a file outside them is EACCES."""
    shown, hidden = tmp_path / "shown", tmp_path / "hidden"
    shown.mkdir()
    hidden.mkdir()
    (shown / "f").write_text("a")
    (hidden / "f").write_text("b")
    ws = tmp_path / "ws"
    code = (
        attempt(f"open({str(shown / 'f')!r}).read()")
        + attempt(f"open({str(hidden / 'f')!r}).read()")
        + "open('out', 'w').write('written')"
    )
    policy = Policy.from_dict({"workspace": {"path": str(ws), "readable": [str(shown)]}})
    r, w = os.pipe()
    with os.fdopen(r) as reader:
        done = Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        printed = reader.read().split()
    assert done.exit_code == 0
    assert printed == ["ok", "EACCES"]
    assert (ws / "out").read_text() == "written"


def test_jail_off_writes_anywhere(places: tuple[Path, Path]) -> None:
    """jail: off leaves the filesystem open (the quota still holds)."""
    ws, outside = places
    result = run(f"open({str(outside)!r} + '/x', 'w').write('x')", ws=ws, jail="off")
    assert result.exit_code == 0
    assert (outside / "x").read_text() == "x"


def test_jail_required_without_landlock_fails_before_the_command(
    places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, audit_log: Path
) -> None:
    """jail: required on a kernel without Landlock: 125 with a message naming the fix, and
    the command never runs."""
    import supervisor._linux

    monkeypatch.setattr(supervisor._linux, "landlock_abi", lambda: None)
    ws, outside = places
    result = run(f"open({str(outside)!r} + '/ran', 'w')", ws=ws, jail="required")
    assert result.exit_code == 125 and result.status == "failed"
    assert "no Landlock" in result.error and "jail: auto" in result.error
    assert not (outside / "ran").exists()


def test_jail_auto_without_landlock_warns_and_records_it(
    places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, audit_log: Path, capfd: Any
) -> None:
    """jail: auto without Landlock runs with a warning on stderr and in the audit log, and
    run_start records landlock: null."""
    import supervisor._linux

    monkeypatch.setattr(supervisor._linux, "landlock_abi", lambda: None)
    ws, _ = places
    result = run("pass", ws=ws)
    assert result.exit_code == 0
    assert "no Landlock" in capfd.readouterr().err
    events = list(read_events(audit_log))
    start = next(e for e in events if e["event"] == "run_start")
    assert start["detail"]["enforced"]["landlock"] is None
    assert any(e["event"] == "warning" and "no Landlock" in e["detail"] for e in events)


@needs_landlock
def test_run_start_records_the_jail(places: tuple[Path, Path], audit_log: Path) -> None:
    """run_start names the Landlock ABI, what is writable and readable, and the workspace."""
    ws, _ = places
    run("pass", ws=ws)
    start = next(e for e in read_events(audit_log) if e["event"] == "run_start")
    enforced = start["detail"]["enforced"]
    assert enforced["landlock"] == {"abi": LANDLOCK_ABI, "writes": "workspace", "reads": "all"}
    assert enforced["workspace"] == str(ws)
    assert enforced["quota"] == "inotify + RLIMIT_FSIZE"


def test_missing_writable_path_is_a_clear_error(places: tuple[Path, Path]) -> None:
    """A `writable` path that does not exist fails the run (125) naming it: a typo must not
    leave the jail looser or tighter than the policy says."""
    ws, outside = places
    result = run("pass", ws=ws, writable=[str(outside / "nope")])
    if not HAS_LANDLOCK:
        pytest.skip("without Landlock the jail is not built")
    assert result.exit_code == 125
    assert "workspace.writable" in result.error and "does not exist" in result.error


# -- the workspace's life ------------------------------------------------------------------


def test_temporary_workspace_is_the_cwd_and_removed_after() -> None:
    """Without a path: a fresh directory, the command's cwd, removed after the run."""
    code = "import os, sys; open('f', 'w').write('x'); sys.stdout.write(os.getcwd())"
    r, w = os.pipe()
    policy = Policy.from_dict({"workspace": {}})
    with os.fdopen(r) as reader:
        result = Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        cwd = reader.read()
    assert result.exit_code == 0 and os.path.basename(cwd).startswith("supervise-")
    assert not os.path.exists(cwd)


def test_keep_keeps_a_temporary_workspace() -> None:
    """keep: true leaves the temporary workspace in place."""
    code = "import os, sys; open('f', 'w').write('x'); sys.stdout.write(os.getcwd())"
    r, w = os.pipe()
    policy = Policy.from_dict({"workspace": {"keep": True}})
    with os.fdopen(r) as reader:
        Supervisor(policy).run(python(code), stdout=w)
        os.close(w)
        cwd = reader.read()
    try:
        assert Path(cwd, "f").read_text() == "x"
    finally:
        import shutil

        shutil.rmtree(cwd)


def test_given_path_is_made_and_never_removed(tmp_path: Path) -> None:
    """A workspace.path that does not exist is made, and kept after the run."""
    ws = tmp_path / "new" / "ws"
    result = run("open('f', 'w').write('x')", ws=ws)
    assert result.exit_code == 0 and (ws / "f").read_text() == "x"


def test_cli_workspace_option(tmp_path: Path) -> None:
    """--workspace DIR runs the command in DIR, and the summary shows storage and files."""
    ws = tmp_path / "w s"
    done = supervise("-w", str(ws), "--", "sh", "-c", "pwd; echo hi > f")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ws) and (ws / "f").read_text() == "hi\n"
    assert "storage 4.0 KiB/4.0 GiB" in done.stderr and "files 1/100000" in done.stderr


# -- the quota: three ways each -------------------------------------------------------------

FILL = (
    "import os, sys\n"
    "n, size = int(sys.argv[1]), int(sys.argv[2])\n"
    "for i in range(n):\n"
    "    with open(f'f{i}', 'wb') as f: f.write(b'x' * size)\n"
)


def fill(n: int, size: int, audit: Path | None = None, **spec: Any) -> Any:
    """Write n files of size bytes in a temporary workspace under ``spec``."""
    spec.setdefault("max_file_size", None)
    policy = Policy.from_dict({"limits": {"wall_time": "20s"}, "grace": "300ms", "workspace": spec})
    return Supervisor(policy, audit=audit).run([*python(FILL), str(n), str(size)])


def test_storage_exceeded_stops_the_run(audit_log: Path) -> None:
    """Writing past the quota: 124, a storage violation, and its audit line."""
    result = fill(40, 64 * KiB, quota="1MiB", max_files=None)
    assert result.exit_code == 124 and result.violation.limit == "storage"
    assert result.violation.observed > MiB and result.violation.limit_value == MiB
    assert "storage limit exceeded" in result.violation.message
    line = next(e for e in read_events(audit_log) if e["event"] == "violation")
    assert (line["limit"], line["limit_value"], line["unit"]) == ("storage", MiB, "bytes")


def test_storage_raised_passes() -> None:
    """The same writes under a larger quota pass, and usage shows what they took."""
    result = fill(40, 64 * KiB, quota="4MiB", max_files=None)
    assert result.exit_code == 0
    assert 40 * 64 * KiB <= result.usage.storage_bytes < 3 * MiB


def test_storage_off_passes() -> None:
    """quota: null does not limit storage."""
    assert fill(40, 64 * KiB, quota=None, max_files=None).exit_code == 0


def test_storage_warn_does_not_stop() -> None:
    """on_violation: warn logs the storage breach and lets the command finish."""
    policy = Policy.from_dict(
        {"on_violation": "warn", "workspace": {"quota": "1MiB", "max_file_size": None}}
    )
    result = Supervisor(policy).run([*python(FILL), "40", str(64 * KiB)])
    assert result.exit_code == 0 and result.status == "violation"
    assert result.violation is not None
    assert result.violation.limit == "storage"


def test_files_exceeded_raised_and_off(audit_log: Path) -> None:
    """max_files: 21 entries over 20 is 124 (files); 20 pass; null passes."""
    result = fill(21, 10, quota=None, max_files=20)
    assert result.exit_code == 124 and result.violation.limit == "files"
    assert result.violation.observed == 21
    assert fill(20, 10, quota=None, max_files=20).exit_code == 0
    assert fill(300, 10, quota=None, max_files=None).exit_code == 0


def test_files_count_directories_too() -> None:
    """Directories are entries: 3 directories and 3 files are 6."""
    code = "import os\nfor d in 'abc': os.mkdir(d); open(d + '/f', 'w').write('x')"
    policy = Policy.from_dict({"workspace": {"max_files": 5}})
    result = Supervisor(policy).run(python(code))
    assert result.violation is not None and result.violation.observed is not None
    assert result.exit_code == 124 and result.violation.observed == 6


@pytest.mark.parametrize(("size", "code"), [(10, 0), (11, 124)])
def test_max_file_size_boundary(size: int, code: int) -> None:
    """max_file_size 10 bytes: 10 fit, 11 do not (a Python writer, which ignores SIGXFSZ)."""
    policy = Policy.from_dict({"workspace": {"max_file_size": 10}})
    result = Supervisor(policy).run(python(f"open('f', 'wb').write(b'x' * {size})"))
    assert result.exit_code == code
    if code:
        assert result.violation is not None
        assert result.violation.limit == "max_file_size"
        assert result.violation.message.startswith("max_file_size limit exceeded: 11 B > 10 B")


def test_max_file_size_stops_a_shell_writer_in_the_kernel() -> None:
    """A shell tool writing a big file is stopped by RLIMIT_FSIZE at max_file_size + 1
    (SIGXFSZ), and the violation names max_file_size."""
    policy = Policy.from_dict({"workspace": {"max_file_size": "1MiB"}})
    result = Supervisor(policy).run(["sh", "-c", "head -c 5000000 /dev/zero > big"])
    assert result.violation is not None
    assert result.exit_code == 124 and result.violation.limit == "max_file_size"


def test_max_file_size_raised_and_off() -> None:
    """A 2 MiB file passes under 4 MiB and under null."""
    code = "open('f', 'wb').write(b'x' * (2 << 20))"
    for limit in ("4MiB", None):
        policy = Policy.from_dict({"workspace": {"max_file_size": limit}})
        assert Supervisor(policy).run(python(code)).exit_code == 0


def test_one_writer_stops_at_the_quota_within_one_block() -> None:
    """One process writing one file as fast as it can: the kernel cap stops it within a
    block of the quota (the bench measures the same)."""
    code = (
        "f = open('big', 'wb')\n"
        "try:\n    while True: f.write(b'x' * 65536)\n"
        "except OSError: pass\n"
        "import time; time.sleep(5)\n"
    )
    policy = Policy.from_dict({"workspace": {"quota": "8MiB", "max_file_size": None}})
    result = Supervisor(policy).run(python(code))
    assert result.violation is not None and result.violation.observed is not None
    assert result.exit_code == 124 and result.violation.limit == "storage"
    assert result.violation.observed - 8 * MiB <= 8 * KiB


FOUR_WRITERS = (
    "import os, signal\n"
    "for w in range(4):\n"
    "    if os.fork() == 0:\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        i = 0\n"
    "        while True:\n"
    "            try:\n"
    "                with open(f'w{w}-{i}', 'wb') as f: f.write(b'x' * 4096)\n"
    "            except OSError:\n"
    "                pass\n"
    "            i += 1\n"
    "os.wait()\n"
)


def disk_used(path: Path) -> int:
    """Allocated bytes under ``path``, as the quota counts them."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))


# The target is 5% past the quota, and scripts/bench measures it (median and worst). Four
# writers on this 2-core machine make ~500 MB/s of 4 KiB files, so every 2 ms the quota
# guard waits for a CPU (or the GIL) is another MiB: most runs stop within 1%, about one in
# ten goes 10-40% past (28.2 MiB was the worst of ~60 measured). The bound here catches a
# guard that does not work (73-109 MiB on disk with the audit stalled, measured before it)
# without failing on the scheduler's bad days.
NEAR = 20 * MiB * 2


@pytest.mark.slow
def test_four_writers_in_parallel_are_stopped_near_the_quota(tmp_path: Path) -> None:
    """Four processes writing small files at once (ignoring SIGTERM, so writing on through
    grace): seen near the quota (NEAR), and the disk used stays there."""
    ws = tmp_path / "ws"
    policy = Policy.from_dict(
        {
            "grace": "1s",
            "workspace": {
                "path": str(ws), "quota": "20MiB", "max_files": None, "max_file_size": None
            },
        }
    )  # fmt: skip
    result = Supervisor(policy).run(python(FOUR_WRITERS))
    assert result.violation is not None and result.violation.observed is not None
    assert result.exit_code == 124 and result.violation.limit == "storage"
    assert result.violation.observed <= NEAR
    assert disk_used(ws) <= NEAR


@pytest.mark.slow
def test_quota_holds_while_the_run_loop_is_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every audit line taking 300 ms (an fsync on a busy disk, injected) holds up the run
    loop, not the quota: growth stops near it (NEAR), before the violation is logged."""
    from supervisor import audit

    slow = audit.AuditLog.append

    def stalled(self: Any, event: str, **kw: Any) -> Any:
        time.sleep(0.3)
        return slow(self, event, **kw)

    monkeypatch.setattr(audit.AuditLog, "append", stalled)
    ws = tmp_path / "ws"
    policy = Policy.from_dict(
        {"workspace": {"path": str(ws), "quota": "20MiB", "max_files": None, "max_file_size": None}}
    )
    result = Supervisor(policy).run(python(FOUR_WRITERS))
    assert result.violation is not None and result.violation.observed is not None
    assert result.exit_code == 124 and result.violation.limit == "storage"
    assert result.violation.observed <= NEAR
    assert disk_used(ws) <= NEAR


def test_sparse_file_counts_what_it_occupies() -> None:
    """A 60 MiB sparse file with one byte written uses one block: with 10 MiB more of real
    data the workspace is under a 16 MiB quota (its apparent size would be 70 MiB)."""
    code = (
        "f = open('sparse', 'wb'); f.seek(60 << 20); f.write(b'x'); f.close()\n"
        "open('real', 'wb').write(b'x' * (10 << 20))\n"
    )
    policy = Policy.from_dict({"workspace": {"quota": "64MiB", "max_file_size": None}})
    assert Supervisor(policy).run(python(code)).exit_code == 0
    policy = Policy.from_dict({"workspace": {"quota": "16MiB", "max_file_size": None}})
    result = Supervisor(policy).run(python(code.replace("60 << 20", "15 << 20")))
    assert result.exit_code == 0 and 10 * MiB <= result.usage.storage_bytes < 11 * MiB


def test_hard_link_counts_once() -> None:
    """A 600 KiB file and 5 hard links to it are 600 KiB, under a 1 MiB quota."""
    code = (
        "import os\nopen('f', 'wb').write(b'x' * (600 << 10))\n"
        "for i in range(5): os.link('f', f'l{i}')\n"
    )
    policy = Policy.from_dict({"workspace": {"quota": "1MiB"}})
    result = Supervisor(policy).run(python(code))
    assert result.exit_code == 0 and result.usage.files == 6


def test_deleted_file_held_open_still_counts() -> None:
    """A file deleted while the tree holds it open still uses the disk: over the quota."""
    code = (
        "import os, time\n"
        "f = open('f', 'wb'); f.write(b'x' * (3 << 20)); f.flush(); os.unlink('f')\n"
        "g = open('g', 'wb'); g.write(b'x' * (3 << 20)); g.flush(); os.unlink('g')\n"
        "time.sleep(600)\n"  # held open until the quota stops it (wall_time: a hang fails)
    )
    policy = Policy.from_dict(
        {"workspace": {"quota": "4MiB", "max_file_size": None}, "limits": {"wall_time": "60s"}}
    )
    result = Supervisor(policy).run(python(code))
    assert result.violation is not None
    assert result.exit_code == 124 and result.violation.limit == "storage"


def test_ten_thousand_small_files_are_counted_exactly(tmp_path: Path) -> None:
    """10k files written in a burst: the tracked count and bytes equal a fresh scan."""
    ws = tmp_path / "ws"
    code = (
        "import os\nos.mkdir('d')\n"
        "for i in range(10000): open(f'd/{i}', 'w').write('x' * (i % 5000))\n"
    )
    policy = Policy.from_dict({"workspace": {"path": str(ws), "max_files": None}})
    result = Supervisor(policy).run(python(code))
    assert result.exit_code == 0
    fresh = QuotaTracker(str(ws))
    try:
        used, files = fresh.totals()
    finally:
        fresh.close()
    assert files == 10001 and result.usage.files == 10001
    assert result.usage.storage_bytes == used


def test_event_overflow_falls_back_to_a_rescan(tmp_path: Path) -> None:
    """Past the inotify queue (16384 events) the tracker rescans and stays exact."""
    tracker = QuotaTracker(str(tmp_path))
    try:
        for i in range(20000):
            (tmp_path / f"f{i}").write_bytes(b"x")
        tracker.poll()
        tracker.poll()
        assert tracker.rescans >= 2
        assert tracker.totals() == (20000 * 4096, 20000)
    finally:
        tracker.close()


def test_moved_directory_is_tracked_under_its_new_name(tmp_path: Path) -> None:
    """A directory renamed inside the workspace keeps being counted, and watched."""
    tracker = QuotaTracker(str(tmp_path))
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "f").write_bytes(b"x" * 5000)
        tracker.poll()
        (tmp_path / "a").rename(tmp_path / "b")
        tracker.poll()
        (tmp_path / "b" / "g").write_bytes(b"x")
        tracker.poll()
        assert sorted(os.path.relpath(p, tmp_path) for p in tracker.entries) == [
            "b",
            "b/f",
            "b/g",
        ]
        assert tracker.totals()[0] == 4096 + 8192 + 4096
    finally:
        tracker.close()


# -- check_write ------------------------------------------------------------------------------


def test_check_write_answers_with_the_reason(tmp_path: Path) -> None:
    """check_write says yes, or no naming the rule: outside, file size, quota, count."""
    ws = Workspace(
        {
            "path": str(tmp_path / "ws"),
            "quota": 100 * KiB,
            "max_files": 2,
            "max_file_size": 50 * KiB,
        }
    )
    ws.prepare()
    ws.tracker = QuotaTracker(ws.path)
    try:
        assert ws.check_write("a.txt", 10) == (True, "ok")
        allowed, reason = ws.check_write("../escape", 10)
        assert not allowed and reason.startswith("outside the workspace")
        allowed, reason = ws.check_write("/etc/passwd", 10)
        assert not allowed and reason.startswith("outside the workspace")
        allowed, reason = ws.check_write("big", 60 * KiB)
        assert not allowed and reason.startswith("over the file size")
        Path(ws.path, "a").write_bytes(b"x" * 48 * KiB)
        Path(ws.path, "b").write_bytes(b"x" * 48 * KiB)
        ws.tracker.poll()
        allowed, reason = ws.check_write("c", 10 * KiB)
        assert not allowed and reason.startswith("over the quota")
        allowed, reason = ws.check_write("c", 1)  # the quota has one block left: fits
        assert not allowed and reason.startswith("over the file count")
        assert ws.check_write("b", 40 * KiB) == (True, "ok")  # rewriting an existing file
        assert not ws.check_write("a", -1)[0]
    finally:
        ws.cleanup()


def test_workspace_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    """workspace.path naming a file: 125, saying so."""
    target = tmp_path / "file"
    target.write_text("x")
    result = run("pass", ws=target)
    assert result.exit_code == 125
    assert "cannot make the workspace" in result.error or "not a directory" in result.error
    with pytest.raises(WorkspaceError):
        Workspace({"path": str(target)}).prepare()


# -- network ----------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Any:
    """A TCP listener on loopback that accepts connections in a thread until the test ends."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[bool] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(True)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    done.set()
    thread.join(timeout=GLOBAL_TIMEOUT)
    server.close()


CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5).close()\n"
    "except OSError as e:\n"
    "    sys.exit(3)\n"
)


def test_network_deny_refuses_a_loopback_connect(listener: Any, audit_log: Path) -> None:
    """network: deny: a connect to a listener on the host's loopback fails, and run_start
    says how it was enforced."""
    port, accepted = listener
    policy = Policy.from_dict({"network": "deny"})
    result = Supervisor(policy).run([*python(CONNECT), str(port)])
    assert result.exit_code == 3 and not accepted
    start = next(e for e in read_events(audit_log) if e["event"] == "run_start")
    assert start["detail"]["enforced"]["network"] in ("namespace", "landlock-tcp")


def test_network_deny_has_a_loopback_of_its_own() -> None:
    """Inside network: deny the tree can still serve itself on its own loopback."""
    code = (
        "import socket\n"
        "s = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(s.getsockname(), timeout=5); c.close()\n"
    )
    policy = Policy.from_dict({"network": "deny"})
    result = Supervisor(policy).run(python(code))
    assert result.exit_code == 0


def test_network_allow_connects(listener: Any) -> None:
    """network: allow (the default): the same connect succeeds."""
    port, accepted = listener
    result = Supervisor(Policy.from_dict({})).run([*python(CONNECT), str(port)])
    assert result.exit_code == 0
    assert wait_until(lambda: bool(accepted), timeout=5)


def test_relative_command_path_is_taken_from_where_supervise_runs(tmp_path: Path) -> None:
    """`supervise -w WS -- ./tool` runs ./tool of the caller's directory, inside WS."""
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\npwd\n")
    tool.chmod(0o755)
    done = supervise("-q", "-w", str(tmp_path / "ws"), "--", "./tool", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "ws")


def test_doctor_reports_jail_network_and_quota() -> None:
    """doctor --json has a row for the jail, network: deny and the quota watch."""
    done = supervise("doctor", "--json")
    rows = json.loads(done.stdout)
    assert {"landlock", "network_deny", "quota_watch"} <= set(rows)
    assert rows["quota_watch"]["available"] is True


def test_a_directory_without_a_watch_is_rescanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_user_watches a directory gets no watch: its writes send no event, so the
    tracker rescans now and then and still counts them."""
    tracker = QuotaTracker(str(tmp_path))
    real = QuotaTracker._watch

    def no_more_watches(self: QuotaTracker, path: str) -> None:
        if path == self.root:
            real(self, path)
        else:
            self.degraded = True  # as when inotify_add_watch says ENOSPC

    monkeypatch.setattr(QuotaTracker, "_watch", no_more_watches)
    try:
        (tmp_path / "sub").mkdir()
        tracker.poll()
        assert tracker.degraded
        (tmp_path / "sub" / "f").write_bytes(b"x" * 10000)
        tracker.poll()
        assert tracker.totals() == (4096, 1)  # the write in sub/ sent nothing
        assert tracker.maybe_rescan(now=1e9)
        assert tracker.totals() == (4096 + 12288, 2)
        assert not tracker.maybe_rescan(now=1e9)  # not again before its interval
    finally:
        tracker.close()
