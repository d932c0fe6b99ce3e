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
