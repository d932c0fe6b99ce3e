"""Shared fixtures: real processes, an isolated state dir, and leak checks after each test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

GLOBAL_TIMEOUT = 60  # seconds: no test waits longer than this for anything

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


def wait_until(predicate, timeout: float = GLOBAL_TIMEOUT, every: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for tests only."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own XDG_STATE_HOME, so audit logs and ledgers never mix."""
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every process a test starts carries a tag; none may be alive after the test."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    yield tag
    survivors = []
    if not wait_until(lambda: not tagged_pids(tag), timeout=2):
        survivors = tagged_pids(tag)
        for pid in survivors:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    assert not survivors, f"processes outlived the test: {survivors}"


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """The test process holds the same fds after the test as before."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    # Allow a moment for fds closed by finalizers of subprocess objects.
    leaked = {fd for fd in after - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds leaked: {sorted(leaked)}"


@pytest.fixture
def audit_log(isolated_state: Path) -> Path:
    """Where runs of this test write their audit log by default."""
    return isolated_state / "supervise" / "audit.jsonl"


def supervise(
    *args: str, timeout: float = GLOBAL_TIMEOUT, **kw
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


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def fresh_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty ledger store: a SQLite file of this test, or a redis-server of
    its own on loopback."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/budget.db"
        return
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

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
        import socket

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
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=GLOBAL_TIMEOUT)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server per test module, flushed by the tests that use it."""
    server = RedisServer()
    yield server
    server.stop()
