"""Test helpers for the budget RPC: an honest in-memory ledger and a served RpcServer."""

from __future__ import annotations

import os
import queue
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from _helpers import GLOBAL_TIMEOUT

from supervisor.errors import BudgetExceeded, RateLimited
from supervisor.rpc import RpcServer


class Ledger:
    """A small in-memory backend: limits on calls and tokens, reservations hold the worst case."""

    def __init__(
        self,
        *,
        tokens: int | None = None,
        calls: int | None = None,
        events: list[tuple[Any, ...]] | None = None,
    ) -> None:
        self.limit_tokens = tokens
        self.limit_calls = calls
        self.used_tokens = 0
        self.used_calls = 0
        self.used_usd = Decimal(0)
        self.holds: dict[str, dict[str, Any]] = {}
        self.commits: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []
        self.events = events if events is not None else []
        self.rate_limited = False
        self._n = 0

    def state(self) -> tuple[Any, ...]:
        """Everything a call could change: compared before and after bad input."""
        return (self.used_tokens, self.used_calls, dict(self.holds), len(self.commits))

    def _check(self, tokens: int, calls: int) -> None:
        held_tokens = sum(h["tokens"] for h in self.holds.values())
        if self.limit_calls is not None and self.used_calls + len(self.holds) + calls > (
            self.limit_calls
        ):
            raise BudgetExceeded("run", "calls", self.used_calls, len(self.holds), self.limit_calls)
        if self.limit_tokens is not None and self.used_tokens + held_tokens + tokens > (
            self.limit_tokens
        ):
            raise BudgetExceeded("run", "tokens", self.used_tokens, held_tokens, self.limit_tokens)

    def reserve(self, *, model: str, **kw: Any) -> dict[str, Any]:
        if self.rate_limited:
            raise RateLimited("calls_per_minute", 1, 1, 1.5)
        tokens = kw["input_tokens"] + kw["max_output_tokens"]
        self._check(tokens, 1)
        self._n += 1
        rid = f"r{self._n}"
        self.holds[rid] = {"model": model, "tokens": tokens, **kw}
        self.events.append(
            ("reserve", model, kw["label"], kw["input_tokens"], kw["max_output_tokens"])
        )
        return {"reservation": rid, "usd_held": Decimal("0.000001") * tokens, "tokens_held": tokens}

    def _spend(self, entry: dict[str, Any]) -> dict[str, Any]:
        tokens = entry["input_tokens"] + entry["output_tokens"]
        self.used_tokens += tokens
        self.used_calls += 1
        usd = Decimal("0.000001") * tokens
        self.used_usd += usd
        if self.limit_tokens is not None and self.used_tokens > self.limit_tokens:
            raise BudgetExceeded("run", "tokens", self.used_tokens, 0, self.limit_tokens)
        return {"usd": usd, "tokens": tokens, "usage": {"tokens": self.used_tokens}}

    def commit(self, reservation: str, **counts: Any) -> dict[str, Any]:
        hold = self.holds.pop(reservation)  # KeyError: unknown or settled
        entry = {
            "reservation": reservation,
            "model": hold["model"],
            "label": hold["label"],
            **counts,
        }
        self.commits.append(entry)
        self.events.append(("commit", reservation, counts["input_tokens"], counts["output_tokens"]))
        return self._spend(entry)

    def release(self, reservation: str) -> dict[str, Any]:
        self.holds.pop(reservation)
        self.events.append(("release", reservation))
        return {}

    def record(self, **entry: Any) -> dict[str, Any]:
        self.records.append(entry)
        return self._spend(entry)

    def usage(self) -> dict[str, Any]:
        return {
            "run": {
                "tokens": {
                    "used": self.used_tokens,
                    "held": sum(h["tokens"] for h in self.holds.values()),
                    "limit": self.limit_tokens,
                },
                "usd": {"used": self.used_usd, "held": Decimal(0), "limit": Decimal("5.00")},
            }
        }

    def check_write(self, path: str, size: int) -> dict[str, Any]:
        allowed = size <= 10
        return {"allowed": allowed, "reason": None if allowed else "max_file_size"}

    def step_begin(self, name: str) -> dict[str, Any]:
        self.events.append(("step_begin", name))
        return {}

    def step_end(self, name: str) -> dict[str, Any]:
        self.events.append(("step_end", name))
        return {}


class Served:
    """An RpcServer driven by a poll loop in a thread, as the run loop will drive it."""

    def __init__(self, backend: Any, **kw: Any) -> None:
        self.errors: list[tuple[int, str, str]] = []
        self.server = RpcServer(backend, run_id="run-1", agent="bot", on_error=self._on_error, **kw)
        self.peak_buffered = 0
        self._jobs: queue.Queue[Callable[[], object]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _on_error(self, code: int, message: str, excerpt: str) -> None:
        self.errors.append((code, message, excerpt))

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.server.fileno(), select.POLLIN)
        while not self._stop.is_set():
            ready = poller.poll(10)
            while not self._jobs.empty():
                self._jobs.get()()
            if ready:
                self.server.on_readable()
                self.peak_buffered = max(self.peak_buffered, self.server.buffered())

    def do(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the loop thread (the server is single-threaded, as in a run)."""
        done = threading.Event()

        def job() -> None:
            fn()
            done.set()

        self._jobs.put(job)
        assert done.wait(GLOBAL_TIMEOUT)

    def raw(self) -> socket.socket:
        """A socket on the inherited end, as a child that speaks raw JSON lines."""
        sock = socket.socket(fileno=os.dup(self.server.child_fd))
        sock.settimeout(GLOBAL_TIMEOUT)
        return sock

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.server.child_env()}

    def run_child(self, code: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in a child that inherits the RPC fd; fail on a non-zero exit."""
        proc = subprocess.run(
            [sys.executable, "-c", code],
            pass_fds=[self.server.child_fd],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=GLOBAL_TIMEOUT,
            check=False,
            **kw,
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(GLOBAL_TIMEOUT)
        self.server.close()


@contextmanager
def serving(backend: Any, **kw: Any) -> Iterator[Served]:
    """A served RpcServer for the duration of the block."""
    served = Served(backend, **kw)
    try:
        yield served
    finally:
        served.close()


def read_line(sock: socket.socket, buf: bytearray) -> bytes:
    """One line from ``sock`` (``buf`` keeps what came after it)."""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line
