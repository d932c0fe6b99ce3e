"""The budget RPC end to end: a real RpcServer, the real client in real children, raw bytes."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from functools import partial
from typing import Any

import pytest
from _helpers import GLOBAL_TIMEOUT, margin, wait_until
from rpc_helpers import Ledger, read_line, serving

from supervisor import client
from supervisor.rpc import RpcServer


def request(sock: socket.socket, buf: bytearray, payload: bytes | dict[str, Any]) -> dict[str, Any]:
    """Send one raw line, read one reply."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode() + b"\n"
    sock.sendall(data)
    reply: dict[str, Any] = json.loads(read_line(sock, buf))
    return reply


def test_child_reserves_commits_records_and_reads_usage() -> None:
    """A child reserves, commits, records, checks a write and runs a step over the RPC."""
    ledger = Ledger(tokens=10_000)
    code = """
import json
from supervisor import client
b = client.connect()
out = {"run": b.run_id, "agent": b.agent}
with b.reserve("gpt-4o-mini", input_tokens=1200, max_output_tokens=500, label="triage") as r:
    out["held"] = r.tokens_held
    out["usd_held"] = str(r.usd_held)
    out["commit"] = r.commit(input_tokens=1180, output_tokens=312, cached_input_tokens=1000)
with b.reserve("gpt-4o-mini", max_output_tokens=10):
    pass
out["record"] = b.record("gpt-4o-mini", input_tokens=100, output_tokens=50)
out["write"] = [b.check_write("a.txt", 10), b.check_write("a.txt", 11)]
with b.step("search"):
    pass
out["usage"] = b.usage()
print(json.dumps(out, default=str))
"""
    with serving(ledger) as s:
        out = json.loads(s.run_child(code).stdout)
        assert not s.errors
    assert out["run"] == "run-1" and out["agent"] == "bot"
    assert out["held"] == 1700 and out["usd_held"] == "0.001700"
    assert out["commit"]["tokens"] == 1492
    assert out["record"]["tokens"] == 150
    assert out["write"] == [
        {"allowed": True, "reason": None},
        {"allowed": False, "reason": "max_file_size"},
    ]
    assert out["usage"]["run"]["tokens"] == {"used": 1642, "held": 0, "limit": 10_000}
    assert [c["cached_input_tokens"] for c in ledger.commits] == [1000]
    assert ("release", "r2") in ledger.events
    assert ("step_begin", "search") in ledger.events and ("step_end", "search") in ledger.events
    assert not ledger.holds


def test_denied_reservation_raises_budget_exceeded_with_its_fields() -> None:
    """Error 1 arrives as BudgetExceeded with limit, scope, used, held and limit_value."""
    code = """
from supervisor import client
b = client.connect()
try:
    b.reserve("m", input_tokens=60, max_output_tokens=50)
except client.BudgetExceeded as e:
    print(e.scope, e.limit, e.used, e.held, e.limit_value)
"""
    with serving(Ledger(tokens=100)) as s:
        assert s.run_child(code).stdout.split() == ["run", "tokens", "0", "0", "100"]
        assert not s.errors  # a denial is the ledger's to log, not an rpc_error


def test_rate_limited_carries_retry_after() -> None:
    """Error 2 arrives as RateLimited with retry_after in seconds."""
    ledger = Ledger()
    ledger.rate_limited = True
    with (
        serving(ledger) as s,
        client.Budget(s.server.child_fd) as b,
        pytest.raises(client.RateLimited) as info,
    ):
        b.reserve("m")
    assert info.value.retry_after == 1.5


def test_an_exception_inside_the_block_releases_the_hold() -> None:
    """Leaving a reservation on an exception releases it and lets the exception through."""
    ledger = Ledger()
    with serving(ledger) as s, client.Budget(s.server.child_fd) as b:
        with pytest.raises(ZeroDivisionError), b.reserve("m", max_output_tokens=5):
            raise ZeroDivisionError
        assert not ledger.holds and ledger.events[-1] == ("release", "r1")


