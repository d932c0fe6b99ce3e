"""What the ledger tells a store and what the store answers: the ``Store`` protocol.

``ledger.py`` decides (prices, limits, scopes, periods); a store (``sqlite.py``,
``redis.py`` with ``ledger.lua``) applies one operation in one atomic transaction and
answers in plain ints: counts, tokens and micro-USD. Every operation and answer below is
a ``TypedDict`` (JSON-able as is: the Redis scripts decode the same keys), defined only for
the type checker, so importing this module costs two constants and one class.

Amounts travel as ``[calls, tokens, micro-USD]`` (``Triple``); a scope's row is
``[calls, tokens, usd used, calls, tokens, usd held]`` (``Row``); a scope id is
``scope:key`` (``run:ID``, ``session:ID``, ``daily:2026-11-23``, ``monthly:2026-11``).
``now`` is the caller's clock, or None for the store's own (Redis: the server's ``TIME``).
"""

from __future__ import annotations

import os
from typing import Protocol

# typing's aliases and TypedDicts cost class creations; mypy honours any TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal, NotRequired, TypeAlias, TypedDict

__all__ = ["KEEP_FINISHED", "SCOPES", "Store", "default_store_url", "open_store"]

SCOPES: tuple[ScopeName, ...] = ("run", "session", "daily", "monthly")  # report order
# A finished hold answers idempotent retries this long, then goes: both stores (SQLite
# prunes older rows when it opens; Redis sets it as the keys' TTL, given to the scripts).
KEEP_FINISHED = 7 * 86400  # seconds


if TYPE_CHECKING:
    ScopeName: TypeAlias = Literal["run", "session", "daily", "monthly"]
    Verdict: TypeAlias = Literal["grant", "replay", "deny", "rate"]
    HoldState: TypeAlias = Literal[
        "open", "committed", "recorded", "released", "expired", "settled"
    ]
    Triple: TypeAlias = list[int]  # [calls, tokens, micro-USD]
    Limits: TypeAlias = list[int | None]  # [calls, tokens, micro-USD]; None: no limit
    Row: TypeAlias = list[int]  # [calls, tokens, usd used, calls, tokens, usd held]
    ScopeLimits: TypeAlias = tuple[str, Limits]  # (scope id, its limits)

    # --- operations ----------------------------------------------------------------------

    class AgentOp(TypedDict):
        agent: str

    class RunOp(AgentOp):
        run_id: str

    class Owner(TypedDict):
        """The supervisor that owns a live run (pids are reused: with its start time)."""

        host: str
        boot: str
        pid: int
        start: int | None

    class AddRunOp(RunOp):
        owner: Owner

    class HoldOp(AgentOp):
        hold_id: str

    class ReleaseOp(HoldOp):
        now: float | None

    class UsageOp(AgentOp):
        scopes: list[str]  # scope ids
        now: float | None

    class SettleOp(RunOp):
        now: float | None

    class ResetOp(AgentOp):
        prefix: str | None  # "daily:" ...; None: every scope

    class ChargeOp(TypedDict):
        """What every charging operation says: who, when, and the scopes it charges."""

        agent: str
        run_id: str
        session: str | None
        now: float | None
        scopes: list[ScopeLimits]
        rate: Limits  # [calls, tokens] per minute

    class GrantEvent(TypedDict):
        """The call a hold is for, as its grant event records it."""

        model: str
        provider: str | None
        label: str | None
        input_tokens: int
        output_tokens: int  # the most it may write (max_output_tokens)
        price_source: str
        price_version: str

    class UsageEvent(TypedDict):
        """What a call used, as its commit or record event records it."""

        input_tokens: int
        output_tokens: int
        cached_input_tokens: int
        cache_write_tokens: int
        reasoning_tokens: int
        price_source: str
        price_version: str

    class RecordEvent(UsageEvent):
        model: str
        provider: str | None
        label: str | None

    class ReserveOp(ChargeOp):
        hold_id: str  # the ledger's id (SQLite uses its row id instead)
        key: str | None  # idempotency key
        ttl: float  # seconds
        amount: Triple  # the worst case, held
        estimate: Triple  # charged if the hold expires or is settled
        event: GrantEvent

    class CommitOp(ChargeOp):
        hold_id: str
        amount: Triple  # the actual usage
        event: UsageEvent

    class RecordOp(ChargeOp):
        hold_id: str
        key: str | None
        amount: Triple
        event: RecordEvent

    # --- answers -------------------------------------------------------------------------

    class Granted(TypedDict):
        verdict: Literal["grant", "replay"]  # replay: the key's first answer, nothing new held
        hold_id: str
        usd: int
        tokens: int
        expires: float

    class Denied(TypedDict):
        verdict: Literal["deny"]
        scope: str  # the scope id over its limit
        limit: int  # 0 calls, 1 tokens, 2 usd
        used: int
        held: int  # by other holds
        limit_value: int

    class RateDenied(TypedDict):
        verdict: Literal["rate"]
        limit: int  # 0 calls per minute, 1 tokens per minute
        used: int
        limit_value: int
        retry_after: float  # seconds

    Reserved: TypeAlias = Granted | Denied | RateDenied

    class HoldInfo(TypedDict):
        model: str
        provider: str | None
        state: HoldState

    class Charged(TypedDict):
        """What a commit or record charged, and the rows of its scopes after it."""

        usd: int
        tokens: int
        delta: Triple  # what this operation added to used (a replay: nothing)
        scopes: dict[str, Row]
        price_source: str
        replayed: NotRequired[bool]

    class UsageRows(TypedDict):
        scopes: dict[str, Row]
        rate: list[int]  # [calls, tokens] in the last 60 s

    class SettledHold(TypedDict):
        hold_id: str
        usd: int
        tokens: int
        model: str
        label: str | None

    class ResetScope(TypedDict):
        scope: str
        calls: int
        tokens: int
        usd: int

    class LiveRun(TypedDict):
        run_id: str
        owner: Owner

    class Event(TypedDict, total=False):
        """One history entry. SQLite gives its columns' types (and None); Redis, text."""

        seq: Any
        ts: Any
        kind: Any  # grant, deny, commit, record, release, expire, settle, reset
        agent: Any
        run_id: Any
        session: Any
        hold_id: Any
        key: Any
        scope: Any
        calls: Any
        tokens: Any
        usd: Any
        model: Any
        provider: Any
        label: Any
        input_tokens: Any
        output_tokens: Any
        cached_input_tokens: Any
        cache_write_tokens: Any
        reasoning_tokens: Any
        price_source: Any
        price_version: Any
        detail: Any


