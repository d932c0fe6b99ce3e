"""The SQLite store's tables and the statements every operation shares, inside a transaction.

Tables: ``scopes`` (used and held per agent and scope id: ``run:ID``, ``session:ID``,
``daily:2026-11-23``, ``monthly:2026-11``; the rate window's ``rate:SECOND`` buckets too),
``reservations`` (durable holds with their expiry and idempotency key; a hold's id is its
row id, so a new one appends to the table's last page) and ``events`` (the history,
append-only: triggers refuse UPDATE and DELETE). A file made by an older version gets the
tables it lacks (``IF NOT EXISTS``). Amounts are integers (micro-USD).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import cast

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypedDict

    from supervisor.budget._store import HoldState, Row, ScopeLimits, Triple

    class HoldRow(TypedDict):
        """A row of ``reservations``, and its id as the ledger sees it (text)."""

        id: int
        hold_id: str
        agent: str
        run_id: str
        session: str | None
        key: str | None
        state: HoldState
        scopes: str  # the scope ids, JSON
        calls: int  # held
        tokens: int
        usd: int
        est_calls: int  # charged if it expires or is settled
        est_tokens: int
        est_usd: int
        charged_calls: int
        charged_tokens: int
        charged_usd: int
        model: str
        provider: str | None
        label: str | None
        price_source: str
        created: float
        expires: float


__all__ = [
    "BY_KEY", "HOLD_COLUMNS", "INSERT_HOLD", "SCHEMA", "add", "add_event", "expire", "finish",
    "hold_row", "hold_rows", "over", "rows",
]  # fmt: skip

SCHEMA = """
PRAGMA page_size = 1024;
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS scopes (
    agent TEXT NOT NULL, id TEXT NOT NULL,
    calls_used INTEGER NOT NULL DEFAULT 0, tokens_used INTEGER NOT NULL DEFAULT 0,
    usd_used INTEGER NOT NULL DEFAULT 0, calls_held INTEGER NOT NULL DEFAULT 0,
    tokens_held INTEGER NOT NULL DEFAULT 0, usd_held INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY, agent TEXT NOT NULL, run_id TEXT, session TEXT, key TEXT,
    state TEXT NOT NULL, scopes TEXT NOT NULL,
    calls INTEGER NOT NULL, tokens INTEGER NOT NULL, usd INTEGER NOT NULL,
    est_calls INTEGER NOT NULL, est_tokens INTEGER NOT NULL, est_usd INTEGER NOT NULL,
    charged_calls INTEGER NOT NULL DEFAULT 0, charged_tokens INTEGER NOT NULL DEFAULT 0,
    charged_usd INTEGER NOT NULL DEFAULT 0,
    model TEXT, provider TEXT, label TEXT, price_source TEXT,
    created REAL NOT NULL, expires REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS reservations_key ON reservations (agent, key)
    WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (agent, expires)
    WHERE state = 'open';
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL,
    agent TEXT NOT NULL, run_id TEXT, session TEXT, hold_id TEXT, key TEXT, scope TEXT,
    calls INTEGER, tokens INTEGER, usd INTEGER, model TEXT, provider TEXT, label TEXT,
    input_tokens INTEGER, output_tokens INTEGER, cached_input_tokens INTEGER,
    cache_write_tokens INTEGER, reasoning_tokens INTEGER,
    price_source TEXT, price_version TEXT, detail TEXT);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the ledger history is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the ledger history is append-only'); END;
CREATE TABLE IF NOT EXISTS runs (
    agent TEXT NOT NULL, run_id TEXT NOT NULL, owner TEXT NOT NULL,
    PRIMARY KEY (agent, run_id)) WITHOUT ROWID;
