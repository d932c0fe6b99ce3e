"""supervise: run AI agents and their tools under hard limits.

The public surface is ``__all__``; names load lazily, so ``import supervisor.client`` and
``supervise -- true`` stay fast (no pydantic, psutil or click on the way).
"""

from __future__ import annotations

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "BudgetError",
    "BudgetExceeded",
    "CommandNotExecutable",
    "CommandNotFound",
    "HelperError",
    "NotSupervised",
    "Policy",
    "PolicyError",
    "RateLimited",
    "RpcError",
    "RunResult",
    "SpawnError",
    "StoreUnavailable",
    "Supervisor",
    "SupervisorError",
    "UnknownModel",
    "UnknownReservation",
    "Usage",
    "UsageMissing",
    "Violation",
    "Workspace",
    "WorkspaceError",
    "__version__",
]

# Where each public name lives; a name loads on first use.
_WHERE = {
    "AuditError": "errors",
    "BudgetError": "errors",
    "BudgetExceeded": "errors",
    "CommandNotExecutable": "errors",
    "CommandNotFound": "errors",
    "HelperError": "errors",
    "NotSupervised": "errors",
    "Policy": "policy",
    "PolicyError": "errors",
    "RateLimited": "errors",
    "RpcError": "errors",
    "RunResult": "result",
    "SpawnError": "errors",
    "StoreUnavailable": "errors",
    "Supervisor": "supervisor",
    "SupervisorError": "errors",
    "UnknownModel": "errors",
    "UnknownReservation": "errors",
    "Usage": "result",
    "UsageMissing": "errors",
    "Violation": "result",
    "Workspace": "workspace",
    "WorkspaceError": "errors",
}

if TYPE_CHECKING:
    from .errors import (
        AuditError,
        BudgetError,
        BudgetExceeded,
        CommandNotExecutable,
        CommandNotFound,
        HelperError,
        NotSupervised,
        PolicyError,
        RateLimited,
        RpcError,
        SpawnError,
        StoreUnavailable,
        SupervisorError,
        UnknownModel,
        UnknownReservation,
        UsageMissing,
        WorkspaceError,
    )
    from .policy import Policy
    from .result import RunResult, Usage, Violation
    from .supervisor import Supervisor
    from .workspace import Workspace


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