def test_commit_over_the_limit_is_written_and_raises() -> None:
    """A commit beyond the limit is spent anyway and raises BudgetExceeded; no release follows."""
    ledger = Ledger(tokens=100)
    with serving(ledger) as s, client.Budget(s.server.child_fd) as b:
        with pytest.raises(client.BudgetExceeded), b.reserve("m", max_output_tokens=50) as r:
            r.commit(input_tokens=80, output_tokens=70)
        assert ledger.used_tokens == 150 and not ledger.holds
        assert [e[0] for e in ledger.events] == ["reserve", "commit"]


def test_connect_without_the_fd_is_not_supervised(monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() raises NotSupervised without SUPERVISE_RPC_FD, or when it is not a socket."""
    monkeypatch.delenv("SUPERVISE_RPC_FD", raising=False)
    with pytest.raises(client.NotSupervised, match="not set"):
        client.connect()
    r, w = os.pipe()
    try:
        monkeypatch.setenv("SUPERVISE_RPC_FD", str(r))
        with pytest.raises(client.NotSupervised, match="not a socket"):
            client.connect()
        monkeypatch.setenv("SUPERVISE_RPC_FD", "999999")
        with pytest.raises(client.NotSupervised, match="not an open fd"):
            client.connect()
    finally:
        os.close(r)
        os.close(w)


def req(method: str, params: object) -> bytes:
    """A well-formed request line with id 1."""
    return (
        json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\n"
    )


def reserve_with(**params: object) -> bytes:
    """A reserve request line for model "m" with these params."""
    return req("reserve", {"model": "m", **params})


COMMIT = {"reservation": "r1", "input_tokens": 1, "output_tokens": 1}
BAD_INPUTS = [
    (b"garbage\n", -32700),
    (b"\xff\xfe\n", -32700),
    (b"[" * 100_000 + b"\n", -32700),
    (req("usage", {})[:-1] + b" trailing\n", -32700),
    (b"[" + req("usage", {})[:-1] + b"]\n", -32600),
    (b'"just a string"\n', -32600),
    (b'{"id":1,"method":"usage"}\n', -32600),
    (b'{"jsonrpc":"2.0","method":"release","params":{"reservation":"r1"}}\n', -32600),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"usage"}\n', -32600),
    (req("raise_limit", {}), -32601),
    (reserve_with(input_tokens=-5), -32602),
    (reserve_with(input_tokens=1.5), -32602),
    (reserve_with(input_tokens=True), -32602),
    (reserve_with(usd=-0.01), -32602),
    (
        b'{"jsonrpc":"2.0","id":1,"method":"reserve","params":{"model":"m","usd":0.0000001}}\n',
        -32602,
    ),
    (reserve_with(usd=float("nan")), -32700),
    (reserve_with(limit=1), -32602),
    (req("reserve", ["m"]), -32602),
    (req("reserve", {}), -32602),
    (req("commit", {**COMMIT, "reservation": "nope"}), -32602),
    (req("commit", {**COMMIT, "cached_input_tokens": 2}), -32602),
    (req("commit", {**COMMIT, "output_tokens": 1, "reasoning_tokens": 2}), -32602),
    (req("release", {"reservation": "unknown"}), -32602),
    (req("check_write", {"path": "a", "size": -1}), -32602),
    (req("step_begin", {"name": ""}), -32602),
]


@pytest.mark.parametrize(("line", "code"), BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_input_gets_an_error_reply_and_never_touches_the_ledger(line: bytes, code: int) -> None:
    """Each bad line gets the error code SPEC names, an on_error report and no ledger change."""
    ledger = Ledger(tokens=1000)
    with serving(ledger) as s, s.raw() as raw:
        buf = bytearray()
        held = request(
            raw, buf, {"jsonrpc": "2.0", "id": 0, "method": "reserve", "params": {"model": "m"}}
        )
        before = ledger.state()
        reply = request(raw, buf, line)
        assert reply["error"]["code"] == code, reply
        assert ledger.state() == before
        assert [e[0] for e in s.errors] == [code]
        # the connection still works afterwards
        assert request(raw, buf, {"jsonrpc": "2.0", "id": 9, "method": "usage"})["id"] == 9
    assert held["result"]["reservation"] == "r1"


def test_a_10mb_line_is_refused_once_with_bounded_memory() -> None:
    """A 10 MB line gets one -32600 reply; the server never buffers more than about a MiB of it."""
    with serving(Ledger()) as s, s.raw() as raw:
        chunk = b"x" * 65536
        for _ in range(160):
            raw.sendall(chunk)
        raw.sendall(
            b"\n" + json.dumps({"jsonrpc": "2.0", "id": 7, "method": "usage"}).encode() + b"\n"
        )
        buf = bytearray()
        first, second = json.loads(read_line(raw, buf)), json.loads(read_line(raw, buf))
        assert first["error"]["code"] == -32600 and "longer than" in first["error"]["message"]
        assert second["id"] == 7 and "result" in second
        assert s.peak_buffered < 2 * 1024 * 1024
        assert len(s.errors) == 1 and s.errors[0][2].startswith("xxxx")


def test_a_last_line_without_newline_is_still_handled() -> None:
    """A request whose sender shuts down writing before the newline is answered all the same."""
    ledger = Ledger()
    with serving(ledger) as s, s.raw() as raw:
        raw.sendall(b'{"jsonrpc":"2.0","id":1,"method":"usage"}')
        raw.shutdown(socket.SHUT_WR)
        assert json.loads(read_line(raw, bytearray()))["id"] == 1


def _flood(raw: socket.socket, n: int, full: threading.Event) -> None:
    """Send ``n`` usage requests on ``raw`` without reading a reply; set ``full`` once the
    socket refuses more (the server stopped reading us) or everything went out."""
    block = b'{"jsonrpc":"2.0","id":1,"method":"usage"}\n' * 1000
    fd = raw.fileno()
    os.set_blocking(fd, False)
    try:
        for _ in range(n // 1000):
            rest = memoryview(block)
            while rest:
                try:
                    rest = rest[os.write(fd, rest) :]
                except BlockingIOError:
                    full.set()
                    select.select([], [fd], [], GLOBAL_TIMEOUT)
    except OSError:
        pass  # the test closed us
    finally:
        full.set()


FLOODER = """
import os, socket, sys, threading
raw = socket.socket(fileno=int(os.environ["SUPERVISE_RPC_FD"]))
block = b'{"jsonrpc":"2.0","id":1,"method":"usage"}\\n' * 1000
writer = threading.Thread(target=lambda: [raw.sendall(block) for _ in range(100)])
writer.start()
print("started", flush=True)
got, buf = 0, b""
while got < 100_000:
    chunk = raw.recv(1 << 20)
    assert chunk
    got += chunk.count(b"\\n")
writer.join()
print(got, flush=True)
"""


def test_a_flood_of_100k_requests_is_served_while_others_stay_prompt() -> None:
    """A child floods 100k requests: all answered, while another child's calls stay prompt."""
    with serving(Ledger()) as s, client.Budget(s.server.child_fd) as b:
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER],
            pass_fds=[s.server.child_fd],
            env=s.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flooder.stdout is not None
        assert flooder.stdout.readline().strip() == "started"
        latencies: list[float] = []
        while flooder.poll() is None and len(latencies) < 5000:
            t0 = time.perf_counter()
            b.usage()
            latencies.append(time.perf_counter() - t0)
        out, _ = flooder.communicate(timeout=GLOBAL_TIMEOUT)
        assert out.strip() == "100000"
        latencies.sort()
        assert len(latencies) > 20, "the flood ended before we measured"
        p50, worst = latencies[len(latencies) // 2], latencies[-1]
        print(f"flood: {len(latencies)} calls, p50 {p50 * 1e6:.0f} us, max {worst * 1e3:.1f} ms")
        assert p50 < margin(0.005) and worst < margin(0.5), latencies[-5:]
        assert s.peak_buffered < 4 * 1024 * 1024


def test_a_child_that_never_reads_its_replies_is_throttled_not_buffered() -> None:
    """A child that never reads its replies stops being read: bounded memory, others go on."""
    with serving(Ledger()) as s, s.raw() as raw, client.Budget(s.server.child_fd) as b:
        full = threading.Event()
        flooder = threading.Thread(target=_flood, args=(raw, 100_000, full), daemon=True)
        flooder.start()
        assert full.wait(GLOBAL_TIMEOUT)  # the buffers are full: the server throttles us
        t0 = time.perf_counter()
        for _ in range(100):
            b.usage()
        assert time.perf_counter() - t0 < margin(2.0)
        assert s.peak_buffered < 2 * 1024 * 1024
        raw.shutdown(socket.SHUT_RDWR)  # unblock the flooder
        flooder.join(GLOBAL_TIMEOUT)
        s.do(lambda: s.server.notify("warning", {"limit": "usd", "used": 1, "limit_value": 2}))
        b.usage()


def _more_than(items: list[Any], n: int) -> bool:
    """Whether ``items`` has grown past ``n`` entries."""
    return len(items) > n


def test_notifications_interleaved_with_replies_are_never_taken_for_replies() -> None:
    """Warnings sent between replies go to on_warning; every reply still matches its call."""
    code = """
import json, sys
from supervisor import client
b = client.connect()
seen = []
b.on_warning = seen.append
print("ready", flush=True)
n = 0
while b.stopping is None:
    r = b.record("m", input_tokens=n, output_tokens=1)
    assert r["tokens"] == n + 1, (r, n)
    n += 1
out = {"calls": n, "warnings": len(seen), "first": seen[0], "stopping": b.stopping}
print(json.dumps(out, default=str))
"""
    ledger = Ledger()
    with serving(ledger) as s:
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=[s.server.child_fd],
            env=s.env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for i in range(50):
            warning = {"limit": "usd", "used": Decimal("4.000001"), "limit_value": i}
            s.do(partial(s.server.notify, "warning", warning))
            # the child makes a call between two warnings, so they really interleave
            assert wait_until(partial(_more_than, ledger.records, len(ledger.records)), every=0.001)
        s.do(lambda: s.server.notify("stopping", {"limit": "usd", "grace": 2.0}))
        out, _ = child.communicate(timeout=GLOBAL_TIMEOUT)
    result = json.loads(out)
    assert result["warnings"] == 50 and result["calls"] > 0
    assert result["first"] == {"limit": "usd", "used": "4.000001", "limit_value": 0}
    assert result["stopping"] == {"limit": "usd", "grace": "2.0"}


def test_a_process_that_attaches_late_gets_the_notifications_sent_before() -> None:
    """A warning and stopping sent before the child's first call reach it when it attaches
    (a process started late must still know the run is stopping)."""
    code = """
import json
from supervisor import client
b = client.connect()
b.usage()
print(json.dumps({"warnings": len(b.notifications), "stopping": b.stopping}, default=str))
"""
    with serving(Ledger()) as s:
        s.do(lambda: s.server.notify("warning", {"limit": "usd", "used": 1, "limit_value": 2}))
        s.do(lambda: s.server.notify("stopping", {"limit": "usd", "grace": 2.0}))
        done = s.run_child(code)
    result = json.loads(done.stdout)
    assert result == {"warnings": 2, "stopping": {"limit": "usd", "grace": "2.0"}}


def test_one_budget_is_thread_safe() -> None:
    """8 threads x 200 calls on one Budget in a child: every reply matches its own call."""
    code = """
import select
import threading
from supervisor import client
b = client.connect()
bad = []
def work(k):
    for i in range(200):
        n = k * 1000 + i
        with b.reserve("m", input_tokens=n, max_output_tokens=1) as r:
            got = r.commit(input_tokens=n, output_tokens=1)["tokens"]
        if got != n + 1:
            bad.append((n, got))
threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(bad))
"""
    ledger = Ledger()
    with serving(ledger) as s:
        assert s.run_child(code).stdout.strip() == "0"
    assert len(ledger.commits) == 1600 and not ledger.holds


def test_asyncio_forms_work_concurrently() -> None:
    """areserve/acommit, arecord, ausage and an async step work under asyncio.gather."""
    code = """
import asyncio
from supervisor import client
b = client.connect()
async def one(n):
    async with b.areserve("m", input_tokens=n, max_output_tokens=2) as r:
        return (await r.acommit(input_tokens=n, output_tokens=2))["tokens"]
async def main():
    got = await asyncio.gather(*(one(n) for n in range(20)))
    assert got == [n + 2 for n in range(20)], got
    r = await b.areserve("m")
    await r.arelease()
    async with b.step("s"):
        await b.arecord("m", input_tokens=1, output_tokens=1)
    print((await b.ausage())["run"]["tokens"]["used"])
asyncio.run(main())
"""
    ledger = Ledger()
    with serving(ledger) as s:
        assert s.run_child(code).stdout.strip() == str(sum(n + 2 for n in range(20)) + 2)
    assert not ledger.holds


def test_processes_sharing_the_inherited_fd_each_get_their_own_replies() -> None:
    """A child, its fork and its subprocess call at once over one fd: no crossed replies."""
    code = """
import os, subprocess, sys
from supervisor import client
b = client.connect()
def work(tag):
    for i in range(300):
        assert b.record("m", input_tokens=tag + i, output_tokens=0)["tokens"] == tag + i
SUB = (
    "from supervisor import client\\nb = client.connect()\\n"
    "for i in range(300):\\n"
    "    assert b.record('m', input_tokens=20000 + i, output_tokens=0)['tokens'] == 20000 + i"
)
fd = int(os.environ["SUPERVISE_RPC_FD"])
sub = subprocess.Popen([sys.executable, "-c", SUB], pass_fds=[fd])
pid = os.fork()
if pid == 0:
    try:
        work(10000)
    finally:
        os._exit(0)
work(0)
assert os.waitpid(pid, 0)[1] == 0
assert sub.wait() == 0
print("ok")
"""
    ledger = Ledger()
    with serving(ledger) as s:
        assert s.run_child(code).stdout.strip() == "ok"
        assert not s.errors
    assert len(ledger.records) == 900


def test_a_call_after_the_supervisor_is_gone_raises_instead_of_hanging() -> None:
    """When the server closes, a call fails with RpcError promptly."""
    s = RpcServer(Ledger())
    b = client.Budget(s.child_fd)
    try:
        s.close()
        with pytest.raises(client.RpcError):
            b.usage()
    finally:
        b.close()


def test_a_backend_bug_is_an_internal_error_not_a_crash() -> None:
    """A backend that raises gets -32603 and an on_error report; the server keeps serving."""

    class Broken(Ledger):
        def usage(self) -> dict[str, Any]:
            raise RuntimeError("boom")

    with serving(Broken()) as s, client.Budget(s.server.child_fd) as b:
        with pytest.raises(client.RpcError) as info:
            b.usage()
        assert info.value.code == -32603 and "boom" in str(info.value)
        assert b.record("m", input_tokens=1, output_tokens=1)["tokens"] == 2
        assert [e[0] for e in s.errors] == [-32603]


def test_attaching_something_that_is_not_a_socket_is_refused() -> None:
    """An fd that is not a unix stream socket sent as attach is closed and reported."""
    with serving(Ledger()) as s, s.raw() as raw:
        r, w = os.pipe()
        try:
            raw.sendmsg(
                [b'{"jsonrpc":"2.0","method":"attach"}\n'],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, sys.byteorder))],
            )
        finally:
            os.close(r)
            os.close(w)
        assert request(raw, bytearray(), {"jsonrpc": "2.0", "id": 1, "method": "usage"})["id"] == 1
        assert s.server.connections == 1
        assert "not a socket" in s.errors[0][1]


