"""The child's channel to the supervisor's ledger: ``connect``, ``Budget``, ``Reservation``.

Users import these from ``supervisor.client`` (its docstring shows the calls); they live here,
a leaf beside ``_jsonrpc`` and ``errors``, so that ``client`` (which offers the SDK
instrumentation) and ``instrument`` / ``_metered`` (which meter through a ``Budget``) each
import this module and never each other.

Stdlib only and fast to import (no asyncio, json, socket or typing at import time: the C
modules ``_socket`` and ``_json`` do the work). ``connect()`` sends the supervisor a private
socket over the inherited ``SUPERVISE_RPC_FD``, so every process of the tree has its own
channel and never reads another's replies; after a fork the child attaches anew. One lock
around each request and its reply makes a ``Budget`` thread-safe; notifications from the
supervisor (``warning``, ``stopping``) that arrive between replies go to ``on_warning`` and
``on_stopping`` and are kept in ``notifications``. Async forms (``areserve``, ``arecord``,
``ausage``, ...) run the same calls in a worker thread.
"""

from __future__ import annotations

import _socket
import _thread
import os
import stat
import sys

from . import _jsonrpc as j
from .errors import BudgetExceeded, NotSupervised, RateLimited, RpcError, SupervisorError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from decimal import Decimal
    from typing import Any, TypeVar

    T = TypeVar("T")

_ATTACH = b'{"jsonrpc":"2.0","method":"attach"}\n'
_KEEP_NOTIFICATIONS = 64


def connect(*, timeout: float | None = 60.0) -> Budget:
    """The budget of this run, from ``SUPERVISE_RPC_FD``; ``NotSupervised`` without one."""
    value = os.environ.get("SUPERVISE_RPC_FD")
    if not value:
        raise NotSupervised("SUPERVISE_RPC_FD is not set", hint="run this under supervise")
    try:
        fd = int(value)
        mode = os.fstat(fd).st_mode
    except (ValueError, OSError) as e:
        raise NotSupervised(f"SUPERVISE_RPC_FD={value!r} is not an open fd ({e})") from None
    if not stat.S_ISSOCK(mode):
        raise NotSupervised(f"SUPERVISE_RPC_FD={value} is not a socket")
    return Budget(fd, timeout=timeout)


