"""The ledger of one run: holds the worst case on every scope at once, then charges what was used.

Scopes: the ``run``, the ``session`` (when there is one), the agent's ``daily`` and
``monthly`` periods (UTC unless ``budget.timezone``), and the agent's ``rate`` (calls and
tokens in the last 60 s). ``reserve`` holds one call, its tokens and its price on every scope
in one store transaction (one SQLite ``BEGIN IMMEDIATE``, one Redis Lua script): all granted
or none. ``commit`` frees the hold and charges the actual usage; spend past the hold is
written anyway and then raised as ``BudgetExceeded`` (with the charge). ``record`` charges a
call made without a hold, the same way. A hold lives ``hold_ttl`` seconds; one that expires,
or is still open when the child exits (``settle_open``), is charged at its input estimate.
An idempotency ``key`` makes a retried reserve or record return the first answer, free.

Money is integer micro-USD in the stores and ``Decimal`` USD here; never float. Every
operation appends events (grant, deny, commit, record, release, expire, settle, reset) with
the raw token counts, the model, the label and the price's source and version.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from decimal import Decimal

from supervisor.budget._owner import owner, owner_alive
from supervisor.budget._policy import BudgetPolicy
from supervisor.budget._results import (
    LIMITS,
    MICRO,
    Alert,
    Amount,
    Charge,
    Hold,
    ScopeUsage,
    Settled,
    scope_usage,
    to_micro,
    to_usd,
)
from supervisor.budget._scopes import limits_of, periods, usage_of
from supervisor.budget._store import SCOPES, Store, default_store_url, open_store
from supervisor.budget.pricing import Prices, Tokens
from supervisor.errors import BudgetExceeded, RateLimited, UnknownModel, UnknownReservation

TYPE_CHECKING = False
if TYPE_CHECKING:
    from supervisor.budget._scopes import ScopeSpec
    from supervisor.budget._store import (
        Charged,
        ChargeOp,
        CommitOp,
        Limits,
        RecordOp,
        ReserveOp,
        ResetScope,
        SettledHold,
        SettleOp,
        UsageEvent,
    )

__all__ = [
    "HOLD_TTL", "LIMITS", "MICRO", "SCOPES", "Alert", "Amount", "Charge", "Hold", "Ledger",
    "ScopeUsage", "Settled", "Store", "default_store_url", "new_id", "open_store", "owner",
    "reset", "status", "to_micro", "to_usd",
]  # fmt: skip

HOLD_TTL = 900.0  # seconds: longer than any LLM call; an expired hold is charged its estimate


def new_id() -> str:
    """A hold id: microseconds then 32 random bits, so ids sort by time (B-trees append)."""
    return f"{time.time_ns() // 1000:014x}{os.urandom(4).hex()}"


def _settled(row: SettledHold) -> Settled:
    return Settled(row["hold_id"], to_usd(row["usd"]), row["tokens"], row["model"], row["label"])


class Ledger:
    """The budget of one run over a store. Build it with ``Ledger.open``."""

    def __init__(
        self,
        budget: BudgetPolicy,
        store: Store,
        *,
        run_id: str,
        agent: str,
        session: str | None,
        clock: Callable[[], float] | None = None,
        hold_ttl: float = HOLD_TTL,
        prices: Prices | None = None,
    ) -> None:
        self.budget, self.store = budget, store
        self.run_id, self.agent, self.session = run_id, agent, session
        self.clock, self.hold_ttl = clock, hold_ttl
        self.prices = prices or Prices(budget.pricing)
        self._limits: dict[str, Limits] = {scope: limits_of(budget, scope) for scope in SCOPES}
        rate = budget.rate
        self._rate = [rate.calls_per_minute, rate.tokens_per_minute]
        self._alerts = sorted(Decimal(str(a)) for a in budget.alerts)
        self._held: dict[str, tuple[str, str | None]] = {}  # hold id -> (model, provider)

    @classmethod
    def open(
        cls,
        budget: BudgetPolicy,
        *,
        run_id: str,
        agent: str,
        session: str | None,
        store: str | None = None,
        clock: Callable[[], float] | None = None,
        hold_ttl: float = HOLD_TTL,
    ) -> Ledger:
        """Connect to ``store`` (else ``budget.store``, else the default SQLite file).

        Raises StoreUnavailable when the store cannot be reached: a run must not start.
        """
        return cls(
            budget,
            open_store(store or budget.store),
            run_id=run_id,
            agent=agent,
            session=session,
            clock=clock,
            hold_ttl=hold_ttl,
        )

    # --- what the store is told ----------------------------------------------------------

    def _now(self) -> float | None:
        """The injected clock's time, or None: the store uses its own (Redis: the server's)."""
        return None if self.clock is None else self.clock()

    def _scopes(self, now: float | None) -> list[ScopeSpec]:
        """(scope id, scope, key, limits) of every scope this run charges, in report order."""
        day, month = periods(self.store.time() if now is None else now, self.budget.timezone)
        keys = {"run": self.run_id, "session": self.session, "daily": day, "monthly": month}
        return [
            (f"{scope}:{keys[scope]}", scope, str(keys[scope]), self._limits[scope])
            for scope in SCOPES
            if keys[scope] is not None
        ]

    def _base(self, now: float | None) -> ChargeOp:
        scopes = self._scopes(now)
        return {
            "agent": self.agent,
            "run_id": self.run_id,
            "session": self.session,
            "now": now,
            "scopes": [(sid, limits) for sid, _, _, limits in scopes],
            "rate": self._rate,
        }

    def _price(self, model: str, provider: str | None, tokens: Tokens) -> tuple[int, str, str]:
        priced = self.prices.price(model, provider, tokens)
        if priced is not None:
            return priced.micro_usd, priced.source, priced.version
        if self.budget.unknown_model == "free":
            return 0, "free", "unknown_model: free"
        raise UnknownModel(model, provider)

    # --- the operations ------------------------------------------------------------------

    def reserve(
        self,
        *,
        model: str,
        provider: str | None = None,
        input_tokens: int = 0,
        max_output_tokens: int = 0,
        usd: Decimal | None = None,
        label: str | None = None,
        key: str | None = None,
    ) -> Hold:
        """Hold the worst case of one call on every scope, or raise (nothing held)."""
        worst = Tokens(input=input_tokens, output=max_output_tokens)
        worst.check()
        estimate = Tokens(input=input_tokens)
        # An unknown model is denied here under unknown_model: deny, whatever usd says.
        held, source, version = self._price(model, provider, worst)
        est_usd = self._price(model, provider, estimate)[0]
        if usd is not None and to_micro(usd) > held:
            # The caller knows a higher price (one supervise does not): hold that.  A lower
            # one never lowers the table's.  Settled at the input's price when we know it.
            if source == "free":
                est_usd = to_micro(usd)
            held, source, version = to_micro(usd), "caller", "caller"
        op: ReserveOp = {
            **self._base(self._now()),
            "hold_id": new_id(),
            "key": key,
            "ttl": self.hold_ttl,
            "amount": [1, worst.input + worst.output, held],
            "estimate": [1, input_tokens, est_usd],
            "event": {
                "model": model,
                "provider": provider,
                "label": label,
                "input_tokens": input_tokens,
                "output_tokens": max_output_tokens,
                "price_source": source,
                "price_version": version,
            },
        }
        answer = self.store.reserve(op)
        if answer["verdict"] == "deny":
            sid, index = answer["scope"], answer["limit"]
            scope, _, scope_key = sid.partition(":")
            money = index == 2
            conv: Callable[[int], int | Decimal] = to_usd if money else int
            raise BudgetExceeded(
                scope,
                LIMITS[index],
                conv(answer["used"]),
                conv(answer["held"]),
                conv(answer["limit_value"]),
                key=scope_key,
                requested=conv(op["amount"][index]),
            )
        if answer["verdict"] == "rate":
            name = ("calls_per_minute", "tokens_per_minute")[answer["limit"]]
            raise RateLimited(name, answer["used"], answer["limit_value"], answer["retry_after"])
        self._held[answer["hold_id"]] = (model, provider)
        return Hold(
            answer["hold_id"],
            to_usd(answer["usd"]),
            answer["tokens"],
            answer["expires"],
            answer["verdict"] == "replay",
        )

    def _charged(self, answer: Charged) -> Charge:
        """The Charge from a store's answer; BudgetExceeded (carrying it) when over a limit."""
        run_sid = f"run:{self.run_id}"
        rows, delta = answer["scopes"], answer["delta"]
        alerts: list[Alert] = []
        exceeded: tuple[str, str, int, int | Decimal, int | Decimal, int | Decimal] | None = None
        for sid, row in rows.items():
            scope, _, key = sid.partition(":")
            limits = self._limits.get(scope)
            if limits is None:
                continue
            for i, limit in enumerate(limits):
                if limit is None or delta[i] <= 0:
                    continue
                after, before = row[i], row[i] - delta[i]
                conv: Callable[[int], int | Decimal] = to_usd if i == 2 else int
                for threshold in self._alerts:
                    if before < threshold * limit <= after:
                        alerts.append(
                            Alert(scope, key, LIMITS[i], float(threshold), conv(after), conv(limit))
                        )
                if after > limit and exceeded is None:
                    exceeded = (scope, key, i, conv(after), conv(row[i + 3]), conv(limit))
        run_row = rows.get(run_sid) or [0] * 6
        charge = Charge(
            to_usd(answer["usd"]),
            answer["tokens"],
            scope_usage("run", self.run_id, run_row, self._limits["run"]),
            answer.get("price_source") or "",
            alerts,
            answer.get("replayed", False),
        )
        if exceeded is not None and not charge.replayed:
            scope, key, i, used, held, limit_value = exceeded
            raise BudgetExceeded(scope, LIMITS[i], used, held, limit_value, key=key, charge=charge)
        return charge

    def _actual(
        self,
        model: str | None,
        provider: str | None,
        tokens: Tokens,
        usd: Decimal | None,
    ) -> tuple[int, str, str]:
        tokens.check()
        if model is None:
            raise ValueError("no model to price the call by")
        priced = self._price(model, provider, tokens)
        if usd is not None and to_micro(usd) > priced[0]:
            return to_micro(usd), "caller", "caller"  # may raise the table's price, not lower it
        return priced

    def commit(
        self,
        hold_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        usd: Decimal | None = None,
    ) -> Charge:
        """Free the hold and charge the actual usage (written even past a limit, then raised)."""
        tokens = Tokens(
            input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        tokens.check()
        now = self._now()
        held = self._held.pop(hold_id, None)
        if held is None:  # a hold granted by another ledger: ask the store
            row = self.store.hold({"agent": self.agent, "hold_id": hold_id})
            if row is None:
                raise UnknownReservation(hold_id)
            held = (row["model"], row["provider"])
        model, provider = held or (None, None)
        micro, source, version = self._actual(model, provider, tokens, usd)
        op: CommitOp = {
            **self._base(now),
            "hold_id": hold_id,
            "amount": [1, tokens.input + tokens.output, micro],
            "event": _usage_event(tokens, source, version),
        }
        answer = self.store.commit(op)
        if answer is None:
            raise UnknownReservation(hold_id)
        return self._charged(answer)

    def record(
        self,
        *,
        model: str,
        provider: str | None = None,
        label: str | None = None,
        key: str | None = None,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        usd: Decimal | None = None,
    ) -> Charge:
        """Charge a call made without a hold: always written, then raised if over a limit."""
        tokens = Tokens(
            input_tokens, output_tokens, cached_input_tokens, cache_write_tokens, reasoning_tokens
        )
        tokens.check()
        micro, source, version = self._actual(model, provider, tokens, usd)
        op: RecordOp = {
            **self._base(self._now()),
            "hold_id": new_id(),
            "key": key,
            "amount": [1, tokens.input + tokens.output, micro],
            "event": {
                "model": model,
                "provider": provider,
                "label": label,
                **_usage_event(tokens, source, version),
            },
        }
        return self._charged(self.store.record(op))

    def release(self, hold_id: str) -> None:
        """Free a hold whose call was not made (nothing charged)."""
        self._held.pop(hold_id, None)
        if not self.store.release({"agent": self.agent, "hold_id": hold_id, "now": self._now()}):
            raise UnknownReservation(hold_id)

    def usage(self) -> list[ScopeUsage]:
        """Every scope of this run: used, held and limit of calls, tokens and usd; then rate."""
        now = self._now()
        return usage_of(self.store, self.agent, self._scopes(now), self._rate, now)

    def claim(self) -> list[tuple[str, Settled]]:
        """Note this run as live, and settle the open holds of this agent's runs whose
        supervisor died on this machine (SIGKILL, a crash, a reboot): each is charged its
        input estimate, as at a normal exit. Returns (dead run id, what was settled)."""
        me = owner()
        recovered: list[tuple[str, Settled]] = []
        for run in self.store.runs({"agent": self.agent}):
            if run["run_id"] == self.run_id or owner_alive(run["owner"], me) is not False:
                continue
            op: SettleOp = {"agent": self.agent, "run_id": run["run_id"], "now": self._now()}
            recovered.extend((run["run_id"], _settled(row)) for row in self.store.settle_open(op))
            self.store.forget_run({"agent": self.agent, "run_id": run["run_id"]})
        self.store.add_run({"agent": self.agent, "run_id": self.run_id, "owner": me})
        return recovered

    def unclaim(self) -> None:
        """This run is over and settled: no longer live."""
        self.store.forget_run({"agent": self.agent, "run_id": self.run_id})

    def settle_open(self) -> list[Settled]:
        """Charge every hold of this run still open at its input estimate (the child exited)."""
        settled = self.store.settle_open(
            {"agent": self.agent, "run_id": self.run_id, "now": self._now()}
        )
        return [_settled(row) for row in settled]

    def close(self) -> None:
        """Close the store connection; open holds stay (settle them first)."""
        self.store.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _usage_event(tokens: Tokens, source: str, version: str) -> UsageEvent:
    return {
        "input_tokens": tokens.input,
        "output_tokens": tokens.output,
        "cached_input_tokens": tokens.cached_input,
        "cache_write_tokens": tokens.cache_write,
        "reasoning_tokens": tokens.reasoning,
        "price_source": source,
        "price_version": version,
    }


def status(
    budget: BudgetPolicy,
    *,
    agent: str,
    session: str | None = None,
    store: Store,
    clock: Callable[[], float] | None = None,
) -> list[ScopeUsage]:
    """The agent's scopes now (session if given, daily, monthly, rate), for ``budget status``."""
    ledger = Ledger(budget, store, run_id="-", agent=agent, session=session, clock=clock)
    now = ledger._now()
    scopes = [s for s in ledger._scopes(now) if s[1] != "run"]
    return usage_of(store, agent, scopes, ledger._rate, now)


def reset(store: Store, *, agent: str, period: str | None) -> list[ResetScope]:
    """Set used to 0 on the agent's scopes of ``period`` (None: every scope); open holds stay."""
    return store.reset({"agent": agent, "prefix": None if period is None else period + ":"})