def test_error_reports_are_rate_limited() -> None:
    """A burst of garbage gets a reply per line but only error_burst on_error reports."""
    with serving(Ledger(), error_burst=5, errors_per_second=0.001) as s, s.raw() as raw:
        raw.sendall(b"garbage\n" * 100)
        buf = bytearray()
        for _ in range(100):
            assert json.loads(read_line(raw, buf))["error"]["code"] == -32700
        assert len(s.errors) == 5


def test_import_supervisor_client_stays_light() -> None:
    """import supervisor.client pulls in no pydantic, psutil, click, yaml, rich or asyncio."""
    heavy = ("pydantic", "psutil", "click", "yaml", "rich", "asyncio", "json", "socket")
    code = f"import sys, supervisor.client; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_method_the_run_does_not_offer_is_method_not_found() -> None:
    """check_write before the workspace lands (NotImplementedError or no method) is -32601."""

    class NoWorkspace(Ledger):
        def check_write(self, path: str, size: int) -> dict[str, Any]:
            raise NotImplementedError("no workspace in this run")

        step_begin = None  # type: ignore[assignment]  # a run without steps has no such method

    with serving(NoWorkspace()) as s, client.Budget(s.server.child_fd) as b:
        for call in (lambda: b.check_write("a", 1), lambda: b.step("x").__enter__()):
            with pytest.raises(client.RpcError) as info:
                call()
            assert info.value.code == -32601 and "not available" in str(info.value)