class Budget:
    """One process's channel to the supervisor's ledger; every method is one round trip."""

    def __init__(self, fd: int, *, timeout: float | None = 60.0) -> None:
        self.fd = fd
        self.timeout = timeout
        self.run_id = os.environ.get("SUPERVISE_RUN_ID", "")
        self.agent = os.environ.get("SUPERVISE_AGENT", "")
        self.on_warning: Callable[[dict[str, Any]], object] | None = None
        self.on_stopping: Callable[[dict[str, Any]], object] | None = None
        self.notifications: list[dict[str, Any]] = []
        self.stopping: dict[str, Any] | None = None  # params of the stopping notice, once sent
        self._lock = _thread.allocate_lock()
        self._sock: _socket.socket | None = None
        self._pid = 0
        self._buf = bytearray()
        self._next_id = 0
        with self._lock:
            self._attach()

    # -- the calls --------------------------------------------------------------------

    def reserve(
        self,
        model: str,
        *,
        provider: str | None = None,
        input_tokens: int = 0,
        max_output_tokens: int = 0,
        usd: Decimal | None = None,
        label: str | None = None,
        key: str | None = None,
    ) -> Reservation:
        """Hold the worst case of one call; a context manager that releases unless committed."""
        params = {"model": model, "input_tokens": input_tokens}
        params.update(max_output_tokens=max_output_tokens)
        _opt(params, provider=provider, usd=usd, label=label, key=key)
        return Reservation(self, self.call("reserve", params))

    def record(
        self,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        usd: Decimal | None = None,
        provider: str | None = None,
        label: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Report a call made without a reservation (the spend is written even over a limit)."""
        params: dict[str, Any] = {"model": model}
        params.update(_counts(input_tokens, output_tokens, cached_input_tokens))
        params.update(cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens)
        _opt(params, provider=provider, usd=usd, label=label, key=key)
        return self.call("record", params)

    def usage(self) -> dict[str, Any]:
        """Every scope's used, held and limit."""
        return self.call("usage", {})

    def check_write(self, path: str, size: int) -> dict[str, Any]:
        """Whether writing ``size`` bytes at ``path`` fits the workspace: ``{allowed, reason}``."""
        return self.call("check_write", {"path": path, "size": size})

    def step(self, name: str) -> Step:
        """A context manager around one declared step (``limits.step_time`` holds inside)."""
        return Step(self, name)

    def poll(self) -> list[dict[str, Any]]:
        """Read notifications already sent, without waiting; dispatch and return them."""
        notes: list[dict[str, Any]] = []
        with self._lock:
            sock = self._ensure()
            sock.settimeout(0.0)
            try:
                while True:
                    msg = self._take_line()
                    if msg is None:
                        chunk = sock.recv(65536)
                        if not chunk:
                            break
                        self._buf += chunk
                    elif "id" not in msg:
                        notes.append(msg)
            except (BlockingIOError, InterruptedError):
                pass
            finally:
                sock.settimeout(self.timeout)
        self._dispatch(notes)
        return notes

    # -- async forms: the same calls in a worker thread -------------------------------

    def areserve(self, model: str, **kw: Any) -> AsyncReserve:
        """``async with b.areserve(...) as r`` (or ``r = await b.areserve(...)``)."""
        return AsyncReserve(self, model, kw)

    async def arecord(self, model: str, **kw: Any) -> dict[str, Any]:
        """``record`` without blocking the event loop."""
        return await _to_thread(self.record, model, **kw)

    async def ausage(self) -> dict[str, Any]:
        """``usage`` without blocking the event loop."""
        return await _to_thread(self.usage)

    async def acheck_write(self, path: str, size: int) -> dict[str, Any]:
        """``check_write`` without blocking the event loop."""
        return await _to_thread(self.check_write, path, size)

    # -- the channel ------------------------------------------------------------------

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply; notifications read meanwhile are dispatched after."""
        notes: list[dict[str, Any]] = []
        with self._lock:
            sock = self._ensure()
            self._next_id += 1
            rid = self._next_id
            data = j.line({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            try:
                sock.sendall(data)
                reply = self._wait(sock, rid, notes)
            except BaseException as e:
                self._close()  # a half-sent request or a lost reply: the next call reattaches
                if isinstance(e, OSError):
                    raise RpcError(f"budget RPC {method} failed: {e}") from e
                raise
        self._dispatch(notes)
        error = reply.get("error")
        if error is not None:
            raise _exception(error)
        result = reply.get("result")
        if not isinstance(result, dict):
            raise RpcError(f"budget RPC {method}: malformed reply")
        return result

    def close(self) -> None:
        """Close this process's channel (the inherited fd stays for the rest of the tree)."""
        with self._lock:
            self._close()

    def __enter__(self) -> Budget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # No lock and no I/O: a repr must not wait behind a call in flight.
        attached = self._sock is not None and self._pid == os.getpid()
        state = "attached" if attached else "not attached"
        return f"<Budget run_id={self.run_id!r} agent={self.agent!r} fd={self.fd} {state}>"

    def _attach(self) -> None:
        try:
            boot = _socket.socket(fileno=os.dup(self.fd))
        except OSError as e:
            raise NotSupervised(f"SUPERVISE_RPC_FD={self.fd}: {e}") from None
        try:
            mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                fd = theirs.fileno().to_bytes(4, sys.byteorder, signed=True)
                boot.sendmsg([_ATTACH], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)])
            except OSError as e:
                mine.close()
                raise NotSupervised(f"the supervisor's end of the RPC is closed ({e})") from None
            finally:
                theirs.close()
        finally:
            boot.close()
        mine.settimeout(self.timeout)
        self._sock = mine
        self._pid = os.getpid()
        self._buf.clear()

    def _ensure(self) -> _socket.socket:
        if self._sock is None or self._pid != os.getpid():
            if self._sock is not None and self._pid != os.getpid():
                self._sock.detach()  # the parent's channel: leave it to the parent
                self._sock = None
            self._attach()
        assert self._sock is not None
        return self._sock

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def _take_line(self) -> dict[str, Any] | None:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return None
            raw = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            try:
                msg = j.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(msg, dict):
                return msg

    def _wait(self, sock: _socket.socket, rid: int, notes: list[dict[str, Any]]) -> dict[str, Any]:
        while True:
            msg = self._take_line()
            if msg is None:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RpcError("the supervisor closed the budget RPC")
                self._buf += chunk
            elif "id" not in msg:
                notes.append(msg)
            elif msg["id"] == rid:
                return msg
            # else: the reply to a call abandoned earlier (interrupted); skip it

    def _dispatch(self, notes: list[dict[str, Any]]) -> None:
        for msg in notes:
            self.notifications.append(msg)
            del self.notifications[:-_KEEP_NOTIFICATIONS]
            params = msg.get("params")
            params = params if isinstance(params, dict) else {}
            if msg.get("method") == "warning" and self.on_warning is not None:
                self.on_warning(params)
            elif msg.get("method") == "stopping":
                self.stopping = params
                if self.on_stopping is not None:
                    self.on_stopping(params)


