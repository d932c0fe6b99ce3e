"""What the budget RPC of a run dispatches to: the ledger, the workspace, the steps.

``RunBackend`` implements ``_rpc_methods.Backend`` for one run.  It turns the ledger's
answers into the RPC's dicts and tells the run what happened, through ``RunEvents``:
a denial (audit ``denied``), spend written past a limit (a violation), an alert fraction
crossed (a warning, and a notification to the child), spend the store failed to write
(the run stops: fail closed), and the usage totals (``RunResult.usage``: calls, tokens,
USD, by model and by label).

A run commits and releases only the reservations it was granted: the ledger knows holds
by agent, and hold ids are row numbers, so without this a child could settle another
run's hold (same agent) by guessing its id.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any, Protocol

from .errors import (
    BudgetError,
    BudgetExceeded,
    StoreUnavailable,
    SupervisorError,
    UnknownReservation,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ._plan import RunPlan
    from ._run_log import RunLog
    from .budget.ledger import Alert, Charge, Ledger, Settled
    from .result import RunResult, Usage
    from .rpc import RpcServer
    from .watch import Verdicts
    from .workspace import Workspace


MAX_OPEN_STEPS = 1024


class RunEvents(Protocol):
    """What the run does with the backend's news (``supervisor.Run`` implements it)."""

    def budget_denied(self, error: BudgetError | StoreUnavailable) -> None: ...
    def budget_breached(self, error: BudgetExceeded) -> None: ...
    def budget_alert(self, alert: Alert) -> None: ...
    def usage_changed(self, call: dict[str, Any]) -> None: ...
    def spend_lost(self, error: StoreUnavailable, call: dict[str, Any]) -> None: ...


# RunEvents is the whole of what a backend may tell its run: it never calls into it.


class BudgetEvents:
    """``RunEvents`` for a supervised run: a denial goes to the audit log, a breach or an
    alert to the run's verdicts, usage to the ``on_usage`` hook, and lost spend to the
    log and ``on_lost`` (the run stops the tree: fail closed)."""

    def __init__(
        self,
        result: RunResult,
        verdicts: Verdicts,
        log: RunLog,
        on_usage: Callable[[dict[str, Any]], None] | None,
        on_lost: Callable[[SupervisorError], None],
    ) -> None:
        self.result, self.verdicts, self.log = result, verdicts, log
        self.on_usage, self.on_lost = on_usage, on_lost
        self.via: dict[str, Any] | None = None  # set by the gateway's calls: said by denials

    def budget_denied(self, error: BudgetError | StoreUnavailable) -> None:
        self.log.denied(error, self.via)

    def budget_breached(self, error: BudgetExceeded) -> None:
        how = f"{error.scope} {error.key}, spend recorded"
        self.verdicts.breach(error.limit, _num(error.used), _num(error.limit_value), how)

    def budget_alert(self, alert: Alert) -> None:
        # Exact (int or Decimal): the verdicts compare them so, as the ledger did.
        self.verdicts.alert(
            alert.limit, alert.used, alert.limit_value, (alert.threshold,), alert.scope
        )

    def usage_changed(self, call: dict[str, Any]) -> None:
        """A call was settled: ``on_usage`` gets it with the run's running totals."""
        if self.on_usage is None:
            return
        u, res = self.result.usage, self.result
        totals = {
            "api_calls": u.api_calls,
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "usd": u.usd,
        }
        self.on_usage({"run_id": res.run_id, "agent": res.agent, **call, "totals": totals})

    def spend_lost(self, error: StoreUnavailable, call: dict[str, Any]) -> None:
        """Spend that happened could not be written to the ledger (the store failed): the
        call goes to the audit log so it is not lost, and the run stops (fail closed)."""
        detail = {k: float(v) if isinstance(v, Decimal) else v for k, v in call.items()}
        self.log.log(
            "unsettled", action="failed", limit="usd", detail={**detail, "error": str(error)}
        )
        self.on_lost(
            SupervisorError(
                f"spend that happened could not be written to the budget ledger ({error}); "
                "the command was stopped (fail closed)"
            )
        )


def _num(value: object) -> float | int:
    """An exact int stays one; a Decimal (money) becomes a float for messages and the log."""
    return value if isinstance(value, int) else float(value)  # type: ignore[arg-type]  # Decimal


