"""Limits the kernel enforces (SPEC "The kernel first"): memory and CPU by the tree's
cgroups where they can be made, and the watcher's route where they cannot.

Each limit has its three tests on both routes: the kernel's (skipped where this machine
gives no cgroup: unprivileged without delegation) and the watcher's, forced with
``SUPERVISE_CGROUPS=off``.  Attacks 10-12 of issue 15 are tests that fail while the
attack works.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import python
from test_run import events, policy

from supervisor import Supervisor
from supervisor._linux import cgroup_parent

MiB = 1 << 20

# A memory hog growing about 50 MB/s, up to a ceiling (argv[1]), then exiting.
HOG = (
    "import sys, time\nchunks = []\nceiling = int(sys.argv[1])\n"
    "while sum(map(len, chunks)) < ceiling:\n"
    "    chunks.append(b'x' * (5 << 20)); time.sleep(0.1)\n"
)

# Attack 11: a fork pool of 8 sharing a 200 MiB buffer (copy-on-write, only read).
FORK_POOL = """
import os, time
buf = bytearray(200 << 20)
for i in range(0, len(buf), 4096): buf[i] = 1
kids = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        total = sum(buf[i] for i in range(0, len(buf), 4096))
        time.sleep(1.0)
        os._exit(0 if total == len(buf) // 4096 else 1)
    kids.append(pid)
print(all(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) == 0 for k in kids), flush=True)
"""

# Attack 10: one SysV segment of argv[1] bytes, filled, detached, then held.
SYSV_HELD = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
size = int(sys.argv[1])
sid = libc.shmget(0, ctypes.c_size_t(size), 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
addr = libc.shmat(sid, None, 0)
ctypes.memset(ctypes.c_void_p(addr), 1, ctypes.c_size_t(size))
libc.shmdt(ctypes.c_void_p(addr))
print('held', flush=True)
time.sleep(float(sys.argv[2]))
"""

# Attack 10 again: memfds, written, never mapped.
MEMFDS = """
import os, sys
fds = [os.memfd_create('x') for _ in range(int(sys.argv[1]))]
for fd in fds:
    for _ in range(64): os.write(fd, b'x' * (1 << 20))
print('held', flush=True)
"""

# Attack 12: SIGCHLD ignored, so the kernel reaps the children and their CPU reaches no
# cutime: argv[1] children of argv[2] s CPU each, one after another.
AUTO_REAPED = """
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        end = time.process_time() + float(sys.argv[2])
        while time.process_time() < end: pass
        os._exit(0)
    while os.path.exists(f'/proc/{pid}'):  # no wait(): the kernel reaps it
        time.sleep(0.02)
"""


def kernel_route(controller: str) -> None:
    """Skip unless this machine gives the tree a cgroup of ``controller``."""
    if os.environ.get("SUPERVISE_CGROUPS") == "off" or cgroup_parent(controller) is None:
        pytest.skip(f"no {controller} cgroup can be made here (unprivileged, no delegation)")