class Reservation:
    """A hold on the budget; ``commit`` the actual usage, or leave it to be released."""

    def __init__(self, budget: Budget, result: dict[str, Any]) -> None:
        self.budget = budget
        self.id: str = result["reservation"]
        self.usd_held = result.get("usd_held")
        self.tokens_held = result.get("tokens_held")
        self.result: dict[str, Any] | None = None  # the commit's reply
        self.settled = False
        self._how = "held"  # what became of it, for the repr

    def commit(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        usd: Decimal | None = None,
    ) -> dict[str, Any]:
        """Settle with the actual usage; over a limit it is written anyway, then raises."""
        if self.settled:
            raise RpcError(f"reservation {self.id} is already settled")
        params: dict[str, Any] = {"reservation": self.id}
        params.update(_counts(input_tokens, output_tokens, cached_input_tokens))
        params.update(cache_write_tokens=cache_write_tokens, reasoning_tokens=reasoning_tokens)
        _opt(params, usd=usd)
        try:
            self.result = self.budget.call("commit", params)
        except BudgetExceeded:
            self.settled = True  # the spend is written; the run has a violation
            self._how = "committed over a limit"
            raise
        self.settled = True
        self._how = "committed"
        return self.result

    def release(self) -> None:
        """Give the hold back (nothing was spent)."""
        if not self.settled:
            self.budget.call("release", {"reservation": self.id})
            self.settled = True
            self._how = "released"

    async def acommit(self, **kw: Any) -> dict[str, Any]:
        """``commit`` without blocking the event loop."""
        return await _to_thread(self.commit, **kw)

    async def arelease(self) -> None:
        """``release`` without blocking the event loop."""
        await _to_thread(self.release)

    def __enter__(self) -> Reservation:
        return self

    def __repr__(self) -> str:
        # The held amounts as the RPC sent them (USD a Decimal), in no money format of ours.
        held = f"usd_held={self.usd_held} tokens_held={self.tokens_held}"
        return f"<Reservation {self.id!r} {held} {self._how}>"

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        _release_quietly(self, failing=exc_type is not None)


class AsyncReserve:
    """What ``areserve`` returns: awaitable, and an async context manager."""

    def __init__(self, budget: Budget, model: str, kw: dict[str, Any]) -> None:
        self._budget, self._model, self._kw = budget, model, kw
        self._reservation: Reservation | None = None

    def __await__(self) -> Any:
        return _to_thread(self._budget.reserve, self._model, **self._kw).__await__()

    async def __aenter__(self) -> Reservation:
        self._reservation = await self
        return self._reservation

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._reservation is not None and not self._reservation.settled:
            await _to_thread(_release_quietly, self._reservation, exc_type is not None)


class Step:
    """``with b.step("search"):`` declares one step to the supervisor (sync or async)."""

    def __init__(self, budget: Budget, name: str) -> None:
        self.budget, self.name = budget, name

    def __repr__(self) -> str:
        return f"<Step {self.name!r}>"

    def __enter__(self) -> Step:
        self.budget.call("step_begin", {"name": self.name})
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.call("step_end", {"name": self.name})

    async def __aenter__(self) -> Step:
        await _to_thread(self.__enter__)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _to_thread(self.__exit__)


def _release_quietly(reservation: Reservation, failing: bool) -> None:
    try:
        reservation.release()
    except SupervisorError:
        if not failing:
            raise  # with no exception in flight, a failed release must be seen


def _counts(input_tokens: int, output_tokens: int, cached: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached,
    }


def _opt(params: dict[str, Any], **kw: object) -> None:
    for name, value in kw.items():
        if value is not None:
            params[name] = value


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _amount(value: object) -> int | Decimal:
    """A count (int) or USD (Decimal, as the codec reads numbers with a point); else 0."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # A Decimal, recognised without importing decimal (the client stays light).
    return value if type(value).__name__ == "Decimal" else 0  # type: ignore[return-value]  # ^


def _exception(error: object) -> SupervisorError:
    if not isinstance(error, dict):
        return RpcError("budget RPC: malformed error reply")
    code, message, data = error.get("code"), str(error.get("message", "")), error.get("data")
    info = data if isinstance(data, dict) else {}
    if code == j.BUDGET_EXCEEDED:
        exc = BudgetExceeded(
            str(info.get("scope", "")),
            str(info.get("limit", "")),
            _amount(info.get("used")),
            _amount(info.get("held")),
            _amount(info.get("limit_value")),
            key=str(info.get("key") or ""),
            requested=_amount(info.get("requested")),
        )
        if exc.scope == "store":  # no limit was reached: the ledger could not answer
            exc.message = f"denied, the budget ledger is unavailable (fail closed): {message}"
            exc.args = (exc.message,)
        elif exc.scope == "model":  # unknown_model: deny; the server's words name the fix
            exc.message = f"denied: {message}"
            exc.args = (exc.message,)
        return exc
    if code == j.RATE_LIMITED:
        return RateLimited(
            str(info.get("limit", "rate")),
            _int(info.get("used")),
            _int(info.get("limit_value")),
            float(info.get("retry_after", 0)),
        )
    number = code if isinstance(code, int) else 0
    return RpcError(f"budget RPC error {code}: {message}", code=number, data=data)


async def _to_thread(fn: Callable[..., T], /, *args: Any, **kw: Any) -> T:
    import asyncio  # only async callers pay for asyncio

    return await asyncio.to_thread(fn, *args, **kw)
