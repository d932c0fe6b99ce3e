"""The tree watcher: tree memory, tree CPU, live processes, open files, alerts."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, margin, python, supervise, tagged_pids, wait_until
from test_run import events, run

from supervisor import Policy, Supervisor
from supervisor.watch import Sample, TreeSampler, next_interval

# A memory hog growing about 50 MB/s, up to an optional ceiling, then exiting.
HOG = (
    "import sys, time\nchunks = []\nceiling = int(sys.argv[1])\n"
    "while sum(map(len, chunks)) < ceiling:\n"
    "    chunks.append(b'x' * (5 << 20)); time.sleep(0.1)\n"
)


# -- memory (tree RSS) ------------------------------------------------------------------


@pytest.fixture
def watcher_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher's route, not a memory cgroup's (test_kernel_limits tests that one)."""
    monkeypatch.setenv("SUPERVISE_CGROUPS", "off")


def test_memory_exceeded_stops_the_tree(audit_log: Path, watcher_route: None) -> None:
    """A hog growing 50 MB/s past memory is stopped: 124, a memory violation, an audit line."""
    result = run([*python(HOG), str(2 << 30)], memory="150MiB", wall_time="30s")
    assert (result.status, result.exit_code) == ("violation", 124)
    v = result.violation
    assert v.limit == "memory" and v.limit_value == 150 << 20
    assert 150 << 20 < v.observed < 170 << 20  # caught within ~10% of the limit
    assert "(tree PSS)" in v.message  # RSS past the limit, confirmed by PSS
    (line,) = events(audit_log, "violation")
    assert (line["limit"], line["unit"], line["action"]) == ("memory", "bytes", "kill")


@pytest.mark.slow
def test_memory_raised_passes() -> None:
    """The same hog, capped at 200 MB, passes under a 1 GiB limit; its peak is recorded."""
    result = run([*python(HOG), str(200 << 20)], memory="1GiB")
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.peak_memory > 150 << 20


@pytest.mark.slow
def test_memory_off_passes() -> None:
    """memory null: the same hog passes, and the peak is still measured."""
    result = run([*python(HOG), str(200 << 20)], memory=None)
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.peak_memory > 150 << 20


def test_memory_of_a_setsid_escapee_is_counted(no_leftovers: str, watcher_route: None) -> None:
    """A double-forked setsid grandchild's memory counts toward the tree's."""
    code = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        exec({HOG!r})\n"
        "    os._exit(0)\n"
        "time.sleep(30)\n"
    )
    result = run([*python(code), str(2 << 30)], memory="150MiB", wall_time="30s")
    assert result.exit_code == 124 and result.violation.limit == "memory"
    assert tagged_pids(no_leftovers) == []


# -- cpu_time (tree CPU, watched) -------------------------------------------------------

SPINNERS = (
    "import subprocess, sys\n"
    "spin = 'import time\\nend = time.process_time() + 0.7\\n'\n"
    "spin += 'while time.process_time() < end: pass'\n"
    "procs = [subprocess.Popen([sys.executable, '-c', spin]) for _ in range(3)]\n"
    "sys.exit(sum(p.wait() for p in procs))\n"
)


@pytest.mark.slow
def test_tree_cpu_time_exceeded_by_children_each_under_the_rlimit(audit_log: Path) -> None:
    """Three children of 0.7 s CPU each (none past its rlimit) break a 1.2 s tree cpu_time."""
    result = run(python(SPINNERS), cpu_time="1.2s", wall_time="30s")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "cpu_time"
    assert "tree CPU" in result.violation.message
    assert events(audit_log, "violation")[0]["limit"] == "cpu_time"


@pytest.mark.slow
def test_tree_cpu_time_raised_passes() -> None:
    """The same spinners pass under cpu_time 10s; the tree's CPU (all reaped) is counted."""
    result = run(python(SPINNERS), cpu_time="10s")
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.cpu_time >= 2.0


@pytest.mark.slow
def test_tree_cpu_time_off_passes() -> None:
    """cpu_time null: the spinners pass and their CPU is still reported."""
    result = run(python(SPINNERS), cpu_time=None)
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.cpu_time >= 2.0


