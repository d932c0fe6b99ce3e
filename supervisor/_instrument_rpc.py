"""Metering of the official SDKs over the budget RPC: the fallback where the gateway is not.

``supervisor.instrument`` points a client at the run's gateway, which meters every call at
the wire. This module is what it falls back to when the run has a budget but no gateway for
the client (``gateway: off``, or a base URL no gateway route forwards to), and what
``instrument_*(client, budget=b)`` asks for by hand: the client's methods are wrapped.

Metered: OpenAI ``chat.completions.create`` and ``responses.create`` (plain and
``stream=True``), Anthropic ``messages.create`` (plain and ``stream=True``) and
``messages.stream``. Each call reserves before the request leaves (so a denied call never
reaches the network) and settles from the SDK's own usage:

- input estimate: every string in the request's content (messages, input, instructions,
  system, tools, ...): ASCII characters / 4 plus one token per other character, rounded up,
  plus 4 per message and 16 per request; output: ``max_tokens`` /
  ``max_completion_tokens`` / ``max_output_tokens`` (times ``n``), else
  ``DEFAULT_MAX_OUTPUT`` (4096);
- tokens as SPEC defines them: OpenAI ``prompt_tokens``/``input_tokens`` include cached
  ones; Anthropic ``input_tokens`` exclude cache reads and writes, so ours is the sum;
  reasoning (OpenAI ``reasoning_tokens``, Anthropic ``thinking_tokens``) is part of output;
- OpenAI chat streams get ``stream_options.include_usage``; Anthropic's
  ``message_delta.usage`` is cumulative. A stream cut short (the consumer stops, closes it or
  an error ends it) is settled from what was seen: the usage reported so far, else the
  input estimate plus the text seen (characters / 4, rounded up);
- a response (or a finished stream) without usage raises ``UsageMissing`` and is charged the
  whole reservation; never free. A request the SDK fails before any response is released,
  except a timeout, which is charged its input estimate (the provider may have billed it).

Not metered here (the gateway meters them): ``with_raw_response``,
``with_streaming_response``, the OpenAI ``.stream()`` / ``.parse()`` helpers, clients made
later with ``with_options()`` / ``copy()``, ``beta``, embeddings, legacy completions; SDK
retries are one call. Stdlib only; the SDKs are duck-typed, never imported here.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from . import _metered as m
from ._rpc_client import Budget

__all__ = ["DEFAULT_MAX_OUTPUT", "estimate_input_tokens", "meter_anthropic", "meter_openai"]

T = TypeVar("T")
DEFAULT_MAX_OUTPUT = 4096
_CONTENT = ("messages", "input", "instructions", "system", "tools", "functions", "prompt")


def estimate_input_tokens(request: dict[str, Any]) -> int:
    """The conservative input estimate of a request (see the module docstring)."""
    ascii_chars = other = 0
    stack: list[object] = [request.get(name) for name in _CONTENT]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            n = len(item.encode("ascii", "ignore"))
            ascii_chars += n
            other += len(item) - n
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, bytes | bytearray):
            ascii_chars += len(item)
        elif hasattr(item, "model_dump"):
            stack.append(item.model_dump())
    messages = request.get("messages")
    count = len(messages) if isinstance(messages, list | tuple) else 1
    return -(-ascii_chars // 4) + other + 4 * count + 16


def _max_output(request: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            break
    else:
        value = DEFAULT_MAX_OUTPUT
    n = request.get("n")
    return value * n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else value


def meter_openai(client: T, budget: Budget, label: str | None = None) -> T:
    """Meter ``chat.completions.create`` and ``responses.create`` of this client in place."""
    chat = getattr(getattr(client, "chat", None), "completions", None)
    if chat is not None:
        _wrap(chat, budget, "openai", label, m.OPENAI_CHAT)
    responses = getattr(client, "responses", None)
    if responses is not None:
        _wrap(responses, budget, "openai", label, m.OPENAI_RESPONSES)
    return client


def meter_anthropic(client: T, budget: Budget, label: str | None = None) -> T:
    """Meter ``messages.create`` and ``messages.stream`` of this client in place."""
    messages = client.messages  # type: ignore[attr-defined]  # duck-typed Anthropic client
    _wrap(messages, budget, "anthropic", label, m.ANTHROPIC)
    _wrap_stream_helper(messages, budget, label)
    return client


def _original(resource: object, name: str) -> Any:
    method = getattr(resource, name)
    return getattr(method, "__supervise_original__", method)  # instrumenting twice: rewrap


def _call(budget: Budget, provider: str, label: str | None, kw: dict[str, Any]) -> m.Call:
    model = kw.get("model")
    return m.Call(
        budget,
        provider=provider,
        model=model if isinstance(model, str) else str(model),
        label=label,
        input_estimate=estimate_input_tokens(kw),
        max_output=_max_output(kw),
    )


def _wrap(resource: object, budget: Budget, provider: str, label: str | None, kind: m.Kind) -> None:
    original = _original(resource, "create")

    def prepare(kw: dict[str, Any]) -> m.Call:
        if kw.get("stream") and kind is m.OPENAI_CHAT:
            options = kw.get("stream_options")
            kw["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        return _call(budget, provider, label, kw)

    if inspect.iscoroutinefunction(inspect.unwrap(original)):  # the SDK decorates create

        async def acreate(*args: Any, **kw: Any) -> Any:
            call = prepare(kw)
            await call.areserve()
            try:
                response = await original(*args, **kw)
            except BaseException as e:
                await call.afailed(e)
                raise
            if kw.get("stream"):
                return m.AsyncMeteredStream(response, call, kind)
            await call.asettle(kind.response_seen(response))
            return response

        wrapper: Any = acreate
    else:

        def create(*args: Any, **kw: Any) -> Any:
            call = prepare(kw)
            call.reserve()
            try:
                response = original(*args, **kw)
            except BaseException as e:
                call.failed(e)
                raise
            if kw.get("stream"):
                return m.MeteredStream(response, call, kind)
            call.settle(kind.response_seen(response))
            return response

        wrapper = create
    wrapper.__supervise_original__ = original
    wrapper.__doc__ = getattr(original, "__doc__", None)
    resource.create = wrapper  # type: ignore[attr-defined]  # an instance attribute shadows the method


def _wrap_stream_helper(resource: object, budget: Budget, label: str | None) -> None:
    original = _original(resource, "stream")

    def stream(*args: Any, **kw: Any) -> Any:
        manager = original(*args, **kw)  # lazy: no request until it is entered
        call = _call(budget, "anthropic", label, kw)
        if hasattr(manager, "__aenter__"):
            return m.AsyncMeteredManager(manager, call)
        return m.MeteredManager(manager, call)

    # The SDK resource is duck-typed here: these attributes are ours to set on it.
    stream.__supervise_original__ = original  # type: ignore[attr-defined]  # see above
    resource.stream = stream  # type: ignore[attr-defined]  # see above
