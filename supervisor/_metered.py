"""The machinery behind ``_instrument_rpc``: one call metered over the RPC, usage, streams.

A ``Call`` reserves, then settles once from a ``Seen`` (the usage reported so far, whether
it is final, and the characters of output seen). Each provider's ``Kind`` knows where its
usage lives in a response and in stream events. Metered streams wrap the SDK's stream and
settle when it ends, is closed, fails, or is dropped.
"""

from __future__ import annotations

from typing import Any

from ._rpc_client import Budget, Reservation, _to_thread
from .errors import SupervisorError, UsageMissing

Counts = dict[str, int]


def _get(obj: object, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _n(obj: object, name: str) -> int:
    value = _get(obj, name) if obj is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _counts(inp: int, out: int, cached: int, write: int, reasoning: int) -> Counts:
    cached = min(cached, inp)  # the ledger insists on subsets; providers are not always exact
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": cached,
        "cache_write_tokens": min(write, inp - cached),
        "reasoning_tokens": min(reasoning, out),
    }


def _text(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


class Seen:
    """What a response or stream showed: usage so far, whether final, output characters."""

    def __init__(self, counts: Counts | None = None, final: bool = False) -> None:
        self.counts = counts
        self.final = final
        self.text = 0
        self.raw: dict[str, int] = {}  # Anthropic's usage fields, merged event by event


class Kind:
    """Where one API keeps its usage; subclasses per provider API."""

    def counts(self, usage: object) -> Counts:
        raise NotImplementedError

    def response_seen(self, response: object) -> Seen:
        usage = _get(response, "usage")
        return Seen(self.counts(usage), final=True) if usage is not None else Seen()

    def observe(self, event: object, seen: Seen) -> None:
        raise NotImplementedError


class _OpenAIChat(Kind):
    def counts(self, usage: object) -> Counts:
        prompt = _get(usage, "prompt_tokens_details")
        completion = _get(usage, "completion_tokens_details")
        return _counts(
            _n(usage, "prompt_tokens"),
            _n(usage, "completion_tokens"),
            _n(prompt, "cached_tokens"),
            _n(prompt, "cache_write_tokens"),
            _n(completion, "reasoning_tokens"),
        )

    def observe(self, event: object, seen: Seen) -> None:
        usage = _get(event, "usage")
        if usage is not None:
            seen.counts, seen.final = self.counts(usage), True
        for choice in _get(event, "choices") or ():
            delta = _get(choice, "delta")
            if delta is None:
                continue
            for name in ("content", "refusal", "reasoning_content"):
                seen.text += _text(_get(delta, name))
            for call in _get(delta, "tool_calls") or ():
                seen.text += _text(_get(_get(call, "function"), "arguments"))


class _OpenAIResponses(Kind):
    def counts(self, usage: object) -> Counts:
        inp = _get(usage, "input_tokens_details")
        out = _get(usage, "output_tokens_details")
        return _counts(
            _n(usage, "input_tokens"),
            _n(usage, "output_tokens"),
            _n(inp, "cached_tokens"),
            _n(inp, "cache_write_tokens"),
            _n(out, "reasoning_tokens"),
        )

    def observe(self, event: object, seen: Seen) -> None:
        kind = _get(event, "type")
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = _get(_get(event, "response"), "usage")
            if usage is not None:
                seen.counts, seen.final = self.counts(usage), True
        seen.text += _text(_get(event, "delta"))


_ANTHROPIC_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


class _Anthropic(Kind):
    def counts(self, usage: object) -> Counts:
        read, creation = (
            _n(usage, "cache_read_input_tokens"),
            _n(usage, "cache_creation_input_tokens"),
        )
        thinking = _n(_get(usage, "output_tokens_details"), "thinking_tokens")
        inp = _n(usage, "input_tokens") + read + creation  # Anthropic's input excludes the cache
        return _counts(inp, _n(usage, "output_tokens"), read, creation, thinking)

    def _merge(self, usage: object, seen: Seen) -> bool:
        if usage is None:
            return False
        for name in _ANTHROPIC_FIELDS:
            value = _get(usage, name)
            if isinstance(value, int):
                seen.raw[name] = value  # message_delta's usage is cumulative: replace, never add
        details = _get(usage, "output_tokens_details")
        if details is not None:
            seen.raw["thinking_tokens"] = _n(details, "thinking_tokens")
        raw = dict(seen.raw)
        raw_details = {"thinking_tokens": raw.pop("thinking_tokens", 0)}
        seen.counts = self.counts({**raw, "output_tokens_details": raw_details})
        return True

    def observe(self, event: object, seen: Seen) -> None:
        kind = _get(event, "type")
        if kind == "message_start":
            self._merge(_get(_get(event, "message"), "usage"), seen)
        elif kind == "message_delta" and self._merge(_get(event, "usage"), seen):
            seen.final = True
        elif kind == "content_block_delta":
            delta = _get(event, "delta")
            for name in ("text", "thinking", "partial_json"):
                seen.text += _text(_get(delta, name))

    def snapshot_seen(self, stream: object) -> Seen:
        """What a ``messages.stream`` MessageStream accumulated (its public snapshot)."""
        try:
            # Only a MessageStream has it; others raise, handled below.
            snapshot = stream.current_message_snapshot  # type: ignore[attr-defined]  # ^
        except (AssertionError, AttributeError):
            return Seen()  # no message_start yet
        seen = Seen(
            self.counts(_get(snapshot, "usage")), final=_get(snapshot, "stop_reason") is not None
        )
        for block in _get(snapshot, "content") or ():
            for name in ("text", "thinking"):
                seen.text += _text(_get(block, name))
        return seen


OPENAI_CHAT: Kind = _OpenAIChat()
OPENAI_RESPONSES: Kind = _OpenAIResponses()
ANTHROPIC = _Anthropic()


class Call:
    """One metered LLM call: reserve, then settle exactly once."""

    def __init__(
        self,
        budget: Budget,
        *,
        provider: str,
        model: str,
        label: str | None,
        input_estimate: int,
        max_output: int,
    ) -> None:
        self.budget = budget
        self.provider = provider
        self.model = model
        self.label = label
        self.input_estimate = input_estimate
        self.max_output = max_output
        self.reservation: Reservation | None = None

    def reserve(self) -> None:
        self.reservation = self.budget.reserve(
            self.model,
            provider=self.provider,
            input_tokens=self.input_estimate,
            max_output_tokens=self.max_output,
            label=self.label,
        )

    async def areserve(self) -> None:
        await _to_thread(self.reserve)

    def settle(self, seen: Seen, complete: bool = True) -> None:
        """Commit what was seen (see ``supervisor._instrument_rpc`` for the rules)."""
        r = self.reservation
        if r is None or r.settled:
            return
        estimated_output = -(-seen.text // 4)
        if seen.counts is not None:
            c = seen.counts
            out = c["output_tokens"] if seen.final else max(c["output_tokens"], estimated_output)
            r.commit(
                input_tokens=c["input_tokens"],
                output_tokens=out,
                cached_input_tokens=c["cached_input_tokens"],
                cache_write_tokens=c["cache_write_tokens"],
                reasoning_tokens=c["reasoning_tokens"],
            )
        elif complete:
            r.commit(input_tokens=self.input_estimate, output_tokens=self.max_output)
            raise UsageMissing(
                f"{self.provider} {self.model}: the response carried no usage; charged its "
                f"reservation ({self.input_estimate} input + {self.max_output} output tokens)"
            )
        else:
            r.commit(input_tokens=self.input_estimate, output_tokens=estimated_output)

    async def asettle(self, seen: Seen, complete: bool = True) -> None:
        await _to_thread(self.settle, seen, complete)

    def settle_quietly(self, seen: Seen, complete: bool = False) -> None:
        """Settle while another exception is on its way (that one is the one to see)."""
        try:
            self.settle(seen, complete)
        except SupervisorError:
            pass

    def failed(self, exc: BaseException) -> None:
        """The SDK raised before any response: release, or charge the input on a timeout."""
        r = self.reservation
        if r is None or r.settled:
            return
        try:
            if "Timeout" in type(exc).__name__:
                r.commit(input_tokens=self.input_estimate, output_tokens=0)
            else:
                r.release()
        except SupervisorError:
            pass

    async def afailed(self, exc: BaseException) -> None:
        await _to_thread(self.failed, exc)


class _Proxy:
    """Attribute access falls through to the SDK object (``response``, ``text_stream``...)."""

    _inner: Any
    _call: Call
    _seen: Seen

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_inner" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __del__(self) -> None:
        if "_call" in self.__dict__:
            try:
                self._call.settle_quietly(self._seen)  # dropped unfinished: settle what was seen
            except Exception:
                pass  # a finalizer has no one to tell (the supervisor settles holds at exit)


class MeteredStream(_Proxy):
    """An SDK ``Stream`` that settles when it ends, is closed, fails or is dropped."""

    def __init__(self, stream: Any, call: Call, kind: Kind) -> None:
        self._inner, self._call, self._kind, self._seen = stream, call, kind, Seen()

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> Any:
        try:
            item = self._inner.__next__()
        except StopIteration:
            self._call.settle(self._seen, complete=True)
            raise
        except BaseException:
            self._call.settle_quietly(self._seen)
            raise
        self._kind.observe(item, self._seen)
        return item

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._call.settle(self._seen, complete=False)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self._inner.close()
        finally:
            self._call.settle_quietly(self._seen)


class AsyncMeteredStream(_Proxy):
    """An SDK ``AsyncStream`` that settles when it ends, is closed, fails or is dropped."""

    def __init__(self, stream: Any, call: Call, kind: Kind) -> None:
        self._inner, self._call, self._kind, self._seen = stream, call, kind, Seen()

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._inner.__anext__()
        except StopAsyncIteration:
            await self._call.asettle(self._seen, complete=True)
            raise
        except BaseException:
            self._call.settle_quietly(self._seen)  # no await: this may be a cancellation
            raise
        self._kind.observe(item, self._seen)
        return item

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._call.asettle(self._seen, complete=False)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
            return
        try:
            await self._inner.close()
        finally:
            self._call.settle_quietly(self._seen)


class MeteredManager:
    """Anthropic's ``messages.stream(...)`` manager: reserve on enter, settle on exit."""

    def __init__(self, manager: Any, call: Call) -> None:
        self._manager, self._call, self._stream = manager, call, None

    def __enter__(self) -> Any:
        self._call.reserve()
        try:
            self._stream = self._manager.__enter__()
        except BaseException as e:
            self._call.failed(e)
            raise
        return self._stream

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._manager.__exit__(exc_type, exc, tb)
        finally:
            seen = ANTHROPIC.snapshot_seen(self._stream)
            if exc_type is None:
                self._call.settle(seen, complete=False)
            else:
                self._call.settle_quietly(seen)


class AsyncMeteredManager(MeteredManager):
    """The async form of ``MeteredManager``."""

    async def __aenter__(self) -> Any:
        await self._call.areserve()
        try:
            self._stream = await self._manager.__aenter__()
        except BaseException as e:
            await self._call.afailed(e)
            raise
        return self._stream

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            await self._manager.__aexit__(exc_type, exc, tb)
        finally:
            seen = ANTHROPIC.snapshot_seen(self._stream)
            if exc_type is None:
                await self._call.asettle(seen, complete=False)
            else:
                self._call.settle_quietly(seen)
