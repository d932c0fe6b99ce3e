"""The budget ledger: all-scope reservations on SQLite and Redis, 1 and 4 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ._common import CONFIG, rows

LEDGER_WORKER = """
import json, sys, time
from decimal import Decimal
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget.ledger import Ledger
url, n, run = sys.argv[1], int(sys.argv[2]), sys.argv[3]
budget = BudgetPolicy.model_validate({
    "run": {"usd": 10**6}, "session": {"usd": 10**6}, "daily": {"usd": 10**6},
    "monthly": {"usd": 10**6}, "rate": {"calls_per_minute": 10**9},
    "pricing": {"m": {"input": 1, "output": 2}}})
with Ledger.open(budget, run_id=run, agent="bench", session="s", store=url) as ledger:
    ledger.reserve(model="m", input_tokens=1000, max_output_tokens=500)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        ledger.reserve(model="m", input_tokens=1000, max_output_tokens=500)
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    print(json.dumps({"total": total, "lat": sorted(lat)[int(0.99 * n)], "max": max(lat),
                      "waited": getattr(ledger.store, "waited_max", 0.0)}))
"""


def _ledger_run(url: str, procs: int, n: int) -> tuple[float, float, float, float]:
    """(reservations/s over all processes, p99 s, max latency s, max lock wait s)."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LEDGER_WORKER, url, str(n), f"bench-{procs}-{i}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for i in range(procs)
    ]  # fmt: skip
    for child in children:  # every worker imported, connected and warm before any starts
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n", "a ledger worker failed to start"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.close()
    out = []
    for child in children:
        assert child.stdout is not None
        out.append(json.loads(child.stdout.read()))
        child.stdout.close()
        assert child.wait() == 0, "a ledger worker failed"
    rate = procs * n / max(o["total"] for o in out)
    return (rate, max(o["lat"] for o in out), max(o["max"] for o in out),
            max(o["waited"] for o in out))  # fmt: skip


def ledger_sqlite(tmp: str) -> None:
    """All-scope reservations on one SQLite file against a bare conditional UPDATE."""
    import sqlite3

    path = os.path.join(tmp, "bare.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE b (id TEXT PRIMARY KEY, used INT, lim INT)")
    db.execute("INSERT INTO b VALUES ('x', 0, 1000000000000)")
    n = 2000 if CONFIG.quick else 10000
    t = time.perf_counter()
    for _ in range(n):
        db.execute("UPDATE b SET used = used + ? WHERE id = ? AND used + ? <= lim", (1, "x", 1))
    bare = n / (time.perf_counter() - t)
    db.close()
    url = f"sqlite:///{tmp}/ledger.db"
    one = _ledger_run(url, 1, n)
    rows.append(
        (
            "ledger: atomic all-scope reservations/s, SQLite, 1 process",
            f"bare conditional UPDATE {bare / 1000:.1f}k/s",
            f"{one[0] / 1000:.1f}k/s",
            f"{one[0] / bare:.2f}x; p99 {one[1] * 1000:.2f} ms (target >= 20k/s)",
        )
    )
    four = _ledger_run(url, 4, n // 2)
    rows.append(
        (
            "ledger: the same, 4 processes on one file",
            "-",
            f"{four[0] / 1000:.1f}k/s",
            f"p99 {four[1] * 1000:.2f} ms, max {four[2] * 1000:.1f} ms, longest lock wait "
            f"{four[3] * 1000:.1f} ms (target p99 <= 5 ms)",
        )
    )


def ledger_redis() -> None:
    """All-scope reservations in one Lua script against a bare EVALSHA, 1 and 4 clients."""
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        rows.append(("ledger: Redis", "-", "skipped", "no redis-server installed"))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        script = client.register_script(
            "local u = redis.call('HINCRBY', KEYS[1], 'used', 1)"
            " if u > tonumber(ARGV[1]) then redis.call('HINCRBY', KEYS[1], 'used', -1) return 0 end"
            " return 1"
        )
        n = 2000 if CONFIG.quick else 10000
        script(keys=["bare"], args=[10**12])
        t = time.perf_counter()
        for _ in range(n):
            script(keys=["bare"], args=[10**12])
        bare = n / (time.perf_counter() - t)
        client.close()
        url = f"redis://127.0.0.1:{port}/0"
        one = _ledger_run(url, 1, n)
        four = _ledger_run(url, 4, n // 2)
        rows.append(
            (
                "ledger: Redis, 1 client",
                f"bare EVALSHA {bare / 1000:.1f}k/s",
                f"{one[0] / 1000:.1f}k/s",
                f"p99 {one[1] * 1000:.2f} ms (target >= 5k/s)",
            )
        )
        rows.append(
            (
                "ledger: Redis, 4 clients",
                "-",
                f"{four[0] / 1000:.1f}k/s",
                f"p99 {four[1] * 1000:.2f} ms (target >= 12k/s)",
            )
        )
    finally:
        server.kill()
        server.wait()


def bench(tmp: str) -> None:
    """The area's rows, in the table's order."""
    ledger_sqlite(tmp)
    ledger_redis()
