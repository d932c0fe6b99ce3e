"""The SQLite ledger store: one file (WAL) shared by every supervise on the machine.

Each operation is one ``BEGIN IMMEDIATE`` transaction. Writers queue on ``flock`` of a side
file (``budget.db.lock``) before they begin, where SQLite's own busy handler sleeps up to
100 ms between tries and was measured starving a waiting writer for 0.7 s.  No wait is
unbounded: any process that can read the file can lock it (a jailed tree can read it), and
a supervisor waiting there enforces nothing, so after ``LOCK_WAIT`` seconds (the lock, or
SQLite's own locks) the operation fails with StoreUnavailable: a denial, never free spend.
``synchronous=NORMAL`` in WAL mode: a commit survives a crash of the process (what SPEC
asks: committed spend survives a supervisor crash); only an OS crash or power cut may lose
the last commits, never corrupt the file. Checkpoints (the only fsyncs) run after the write
lock is released, never inside another writer's wait.

Tables: ``scopes`` (used and held per agent and scope id: ``run:ID``, ``session:ID``,
``daily:2026-11-23``, ``monthly:2026-11``), ``reservations`` (durable holds with their
expiry and idempotency key; a hold's id is its row id, so a new one appends to the table's
last page) and ``events`` (the history, append-only: triggers refuse UPDATE and DELETE).
The rate window is 60 one-second buckets kept as ``rate:SECOND`` rows of ``scopes``, beside
the agent's other rows. A reservation is one UPDATE of every scope row that returns them
(checked in Python; a scope over its limit takes the hold back), one row in
``reservations`` and its open-holds index, one event: about four 1 KiB WAL frames, which
is what its COMMIT costs. Amounts are integers (micro-USD).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

from supervisor.errors import StoreUnavailable

__all__ = ["SQLiteStore"]

_SCHEMA = """
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
_HOLD_COLUMNS = (
    "id, agent, run_id, session, key, state, scopes, calls, tokens, usd, est_calls, est_tokens,"
    " est_usd, charged_calls, charged_tokens, charged_usd, model, provider, label,"
    " price_source, created, expires"
)
_INSERT_HOLD = f"INSERT INTO reservations ({_HOLD_COLUMNS}) VALUES ({', '.join('?' * 22)})"
_BY_KEY = "SELECT id, usd, tokens, expires FROM reservations WHERE agent = ? AND key = ?"
_MARKS = [", ".join("?" * n) for n in range(8)]
_WINDOW = 60.0
_CHECKPOINT_EVERY = 250  # commits of this process (~1000 WAL pages), or a second, whichever first
# Expired holds are swept (charged their estimate, freed) at most this often per process
# on the reserve path, and always before a denial and in usage(): until then an expired hold
# only holds more than it will cost, so sweeping late never grants what sweeping early denies.
_SWEEP_EVERY = 1.0
LOCK_WAIT = 2.0  # seconds: longest wait for the write lock (the Redis store's timeout too)
_KEEP_FINISHED = 7 * 86400.0  # finished holds answer idempotent retries this long


def _over(
    scopes: list[tuple[str, list[int | None]]], rows: dict[str, tuple[int, ...]], amount: list[int]
) -> tuple[str, int, int, int, int] | None:
    """(scope, limit index, used, held before, limit) of the first scope over a limit."""
    for sid, limits in scopes:
        row = rows[sid]
        for i, limit in enumerate(limits):
            if limit is not None and row[i] + row[i + 3] > limit:
                return sid, i, row[i], row[i + 3] - amount[i], limit
    return None


