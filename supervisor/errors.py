"""The exceptions supervise raises, one tree rooted at SupervisorError.

    SupervisorError              anything supervise itself got wrong or was given wrong (exit 125)
    ├── PolicyError              a policy file, a dict or a --set override is invalid
    ├── SpawnError               the command could not be started
    │   ├── CommandNotFound      exit 127
    │   └── CommandNotExecutable exit 126
    ├── AuditError               the audit log cannot be written or read
    ├── WorkspaceError           the workspace, its jail or network: deny cannot be set up
    ├── HelperError              the reaper helper is missing and cannot be built
    ├── StoreUnavailable         the budget store cannot be reached or used (fail closed)
    ├── BudgetError              the ledger refused an operation (exit 124, not 125: see below)
    │   ├── BudgetExceeded       a scope's calls, tokens or usd would go (or went) past its limit
    │   ├── RateLimited          calls or tokens per minute: retry after ``retry_after`` seconds
    │   ├── UnknownModel         no price for the model under ``unknown_model: deny``
    │   └── UnknownReservation   no such hold (never granted, or of another agent)
    ├── NotSupervised            (child) ``supervisor.client.connect()`` outside supervise
    ├── RpcError                 (child) the supervisor answered an error, or the channel broke
    └── UsageMissing             (child) a provider response had no usage; charged its hold

``exit_code`` is the status supervise exits with when the error ends a run or a command
(SPEC's table): 125 when supervise itself failed or was given something wrong (a store it
cannot reach included), 126 and 127 when the command cannot be run. A ``BudgetError`` is
the ledger doing its job, not supervise failing: the RPC answers it and the run goes on;
when a budget does end a run (spend written past a limit), the run ends as a limit
violation, 124. The child's errors (marked "child") are raised in the agent's process by
``supervisor.client``, which exports them with ``BudgetError``, ``BudgetExceeded`` and
``RateLimited`` (what the child meets; the ledger's ``UnknownModel`` reaches it as a
``BudgetExceeded`` of scope ``model``, ``UnknownReservation`` as an ``RpcError`` with
code -32602, invalid params);
they keep the root's 125 (supervise's side failed or was misused) for a tool that maps
errors to statuses.

Each carries the facts as fields and a message that says what happened and how to fix it,
and survives ``pickle`` with its fields (multiprocessing, concurrent.futures).
"""

from __future__ import annotations

# Imported on every run: neither typing (~5 ms) nor decimal (~3 ms) at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from decimal import Decimal
    from typing import Any


def _rebuilt(cls: type[SupervisorError], args: tuple[object, ...]) -> SupervisorError:
    """An error of ``cls`` with ``args`` and no ``__init__`` run; pickle then sets its fields."""
    return cls.__new__(cls, *args)


class SupervisorError(Exception):
    """Base of every error supervise raises on purpose; the CLI maps it to exit 125."""

    exit_code = 125

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls cls(*self.args), which fails (or loses fields) when
        # __init__ takes the facts rather than the message; rebuild without it and let
        # pickle restore the fields from __dict__ (psutil's errors define __reduce__ too).
        return _rebuilt, (type(self), self.args), self.__dict__


