"""A run's records in the audit log: run_start, run_end, and the throttle on what a child
can make us write (denials here, RPC errors in ``rpc.py``: one ``TokenBucket`` for both).

``RunLog`` fails closed: a line the log cannot take calls ``on_fail`` (the run kills the
tree at once) before the error goes up, wherever the line came from (the loop, the RPC, a
hook's thread): nothing may happen that the log cannot record.
"""

from __future__ import annotations

import os
import time

from .errors import SupervisorError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, Protocol

    class Holds(Protocol):
        """The run's budget backend, as the end of a run settles it."""

        def settle(self) -> list[dict[str, Any]]: ...
        def unclaim(self) -> None: ...

    from ._confine import Confinement
    from ._plan import RunPlan
    from .audit import AuditLog
    from .budget.ledger import Settled
    from .errors import BudgetError, StoreUnavailable
    from .gateway import Gateway
    from .result import RunResult, Violation
    from .spawn import Child

    class Served(Protocol):
        """The run's gateway as ``run_start`` records it (``_gateway_run.Opening``)."""

        @property
        def gateway(self) -> Gateway | None: ...
        @property
        def listens(self) -> str | None: ...


class TokenBucket:
    """At most ``burst`` at once, then ``rate`` a second; counts what it turned away.

    ``take()`` says whether one more may go; ``suppressed`` is how many did not since the
    last ``take()`` that did (the caller says so in its next line, then calls ``reset``).
    """

    __slots__ = ("_stamp", "burst", "rate", "suppressed", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._stamp = time.monotonic()
        self.suppressed = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return False
        self.tokens -= 1.0
        return True

    def pop_suppressed(self) -> int:
        """How many were turned away since last asked (and forget them)."""
        n, self.suppressed = self.suppressed, 0
        return n


def open_audit(plan: RunPlan, path: str | None) -> AuditLog:
    """The run's audit log: ``path`` (Supervisor(audit=...)), the policy's, or the default."""
    from .audit import AuditLog, default_audit_file

    path = path or plan.audit
    path = os.path.expanduser(path) if path else default_audit_file()
    return AuditLog(path, max_size=plan.audit_max_size, keep=plan.audit_keep)


def _number(value: object) -> int | float | None:
    """An int stays exact; a Decimal (money) becomes a JSON float; None stays None."""
    if value is None or isinstance(value, int):
        return value
    return float(value)  # type: ignore[arg-type]  # Decimal or float, from the ledger


class RunLog:
    """The audit records of one run (no log: every call is a no-op)."""

    def __init__(
        self, audit: AuditLog | None, result: RunResult, on_fail: Callable[[SupervisorError], None]
    ) -> None:
        self.audit = audit
        self.result = result
        self._on_fail = on_fail
        # A child may be denied again and again: a burst of 20 lines, then 5 a second, and
        # the next line logged counts those that were not (the log is outside the quota).
        self._denials = TokenBucket(5.0, 20)

    def log(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        res = self.result
        try:
            self.audit.append(
                event, run_id=res.run_id, agent=res.agent, session=res.session, **fields
            )
        except SupervisorError as e:
            self._on_fail(e)
            raise

    def hook_failed(self, name: str, error: BaseException) -> None:
        """A hook raised: said on stderr and in the log; enforcement goes on."""
        import sys

        message = f"the {name} hook raised {type(error).__name__}: {error}"
        print(f"supervise: {message}", file=sys.stderr)
        self.log("warning", action="hook_failed", detail=message)

    def violation(self, v: Violation, kill: bool) -> None:
        self.log(
            "violation",
            limit=v.limit,
            observed=v.observed,
            limit_value=v.limit_value,
            unit=v.unit,
            action="kill" if kill else "warn",
            detail=v.message,
        )

    def warning(self, w: dict[str, Any]) -> None:
        """An alert (``watch.Verdicts.alert``'s warning)."""
        from .result import UNITS

        self.log(
            "warning",
            limit=w["limit"],
            observed=w["observed"],
            limit_value=w["limit_value"],
            unit=UNITS.get(w["limit"]),
            action="alert",
            detail=w["message"],
        )

    def denied(
        self, error: BudgetError | StoreUnavailable, via: dict[str, Any] | None = None
    ) -> None:
        """A budget call was refused (throttled: see ``TokenBucket``); ``via``: the gateway's
        call (``{"via": "gateway", "model", "provider", "label"}``) makes the detail a mapping."""
        if not self._denials.take():
            return
        message = str(error)
        quiet = self._denials.pop_suppressed()
        if quiet:
            message += f" ({quiet} more denials not logged one by one)"
        detail: str | dict[str, Any] = message if via is None else {"message": message, **via}
        self.log(
            "denied",
            limit=getattr(error, "limit", None),
            observed=_number(getattr(error, "used", None)),
            limit_value=_number(getattr(error, "limit_value", None)),
            action="deny",
            detail=detail,
        )

    def flush_denied(self) -> None:
        """The count of denials not logged one by one, so the log's total is exact."""
        quiet = self._denials.pop_suppressed()
        if quiet and self.audit is not None:
            try:
                self.log(
                    "denied",
                    action="suppressed",  # a count, not a denial of its own
                    detail=f"({quiet} more denials not logged one by one)",
                )
            except SupervisorError:
                pass

    def recovered(self, dead_run: str, agent: str, s: Settled) -> None:
        """A hold of a run whose supervisor died, settled by this one (``Ledger.claim``)."""
        assert self.audit is not None
        why = f"its supervisor died; settled by run {self.result.run_id}"
        self.audit.append(
            "unsettled",
            run_id=dead_run,
            agent=agent,
            limit="usd",
            action="charged",
            detail={
                "reservation": s.hold_id, "usd": float(s.usd), "tokens": s.tokens,
                "model": s.model, "label": s.label, "why": why,
            },
        )  # fmt: skip

    def settled(self, backend: Holds) -> None:
        """The tree is gone: holds still open are charged at their input estimate."""
        try:
            settled = backend.settle()
        except SupervisorError as e:  # the store is gone: the next run (or expiry) settles them
            self.log("unsettled", action="failed", detail=str(e))
            return
        for s in settled:
            detail = {k: float(v) if k == "usd" else v for k, v in s.items()}
            self.log("unsettled", action="charged", limit="usd", detail=detail)
        try:
            backend.unclaim()
        except SupervisorError:
            pass  # a live-run note left behind: the next run finds this pid gone, settles nothing

    def failed_start(self, argv: list[str], error: SupervisorError) -> None:
        """The run failed before its ``run_start``: one that says why."""
        try:
            self.log("run_start", detail={"command": argv, "error": str(error)})
        except SupervisorError:
            pass

    def start(
        self,
        plan: RunPlan,
        argv: list[str],
        child: Child,
        confine: Confinement,
        rlimits: list[str],
        processes_cap: str | None,
        gateway: Served | None = None,
    ) -> None:
        """``run_start``: the command, the policy, and what is enforced, from evidence."""
        self.log(
            "run_start",
            detail={
                "command": argv,
                "pid": child.pid,
                "policy": plan.name,
                "policy_sha256": plan.sha256,
                "on_violation": plan.on_violation,
                "enforced": {
                    "rlimits": rlimits,
                    "reaper": "subreaper+pidfd" if child.pidfd else "subreaper+pipe EOF",
                    "signal_scope": "landlock" if child.scoped else None,
                    "wall_time": plan.max.wall_time,
                    "watched": ["memory", "cpu_time", "processes", "open_files"],
                    "processes_kernel_cap": processes_cap,
                    **confine.enforced(),
                    "gateway": _gateway_evidence(gateway),
                },
            },
        )

    def end(self, res: RunResult, *, budget: bool) -> None:
        """``run_end``, then the log is closed; a line it cannot take becomes ``res.error``."""
        if self.audit is None:
            return
        detail: dict[str, Any] = {
            "exit_code": res.exit_code,
            "returncode": res.returncode,
            "wall_time": round(res.usage.wall_time, 6),
            "cpu_time": res.usage.cpu_time,
            "violation": None if res.violation is None else res.violation.limit,
        }
        if budget:
            u = res.usage
            detail["usage"] = {
                "api_calls": u.api_calls,
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "usd": f"{u.usd:f}",  # exact, as text: JSON numbers are floats to most readers
            }
        try:
            self.log("run_end", action=res.status, detail=detail)
        except SupervisorError as e:
            res.error = res.error or str(e)
        self.audit.close()


def _gateway_evidence(served: Served | None) -> dict[str, Any] | None:
    """What ``run_start`` records of the gateway: where it listens (its URL; the network
    namespace it is reachable from, see ``_gateway_run``), whom it serves (no key)."""
    gw = None if served is None else served.gateway
    if served is None or gw is None:
        return None
    providers = {
        p.name: {"kind": p.kind, "upstream": p.upstream, "custody": p.key is not None}
        for p in gw.providers.values()
    }
    return {"url": gw.url, "listens": served.listens, "providers": providers}
