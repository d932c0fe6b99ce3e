"""The supervisor's end of the budget RPC: JSON-RPC 2.0 framing, validation and dispatch.

One ``RpcServer`` per run. It owns a ``socketpair``; the child inherits the other end
(``SUPERVISE_RPC_FD``). Any process of the tree may send the server a private socket over
that fd (SCM_RIGHTS, with an ``attach`` line); ``supervisor.client`` does so on ``connect()``
so that several processes sharing the inherited fd never read each other's replies. Every
connection is served by the same backend, so the whole tree shares the run's budget.

Non-blocking and single-threaded, for the run loop: ``fileno()`` is an epoll fd that turns
readable when any connection has input, room for pending output, or a backlog; then call
``on_readable()``. Memory is bounded everywhere: a line is capped (``max_line``; a longer
one is dropped up to its newline), a connection is read only while less than 64 KiB of its
lines wait and while its unread replies stay under ``max_outbound // 4`` (a child that
never reads stalls itself, not us), notifications beyond ``max_outbound`` are dropped, and
one call handles at most ``max_requests`` requests, round-robin over the connections, so a
flood never starves enforcement or the other children.

Bad input gets a JSON-RPC error reply and an ``on_error(code, message, excerpt)`` callback
(rate-limited, for ``rpc_error`` audit events), and never reaches the backend.  A response
object (``result`` or ``error``, no ``method``) is reported but never answered, as JSON-RPC
says: a child that hands the server both ends of one socket (or its own end back) would
otherwise have it answer its own replies forever.  One call also stops handling requests
after ``max_busy`` seconds (a ledger that waits on a lock must not hold the run loop for
a whole batch); the rest are handled at the next wake-up.
"""

from __future__ import annotations

import json.decoder  # noqa: F401  the C scanner reports errors in strings through it
import os
import select
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _jsonrpc as j
from ._rpc_methods import METHODS, Backend, InvalidParams, call, validate
from ._run_log import TokenBucket

__all__ = ["Backend", "RpcServer"]  # Backend lives in _rpc_methods

ErrorCallback = Callable[[int, str, str], object]

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_CHUNK = 65536
_MAX_FDS = 8  # sockets accepted per message
_EXCERPT = 200