"""
_EVENT_FIELDS = (
    "model", "provider", "label", "input_tokens", "output_tokens", "cached_input_tokens",
    "cache_write_tokens", "reasoning_tokens", "price_source", "price_version",
)  # fmt: skip
_INSERT_EVENT = (
    "INSERT INTO events (ts, kind, agent, run_id, session, hold_id, key, scope, calls, tokens,"
    f" usd, {', '.join(_EVENT_FIELDS)}, detail) VALUES ({', '.join('?' * 22)})"
)
HOLD_COLUMNS = (
    "id, agent, run_id, session, key, state, scopes, calls, tokens, usd, est_calls, est_tokens,"
    " est_usd, charged_calls, charged_tokens, charged_usd, model, provider, label,"
    " price_source, created, expires"
)
_HOLD_NAMES = HOLD_COLUMNS.replace(" ", "").split(",")
INSERT_HOLD = f"INSERT INTO reservations ({HOLD_COLUMNS}) VALUES ({', '.join('?' * 22)})"
BY_KEY = "SELECT id, usd, tokens, expires FROM reservations WHERE agent = ? AND key = ?"
_MARKS = [", ".join("?" * n) for n in range(8)]
_NO_FIELDS: Mapping[str, object] = {}


def over(
    scopes: list[ScopeLimits], rows: dict[str, tuple[int, ...]], amount: Triple
) -> tuple[str, int, int, int, int] | None:
    """(scope, limit index, used, held before, limit) of the first scope over a limit."""
    for sid, limits in scopes:
        row = rows[sid]
        for i, limit in enumerate(limits):
            if limit is not None and row[i] + row[i + 3] > limit:
                return sid, i, row[i], row[i + 3] - amount[i], limit
    return None


def add_event(
    db: sqlite3.Connection,
    now: float,
    kind: str,
    agent: str,
    *,
    run_id: str | None = None,
    session: str | None = None,
    hold_id: str | None = None,
    key: str | None = None,
    scope: str | None = None,
    amount: Triple | tuple[int, int, int] | None = None,
    fields: Mapping[str, object] = _NO_FIELDS,  # the call's: model, tokens, price source...
    detail: Mapping[str, object] | None = None,
) -> None:
    """Append one event to the history."""
    db.execute(
        _INSERT_EVENT,
        (
            now, kind, agent, run_id, session, hold_id, key, scope, *(amount or (None,) * 3),
            *(fields.get(name) for name in _EVENT_FIELDS),
            json.dumps(detail, sort_keys=True) if detail else None,
        ),
    )  # fmt: skip


def rows(db: sqlite3.Connection, agent: str, sids: list[str]) -> dict[str, Row]:
    """The rows of these scopes (created, zero, if new)."""
    marks = ", ".join("?" * len(sids))
    found = db.execute(
        "SELECT id, calls_used, tokens_used, usd_used, calls_held, tokens_held, usd_held"
        f" FROM scopes WHERE agent = ? AND id IN ({marks})",
        (agent, *sids),
    ).fetchall()
    result: dict[str, Row] = {row[0]: list(row[1:]) for row in found}
    missing = [sid for sid in sids if sid not in result]
    if missing:
        db.executemany(
            "INSERT OR IGNORE INTO scopes (agent, id) VALUES (?, ?)",
            [(agent, sid) for sid in missing],
        )
        result.update({sid: [0] * 6 for sid in missing})
    return result


def add(
    db: sqlite3.Connection,
    agent: str,
    sids: list[str],
    used: Triple | tuple[int, int, int],
    held: Triple | tuple[int, int, int],
) -> None:
    """Add ``used`` and ``held`` to every scope's counters."""
    marks = ", ".join("?" * len(sids))
    db.execute(
        "UPDATE scopes SET calls_used = calls_used + ?, tokens_used = tokens_used + ?,"
        " usd_used = usd_used + ?, calls_held = calls_held + ?,"
        f" tokens_held = tokens_held + ?, usd_held = usd_held + ?"
        f" WHERE agent = ? AND id IN ({marks})",
        (*used, *held, agent, *sids),
    )


def hold_rows(
    db: sqlite3.Connection, agent: str, sids: list[str], amount: Triple
) -> dict[str, tuple[int, ...]]:
    """Add ``amount`` to the held columns of every scope; the rows after (created if new)."""
    marks = _MARKS[len(sids)]
    found = {
        row[0]: row[1:]
        for row in db.execute(
            "UPDATE scopes SET calls_held = calls_held + ?, tokens_held = tokens_held + ?,"
            f" usd_held = usd_held + ? WHERE agent = ? AND id IN ({marks}) RETURNING id,"
            " calls_used, tokens_used, usd_used, calls_held, tokens_held, usd_held",
            (*amount, agent, *sids),
        )
    }
    if len(found) < len(sids):
        new = [sid for sid in sids if sid not in found]
        db.executemany(
            "INSERT INTO scopes (agent, id, calls_held, tokens_held, usd_held)"
            " VALUES (?, ?, ?, ?, ?)",
            [(agent, sid, *amount) for sid in new],
        )
        found.update((sid, (0, 0, 0, *amount)) for sid in new)
    return found


def expire(db: sqlite3.Connection, agent: str, now: float) -> None:
    """Holds past their expiry: freed, and charged at their input estimate."""
    due = db.execute(
        "SELECT id, run_id, session, scopes, calls, tokens, usd, est_calls, est_tokens, est_usd"
        " FROM reservations WHERE agent = ? AND state = 'open' AND expires <= ?",
        (agent, now),
    ).fetchall()
    for hid, run_id, session, scopes, *amounts in due:
        held, est = amounts[:3], amounts[3:]
        add(db, agent, json.loads(scopes), est, [-x for x in held])
        db.execute(
            "UPDATE reservations SET state = 'expired', charged_calls = ?, charged_tokens = ?,"
            " charged_usd = ? WHERE id = ?",
            (*est, hid),
        )
        add_event(
            db, now, "expire", agent, run_id=run_id, session=session, hold_id=str(hid), amount=est
        )


def hold_row(db: sqlite3.Connection, agent: str, hold_id: str | int) -> HoldRow | None:
    """The agent's hold of this id, or None."""
    if isinstance(hold_id, str):
        # Ours are row ids, written as str(id): not "01", "+1" or "\u0661" (an Arabic
        # one, which isdigit() and int() take), so that an id names one hold, as in Redis.
        if not (hold_id.isascii() and hold_id.isdigit()) or len(hold_id) > 18:
            return None
        if hold_id != str(int(hold_id)):
            return None
        hold_id = int(hold_id)
    row = db.execute(
        f"SELECT {HOLD_COLUMNS} FROM reservations WHERE id = ? AND agent = ?", (hold_id, agent)
    ).fetchone()
    if row is None:
        return None
    hold = cast("HoldRow", dict(zip(_HOLD_NAMES, row, strict=True)))
    hold["hold_id"] = str(hold["id"])
    return hold


def finish(db: sqlite3.Connection, hold: HoldRow, charged: Triple) -> tuple[dict[str, Row], Triple]:
    """Rows after the hold's scopes were freed and charged ``charged``; the delta."""
    sids = json.loads(hold["scopes"])
    already = [hold["charged_calls"], hold["charged_tokens"], hold["charged_usd"]]
    held = [hold["calls"], hold["tokens"], hold["usd"]] if hold["state"] == "open" else [0] * 3
    delta = [c - a for c, a in zip(charged, already, strict=True)]
    add(db, hold["agent"], sids, delta, [-x for x in held])
    return rows(db, hold["agent"], sids), delta