@pytest.fixture(params=["kernel", "watcher"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both routes: the kernel's (skipped without a cgroup), the watcher's (forced)."""
    if request.param == "watcher":
        monkeypatch.setenv("SUPERVISE_CGROUPS", "off")
    yield str(request.param)


def run_logged(argv: list[str], **limits: Any) -> tuple[Any, dict[str, Any]]:
    """Run under ``limits``; the RunResult and run_start's ``enforced``."""
    log = Path(os.environ["XDG_STATE_HOME"]) / "k.jsonl"
    result = Supervisor(policy(**limits), audit=log).run(argv)
    (start,) = events(log, "run_start")
    return result, dict(start["detail"]["enforced"])


# -- memory ------------------------------------------------------------------------------


def test_memory_exceeded_is_stopped_on_either_route(route: str) -> None:
    """A hog growing past memory: 124, a memory violation, its audit line; run_start says
    which route enforced it (an OOM kill in the cgroup, or the watcher's PSS)."""
    if route == "kernel":
        kernel_route("memory")
    log = Path(os.environ["XDG_STATE_HOME"]) / "k.jsonl"
    result = Supervisor(policy(memory="150MiB", wall_time="30s"), audit=log).run(
        [*python(HOG), str(2 << 30)]
    )
    assert (result.status, result.exit_code) == ("violation", 124)
    v = result.violation
    assert v is not None and (v.limit, v.limit_value) == ("memory", 150 * MiB)
    (line,) = events(log, "violation")
    assert (line["limit"], line["action"]) == ("memory", "kill")
    (start,) = events(log, "run_start")
    how = start["detail"]["enforced"]["memory"]
    if route == "kernel":
        assert how.startswith("kernel: memory cgroup")
        assert v.observed is None and "OOM kill" in v.message
    else:
        assert how.startswith("watcher:")
        assert v.observed is not None and 150 * MiB < v.observed < 170 * MiB
        assert "(tree PSS)" in v.message


@pytest.mark.slow
def test_memory_raised_passes_on_either_route(route: str) -> None:
    """The hog capped at 200 MB passes under 1 GiB; its peak is recorded."""
    if route == "kernel":
        kernel_route("memory")
    result, how = run_logged([*python(HOG), str(200 << 20)], memory="1GiB")
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.peak_memory > 150 * MiB
    assert how["memory"].startswith("kernel:" if route == "kernel" else "watcher:")


@pytest.mark.slow
def test_memory_off_passes_on_either_route(route: str) -> None:
    """memory null: the hog passes, no memory route is claimed, the peak is measured."""
    result, how = run_logged([*python(HOG), str(200 << 20)], memory=None)
    assert (result.status, result.exit_code) == ("ok", 0)
    assert "memory" not in how
    assert result.usage.peak_memory > 150 * MiB


def test_fork_pool_sharing_a_buffer_is_not_killed_for_shared_pages(route: str) -> None:
    """Attack 11: 8 forks sharing a 200 MiB buffer (RSS summed: 1.8 GiB) pass under
    memory 350 MiB: the cgroup charges a page once, PSS divides it among its sharers."""
    if route == "kernel":
        kernel_route("memory")
    result, _ = run_logged(python(FORK_POOL), memory="350MiB", wall_time="60s")
    assert (result.status, result.exit_code, result.violation) == ("ok", 0, None)
    assert result.usage.peak_memory < 350 * MiB


def test_detached_sysv_segment_is_charged_to_the_tree() -> None:
    """Attack 10: a SysV segment of 1 GiB, filled and detached, breaks memory 128 MiB
    (the memory cgroup charges it) instead of passing unseen."""
    kernel_route("memory")
    result, how = run_logged(
        [*python(SYSV_HELD), str(1 << 30), "5"], memory="128MiB", wall_time="60s"
    )
    assert (result.exit_code, result.violation and result.violation.limit) == (124, "memory")
    assert how["memory"].startswith("kernel:")


def test_memory_in_memfds_is_charged_to_the_tree() -> None:
    """Attack 10: 6 memfds of 64 MiB (written, never mapped) break memory 128 MiB."""
    kernel_route("memory")
    result, _ = run_logged([*python(MEMFDS), "6"], memory="128MiB", wall_time="60s")
    assert (result.exit_code, result.violation and result.violation.limit) == (124, "memory")


def test_memory_under_warn_is_left_to_the_watcher() -> None:
    """on_violation: warn never kills, so no memory limit goes to the kernel: the watcher
    logs the breach and the hog runs to its end."""
    result, how = run_logged([*python(HOG), str(200 << 20)], memory="100MiB", on_violation="warn")
    assert (result.status, result.exit_code) == ("violation", 0)
    assert how["memory"].startswith("watcher:")


# -- cpu_time ----------------------------------------------------------------------------


def test_cpu_of_children_the_kernel_reaps_is_counted(route: str) -> None:
    """Attack 12: with SIGCHLD ignored, 4 children of 0.5 s CPU each (no cutime ever
    counts them, none past its RLIMIT_CPU) break cpu_time 1.2 s: 124, cpu_time."""
    if route == "kernel":
        kernel_route("cpu")
    log = Path(os.environ["XDG_STATE_HOME"]) / "k.jsonl"
    result = Supervisor(policy(cpu_time="1.2s", wall_time="60s"), audit=log).run(
        [*python(AUTO_REAPED), "4", "0.5"]
    )
    assert (result.exit_code, result.violation and result.violation.limit) == (124, "cpu_time")
    (line,) = events(log, "violation")
    assert line["limit"] == "cpu_time"
    (start,) = events(log, "run_start")
    assert start["detail"]["enforced"]["cpu"].startswith(route)


@pytest.mark.slow
def test_cpu_of_children_the_kernel_reaps_raised_passes(route: str) -> None:
    """The same children pass under cpu_time 30 s, and their CPU is in the usage."""
    if route == "kernel":
        kernel_route("cpu")
    result, _ = run_logged([*python(AUTO_REAPED), "3", "0.4"], cpu_time="30s")
    assert (result.status, result.exit_code) == ("ok", 0)
    assert result.usage.cpu_time >= 1.0


@pytest.mark.slow
def test_cpu_of_children_the_kernel_reaps_off_passes(route: str) -> None:
    """cpu_time null: the children pass; no CPU route is claimed."""
    result, how = run_logged([*python(AUTO_REAPED), "3", "0.4"], cpu_time=None)
    assert (result.status, result.exit_code) == ("ok", 0)
    assert "cpu" not in how