class PolicyError(SupervisorError):
    """A policy is invalid; ``problems`` has one line per problem, with file, line and key path."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))


class SpawnError(SupervisorError):
    """The command could not be started; ``step`` names the setup step, ``errno`` its errno."""

    def __init__(self, message: str, *, step: str = "exec", errno: int = 0) -> None:
        self.step = step
        self.errno = errno
        super().__init__(message)


class CommandNotFound(SpawnError):
    """The command does not exist on PATH or at the given path (exit 127)."""

    exit_code = 127


class CommandNotExecutable(SpawnError):
    """The command exists but cannot be executed (exit 126)."""

    exit_code = 126


class WorkspaceError(SupervisorError):
    """The workspace cannot be made, or its jail or ``network: deny`` cannot be enforced."""


class AuditError(SupervisorError):
    """The audit log cannot be written or read."""


class HelperError(SupervisorError):
    """The compiled reaper helper is missing and could not be built."""


class StoreUnavailable(SupervisorError):
    """The budget store (``store``: its URL) cannot be reached or used; nothing was granted."""

    def __init__(self, store: str, reason: str, *, hint: str | None = None) -> None:
        self.store = store
        self.reason = reason
        super().__init__(
            f"the budget store {store} is unavailable: {reason}",
            hint=hint or "start it or fix budget.store / --store; budgets fail closed",
        )


class BudgetError(SupervisorError):
    """The ledger refused an operation; the RPC turns it into an error reply.

    Not supervise failing, so not 125: the run goes on; a budget that ends a run (spend
    written past a limit) ends it as a limit violation, exit 124.
    """

    exit_code = 124


class BudgetExceeded(BudgetError):
    """A scope would go (or, for spend already made, went) past one of its limits.

    ``scope`` is run, session, daily or monthly; ``key`` the scope's key (the run id, the
    session, ``2026-11-23``, ``2026-11``); ``limit`` is calls, tokens or usd; ``used`` and
    ``held`` are the scope's totals before the request (after, for spend that was written);
    ``requested`` what was asked; ``limit_value`` the limit. Money is ``Decimal`` USD.
    ``charge`` is set when the spend was written anyway (commit, record).
    """

    def __init__(
        self,
        scope: str,
        limit: str,
        used: int | Decimal,
        held: int | Decimal,
        limit_value: int | Decimal,
        *,
        key: str = "",
        requested: int | Decimal = 0,
        charge: Any = None,
    ) -> None:
        self.scope, self.key, self.limit = scope, key, limit
        self.used, self.held, self.requested, self.limit_value = used, held, requested, limit_value
        self.charge = charge
        where = f"{scope} {key}".rstrip()
        if charge is None:
            message = (
                f"{where} budget exceeded: {limit} {_show(limit, used)} used + "
                f"{_show(limit, held)} held + {_show(limit, requested)} asked > "
                f"{_show(limit, limit_value)}"
            )
        else:
            message = (
                f"{where} budget exceeded: {limit} {_show(limit, used)} used > "
                f"{_show(limit, limit_value)} (the spend was recorded)"
            )
        super().__init__(message, hint=f"raise budget.{scope}.{limit}, or wait for a new period")


class RateLimited(BudgetError):
    """Too many calls or tokens in the last minute; ``retry_after`` is in seconds."""

    def __init__(self, limit: str, used: int, limit_value: int, retry_after: float) -> None:
        self.limit, self.used, self.limit_value = limit, used, limit_value
        self.retry_after = retry_after
        self.scope = "rate"
        super().__init__(
            f"rate limited: {used} {limit} in the last minute, the limit is {limit_value}",
            hint=f"retry after {retry_after:.3f} s",
        )


class UnknownModel(BudgetError):
    """No price is known for ``model`` and the policy says ``unknown_model: deny``."""

    def __init__(self, model: str, provider: str | None = None) -> None:
        self.model, self.provider = model, provider
        name = f"{provider}:{model}" if provider else model
        super().__init__(
            f"no price for the model {name!r}",
            hint=f"price it in budget.pricing (e.g. {model}: {{input: 1.0, output: 2.0}}) "
            "or set budget.unknown_model: free",
        )


class UnknownReservation(BudgetError):
    """No hold ``hold_id`` exists in this ledger (never granted, or another agent's)."""

    def __init__(self, hold_id: str) -> None:
        self.hold_id = hold_id
        super().__init__(f"no reservation {hold_id!r}", hint="use the id reserve returned")


class NotSupervised(SupervisorError):
    """(child) No budget RPC here: ``SUPERVISE_RPC_FD`` is unset, not a socket, or closed."""


class RpcError(SupervisorError):
    """(child) The supervisor answered with an error (``code``, ``data``) or the channel broke."""

    def __init__(self, message: str, *, code: int = 0, data: object = None) -> None:
        self.code = code
        self.data = data
        super().__init__(message)


class UsageMissing(SupervisorError):
    """(child) A provider response carried no usage; the call was charged at its reservation."""


def _show(limit: str, value: int | Decimal) -> str:
    if limit == "usd":
        from decimal import Decimal

        from supervisor._units import format_money

        return format_money(Decimal(value))
    return str(value)