def test_cpu_of_a_setsid_escapee_is_counted(no_leftovers: str) -> None:
    """A double-forked setsid grandchild's CPU counts toward the tree's cpu_time."""
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        end = time.process_time() + 0.8\n"
        "        while time.process_time() < end: pass\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "time.sleep(30)\n"
    )
    # RLIMIT_CPU is 1 s per process here (0.5 s rounded up): the escapee stays under it,
    # so only the tree count, which includes it, sees the breach.
    result = run(python(code), cpu_time="0.5s", wall_time="20s")
    assert result.exit_code == 124 and result.violation.limit == "cpu_time"
    assert "tree CPU" in result.violation.message
    assert tagged_pids(no_leftovers) == []


# -- processes --------------------------------------------------------------------------

SLEEPERS = (
    "import subprocess, sys\n"
    "procs = [subprocess.Popen(['sleep', '1.5']) for _ in range(int(sys.argv[1]))]\n"
    "for p in procs: p.wait()\n"
)


def test_processes_boundary(audit_log: Path) -> None:
    """processes 5: the parent and 4 sleepers pass; the parent and 5 sleepers are stopped."""
    ok = run([*python(SLEEPERS), "4"], processes=5)
    assert (ok.status, ok.exit_code) == ("ok", 0)
    assert ok.usage.peak_processes == 5
    bad = run([*python(SLEEPERS), "5"], processes=5)
    assert (bad.status, bad.exit_code) == ("violation", 124)
    assert (bad.violation.limit, bad.violation.observed, bad.violation.limit_value) == (
        "processes",
        6,
        5,
    )
    assert events(audit_log, "violation")[0]["limit"] == "processes"


@pytest.mark.slow
def test_processes_raised_and_off_pass() -> None:
    """The parent and 5 sleepers pass under processes 20, and with processes null."""
    assert run([*python(SLEEPERS), "5"], processes=20).exit_code == 0
    assert run([*python(SLEEPERS), "5"], processes=None).exit_code == 0


def test_fork_bomb_is_stopped_and_leaves_nothing(no_leftovers: str) -> None:
    """A fork bomb under processes 32 is stopped (124) and no process of it survives."""
    bomb = "import os, time\nwhile True:\n    os.fork()\n    time.sleep(0.01)\n"
    t = time.monotonic()
    result = run(python(bomb), processes=32, wall_time="30s")
    assert (result.status, result.exit_code) == ("violation", 124)
    assert result.violation.limit == "processes"
    assert time.monotonic() - t < margin(10)
    assert tagged_pids(no_leftovers) == []


# -- open files, alerts, the sampler itself ---------------------------------------------


def test_peak_open_files_is_the_most_one_process_held() -> None:
    """usage.peak_open_files is the most fds any one process of the tree held."""
    code = (
        "import os, time\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(50)]\n"
        "time.sleep(1.5)"
    )
    result = run(python(code))
    assert 53 <= result.usage.peak_open_files <= 60


@pytest.mark.slow
def test_warning_fires_once_at_the_threshold_without_a_kill(audit_log: Path) -> None:
    """At 80% of memory a warning fires once (hook, result, audit); the run is not stopped."""
    seen: list[dict[str, Any]] = []
    policy = Policy.from_dict({"limits": {"memory": "250MiB"}})
    code = HOG + "time.sleep(0.6)\n"
    result = Supervisor(policy, on_warning=seen.append).run([*python(code), str(210 << 20)])
    assert (result.status, result.exit_code) == ("ok", 0)
    assert [(w["limit"], w["fraction"]) for w in seen] == [("memory", 0.8)]
    assert result.warnings == seen
    (w,) = events(audit_log, "warning")
    assert (w["limit"], w["action"], w["limit_value"]) == ("memory", "alert", 250 << 20)
    assert w["observed"] >= 0.8 * (250 << 20)


