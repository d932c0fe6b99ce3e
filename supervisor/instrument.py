"""Drop-in metering of the official SDKs: one line puts every LLM call on the run's budget.

    client = instrument_openai(OpenAI(), label="planner")     # or AsyncOpenAI()
    client = instrument_anthropic(Anthropic())                # or AsyncAnthropic()

The client is pointed, in place, at the run's LLM gateway: its base URL becomes the
gateway's route to the same upstream (``<gateway>/openai/v1``, ``<gateway>/anthropic``, or
another provider's ``<gateway>/<name>``), and it sends the run token (header
``x-supervise-token``) and the label (``x-supervise-label``). The SDK's own key goes as
usual: the gateway passes it upstream when supervise holds no key for that provider
(custody off), and uses its own when it does. The gateway meters every request at the
wire, so every entry point is metered by the same code, once: ``create``, streams,
``parse``, ``.stream()``, ``with_raw_response`` (the raw response reaches the caller
unharmed), ``with_streaming_response``, clients made by ``with_options()`` / ``copy()``,
``beta.messages``, embeddings, legacy completions, and every request of an SDK retry (a
request the provider refuses, e.g. a 500, is not charged). The same client is returned.

Which meter, first that applies:

1. ``budget=`` given: the client's methods are wrapped to reserve over that budget RPC
   connection (``supervisor._instrument_rpc``: create and streams only);
2. the run's gateway (``SUPERVISE_GATEWAY_URL`` / ``_TOKEN`` / ``_PROVIDERS``, set
   whenever it runs: a budget and a key supervise holds, or ``gateway: on``; it serves
   the providers whose key it does not hold too, for instrumented clients) forwards to
   the client's base URL (or the client points at the gateway already, from
   ``OPENAI_BASE_URL``): the gateway. Under a policy without a budget and ``gateway:
   on`` the usage is counted for the result and report, with no limit;
3. the run has a budget but no gateway route for this client (``gateway: off``; ``auto``
   with no key held; a base URL no provider of the policy has as its upstream): the
   budget RPC, as in 1, and a
   warning says once what is not metered that way;
4. otherwise (outside supervise; a policy with no budget and no ``gateway: on``): the
   client is returned unchanged, and a warning says once that nothing is metered.

Stdlib only; the SDKs are duck-typed, never imported here.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from ._instrument_rpc import DEFAULT_MAX_OUTPUT, estimate_input_tokens
from ._rpc_client import Budget
from .errors import UsageMissing

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "UsageMissing",
    "estimate_input_tokens",
    "instrument_anthropic",
    "instrument_openai",
]

T = TypeVar("T")
TOKEN_HEADER = "x-supervise-token"
LABEL_HEADER = "x-supervise-label"
_said: set[str] = set()  # warnings given (each once per process)


def instrument_openai(client: T, *, label: str | None = None, budget: Budget | None = None) -> T:
    """Meter every call of an ``OpenAI`` / ``AsyncOpenAI`` client (see the module docstring)."""
    return _instrument(client, "openai", label, budget)


def instrument_anthropic(client: T, *, label: str | None = None, budget: Budget | None = None) -> T:
    """Meter every call of an ``Anthropic`` / ``AsyncAnthropic`` client."""
    return _instrument(client, "anthropic", label, budget)


def _instrument(client: T, kind: str, label: str | None, budget: Budget | None) -> T:
    from . import _instrument_rpc as rpc

    meter = rpc.meter_openai if kind == "openai" else rpc.meter_anthropic
    if budget is not None:
        return meter(client, budget, label)
    base = str(getattr(client, "base_url", "")).rstrip("/")
    target = gateway_route(kind, base, os.environ)
    if target is not None:
        headers = {TOKEN_HEADER: os.environ["SUPERVISE_GATEWAY_TOKEN"]}
        if label is not None:
            headers[LABEL_HEADER] = label
        return _point(client, target, headers)
    budget = _run_budget()
    if budget is not None:
        why = (
            f"the run's gateway does not forward to {base}"
            if os.environ.get("SUPERVISE_GATEWAY_URL")
            else "the run's gateway is off"
        )
        _warn(
            f"supervise: {why}: {kind} calls are metered over the budget RPC, which "
            "meters create and streams only (not parse, with_raw_response, "
            "with_options/copy, beta, embeddings, legacy completions)"
        )
        return meter(client, budget, label)
    _warn(
        "supervise: not supervised: nothing metered "
        "(no budget and no gateway: on in this run's policy, or no run at all)"
    )
    return client


def gateway_route(kind: str, base: str, environ: Any) -> str | None:
    """The base URL a client of ``kind`` whose base URL is ``base`` gets, or None: the
    run has no gateway, or none of its providers has ``base`` as its upstream."""
    import json

    url = environ.get("SUPERVISE_GATEWAY_URL")
    if not url or not environ.get("SUPERVISE_GATEWAY_TOKEN"):
        return None
    if base == url or base.startswith(url + "/"):
        return base  # pointed at the gateway already (OPENAI_BASE_URL / ANTHROPIC_BASE_URL)
    try:
        providers = json.loads(environ.get("SUPERVISE_GATEWAY_PROVIDERS") or "{}")
    except ValueError:
        return None
    for name, (provider_kind, upstream) in providers.items():
        if provider_kind == kind and upstream.rstrip("/") == base:
            # The gateway's OpenAI routes are /<name>/v1/..., and it drops the "v1/".
            return f"{url}/{name}/v1" if kind == "openai" else f"{url}/{name}"
    return None


def _point(client: T, base: str, headers: dict[str, str]) -> T:
    """Set the client's base URL and default headers in place (so ``copy()`` and
    ``with_options()`` inherit them); an SDK without those attributes gets a copy."""
    custom = getattr(client, "_custom_headers", None)
    if isinstance(custom, dict) and isinstance(getattr(type(client), "base_url", None), property):
        client.base_url = base  # type: ignore[attr-defined]  # duck-typed SDK client
        # A new dict: the one the caller passed as default_headers stays theirs.
        client._custom_headers = {**custom, **headers}  # type: ignore[attr-defined]  # duck-typed
        return client
    options: Any = client.with_options  # type: ignore[attr-defined]  # duck-typed SDK client
    copied: T = options(base_url=base, default_headers=headers)
    return copied


def _run_budget() -> Budget | None:
    """The run's budget RPC when the run has a budget, else None."""
    if not os.environ.get("SUPERVISE_RPC_FD"):
        return None
    from ._rpc_client import connect
    from .errors import SupervisorError

    try:
        budget = connect()
        budget.usage()  # a run without a budget section answers with an error
    except (SupervisorError, OSError):
        return None
    return budget


def _warn(message: str) -> None:
    if message in _said:
        return
    _said.add(message)
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=4)
