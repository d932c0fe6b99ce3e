"""``import supervisor.client`` and the budget RPC: bare, and through a real run."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading

from supervisor import Policy, Supervisor

from ._common import CONFIG, REPO, median_ms, rows


def client_import() -> None:
    """``import supervisor.client`` against a bare interpreter, both without site hooks.

    Bytecode is cached (in a temp prefix, even under PYTHONDONTWRITEBYTECODE): an installed
    package has its .pyc, and compiling the source on every start is not what we measure.
    """
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="supervise-bench-pyc-")
    n = CONFIG.n * 2
    base = median_ms(lambda: subprocess.run([py, "-S", "-c", "pass"], env=env, check=True), n=n)
    ours = median_ms(
        lambda: subprocess.run([py, "-S", "-c", "import supervisor.client"], env=env, check=True),
        n=n,
    )
    cumulative = []
    for _ in range(n):
        out = subprocess.run(
            [py, "-S", "-X", "importtime", "-c", "import supervisor.client"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        last = [line for line in out.splitlines() if line.rstrip().endswith("supervisor.client")]
        cumulative.append(int(last[-1].split("|")[1]) / 1000)
    rows.append(
        (
            "`python -S -c 'import supervisor.client'`",
            f"`python -S -c pass` {base:.1f} ms",
            f"{ours:.1f} ms",
            f"+{ours - base:.1f} ms, {ours / base:.2f}x; -X importtime cumulative "
            f"{statistics.median(cumulative):.1f} ms (target <= +15 ms)",
        )
    )


RPC_CLIENT = """
import statistics, time
from supervisor import client
b = client.connect()
times = []
for _ in range(3000):
    t = time.perf_counter()
    b.usage()
    times.append(time.perf_counter() - t)
times.sort()
hold = []
for _ in range(1000):
    t = time.perf_counter()
    with b.reserve("m", input_tokens=10, max_output_tokens=10) as r:
        r.commit(input_tokens=10, output_tokens=5)
    hold.append(time.perf_counter() - t)
hold.sort()
print(times[len(times) // 2] * 1e6, times[len(times) * 99 // 100] * 1e6, hold[len(hold) // 2] * 1e6)
"""


class _NullBackend:
    """Answers every method at once: the RPC's own cost, without a ledger behind it."""

    def reserve(self, **kw: object) -> dict[str, object]:
        return {"reservation": "r", "usd_held": 0, "tokens_held": 0}

    def commit(self, reservation: str, **kw: object) -> dict[str, object]:
        return {"usd": 0, "tokens": 0, "usage": {}}

    def release(self, reservation: str) -> dict[str, object]:
        return {}

    def usage(self) -> dict[str, object]:
        return {"run": {"usd": {"used": 0, "held": 0, "limit": 5}}}


def rpc_round_trip() -> None:
    """``usage`` and reserve+commit round trips from a child, RpcServer driven by a poll loop."""
    import select

    from supervisor.rpc import RpcServer

    server = RpcServer(_NullBackend())  # type: ignore[arg-type]  # only the methods used here
    stop = threading.Event()

    def loop() -> None:
        poller = select.poll()
        poller.register(server.fileno(), select.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                server.on_readable()

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", RPC_CLIENT],
            pass_fds=[server.child_fd],
            env={**os.environ, **server.child_env()},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        stop.set()
        thread.join()
        server.close()
    p50, p99, hold = (float(x) for x in out.split())
    rows.append(
        (
            "budget RPC `usage` round trip, child -> RpcServer (no ledger)",
            "JSON over a socketpair: 24-97 us (issue 6)",
            f"p50 {p50:.0f} us, p99 {p99:.0f} us",
            "target p50 <= 100 us",
        )
    )
    rows.append(
        (
            "reserve + commit round trips (no ledger)",
            "-",
            f"p50 {hold:.0f} us",
            "the RPC's share of the SQLite target (<= 250 us)",
        )
    )


RUN_CLIENT = """
import statistics, sys, time
from supervisor import client
b = client.connect()
n = int(sys.argv[1])
times = []
for i in range(n):
    t = time.perf_counter()
    with b.reserve(model="m1", input_tokens=100, max_output_tokens=100) as r:
        r.commit(input_tokens=90, output_tokens=50)
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e6, sorted(times)[int(n * 0.99)] * 1e6, n / sum(times))
"""


def rpc_through_a_run(tmp: str) -> None:
    """reserve + commit from children of a real run, the real ledger on a SQLite file."""
    budget = {
        "run": {"calls": 10**9},
        "pricing": {"m1": {"input": 1, "output": 2}},
        "store": f"sqlite:///{tmp}/rpc-bench.db",
    }
    sup = Supervisor(Policy.from_dict({"budget": budget}), audit=os.path.join(tmp, "a.jsonl"))
    n = 300 if CONFIG.quick else 1000
    r, w = os.pipe()
    sup.run([sys.executable, "-c", RUN_CLIENT, str(n)], stdout=w)
    os.close(w)
    with os.fdopen(r) as f:
        p50, p99, _ = (float(x) for x in f.read().split())
    rows.append(
        (
            "reserve + commit round trip from a child, SQLite ledger",
            "-",
            f"p50 {p50:.0f} us, p99 {p99:.0f} us",
            "target p50 <= 250 us",
        )
    )
    four = (
        "import subprocess, sys, os\n"
        "fd = int(os.environ['SUPERVISE_RPC_FD'])\n"
        "ps = [subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], pass_fds=[fd],"
        " stdout=subprocess.PIPE, text=True) for _ in range(4)]\n"
        "print(sum(float(p.communicate()[0].split()[2]) for p in ps))\n"
    )
    r, w = os.pipe()
    sup.run([sys.executable, "-c", four, RUN_CLIENT, str(n)], stdout=w)
    os.close(w)
    with os.fdopen(r) as f:
        rate = float(f.read())
    rows.append(
        (
            "reserve + commit calls/s through one supervisor, 4 children at once",
            "-",
            f"{rate:.0f} calls/s",
            "reported (each call is 2 ledger transactions)",
        )
    )


def bench(tmp: str) -> None:
    """The area's rows, in the table's order."""
    client_import()
    rpc_round_trip()
    rpc_through_a_run(tmp)
