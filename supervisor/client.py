"""The child's side of the budget RPC: ask the supervisor before each LLM call, report after.

    from supervisor import client
    b = client.connect()                 # NotSupervised when not run under supervise
    with b.reserve(model="gpt-4o-mini", input_tokens=1200, max_output_tokens=500) as r:
        ...                              # the LLM call
        r.commit(input_tokens=1180, output_tokens=312)   # leaving without commit releases
    b.record(model="gpt-4o-mini", input_tokens=1000, output_tokens=500)
    b.usage()

    llm = client.instrument_openai(OpenAI())      # or meter an SDK client in one line

Every error the child can meet is here too: ``BudgetExceeded`` and ``RateLimited`` (both
``BudgetError``), ``NotSupervised``, ``RpcError``, ``UsageMissing``, and their base
``SupervisorError``. Stdlib only and fast to import: the channel itself is
``_rpc_client`` (see its docstring), the instrumentation loads on first use.
"""

from __future__ import annotations

from ._rpc_client import AsyncReserve, Budget, Reservation, Step, connect
from .errors import (
    BudgetError,
    BudgetExceeded,
    NotSupervised,
    RateLimited,
    RpcError,
    SupervisorError,
    UsageMissing,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")

__all__ = [
    "AsyncReserve",
    "Budget",
    "BudgetError",
    "BudgetExceeded",
    "NotSupervised",
    "RateLimited",
    "Reservation",
    "RpcError",
    "Step",
    "SupervisorError",
    "UsageMissing",
    "connect",
    "instrument_anthropic",
    "instrument_openai",
]


def instrument_openai(client: T, *, label: str | None = None, budget: Budget | None = None) -> T:
    """Meter an ``OpenAI`` or ``AsyncOpenAI`` client in place (see ``supervisor.instrument``)."""
    from .instrument import instrument_openai as instrument

    return instrument(client, label=label, budget=budget)


def instrument_anthropic(client: T, *, label: str | None = None, budget: Budget | None = None) -> T:
    """Meter an ``Anthropic`` or ``AsyncAnthropic`` client in place."""
    from .instrument import instrument_anthropic as instrument

    return instrument(client, label=label, budget=budget)