class _Conn:
    __slots__ = ("deaf", "eof", "inbuf", "lines", "mask", "out", "pending", "skipping", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()  # a partial line
        self.lines: deque[bytes] = deque()  # complete lines not handled yet
        self.pending = 0  # bytes in lines; reading waits while a chunk of them is pending
        self.out = bytearray()
        self.skipping = False  # inside a line longer than max_line: drop up to its newline
        self.eof = False  # the peer sends no more
        self.deaf = False  # the peer reads no more: its replies are dropped
        self.mask = 0


class RpcServer:
    """The budget RPC of one run; see the module docstring for the loop contract."""

    def __init__(
        self,
        backend: Backend,
        *,
        run_id: str = "",
        agent: str = "",
        on_error: ErrorCallback | None = None,
        max_line: int = 1 << 20,
        max_outbound: int = 1 << 20,
        max_requests: int = 32,
        max_busy: float = 0.02,
        max_connections: int = 64,
        errors_per_second: float = 5.0,
        error_burst: int = 20,
    ) -> None:
        self.backend = backend
        self.run_id = run_id
        self.agent = agent
        self.on_error = on_error
        self.max_line = max_line
        self.max_outbound = max_outbound
        self.high_water = max(max_outbound // 4, _CHUNK)  # stop reading a conn above this
        self.max_requests = max_requests
        self.max_busy = max_busy
        self.max_connections = max_connections
        self._errors = TokenBucket(errors_per_second, error_burst)
        # Notifications sent so far (the last 64): a process that attaches later (a child
        # started after a warning, or one slow to make its first call) gets them first.
        self._sent: list[bytes] = []
        self._conns: dict[int, _Conn] = {}
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._child: socket.socket | None = child
        self._child_ino = os.fstat(child.fileno()).st_ino  # never adopted back: see _adopt_fds
        self._adopt(parent)

    # -- what the run loop calls -------------------------------------------------------

    def fileno(self) -> int:
        """Poll this for reading; when readable, call ``on_readable()``."""
        return self._epoll.fileno()

    @property
    def child_fd(self) -> int:
        """The fd the child inherits (put it in ``pass_fds``); -1 once closed here."""
        return -1 if self._child is None else self._child.fileno()

    def child_env(self) -> dict[str, str]:
        """The environment that tells ``supervisor.client`` where the RPC is."""
        return {
            "SUPERVISE_RPC_FD": str(self.child_fd),
            "SUPERVISE_RUN_ID": self.run_id,
            "SUPERVISE_AGENT": self.agent,
        }

    def close_child_end(self) -> None:
        """Close our copy of the child's end once the child is spawned (so EOF can come)."""
        if self._child is not None:
            self._child.close()
            self._child = None

    def on_readable(self) -> None:
        """Read, handle up to ``max_requests`` requests, and write; never blocks."""
        for fd, events in self._epoll.poll(0):
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            conn = self._conns.get(fd)
            if conn is None:
                continue
            if events & (_OUT | select.EPOLLHUP | select.EPOLLERR):
                self._flush(conn)
            if events & (_IN | select.EPOLLHUP | select.EPOLLERR):
                self._read(conn)
        self._handle_backlog()
        self._settle()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        """Send a notification to every connection (``warning``, ``stopping``)."""
        data = j.line({"jsonrpc": "2.0", "method": method, "params": params})
        self._sent = [*self._sent[-63:], data]
        for conn in self._conns.values():
            if conn.deaf:
                continue
            if len(conn.out) + len(data) > self.max_outbound:
                self._error(j.SERVER_ERROR, f"notification {method} dropped: child not reading", "")
                continue
            self._queue(conn, data)
            self._flush(conn)
        self._settle()

    @property
    def connections(self) -> int:
        """Open connections (the inherited one included)."""
        return len(self._conns)

    def buffered(self) -> int:
        """Bytes held for all connections, in and out (bounded; for gauges and tests)."""
        return sum(len(c.inbuf) + c.pending + len(c.out) for c in self._conns.values())

    def flush_errors(self) -> None:
        """Report now how many errors were not reported one by one (if any)."""
        if self._errors.suppressed:
            self._errors.tokens = max(self._errors.tokens, 1.0)
            self._error(j.SERVER_ERROR, "end of run", "")

    def close(self) -> None:
        """Close every connection and fd; a summary of suppressed errors goes out first.

        Never raises: the run may already have closed what ``on_error`` writes to (its
        audit log) when it closes the server; call ``flush_errors()`` before that.
        """
        try:
            self.flush_errors()
        except Exception:  # the summary is lost; the end of the run is not
            self._errors.pop_suppressed()
        for conn in list(self._conns.values()):
            self._drop(conn)
        self.close_child_end()
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1
        self._epoll.close()

    def __enter__(self) -> RpcServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ------------------------------------------------------------------

    def _adopt(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        conn.mask = _IN
        self._epoll.register(sock.fileno(), _IN)

    def _adopt_fds(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                self._error(j.SERVER_ERROR, "attach: the fd sent is not a socket", "")
                continue
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.close()
                self._error(j.SERVER_ERROR, "attach: not a unix stream socket", "")
            elif os.fstat(sock.fileno()).st_ino == self._child_ino:
                sock.close()
                self._error(j.SERVER_ERROR, "attach: supervise's own socket sent back", "")
            elif len(self._conns) >= self.max_connections:
                sock.close()
                self._error(j.SERVER_ERROR, f"attach: more than {self.max_connections}", "")
            else:
                self._adopt(sock)
                conn = self._conns[sock.fileno()]
                for data in self._sent:
                    self._queue(conn, data)
                if self._sent:
                    self._flush(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        if conn.eof or len(conn.out) > self.high_water or conn.pending >= _CHUNK:
            return
        try:
            data, anc, _flags, _addr = conn.sock.recvmsg(
                _CHUNK, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, anc = b"", []
        fds = array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:
            self._adopt_fds(list(fds))
        if not data:
            conn.eof = True
            if conn.inbuf and not conn.skipping:
                self._push_line(conn, bytes(conn.inbuf))  # a last line without newline
            conn.inbuf.clear()
            return
        self._split(conn, data)

    def _split(self, conn: _Conn, data: bytes) -> None:
        start = 0
        if conn.skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return
            conn.skipping = False
            start = nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if conn.inbuf:
                conn.inbuf += data[start:nl]
                piece = bytes(conn.inbuf)
                conn.inbuf.clear()
            else:
                piece = data[start:nl]
            self._push_line(conn, piece)
            start = nl + 1
        if start < len(data):
            conn.inbuf += data[start:]
            if len(conn.inbuf) > self.max_line:
                excerpt = bytes(conn.inbuf[:_EXCERPT])
                conn.inbuf.clear()
                conn.skipping = True
                self._reply_error(conn, None, j.INVALID_REQUEST, self._too_long(), excerpt)

    def _push_line(self, conn: _Conn, piece: bytes) -> None:
        if len(piece) > self.max_line:
            self._reply_error(conn, None, j.INVALID_REQUEST, self._too_long(), piece[:_EXCERPT])
            return
        conn.lines.append(piece)
        conn.pending += len(piece)

    def _too_long(self) -> str:
        return f"line longer than {self.max_line} bytes (discarded up to its newline)"

    def _handle_backlog(self) -> None:
        budget = self.max_requests
        until = time.monotonic() + self.max_busy
        while budget > 0 and time.monotonic() < until:
            ready = [c for c in self._conns.values() if c.lines and len(c.out) <= self.high_water]
            if not ready:
                return
            for conn in ready:
                piece = conn.lines.popleft()
                conn.pending -= len(piece)
                self._handle(conn, piece)
                budget -= 1
                if budget == 0 or time.monotonic() >= until:
                    return

    def _settle(self) -> None:
        """Flush, close finished connections, fix epoll interest, keep the backlog flag."""
        backlog = False
        for conn in list(self._conns.values()):
            if conn.out:
                self._flush(conn)
            if conn.eof and not conn.lines and not conn.out:
                self._drop(conn)
                continue
            answering = len(conn.out) <= self.high_water
            if conn.lines and answering:
                backlog = True
            reading = answering and not conn.eof and conn.pending < _CHUNK
            mask = (_IN if reading else 0) | (_OUT if conn.out else 0)
            if mask != conn.mask:
                conn.mask = mask
                self._epoll.modify(conn.sock.fileno(), mask)
        if backlog and self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                conn.out.clear()  # the peer is gone: its replies go nowhere
                conn.deaf = True
                return
            del conn.out[:sent]

    # -- requests ---------------------------------------------------------------------

    def _handle(self, conn: _Conn, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            msg = j.loads(raw)
        except (ValueError, RecursionError) as e:
            self._reply_error(conn, None, j.PARSE_ERROR, f"parse error: {e}", raw)
            return
        if not isinstance(msg, dict):
            what = "batches are not supported" if isinstance(msg, list) else "not an object"
            self._reply_error(conn, None, j.INVALID_REQUEST, f"invalid request: {what}", raw)
            return
        if "method" not in msg and ("result" in msg or "error" in msg):
            # A response: never answered, or two of our own ends would talk forever.
            excerpt = raw[:_EXCERPT].decode("utf-8", "replace")
            self._error(j.INVALID_REQUEST, "a response sent to supervise (not answered)", excerpt)
            return
        rid = msg.get("id")
        if not (rid is None or _valid_id(rid)):
            self._reply_error(conn, None, j.INVALID_REQUEST, "invalid request: bad id", raw)
            return
        method = msg.get("method")
        problem = None
        if msg.get("jsonrpc") != "2.0":
            problem = 'jsonrpc must be "2.0"'
        elif not isinstance(method, str):
            problem = "method must be a string"
        elif set(msg) - {"jsonrpc", "method", "params", "id"}:
            problem = f"unknown members {sorted(set(msg) - {'jsonrpc', 'method', 'params', 'id'})}"
        elif method == "attach":
            if "id" in msg:
                self._reply(conn, rid, {})
            return
        elif "id" not in msg or rid is None:
            problem = "id required (a budget call must be answered)"
        if problem is not None:
            self._reply_error(conn, rid, j.INVALID_REQUEST, f"invalid request: {problem}", raw)
            return
        assert isinstance(method, str)
        if method not in METHODS:
            self._reply_error(conn, rid, j.METHOD_NOT_FOUND, f"unknown method {method!r}", raw)
            return
        try:
            args, kwargs = validate(method, msg.get("params", {}))
        except InvalidParams as e:
            self._reply_error(conn, rid, j.INVALID_PARAMS, f"{method}: {e}", raw)
            return
        self._dispatch(conn, rid, method, args, kwargs, raw)

    def _dispatch(
        self,
        conn: _Conn,
        rid: object,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        raw: bytes,
    ) -> None:
        result, error = call(self.backend, method, args, kwargs)
        if result is not None:
            try:
                self._queue(conn, j.line({"jsonrpc": "2.0", "id": rid, "result": result}))
                return
            except (TypeError, ValueError) as e:
                error = (j.INTERNAL_ERROR, f"{method}: internal error: {e}", None)
        assert error is not None
        code, message, data = error
        self._send_error(conn, rid, code, message, data)
        if code < 0:  # bad input or a backend bug; denials (1, 2) are the ledger's to log
            self._error(code, message, raw[:_EXCERPT].decode("utf-8", "replace"))

    def _queue(self, conn: _Conn, data: bytes) -> None:
        if not conn.deaf:
            conn.out += data

    def _reply(self, conn: _Conn, rid: object, result: dict[str, Any]) -> None:
        self._queue(conn, j.line({"jsonrpc": "2.0", "id": rid, "result": result}))

    def _send_error(
        self, conn: _Conn, rid: object, code: int, message: str, data: object = None
    ) -> None:
        error: dict[str, object] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        try:
            body = j.line({"jsonrpc": "2.0", "id": rid, "error": error})
        except (TypeError, ValueError):
            error.pop("data")
            body = j.line({"jsonrpc": "2.0", "id": rid, "error": error})
        self._queue(conn, body)

    def _reply_error(self, conn: _Conn, rid: object, code: int, message: str, raw: bytes) -> None:
        self._send_error(conn, rid, code, message)
        self._error(code, message, raw[:_EXCERPT].decode("utf-8", "replace"))

    def _error(self, code: int, message: str, excerpt: str) -> None:
        """Report to ``on_error``, at most ``error_burst`` at once and then ``rate`` a second."""
        if self.on_error is None:
            return
        if not self._errors.take():
            return
        quiet = self._errors.pop_suppressed()
        if quiet:
            message = f"{message} ({quiet} more RPC errors not reported one by one)"
        self.on_error(code, message, excerpt)


def _valid_id(rid: object) -> bool:
    if isinstance(rid, str):
        return len(rid) <= 256
    return isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**63