class RunBackend:
    """The budget RPC's backend for one run."""

    def __init__(
        self,
        events: RunEvents,
        usage: Usage,
        ledger: Ledger | None,
        workspace: Workspace | None,
        step_time: float | None,
    ) -> None:
        self.events = events
        self.totals = usage  # RunResult.usage (``usage`` is the RPC method)
        self.ledger = ledger
        self.workspace = workspace
        self.step_time = step_time
        self.steps: dict[str, float] = {}  # open step -> when it began (monotonic)
        self._calls: dict[str, tuple[str, str | None]] = {}  # hold -> (model, label)
        self._granted: set[str] = set()  # every hold granted to this run

    # -- the ledger ---------------------------------------------------------------------

    def _ledger(self) -> Ledger:
        if self.ledger is None:
            raise NotImplementedError("this run has no budget (add a budget section)")
        return self.ledger

    def reserve(
        self,
        *,
        model: str,
        provider: str | None,
        input_tokens: int,
        max_output_tokens: int,
        usd: Decimal | None,
        label: str | None,
        key: str | None,
    ) -> dict[str, Any]:
        ledger = self._ledger()
        try:
            hold = ledger.reserve(
                model=model,
                provider=provider,
                input_tokens=input_tokens,
                max_output_tokens=max_output_tokens,
                usd=usd,
                label=label,
                key=key,
            )
        except (BudgetError, StoreUnavailable) as e:
            self.events.budget_denied(e)
            raise
        if not hold.replayed:  # a replayed key may be another run's: its answer, not its hold
            self._granted.add(hold.id)
        if hold.id in self._granted:
            self._calls[hold.id] = (model, label)
        return {"reservation": hold.id, "usd_held": hold.usd_held, "tokens_held": hold.tokens_held}

    def _own(self, reservation: str) -> None:
        if reservation not in self._granted:
            raise UnknownReservation(reservation)

    def commit(self, reservation: str, **counts: Any) -> dict[str, Any]:
        ledger = self._ledger()
        self._own(reservation)
        model, label = self._calls.pop(reservation, ("?", None))
        return self._charged(
            lambda: ledger.commit(reservation, **counts), model, label, counts, "commit"
        )

    def record(
        self, *, model: str, provider: str | None, label: str | None, key: str | None, **counts: Any
    ) -> dict[str, Any]:
        ledger = self._ledger()

        def charge() -> Charge:
            return ledger.record(model=model, provider=provider, label=label, key=key, **counts)

        return self._charged(charge, model, label, counts, "record")

    def _charged(
        self,
        do: Callable[[], Charge],
        model: str,
        label: str | None,
        counts: dict[str, Any],
        how: str,
    ) -> dict[str, Any]:
        try:
            charge = do()
        except BudgetExceeded as e:
            if e.charge is not None:  # the spend happened and was written: count it
                self._count(e.charge, model, label, counts, how)
                self.events.budget_breached(e)
            else:
                self.events.budget_denied(e)
            raise
        except UnknownReservation:
            raise  # bad input, not a denial: the RPC answers -32602 and logs an rpc_error
        except StoreUnavailable as e:
            # The call was made, its spend could not be written: not a denial, a loss.
            self.events.spend_lost(e, {"how": how, "model": model, "label": label, **counts})
            raise
        except BudgetError as e:
            self.events.budget_denied(e)
            raise
        self._count(charge, model, label, counts, how)
        return {"usd": charge.usd, "tokens": charge.tokens, "usage": charge.usage.to_dict()}

    def _count(
        self, charge: Charge, model: str, label: str | None, counts: dict[str, Any], how: str
    ) -> None:
        tokens_in = int(counts.get("input_tokens", 0))
        tokens_out = int(counts.get("output_tokens", 0))
        if not charge.replayed:
            self._add(model, label, 1, tokens_in, tokens_out, charge.usd, how)
        for alert in charge.alerts:
            self.events.budget_alert(alert)

    def _add(
        self,
        model: str,
        label: str | None,
        calls: int,
        tin: int,
        tout: int,
        usd: Decimal,
        how: str,
    ) -> None:
        u = self.totals
        u.api_calls += calls
        u.input_tokens += tin
        u.output_tokens += tout
        u.usd += usd
        for table, name in ((u.by_model, model), (u.by_label, label)):
            if name is None:
                continue
            row = table.setdefault(
                name, {"calls": 0, "input_tokens": 0, "output_tokens": 0, "usd": Decimal(0)}
            )
            for field, add in (("calls", calls), ("input_tokens", tin), ("output_tokens", tout)):
                row[field] = _int(row[field]) + add
            row["usd"] = _dec(row["usd"]) + usd
        self.events.usage_changed(
            {"how": how, "model": model, "label": label, "calls": calls,
             "input_tokens": tin, "output_tokens": tout, "usd": usd}
        )  # fmt: skip

    def release(self, reservation: str) -> dict[str, Any]:
        self._ledger()
        self._own(reservation)
        self._calls.pop(reservation, None)
        self._ledger().release(reservation)
        return {}

    def usage(self) -> dict[str, Any]:
        return {"scopes": [scope.to_dict() for scope in self._ledger().usage()]}

    def settle(self) -> list[dict[str, Any]]:
        """The child exited: charge every hold still open at its input estimate."""
        if self.ledger is None:
            return []
        settled = []
        for s in self.ledger.settle_open():
            self._calls.pop(s.hold_id, None)
            self._add(s.model, s.label, 1, s.tokens, 0, s.usd, "unsettled")
            settled.append(
                {
                    "reservation": s.hold_id,
                    "usd": s.usd,
                    "tokens": s.tokens,
                    "model": s.model,
                    "label": s.label,
                }
            )
        return settled

    @property
    def has_ledger(self) -> bool:
        return self.ledger is not None

    def unclaim(self) -> None:
        """The run is over: its live-run note in the store goes (see ``Ledger.claim``)."""
        if self.ledger is not None:
            self.ledger.unclaim()

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    # -- the workspace and the steps ------------------------------------------------------

    def check_write(self, path: str, size: int) -> dict[str, Any]:
        if self.workspace is None:
            return {"allowed": True, "reason": "no workspace: supervise does not limit writes"}
        allowed, reason = self.workspace.check_write(path, size)
        return {"allowed": allowed, "reason": reason}

    def step_begin(self, name: str) -> dict[str, Any]:
        if name in self.steps:
            raise ValueError(f"step {name!r} has already begun (end it first)")
        if len(self.steps) >= MAX_OPEN_STEPS:  # a child must not grow our memory at will
            raise ValueError(f"{MAX_OPEN_STEPS} steps are open already (end some first)")
        self.steps[name] = time.monotonic()
        return {} if self.step_time is None else {"step_time": self.step_time}

    def step_end(self, name: str) -> dict[str, Any]:
        began = self.steps.pop(name, None)
        if began is None:
            raise ValueError(f"no step {name!r} has begun (call step_begin first)")
        return {"elapsed": round(time.monotonic() - began, 6)}

    def expire_step(self, name: str) -> None:
        """The step broke step_time: it is over (the run reports the violation)."""
        self.steps.pop(name, None)

    def step_deadline(self) -> tuple[float, str] | None:
        """When the oldest open step breaks step_time, and its name."""
        if self.step_time is None or not self.steps:
            return None
        name, began = min(self.steps.items(), key=lambda item: item[1])
        return began + self.step_time, name


