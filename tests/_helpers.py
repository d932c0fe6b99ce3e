"""Helpers and capability flags shared by the tests (fixtures live in conftest.py).

Margins: ``GLOBAL_TIMEOUT`` bounds every wait (a hang fails, it does not stall the suite);
``SLOWDOWN`` scales the upper bounds a test puts on how soon something must happen, so a
machine busy with other work (``stress-ng --cpu 2`` beside the suite) makes the suite slower,
not red. Lower bounds (something must *not* happen before a limit) are never scaled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from supervisor._linux import landlock_abi


def _slowdown() -> float:
    """How much slower than an idle machine this one runs now: SUPERVISE_TEST_SLOWDOWN when
    set, else the one-minute load per core (at least 1, at most 4)."""
    forced = os.environ.get("SUPERVISE_TEST_SLOWDOWN")
    if forced:
        return max(1.0, float(forced))
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return min(max(1.0, load), 4.0)


SLOWDOWN = _slowdown()

GLOBAL_TIMEOUT = 60  # seconds: no test waits longer than this for anything


def margin(seconds: float) -> float:
    """An upper bound of ``seconds`` on an idle machine, stretched by ``SLOWDOWN``."""
    return seconds * SLOWDOWN


# Capability flags (psutil style): what this kernel offers, computed once.
LANDLOCK_ABI: int | None = landlock_abi()
"""The kernel's Landlock ABI version, or None without Landlock."""
HAS_LANDLOCK = LANDLOCK_ABI is not None
HAS_LANDLOCK_SCOPE = (LANDLOCK_ABI or 0) >= 6  # ABI 6 scopes signals and abstract sockets

needs_landlock = pytest.mark.skipif(not HAS_LANDLOCK, reason="this kernel has no Landlock")
needs_landlock_scope = pytest.mark.skipif(
    not HAS_LANDLOCK_SCOPE, reason="signal scoping needs Landlock ABI 6"
)

TAG = "SUPERVISE_TEST_TAG"


def python(code: str) -> list[str]:
    """The argv of a Python child running ``code``."""
    return [sys.executable, "-c", code]


def tagged_pids(tag: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment carries ``tag``."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def wait_until(
    predicate: Callable[[], object], timeout: float = GLOBAL_TIMEOUT, every: float = 0.01
) -> bool:
    """Poll ``predicate`` until true or ``timeout`` (stretched by ``SLOWDOWN``, capped at
    ``GLOBAL_TIMEOUT``)."""
    end = time.monotonic() + min(margin(timeout), max(timeout, GLOBAL_TIMEOUT))
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def supervise(
    *args: str, timeout: float = GLOBAL_TIMEOUT, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run the real ``supervise`` command line (python -m supervisor) and capture it."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )


def run_together(argvs: list[list[str]], env: dict[str, str] | None = None) -> None:
    """Start processes that print "ready" and wait for a line on stdin; release them at
    once (so what they do really overlaps) and check that each exits 0."""
    procs = [
        subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            p.communicate(timeout=GLOBAL_TIMEOUT)
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A real redis-server on a free loopback port, without persistence; ``stop()`` kills it."""

    def __init__(self, port: int | None = None) -> None:
        import shutil

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (scripts/test installs it with apt-get)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        # Without the test's tag: a server shared by a module must not count as a leftover.
        env = {k: v for k, v in os.environ.items() if k != TAG}
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        if not wait_until(up, timeout=10):
            self.stop()
            pytest.fail("redis-server did not start")

    @classmethod
    def on_port(cls, port: int) -> RedisServer:
        """A server on this port (to restart one where clients expect it)."""
        return cls(port)

    def flush(self) -> None:
        """Empty every database of the server."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        """Kill the server and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=GLOBAL_TIMEOUT)


def spend(store: str, usd: str, session: str | None = None, *, rate: bool = False) -> None:
    """Record one call of ``usd`` for agent bot in ``store`` (``rate``: with a rate limit,
    so the store holds a rate window too)."""
    from decimal import Decimal

    from supervisor.budget._policy import BudgetPolicy
    from supervisor.budget.ledger import Ledger

    section: dict[str, Any] = {"unknown_model": "free"}
    if rate:
        section["rate"] = {"calls_per_minute": 60}
    budget = BudgetPolicy.model_validate(section)
    with Ledger.open(budget, run_id="r", agent="bot", session=session, store=store) as ledger:
        ledger.record(model="x", input_tokens=100, output_tokens=50, usd=Decimal(usd))
