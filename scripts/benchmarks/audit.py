"""The audit log (append, verify, summary) and ``supervise report``."""

from __future__ import annotations

import os

from ._common import CONFIG, median_ms, rows


def audit_append(tmp: str) -> None:
    """One durable audit line against a bare write + fsync of the same bytes; with rotation."""
    from supervisor.audit import AuditLog

    n = 100 if CONFIG.quick else 400
    line = b"x" * 420 + b"\n"  # about the size of a warning line
    fd = os.open(os.path.join(tmp, "bare.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def bare() -> None:
        os.write(fd, line)
        os.fsync(fd)

    base = median_ms(bare, n)
    os.close(fd)
    got: dict[str, float] = {}
    for name, size in (("plain", None), ("rotating", 64 << 10)):
        with AuditLog(os.path.join(tmp, f"{name}.jsonl"), max_size=size) as log:

            def append(log: AuditLog = log) -> None:
                log.append("warning", run_id="r", detail="x")

            got[name] = median_ms(append, n)
    rows.append(
        (
            "audit: one durable, chained line (append)",
            f"write + fsync {base:.3f} ms",
            f"{got['plain']:.3f} ms; rotating every 64 KiB {got['rotating']:.3f} ms",
            f"{got['plain'] / base:.2f}x, {got['rotating'] / base:.2f}x (median of {n})",
        )
    )


def audit_read(tmp: str) -> None:
    """verify and the summary over a 100k-line log, against hashing / parsing its lines bare."""
    import hashlib
    import json

    from supervisor import _audit_chain as chain
    from supervisor import audit
    from supervisor._audit_view import summarize

    path = os.path.join(tmp, "big.jsonl")
    n = 20_000 if CONFIG.quick else 100_000
    prev = audit.ZERO_HASH
    kinds = ("run_start", "warning", "violation", "run_end")
    with open(path, "wb") as f:  # the writer's exact lines, without 100k fsyncs
        for i in range(n):
            record = {
                "ts": "2026-12-01T00:00:00.000000Z", "seq": i, "run_id": f"r{i // 4}",
                "agent": f"agent-{i % 7}", "session": None, "event": kinds[i % 4],
                "limit": "memory" if i % 4 == 2 else None, "observed": i, "limit_value": 10,
                "unit": "bytes", "action": "kill", "prev": prev,
                "detail": {"usage": {"api_calls": 1, "usd": "0.001"}} if i % 4 == 3 else "x",
            }  # fmt: skip
            record["hash"] = prev = chain._hash(record)
            f.write(chain._canonical(record) + b"\n")

    def bare_hash() -> None:
        with open(path, "rb") as f:
            for raw in f:
                hashlib.sha256(raw).hexdigest()

    def bare_parse() -> None:
        with open(path, "rb") as f:
            for raw in f:
                json.loads(raw)

    rounds = 3 if CONFIG.quick else 5
    h = median_ms(bare_hash, rounds)
    v = median_ms(lambda: audit.verify(path), rounds)
    p = median_ms(bare_parse, rounds)
    s = median_ms(lambda: summarize(audit.read_events(path)), rounds)
    rows.append(
        (
            f"audit --verify, {n // 1000}k lines",
            f"sha256 of each line {h:.0f} ms",
            f"{v:.0f} ms ({n / v:.0f}k lines/s)",
            f"{v / h:.1f}x (it also parses, re-serializes and links each line)",
        )
    )
    rows.append(
        (
            f"audit summary (the default), {n // 1000}k lines",
            f"json.loads of each line {p:.0f} ms",
            f"{s:.0f} ms ({n / s:.0f}k lines/s)",
            f"{s / p:.2f}x",
        )
    )


def report_cost(tmp: str) -> None:
    """supervise report's replay of the ledger history against one bare GROUP BY."""
    import sqlite3

    from supervisor.budget._policy import BudgetPolicy
    from supervisor.budget.ledger import Ledger, open_store
    from supervisor.budget.sqlite import SQLiteStore
    from supervisor.report import breakdown, costs

    url = f"sqlite:///{tmp}/report.db"
    budget = BudgetPolicy.model_validate({"pricing": {"m": {"input": 1, "output": 2}}})
    n = 5_000 if CONFIG.quick else 20_000
    with Ledger.open(budget, run_id="r", agent="a", session="s", store=url) as ledger:
        store = ledger.store
        assert isinstance(store, SQLiteStore)  # batch() (one transaction) is SQLite's own
        with store.batch():
            for i in range(n):
                hold = ledger.reserve(model="m", input_tokens=100, label=f"step{i % 5}")
                ledger.commit(hold.id, input_tokens=100, output_tokens=i % 50)
    db = sqlite3.connect(f"{tmp}/report.db")

    def bare() -> None:
        db.execute(
            "SELECT label, count(*), sum(usd) FROM events WHERE kind = 'commit' GROUP BY label"
        ).fetchall()

    store = open_store(url)

    def report() -> None:
        charges = costs(store)
        for by in ("agent", "model", "label"):
            breakdown(charges, by)

    rounds = 3 if CONFIG.quick else 5
    b = median_ms(bare, rounds)
    r = median_ms(report, rounds)
    store.close()
    db.close()
    rows.append(
        (
            f"report by agent, model and label, {n // 1000}k calls ({2 * n // 1000}k events)",
            f"one SQL GROUP BY {b:.1f} ms",
            f"{r:.0f} ms",
            f"{r / b:.0f}x (replays every hold: expiries and late commits count once)",
        )
    )


def bench(tmp: str) -> None:
    """The area's rows, in the table's order."""
    audit_append(tmp)
    audit_read(tmp)
    report_cost(tmp)