class Store(Protocol):
    """What a ledger store does; every method is one atomic transaction. Ints everywhere."""

    url: str

    def reserve(self, op: ReserveOp) -> Reserved: ...
    def hold(self, op: HoldOp) -> HoldInfo | None: ...
    def commit(self, op: CommitOp) -> Charged | None: ...  # None: no such hold
    def record(self, op: RecordOp) -> Charged: ...
    def release(self, op: ReleaseOp) -> bool: ...  # False: no such hold
    def usage(self, op: UsageOp) -> UsageRows: ...
    def settle_open(self, op: SettleOp) -> list[SettledHold]: ...
    def reset(self, op: ResetOp) -> list[ResetScope]: ...
    def time(self) -> float: ...
    def events(self, agent: str | None = None) -> list[Event]: ...
    def add_run(self, op: AddRunOp) -> None: ...
    def forget_run(self, op: RunOp) -> None: ...
    def runs(self, op: AgentOp) -> list[LiveRun]: ...
    def close(self) -> None: ...


def default_store_url() -> str:
    """``sqlite:////…/supervise/budget.db`` beside the audit log (``$XDG_STATE_HOME``)."""
    from supervisor.audit import default_audit_file

    return "sqlite:///" + os.path.join(os.path.dirname(default_audit_file()), "budget.db")


def open_store(url: str | None) -> Store:
    """The store at ``url`` (None: the default SQLite file); StoreUnavailable if it is not."""
    from supervisor.budget._policy import parse_store_url
    from supervisor.errors import StoreUnavailable

    default = default_store_url()
    url = url or default
    try:
        kind, target = parse_store_url(url)
    except ValueError as error:
        raise StoreUnavailable(url, str(error), hint="fix budget.store or --store") from None
    if kind == "sqlite":
        from supervisor.budget.sqlite import SQLiteStore

        # Only the default file's directory is made: a typo in a path given is an error.
        return SQLiteStore(url, target, make_dirs=url == default)
    from supervisor.budget.redis import RedisStore

    return RedisStore(url)