def test_sampler_counts_a_tree_and_its_reaped_cpu() -> None:
    """TreeSampler sees every descendant of a root, and the CPU of reaped ones (cutime)."""
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    script = f"{sys.executable} -c '{spin}'; sleep 5 & sleep 5 & wait"
    with subprocess.Popen(["sh", "-c", script]) as root:
        try:
            sampler = TreeSampler(root.pid)
            assert wait_until(lambda: len(sampler.pids()) == 2, timeout=10)
            s = sampler.sample(time.monotonic())
            assert s.processes == 2 and s.rss > 0
            assert s.cpu >= 0.3  # the spinner, reaped by the shell, still counts
        finally:
            for pid in [*sampler.pids(), root.pid]:
                os.kill(pid, 9)


def test_next_interval_speeds_up_near_a_limit() -> None:
    """Far from every limit the sampler is slow; near one, or growing fast toward it, fast."""
    a, b = Sample(0.0), Sample(0.1)
    assert next_interval(None, b, [("memory", 10.0, 100.0)]) == 0.1
    assert next_interval(None, b, [("memory", 85.0, 100.0)]) <= 0.02
    a.rss, b.rss = 10, 50  # 400 units/s toward a limit of 100: 0.125 s left
    assert next_interval(a, b, [("memory", 50.0, 100.0)]) <= 0.125 / 4


def test_kernel_process_cap_in_a_user_namespace_counts_only_the_tree() -> None:
    """As an unprivileged user, RLIMIT_NPROC in the reaper's user namespace caps the tree.

    Run as nobody (root is exempt from RLIMIT_NPROC): the fork loop is refused (EAGAIN)
    at the cap, although nobody's other processes on the host are not counted.
    """
    import shutil

    from supervisor._linux import userns_available
    from supervisor.spawn import reaper_path

    if os.geteuid() != 0 or not shutil.which("setpriv") or not userns_available():
        pytest.skip("needs root (to become nobody), setpriv and user namespaces")
    reaper = reaper_path()
    work = Path(tempfile.mkdtemp())
    copy = work / "reaper"
    shutil.copy(reaper, copy)
    work.chmod(0o755)
    loop = (
        "import os, time\nn = 0\ntry:\n    while True:\n"
        "        if os.fork() == 0:\n            time.sleep(2); os._exit(0)\n"
        "        n += 1\nexcept OSError as e:\n    print(n, e.errno)\n"
    )
    status_r, status_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(copy)]
    cmd += [f"status={status_w}", f"ctl={ctl_r}", f"ppid={os.getpid()}", "nproc=8", "--"]
    cmd += ["/usr/bin/python3", "-c", loop]
    try:
        done = subprocess.run(
            cmd, pass_fds=(status_w, ctl_r), capture_output=True, text=True, timeout=30
        )
    finally:
        for fd in (status_r, status_w, ctl_r, ctl_w):
            os.close(fd)
        shutil.rmtree(work)
    forks, err = done.stdout.split()
    assert (int(forks), int(err)) == (7, 11)  # 8 tasks: python and 7 children, then EAGAIN


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], GLOBAL_TIMEOUT)
        if not ready:
            return out
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the pty is closed
            return out
        if not chunk:
            return out
        out += chunk


def test_live_gauges_render_on_a_terminal() -> None:
    """--live draws a gauge per limit (used / limit, a bar) on a pseudo-terminal's stderr."""
    master, slave = os.openpty()
    code = "import time; x = bytearray(50 << 20); time.sleep(0.8)"
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "--live", "--", *python(code)],
        stderr=slave,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(slave)
    try:
        screen = _read_all(master).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.wait(timeout=GLOBAL_TIMEOUT) == 0
    for gauge in ("wall_time", "cpu_time", "memory", "processes", "open_files"):
        assert gauge in screen
    assert "/ 2.0 GiB" in screen and "━" in screen  # memory against the default 2 GiB


def test_live_is_off_when_stderr_is_not_a_terminal() -> None:
    """--live with stderr to a pipe prints only the summary, no gauges."""
    done = supervise("--live", "--", "true")
    assert done.returncode == 0
    assert "━" not in done.stderr and done.stderr.startswith("supervise: run ")
