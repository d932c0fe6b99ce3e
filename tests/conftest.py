"""Shared fixtures: real processes, an isolated state dir, and leak checks after each test.

Helpers and capability flags live in _helpers.py; this file holds only fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import TAG, RedisServer, tagged_pids, wait_until


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


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server per test module, flushed by the tests that use it."""
    server = RedisServer()
    yield server
    server.stop()
