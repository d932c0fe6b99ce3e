"""The SQLite ledger store: one file (WAL) shared by every supervise on the machine.

Each operation is one ``BEGIN IMMEDIATE`` transaction. Writers queue on ``flock`` of a side
file (``budget.db.lock``) before they begin, where SQLite's own busy handler sleeps up to
100 ms between tries and was measured starving a waiting writer for 0.7 s.  No wait is
unbounded: any process that can read the file can lock it (a jailed tree can read it), and
a supervisor waiting there enforces nothing, so after ``LOCK_WAIT`` seconds held by the
run's own tree (``/proc/locks`` says who: ``_flock``), or SQLite's own locks, the operation
fails with StoreUnavailable: a denial, never free spend.  Other supervisors are waited for.
``synchronous=NORMAL`` in WAL mode: a commit survives a crash of the process (what SPEC
asks: committed spend survives a supervisor crash); only an OS crash or power cut may lose
the last commits, never corrupt the file. Checkpoints (the only fsyncs) run after the write
lock is released, never inside another writer's wait.

The tables and the statements shared by the operations are in ``_sqlite_sql.py``. A
reservation is one UPDATE of every scope row that returns them (checked in Python; a scope
over its limit takes the hold back), one row in ``reservations`` and its open-holds index,
one event: about four 1 KiB WAL frames, which is what its COMMIT costs. The rate window is
60 one-second buckets kept as ``rate:SECOND`` rows of ``scopes``, beside the agent's rows.
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
from typing import cast

from supervisor._flock import LockHeld, wait_flock
from supervisor.budget import _sqlite_sql as sql
from supervisor.budget._sqlite_rate import RateWindow, rate_add
from supervisor.budget._store import KEEP_FINISHED
from supervisor.errors import StoreUnavailable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from supervisor.budget._sqlite_sql import HoldRow
    from supervisor.budget._store import (
        AddRunOp,
        AgentOp,
        Charged,
        CommitOp,
        Event,
        HoldInfo,
        HoldOp,
        LiveRun,
        RecordOp,
        ReleaseOp,
        Reserved,
        ReserveOp,
        ResetOp,
        ResetScope,
        RunOp,
        SettledHold,
        SettleOp,
        UsageOp,
        UsageRows,
    )

__all__ = ["SQLiteStore"]

_CHECKPOINT_EVERY = 250  # commits of this process (~1000 WAL pages), or a second, whichever first
# Expired holds are swept (charged their estimate, freed) at most this often per process
# on the reserve path, and always before a denial and in usage(): until then an expired hold
# only holds more than it will cost, so sweeping late never grants what sweeping early denies.
_SWEEP_EVERY = 1.0
LOCK_WAIT = 2.0  # seconds: SQLite's own busy wait, and the Redis store's timeout


class SQLiteStore:
    """A ledger store in one SQLite file; safe for many processes and threads."""

    def __init__(self, url: str, path: str, *, make_dirs: bool = False) -> None:
        self.url, self.path = url, os.path.abspath(path)
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing the fd
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._in_batch = False
        self._commits = 0  # commits since this process last checkpointed
        self._checkpointed = time.monotonic()
        self.waited_max = 0.0  # the longest wait for the write lock, seconds (for the bench)
        self._rate = RateWindow()
        self._swept_at = -_SWEEP_EVERY  # when this process last expired holds (store clock)
        try:
            if make_dirs:
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
                    self._db.executescript(sql.SCHEMA)  # its own transaction; IF NOT EXISTS
                    self._db.execute("PRAGMA journal_mode=WAL")  # a no-op if it is already
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            with self._transaction():
                self._db.execute(
                    # Never the newest row: its id + 1 is the next id, and ids are not reused.
                    "DELETE FROM reservations WHERE state != 'open' AND expires < ?"
                    " AND id < (SELECT max(id) FROM reservations)",
                    (time.time() - KEEP_FINISHED,),
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
        """flock(LOCK_EX) of the lock file; the seconds waited (see ``_flock``: other
        supervisors are waited for, the run's own tree ``LOCK_WAIT``).

        Uncontended, one syscall.  Contended, it polls: a blocking flock cannot time out,
        and its holder may be a hostile process that never lets go.
        """
        try:
            return wait_flock(self._lock_fd)
        except LockHeld as held:
            raise StoreUnavailable(
                self.url, f"{self.path}.lock: {held.strerror}", hint=held.hint
            ) from None

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

    def _expire(self, db: sqlite3.Connection, agent: str, now: float) -> None:
        self._swept_at = now
        sql.expire(db, agent, now)

    # --- operations --------------------------------------------------------------------------

    def reserve(self, op: ReserveOp) -> Reserved:
        agent, amount = op["agent"], op["amount"]
        sids = [sid for sid, _ in op["scopes"]]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            swept = not self._swept_at <= now < self._swept_at + _SWEEP_EVERY
            if swept:
                self._expire(db, agent, now)
            if op["key"] is not None:
                row = db.execute(sql.BY_KEY, (agent, op["key"])).fetchone()
                if row is not None:
                    return {"verdict": "replay", "hold_id": str(row[0]), "usd": row[1],
                            "tokens": row[2], "expires": row[3]}  # fmt: skip
            # Hold first, check after: one UPDATE adds the amount to every scope and returns
            # the rows; a scope over its limit takes it back (the deny path, rarer).
            rows = sql.hold_rows(db, agent, sids, amount)
            over = sql.over(op["scopes"], rows, amount)
            if over is not None and not swept:
                # Expired holds may be what fills a scope: expire them, then look again.
                sql.add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                self._expire(db, agent, now)
                rows = sql.hold_rows(db, agent, sids, amount)
                over = sql.over(op["scopes"], rows, amount)
            if over is not None:
                sql.add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                sid, i, used, held, limit = over
                detail = {"limit": i, "used": used, "held": held}
                sql.add_event(db, now, "deny", agent, run_id=op["run_id"], session=op["session"],
                              hold_id=op["hold_id"], key=op["key"], scope=sid, amount=amount,
                              fields=op["event"], detail=detail)  # fmt: skip
                return {"verdict": "deny", "scope": sid, "limit": i, "used": used,
                        "held": held, "limit_value": limit}  # fmt: skip
            rate = op["rate"]
            if rate[0] is not None or rate[1] is not None:
                denied = self._rate.check(db, agent, now, rate, amount[1])
                if denied is not None:
                    sql.add(db, agent, sids, (0, 0, 0), [-x for x in amount])
                    why: dict[str, object] = {k: v for k, v in denied.items() if k != "verdict"}
                    sql.add_event(db, now, "deny", agent, run_id=op["run_id"],
                                  session=op["session"], hold_id=op["hold_id"], key=op["key"],
                                  scope="rate", amount=amount, fields=op["event"],
                                  detail=why)  # fmt: skip
                    return denied
            expires = now + op["ttl"]
            event = op["event"]
            hold_id = str(db.execute(
                sql.INSERT_HOLD,
                (
                    None, agent, op["run_id"], op["session"], op["key"], "open",
                    json.dumps(sids), *amount, *op["estimate"], 0, 0, 0,
                    event["model"], event["provider"], event["label"],
                    event["price_source"], now, expires,
                ),
            ).lastrowid)  # fmt: skip
            rate_add(db, agent, now, 1, amount[1])
            sql.add_event(db, now, "grant", agent, run_id=op["run_id"], session=op["session"],
                          hold_id=hold_id, key=op["key"], amount=amount, fields=event)  # fmt: skip
            return {"verdict": "grant", "hold_id": hold_id, "usd": amount[2],
                    "tokens": amount[1], "expires": expires}  # fmt: skip

    def hold(self, op: HoldOp) -> HoldInfo | None:
        with self._transaction() as db:
            return sql.hold_row(db, op["agent"], op["hold_id"])

    @staticmethod
    def _replay(db: sqlite3.Connection, hold: HoldRow) -> Charged:
        """A finished hold's first answer, charging nothing more."""
        sids = json.loads(hold["scopes"])
        return {"usd": hold["charged_usd"], "tokens": hold["charged_tokens"],
                "delta": [0, 0, 0], "scopes": sql.rows(db, hold["agent"], sids),
                "price_source": hold["price_source"], "replayed": True}  # fmt: skip

    def commit(self, op: CommitOp) -> Charged | None:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            hold = sql.hold_row(db, agent, op["hold_id"])
            if hold is None:
                return None
            if hold["state"] in ("committed", "recorded"):
                return self._replay(db, hold)
            amount = op["amount"]
            rows, delta = sql.finish(db, hold, amount)
            db.execute(
                "UPDATE reservations SET state = 'committed', charged_calls = ?,"
                " charged_tokens = ?, charged_usd = ?, price_source = ? WHERE id = ?",
                (*amount, op["event"]["price_source"], hold["id"]),
            )
            if hold["state"] == "open":  # the window counts what was used, not the worst case
                rate_add(db, agent, hold["created"], 0, amount[1] - hold["tokens"])
            fields = {**op["event"], "model": hold["model"], "provider": hold["provider"],
                      "label": hold["label"]}  # fmt: skip
            sql.add_event(db, now, "commit", agent, run_id=hold["run_id"],
                          session=hold["session"], hold_id=hold["hold_id"], key=hold["key"],
                          amount=amount, fields=fields,
                          detail={"delta": delta, "was": hold["state"]})  # fmt: skip
            return {"usd": amount[2], "tokens": amount[1], "delta": delta, "scopes": rows,
                    "price_source": op["event"]["price_source"]}  # fmt: skip

    def record(self, op: RecordOp) -> Charged:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            if op["key"] is not None:
                row = db.execute(
                    "SELECT id FROM reservations WHERE agent = ? AND key = ?", (agent, op["key"])
                ).fetchone()
                if row is not None:
                    hold = sql.hold_row(db, agent, row[0])
                    assert hold is not None
                    return self._replay(db, hold)
            sids = [sid for sid, _ in op["scopes"]]
            amount = op["amount"]
            sql.rows(db, agent, sids)
            sql.add(db, agent, sids, amount, (0, 0, 0))
            event = op["event"]
            hold_id = db.execute(
                sql.INSERT_HOLD,
                (
                    None, agent, op["run_id"], op["session"], op["key"], "recorded",
                    json.dumps(sids), 0, 0, 0, 0, 0, 0, *amount, event["model"],
                    event["provider"], event["label"], event["price_source"], now, now,
                ),
            ).lastrowid  # fmt: skip
            rate_add(db, agent, now, 1, amount[1])
            sql.add_event(db, now, "record", agent, run_id=op["run_id"], session=op["session"],
                          hold_id=str(hold_id), key=op["key"], amount=amount,
                          fields=event)  # fmt: skip
            return {"usd": amount[2], "tokens": amount[1], "delta": list(amount),
                    "scopes": sql.rows(db, agent, sids),
                    "price_source": event["price_source"]}  # fmt: skip

    def release(self, op: ReleaseOp) -> bool:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            hold = sql.hold_row(db, agent, op["hold_id"])
            if hold is None:
                return False
            if hold["state"] not in ("open", "expired", "settled"):
                return True  # committed, recorded or released already: nothing to free
            sql.finish(db, hold, [0, 0, 0])
            db.execute(
                "UPDATE reservations SET state = 'released', charged_calls = 0, charged_tokens = 0,"
                " charged_usd = 0 WHERE id = ?",
                (hold["id"],),
            )
            if hold["state"] == "open":
                rate_add(db, agent, hold["created"], 0, -hold["tokens"])
            sql.add_event(db, now, "release", agent, run_id=hold["run_id"],
                          session=hold["session"], hold_id=hold["hold_id"],
                          detail={"was": hold["state"]})  # fmt: skip
            return True

    def usage(self, op: UsageOp) -> UsageRows:
        agent = op["agent"]
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            self._expire(db, agent, now)
            rows = sql.rows(db, agent, op["scopes"]) if op["scopes"] else {}
            window = self._rate.buckets(db, agent, now)
            calls, tokens = sum(b[1] for b in window), sum(b[2] for b in window)
            return {"scopes": rows, "rate": [calls, tokens]}

    def settle_open(self, op: SettleOp) -> list[SettledHold]:
        agent = op["agent"]
        settled: list[SettledHold] = []
        with self._transaction() as db:
            now = op["now"] if op["now"] is not None else time.time()
            ids = db.execute(
                "SELECT id FROM reservations WHERE run_id = ? AND agent = ? AND state = 'open'",
                (op["run_id"], agent),
            ).fetchall()
            for (hold_id,) in ids:
                hold = sql.hold_row(db, agent, hold_id)
                assert hold is not None
                est = [hold["est_calls"], hold["est_tokens"], hold["est_usd"]]
                sql.finish(db, hold, est)
                db.execute(
                    "UPDATE reservations SET state = 'settled', charged_calls = ?,"
                    " charged_tokens = ?, charged_usd = ? WHERE id = ?",
                    (*est, hold_id),
                )
                sql.add_event(db, now, "settle", agent, run_id=op["run_id"],
                              session=hold["session"], hold_id=hold["hold_id"], amount=est,
                              fields={"model": hold["model"], "provider": hold["provider"],
                                      "label": hold["label"]})  # fmt: skip
                settled.append({"hold_id": hold["hold_id"], "usd": est[2], "tokens": est[1],
                                "model": hold["model"], "label": hold["label"]})  # fmt: skip
        return settled

    def reset(self, op: ResetOp) -> list[ResetScope]:
        agent, prefix = op["agent"], op["prefix"]
        with self._transaction() as db:
            now = time.time()
            found = db.execute(
                "SELECT id, calls_used, tokens_used, usd_used FROM scopes WHERE agent = ?"
                " AND (? IS NULL OR substr(id, 1, length(?)) = ?) ORDER BY id",
                (agent, prefix, prefix, prefix),
            ).fetchall()
            done: list[ResetScope] = []
            for sid, calls, tokens, usd in found:
                if not (calls or tokens or usd):
                    continue
                sql.add_event(db, now, "reset", agent, scope=sid, amount=(calls, tokens, usd))
                db.execute(
                    "UPDATE scopes SET calls_used = 0, tokens_used = 0, usd_used = 0"
                    " WHERE agent = ? AND id = ?",
                    (agent, sid),
                )
                done.append({"scope": sid, "calls": calls, "tokens": tokens, "usd": usd})
            return done

    def add_run(self, op: AddRunOp) -> None:
        """Note a live run and its owner (the supervisor: host, boot, pid, start time)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO runs (agent, run_id, owner) VALUES (?, ?, ?)",
                (op["agent"], op["run_id"], json.dumps(op["owner"], sort_keys=True)),
            )

    def forget_run(self, op: RunOp) -> None:
        with self._transaction() as db:
            db.execute(
                "DELETE FROM runs WHERE agent = ? AND run_id = ?", (op["agent"], op["run_id"])
            )

    def runs(self, op: AgentOp) -> list[LiveRun]:
        """The runs of an agent noted live: [{run_id, owner}]."""
        with self._transaction() as db:
            found = db.execute(
                "SELECT run_id, owner FROM runs WHERE agent = ?", (op["agent"],)
            ).fetchall()
        return [{"run_id": run_id, "owner": json.loads(owner)} for run_id, owner in found]

    def events(self, agent: str | None = None) -> list[Event]:
        """The history, oldest first (for tests, reports and re-pricing)."""
        assert self._db is not None
        cursor = self._db.execute(
            "SELECT * FROM events WHERE ? IS NULL OR agent = ? ORDER BY seq", (agent, agent)
        )
        names = [d[0] for d in cursor.description]
        return [cast("Event", dict(zip(names, row, strict=True))) for row in cursor]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