class SQLiteStore:
    """A ledger store in one SQLite file; safe for many processes and threads."""

    def __init__(self, url: str, path: str) -> None:
        self.url, self.path = url, os.path.abspath(path)
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing the fd
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._in_batch = False
        self._commits = 0  # commits since this process last checkpointed
        self._checkpointed = time.monotonic()
        self.waited_max = 0.0  # the longest wait for the write lock, seconds (for the bench)
        self._swept = 0  # the second before which this process last deleted rate buckets
        self._swept_at = -_SWEEP_EVERY  # when this process last expired holds (store clock)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            self._lock_fd = os.open(
                self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT
            )
            self._db.execute("PRAGMA synchronous=NORMAL")
            # SQLite would checkpoint (copy the WAL into the file, fsync) inside the COMMIT that
            # fills the WAL, while this process holds the write lock: every writer then waits
            # for the fsync (~12 ms measured). We checkpoint after releasing the lock instead.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            if not self._has_schema():
                self._lock()
                try:
                    self._db.executescript(_SCHEMA)  # its own transaction; IF NOT EXISTS
                    self._db.execute("PRAGMA journal_mode=WAL")  # a no-op if it is already
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            with self._transaction():
                self._db.execute(
                    # Never the newest row: its id + 1 is the next id, and ids are not reused.
                    "DELETE FROM reservations WHERE state != 'open' AND expires < ?"
                    " AND id < (SELECT max(id) FROM reservations)",
                    (time.time() - _KEEP_FINISHED,),
                )
        except (OSError, sqlite3.Error) as error:
            self.close()
            why = getattr(error, "strerror", None) or str(error)
            raise StoreUnavailable(
                url, f"cannot open {self.path}: {why}", hint="check the path and its permissions"
            ) from None

    def _has_schema(self) -> bool:
        assert self._db is not None
        row = self._db.execute(
            # The newest object of the schema: a file made by an older version gets the rest.
            "SELECT count(*) FROM sqlite_master WHERE name = 'runs'"
        ).fetchone()
        return bool(row[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The write lock (threads, then processes in kernel order) and BEGIN IMMEDIATE."""
        db = self._db
        if db is None:
            raise StoreUnavailable(self.url, "the store is closed")
        if self._in_batch:
            yield db
            return
        with self._thread_lock:
            waited = self._lock()
            if waited > self.waited_max:
                self.waited_max = waited
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except sqlite3.Error as error:
                raise StoreUnavailable(self.url, f"SQLite: {error}") from None
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._commits += 1
        if self._commits >= _CHECKPOINT_EVERY or time.monotonic() - self._checkpointed > 1.0:
            self._checkpoint()

    def _lock(self) -> float:
        """flock(LOCK_EX) of the lock file within LOCK_WAIT; the seconds waited.

        Uncontended, one syscall.  Contended, it polls (0.1 ms, doubling to 1 ms): a
        blocking flock cannot time out, and its holder may be a hostile process that
        never lets go.
        """
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return 0.0
        except BlockingIOError:
            pass
        start = time.perf_counter()
        delay = 0.0001
        while True:
            time.sleep(delay)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return time.perf_counter() - start
            except BlockingIOError:
                if time.perf_counter() - start >= LOCK_WAIT:
                    raise StoreUnavailable(
                        self.url,
                        f"{self.path}.lock was held for more than {LOCK_WAIT:g} s",
                        hint="a process holds the ledger's lock: find it with fuser",
                    ) from None
                delay = min(2 * delay, 0.001)

    def _checkpoint(self) -> None:
        """Copy the WAL into the file outside the write lock (PASSIVE: it waits for no one)."""
        self._commits, self._checkpointed = 0, time.monotonic()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):  # busy: another process is at it; later
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many operations in one transaction (bulk imports, tests): all or none."""
        with self._transaction():
            self._in_batch = True
            try:
                yield
            finally:
                self._in_batch = False

    def time(self) -> float:
        return time.time()

    # --- helpers, inside a transaction --------------------------------------------------------

    @staticmethod
    def _event(
        db: sqlite3.Connection, now: float, kind: str, op: dict[str, Any], **kw: Any
    ) -> None:
        event = op.get("event") or {}
        amount = kw.get("amount") or (None, None, None)
        db.execute(
            _INSERT_EVENT,
            (
                now, kind, op["agent"], kw.get("run_id", op.get("run_id")),
                kw.get("session", op.get("session")), kw.get("hold_id", op.get("hold_id")),
                op.get("key"), kw.get("scope"), *amount,
                *(kw.get(name, event.get(name)) for name in _EVENT_FIELDS),
                json.dumps(kw["detail"], sort_keys=True) if kw.get("detail") else None,
            ),
        )  # fmt: skip

    @staticmethod
    def _rows(db: sqlite3.Connection, agent: str, sids: list[str]) -> dict[str, list[int]]:
        marks = ", ".join("?" * len(sids))
        found = db.execute(
            "SELECT id, calls_used, tokens_used, usd_used, calls_held, tokens_held, usd_held"
            f" FROM scopes WHERE agent = ? AND id IN ({marks})",
            (agent, *sids),
        ).fetchall()
        rows = {row[0]: list(row[1:]) for row in found}
        missing = [sid for sid in sids if sid not in rows]
        if missing:
            db.executemany(
                "INSERT OR IGNORE INTO scopes (agent, id) VALUES (?, ?)",
                [(agent, sid) for sid in missing],
            )
            rows.update({sid: [0] * 6 for sid in missing})
        return rows

    @staticmethod
    def _add(db: sqlite3.Connection, agent: str, sids: list[str], used: Any, held: Any) -> None:
        marks = ", ".join("?" * len(sids))
        db.execute(
            "UPDATE scopes SET calls_used = calls_used + ?, tokens_used = tokens_used + ?,"
            " usd_used = usd_used + ?, calls_held = calls_held + ?,"
            f" tokens_held = tokens_held + ?, usd_held = usd_held + ?"
            f" WHERE agent = ? AND id IN ({marks})",
            (*used, *held, agent, *sids),
        )

    def _expire(self, db: sqlite3.Connection, agent: str, now: float) -> None:
        """Holds past their expiry: freed, and charged at their input estimate."""
        self._swept_at = now
        due = db.execute(
            "SELECT id, run_id, session, scopes, calls, tokens, usd, est_calls, est_tokens, est_usd"
            " FROM reservations WHERE agent = ? AND state = 'open' AND expires <= ?",
            (agent, now),
        ).fetchall()
        for hid, run_id, session, scopes, *amounts in due:
            held, est = amounts[:3], amounts[3:]
            self._add(db, agent, json.loads(scopes), est, [-x for x in held])
            db.execute(
                "UPDATE reservations SET state = 'expired', charged_calls = ?, charged_tokens = ?,"
                " charged_usd = ? WHERE id = ?",
                (*est, hid),
            )
            op = {"agent": agent, "run_id": run_id, "session": session}
            self._event(db, now, "expire", op, hold_id=str(hid), amount=est)

    def _hold_row(
        self, db: sqlite3.Connection, agent: str, hold_id: str | int
    ) -> dict[str, Any] | None:
        if isinstance(hold_id, str):
            # Ours are row ids, written as str(id): not "01", "+1" or "\u0661" (an Arabic
            # one, which isdigit() and int() take), so that an id names one hold, as in Redis.
            if not (hold_id.isascii() and hold_id.isdigit()) or len(hold_id) > 18:
                return None
            if hold_id != str(int(hold_id)):
                return None
            hold_id = int(hold_id)
        row = db.execute(
            f"SELECT {_HOLD_COLUMNS} FROM reservations WHERE id = ? AND agent = ?", (hold_id, agent)
        ).fetchone()
        if row is None:
            return None
        hold = dict(zip(_HOLD_COLUMNS.replace(" ", "").split(","), row, strict=True))
        hold["hold_id"] = str(hold["id"])
        return hold

    # --- operations --------------------------------------------------------------------------

    def reserve(self, op: dict[str, Any]) -> dict[str, Any]:
        agent, amount = op["agent"], op["amount"]
        sids = [sid for sid, _ in op["scopes"]]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            swept = not self._swept_at <= now < self._swept_at + _SWEEP_EVERY
            if swept:
                self._expire(db, agent, now)
            if op["key"] is not None:
                row = db.execute(_BY_KEY, (agent, op["key"])).fetchone()
                if row is not None:
                    return {"verdict": "replay", "hold_id": str(row[0]), "usd": row[1],
                            "tokens": row[2], "expires": row[3]}  # fmt: skip
            # Hold first, check after: one UPDATE adds the amount to every scope and returns
            # the rows; a scope over its limit takes it back (the deny path, rarer).
            rows = self._hold_rows(db, agent, sids, amount)
            over = _over(op["scopes"], rows, amount)
            if over is not None and not swept:
                # Expired holds may be what fills a scope: expire them, then look again.
                self._add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                self._expire(db, agent, now)
                rows = self._hold_rows(db, agent, sids, amount)
                over = _over(op["scopes"], rows, amount)
            if over is not None:
                self._add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                sid, i, used, held, limit = over
                detail = {"limit": i, "used": used, "held": held}
                self._event(db, now, "deny", op, scope=sid, amount=amount, detail=detail)
                return {"verdict": "deny", "scope": sid, "limit": i, "used": used,
                        "held": held, "limit_value": limit}  # fmt: skip
            rate = op["rate"]
            if rate[0] is not None or rate[1] is not None:
                denied = self._rate_check(db, agent, now, rate, amount[1])
                if denied is not None:
                    self._add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                    self._event(db, now, "deny", op, scope="rate", amount=amount, detail=denied)
                    return {"verdict": "rate", **denied}
            expires = now + op["ttl"]
            event = op["event"]
            hold_id = str(db.execute(
                _INSERT_HOLD,
                (
                    None, agent, op["run_id"], op["session"], op["key"], "open",
                    json.dumps(sids), *amount, *op["estimate"], 0, 0, 0,
                    event["model"], event["provider"], event["label"],
                    event["price_source"], now, expires,
                ),
            ).lastrowid)  # fmt: skip
            self._rate_add(db, agent, now, 1, amount[1])
            self._event(db, now, "grant", op, hold_id=hold_id, amount=amount)
            return {"verdict": "grant", "hold_id": hold_id, "usd": amount[2],
                    "tokens": amount[1], "expires": expires}  # fmt: skip

    @staticmethod
    def _hold_rows(
        db: sqlite3.Connection, agent: str, sids: list[str], amount: list[int]
    ) -> dict[str, tuple[int, ...]]:
        """Add ``amount`` to the held columns of every scope; the rows after (created if new)."""
        marks = _MARKS[len(sids)]
        rows = {
            row[0]: row[1:]
            for row in db.execute(
                "UPDATE scopes SET calls_held = calls_held + ?, tokens_held = tokens_held + ?,"
                f" usd_held = usd_held + ? WHERE agent = ? AND id IN ({marks}) RETURNING id,"
                " calls_used, tokens_used, usd_used, calls_held, tokens_held, usd_held",
                (*amount, agent, *sids),
            )
        }
        if len(rows) < len(sids):
            new = [sid for sid in sids if sid not in rows]
            db.executemany(
                "INSERT INTO scopes (agent, id, calls_held, tokens_held, usd_held)"
                " VALUES (?, ?, ?, ?, ?)",
                [(agent, sid, *amount) for sid in new],
            )
            rows.update((sid, (0, 0, 0, *amount)) for sid in new)
        return rows

    @staticmethod
    def _rate_add(db: sqlite3.Connection, agent: str, when: float, calls: int, tokens: int) -> None:
        db.execute(
            "INSERT INTO scopes (agent, id, calls_used, tokens_used) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET calls_used = calls_used + excluded.calls_used,"
            " tokens_used = max(0, tokens_used + excluded.tokens_used)",
            (agent, f"rate:{int(when):011d}", calls, tokens),
        )

    def _drop_old_buckets(self, db: sqlite3.Connection, agent: str, now: float) -> int:
        """The window's first second; buckets older than a minute go now and then."""
        oldest = int(now) - int(_WINDOW) + 1
        if oldest - self._swept > _WINDOW:
            db.execute(
                "DELETE FROM scopes WHERE agent = ? AND id >= 'rate:' AND id < ?",
                (agent, f"rate:{oldest:011d}"),
            )
            self._swept = oldest
        return oldest

    def _window(self, db: sqlite3.Connection, agent: str, now: float) -> list[tuple[int, int, int]]:
        """(second, calls, tokens) of the last minute, oldest first; old buckets go now and then."""
        oldest = self._drop_old_buckets(db, agent, now)
        found = db.execute(
            "SELECT id, calls_used, tokens_used FROM scopes WHERE agent = ? AND id >= ?"
            " AND id < 'rate;'",
            (agent, f"rate:{oldest:011d}"),
        ).fetchall()
        return [(int(sid[5:]), calls, tokens) for sid, calls, tokens in found]

    def _rate_check(
        self, db: sqlite3.Connection, agent: str, now: float, rate: list[int | None], tokens: int
    ) -> dict[str, Any] | None:
        oldest = self._drop_old_buckets(db, agent, now)
        calls, held = db.execute(
            "SELECT coalesce(sum(calls_used), 0), coalesce(sum(tokens_used), 0) FROM scopes"
            " WHERE agent = ? AND id >= ? AND id < 'rate;'",
            (agent, f"rate:{oldest:011d}"),
        ).fetchone()
        if (rate[0] is None or calls + 1 <= rate[0]) and (
            rate[1] is None or held + tokens <= rate[1]
        ):
            return None
        window = self._window(db, agent, now)  # the denial says when to retry: the buckets
        for index, need, limit in ((0, 1, rate[0]), (1, tokens, rate[1])):
            used = sum(bucket[index + 1] for bucket in window)
            if limit is None or used + need <= limit:
                continue
            # Wait until enough of the window's oldest seconds have left it.
            freed, retry = 0, _WINDOW
            for bucket in window:
                freed += bucket[index + 1]
                if used - freed + need <= limit:
                    retry = bucket[0] + _WINDOW - now
                    break
            return {"limit": index, "used": used, "limit_value": limit,
                    "retry_after": max(retry, 0.001)}  # fmt: skip
        return None

    def hold(self, op: dict[str, Any]) -> dict[str, Any] | None:
        with self._transaction() as db:
            return self._hold_row(db, op["agent"], op["hold_id"])

    def _finish(self, db: sqlite3.Connection, hold: dict[str, Any], charged: list[int]) -> Any:
        """Rows after the hold's scopes were freed and charged ``charged``; the delta."""
        sids = json.loads(hold["scopes"])
        already = [hold["charged_calls"], hold["charged_tokens"], hold["charged_usd"]]
        held = [hold["calls"], hold["tokens"], hold["usd"]] if hold["state"] == "open" else [0] * 3
        delta = [c - a for c, a in zip(charged, already, strict=True)]
        self._add(db, hold["agent"], sids, delta, [-x for x in held])
        return self._rows(db, hold["agent"], sids), delta

    def commit(self, op: dict[str, Any]) -> dict[str, Any]:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            hold = self._hold_row(db, agent, op["hold_id"])
            if hold is None:
                return {"missing": True}
            if hold["state"] in ("committed", "recorded"):
                sids = json.loads(hold["scopes"])
                return {"usd": hold["charged_usd"], "tokens": hold["charged_tokens"],
                        "delta": [0, 0, 0], "scopes": self._rows(db, agent, sids),
                        "price_source": hold["price_source"], "replayed": True}  # fmt: skip
            amount = op["amount"]
            rows, delta = self._finish(db, hold, amount)
            db.execute(
                "UPDATE reservations SET state = 'committed', charged_calls = ?,"
                " charged_tokens = ?, charged_usd = ?, price_source = ? WHERE id = ?",
                (*amount, op["event"]["price_source"], hold["id"]),
            )
            if hold["state"] == "open":  # the window counts what was used, not the worst case
                self._rate_add(db, agent, hold["created"], 0, amount[1] - hold["tokens"])
            op = {**op, "run_id": hold["run_id"], "session": hold["session"], "key": hold["key"],
                  "hold_id": hold["hold_id"]}  # fmt: skip
            self._event(db, now, "commit", op, amount=amount, model=hold["model"],
                        provider=hold["provider"], label=hold["label"],
                        detail={"delta": delta, "was": hold["state"]})  # fmt: skip
            return {"usd": amount[2], "tokens": amount[1], "delta": delta, "scopes": rows,
                    "price_source": op["event"]["price_source"]}  # fmt: skip

    def record(self, op: dict[str, Any]) -> dict[str, Any]:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            if op["key"] is not None:
                row = db.execute(
                    "SELECT id FROM reservations WHERE agent = ? AND key = ?", (agent, op["key"])
                ).fetchone()
                if row is not None:
                    hold = self._hold_row(db, agent, row[0])
                    assert hold is not None
                    return {"usd": hold["charged_usd"], "tokens": hold["charged_tokens"],
                            "delta": [0, 0, 0], "replayed": True,
                            "scopes": self._rows(db, agent, json.loads(hold["scopes"])),
                            "price_source": hold["price_source"]}  # fmt: skip
            sids = [sid for sid, _ in op["scopes"]]
            amount = op["amount"]
            self._rows(db, agent, sids)
            self._add(db, agent, sids, amount, (0, 0, 0))
            event = op["event"]
            hold_id = db.execute(
                _INSERT_HOLD,
                (
                    None, agent, op["run_id"], op["session"], op["key"], "recorded",
                    json.dumps(sids), 0, 0, 0, 0, 0, 0, *amount, event["model"],
                    event["provider"], event["label"], event["price_source"], now, now,
                ),
            ).lastrowid  # fmt: skip
            self._rate_add(db, agent, now, 1, amount[1])
            self._event(db, now, "record", op, hold_id=str(hold_id), amount=amount)
            return {"usd": amount[2], "tokens": amount[1], "delta": list(amount),
                    "scopes": self._rows(db, agent, sids),
                    "price_source": event["price_source"]}  # fmt: skip

    def release(self, op: dict[str, Any]) -> dict[str, Any]:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            hold = self._hold_row(db, agent, op["hold_id"])
            if hold is None:
                return {"missing": True}
            if hold["state"] not in ("open", "expired", "settled"):
                return {}  # committed, recorded or released already: nothing to free
            self._finish(db, hold, [0, 0, 0])
            db.execute(
                "UPDATE reservations SET state = 'released', charged_calls = 0, charged_tokens = 0,"
                " charged_usd = 0 WHERE id = ?",
                (hold["id"],),
            )
            if hold["state"] == "open":
                self._rate_add(db, agent, hold["created"], 0, -hold["tokens"])
            op = {**op, "run_id": hold["run_id"], "session": hold["session"],
                  "hold_id": hold["hold_id"]}  # fmt: skip
            self._event(db, now, "release", op, detail={"was": hold["state"]})
            return {}

    def usage(self, op: dict[str, Any]) -> dict[str, Any]:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            self._expire(db, agent, now)
            rows = self._rows(db, agent, op["scopes"]) if op["scopes"] else {}
            window = self._window(db, agent, now)
            calls, tokens = sum(b[1] for b in window), sum(b[2] for b in window)
            return {"scopes": rows, "rate": [calls, tokens]}

    def settle_open(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        agent = op["agent"]
        settled = []
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            ids = db.execute(
                "SELECT id FROM reservations WHERE run_id = ? AND agent = ? AND state = 'open'",
                (op["run_id"], agent),
            ).fetchall()
            for (hold_id,) in ids:
                hold = self._hold_row(db, agent, hold_id)
                assert hold is not None
                est = [hold["est_calls"], hold["est_tokens"], hold["est_usd"]]
                self._finish(db, hold, est)
                db.execute(
                    "UPDATE reservations SET state = 'settled', charged_calls = ?,"
                    " charged_tokens = ?, charged_usd = ? WHERE id = ?",
                    (*est, hold_id),
                )
                self._event(db, now, "settle", {**op, "session": hold["session"]},
                            hold_id=hold["hold_id"], amount=est, model=hold["model"],
                            provider=hold["provider"], label=hold["label"])  # fmt: skip
                settled.append({"hold_id": hold["hold_id"], "usd": est[2], "tokens": est[1],
                                "model": hold["model"], "label": hold["label"]})  # fmt: skip
        return settled

    def reset(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        agent, prefix = op["agent"], op["prefix"]
        with self._transaction() as db:
            now = time.time()
            found = db.execute(
                "SELECT id, calls_used, tokens_used, usd_used FROM scopes WHERE agent = ?"
                " AND (? IS NULL OR substr(id, 1, length(?)) = ?) ORDER BY id",
                (agent, prefix, prefix, prefix),
            ).fetchall()
            done = []
            for sid, calls, tokens, usd in found:
                if not (calls or tokens or usd):
                    continue
                self._event(db, now, "reset", {"agent": agent}, scope=sid,
                            amount=(calls, tokens, usd))  # fmt: skip
                db.execute(
                    "UPDATE scopes SET calls_used = 0, tokens_used = 0, usd_used = 0"
                    " WHERE agent = ? AND id = ?",
                    (agent, sid),
                )
                done.append({"scope": sid, "calls": calls, "tokens": tokens, "usd": usd})
            return done

    def add_run(self, op: dict[str, Any]) -> None:
        """Note a live run and its owner (the supervisor: host, boot, pid, start time)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (agent, run_id, owner) VALUES (?, ?, ?)",
                (op["agent"], op["run_id"], json.dumps(op["owner"], sort_keys=True)),
            )

    def forget_run(self, op: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM runs WHERE agent = ? AND run_id = ?", (op["agent"], op["run_id"])
            )

    def runs(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        """The runs of an agent noted live: [{run_id, owner}]."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT run_id, owner FROM runs WHERE agent = ?", (op["agent"],)
            ).fetchall()
        return [{"run_id": run_id, "owner": json.loads(owner)} for run_id, owner in found]

    def events(self, agent: str | None = None) -> list[dict[str, Any]]:
        """The history, oldest first (for tests, reports and re-pricing)."""
        assert self._db is not None
        cursor = self._db.execute(
            "SELECT * FROM events WHERE ? IS NULL OR agent = ? ORDER BY seq", (agent, agent)
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