def open_rpc(
    plan: RunPlan,
    result: RunResult,
    workspace: Workspace | None,
    log: RunLog,
    verdicts: Verdicts,
    on_usage: Callable[[dict[str, Any]], None] | None,
    on_lost: Callable[[SupervisorError], None],
    gateway: bool = False,
) -> tuple[RunBackend, RpcServer, BudgetEvents] | None:
    """The budget RPC of a run, when the policy has something to ask it for (a budget, a
    workspace's check_write, steps); None when it has not.  The ledger opens here, so an
    unreachable store fails the run (125) before the command starts; holds of runs whose
    supervisor died are settled and logged."""
    if not plan.needs_rpc(gateway):
        return None
    budget = {} if plan.budget is None and gateway else plan.budget  # usage counted, no limit
    from .rpc import RpcServer

    ledger = None
    if budget is not None:
        agent = result.agent or "default"
        ledger, recovered = open_ledger(
            budget, run_id=result.run_id, agent=agent, session=result.session
        )
        for dead_run, s in recovered:
            log.recovered(dead_run, agent, s)
    events = BudgetEvents(result, verdicts, log, on_usage, on_lost)
    backend = RunBackend(events, result.usage, ledger, workspace, plan.max.step_time)

    def rpc_error(code: int, message: str, excerpt: str) -> None:
        detail = {"code": code, "message": message, "excerpt": excerpt[:200]}
        log.log("rpc_error", action="reply", detail=detail)

    rpc = RpcServer(backend, run_id=result.run_id, agent=result.agent or "", on_error=rpc_error)
    return backend, rpc, events


def open_ledger(
    budget: dict[str, Any], *, run_id: str, agent: str, session: str | None
) -> tuple[Ledger, list[tuple[str, Settled]]]:
    """The run's ledger, claimed for this run, and the holds it settled of runs whose
    supervisor died (SIGKILL...), with those runs' ids.  An unreachable store raises
    here, before the command starts (the run fails, 125)."""
    from .budget._policy import BudgetPolicy
    from .budget.ledger import Ledger

    ledger = Ledger.open(
        BudgetPolicy.model_validate(budget), run_id=run_id, agent=agent, session=session
    )
    try:
        recovered = ledger.claim()
    except BaseException:
        ledger.close()
        raise
    return ledger, recovered


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _dec(value: object) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(0)
