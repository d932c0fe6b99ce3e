"""The SQLite store's rate window: 60 one-second buckets per agent, ``rate:SECOND`` rows.

The buckets live in ``scopes`` beside the agent's other rows (``calls_used`` and
``tokens_used``), so a reservation reads and writes them in its own transaction. A hold
counts its worst case at once; its commit or release corrects its second's bucket.
"""

from __future__ import annotations

import sqlite3

TYPE_CHECKING = False
if TYPE_CHECKING:
    from supervisor.budget._store import Limits, RateDenied

__all__ = ["WINDOW", "RateWindow", "rate_add"]

WINDOW = 60.0


def rate_add(db: sqlite3.Connection, agent: str, when: float, calls: int, tokens: int) -> None:
    """Count a call and its tokens in the rate bucket of second ``when`` (never below 0)."""
    db.execute(
        "INSERT INTO scopes (agent, id, calls_used, tokens_used) VALUES (?, ?, ?, ?)"
        " ON CONFLICT DO UPDATE SET calls_used = calls_used + excluded.calls_used,"
        " tokens_used = max(0, tokens_used + excluded.tokens_used)",
        (agent, f"rate:{int(when):011d}", calls, tokens),
    )


class RateWindow:
    """The last minute of one store connection's agents (old buckets go now and then)."""

    def __init__(self) -> None:
        self._swept = 0  # the second before which this process last deleted rate buckets

    def _drop_old_buckets(self, db: sqlite3.Connection, agent: str, now: float) -> int:
        """The window's first second; buckets older than a minute go now and then."""
        oldest = int(now) - int(WINDOW) + 1
        if oldest - self._swept > WINDOW:
            db.execute(
                "DELETE FROM scopes WHERE agent = ? AND id >= 'rate:' AND id < ?",
                (agent, f"rate:{oldest:011d}"),
            )
            self._swept = oldest
        return oldest

    def buckets(self, db: sqlite3.Connection, agent: str, now: float) -> list[tuple[int, int, int]]:
        """(second, calls, tokens) of the last minute, oldest first; old buckets go now and then."""
        oldest = self._drop_old_buckets(db, agent, now)
        found = db.execute(
            "SELECT id, calls_used, tokens_used FROM scopes WHERE agent = ? AND id >= ?"
            " AND id < 'rate;'",
            (agent, f"rate:{oldest:011d}"),
        ).fetchall()
        return [(int(sid[5:]), calls, tokens) for sid, calls, tokens in found]

    def check(
        self, db: sqlite3.Connection, agent: str, now: float, rate: Limits, tokens: int
    ) -> RateDenied | None:
        """None if one more call of ``tokens`` fits the window, else the denial."""
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
        window = self.buckets(db, agent, now)  # the denial says when to retry: the buckets
        for index, need, limit in ((0, 1, rate[0]), (1, tokens, rate[1])):
            used = sum(bucket[index + 1] for bucket in window)
            if limit is None or used + need <= limit:
                continue
            # Wait until enough of the window's oldest seconds have left it.
            freed, retry = 0, WINDOW
            for bucket in window:
                freed += bucket[index + 1]
                if used - freed + need <= limit:
                    retry = bucket[0] + WINDOW - now
                    break
            return {"verdict": "rate", "limit": index, "used": used, "limit_value": limit,
                    "retry_after": max(retry, 0.001)}  # fmt: skip
        return None
