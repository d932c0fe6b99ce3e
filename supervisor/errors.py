"""The exceptions supervise raises, one tree rooted at SupervisorError.

    SupervisorError              anything supervise itself got wrong or was given wrong (exit 125)
    ├── PolicyError              a policy file, a dict or a --set override is invalid
    ├── SpawnError               the command could not be started
    │   ├── CommandNotFound      exit 127
    │   └── CommandNotExecutable exit 126
    ├── AuditError               the audit log cannot be written or read
    ├── HelperError              the reaper helper is missing and cannot be built
    ├── BudgetExceeded           a reservation or a spend breaks a budget limit (RPC error 1)
    ├── RateLimited              a budget rate limit says wait ``retry_after`` s (RPC error 2)
    └── (supervisor.client)      NotSupervised, RpcError, UsageMissing: the child side

Each carries the facts as fields and a message that says what happened and how to fix it.
"""

from __future__ import annotations


class SupervisorError(Exception):
    """Base of every error supervise raises on purpose; the CLI maps it to exit 125."""

    exit_code = 125

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


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


class AuditError(SupervisorError):
    """The audit log cannot be written or read."""


class HelperError(SupervisorError):
    """The compiled reaper helper is missing and could not be built."""


class BudgetExceeded(SupervisorError):
    """A budget limit would be (or was) broken: ``limit`` (calls, tokens, usd) of ``scope``.

    ``used`` is what was already spent in that scope, ``held`` what open reservations hold,
    ``limit_value`` the limit; the same fields travel as RPC error 1's data.
    """

    def __init__(
        self, scope: str, limit: str, used: object, held: object, limit_value: object
    ) -> None:
        self.scope = scope
        self.limit = limit
        self.used = used
        self.held = held
        self.limit_value = limit_value
        super().__init__(
            f"budget exceeded: {scope} {limit} limit {limit_value} (used {used}, held {held})",
            hint=f"raise budget.{scope}.{limit} in the policy, or spend less",
        )


class RateLimited(SupervisorError):
    """A rate limit of the budget is reached; retry after ``retry_after`` seconds (RPC error 2)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = float(retry_after)
        super().__init__(
            f"rate limited: retry after {self.retry_after:.3f} s",
            hint="wait, or raise budget.rate in the policy",
        )
