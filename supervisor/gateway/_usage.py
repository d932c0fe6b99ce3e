"""What a provider says a call used, read from its answer: JSON or SSE, pure functions.

SPEC's counts: ``input`` is every input token (cache reads and writes included),
``cached_input`` and ``cache_write`` (and ``cache_write_1h``) are parts of it, ``reasoning``
is part of ``output``. OpenAI chat reports ``prompt_tokens`` (cached included); the Responses
API ``input_tokens`` (cached included); Anthropic ``input_tokens`` *without* the cache reads
and writes, which are added here.

Streams: ``SseReader`` cuts bytes into events; ``StreamMeter`` keeps the usage seen so far
(OpenAI chat's usage chunk, the Responses API's terminal ``response.completed`` /
``response.incomplete`` / ``response.failed``, Anthropic's ``message_start`` then every
``message_delta``, whose usage is cumulative: the last one wins, as a server tool can send
several).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["SseReader", "StreamMeter", "WireUsage", "from_json"]


@dataclass(frozen=True)
class WireUsage:
    """One call's usage as the provider reported it, in SPEC's terms."""

    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    web_searches: int = 0
    service_tier: str | None = None

    @property
    def priced_apart(self) -> bool:
        """Whether the ledger's token counts alone would misprice it (the gateway prices it)."""
        tier = self.service_tier not in (None, "default", "auto", "standard", "standard_only")
        return bool(self.cache_write_1h or self.web_searches or tier)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def openai_usage(usage: dict[str, Any], service_tier: object = None) -> WireUsage:
    """Chat (prompt/completion_tokens), Responses (input/output_tokens) or embeddings."""
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        details = _dict(usage.get("prompt_tokens_details"))
        out = _dict(usage.get("completion_tokens_details"))
        inp, output = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    else:
        details = _dict(usage.get("input_tokens_details"))
        out = _dict(usage.get("output_tokens_details"))
        inp, output = _int(usage.get("input_tokens")), _int(usage.get("output_tokens"))
    if not output and not inp:
        inp = _int(usage.get("total_tokens"))  # embeddings: prompt_tokens == total_tokens
    cached = min(_int(details.get("cached_tokens")), inp)
    reasoning = min(_int(out.get("reasoning_tokens")), output)
    tier = service_tier if isinstance(service_tier, str) else None
    return WireUsage(inp, output, cached, 0, 0, reasoning, 0, tier)


def anthropic_usage(usage: dict[str, Any], raw: dict[str, Any] | None = None) -> WireUsage:
    """A Messages usage block; ``raw`` accumulates a stream's (message_start, then deltas)."""
    raw = {} if raw is None else raw
    for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
                 "output_tokens"):  # fmt: skip
        if usage.get(name) is not None:
            raw[name] = _int(usage.get(name))
    creation = _dict(usage.get("cache_creation"))
    if creation:
        raw["1h"] = _int(creation.get("ephemeral_1h_input_tokens"))
    tool = _dict(usage.get("server_tool_use"))
    if tool:
        raw["searches"] = _int(tool.get("web_search_requests"))
    out_details = _dict(usage.get("output_tokens_details"))
    if out_details:
        raw["thinking"] = _int(out_details.get("thinking_tokens"))
    if isinstance(usage.get("service_tier"), str):
        raw["tier"] = usage["service_tier"]
    read = raw.get("cache_read_input_tokens", 0)
    write = raw.get("cache_creation_input_tokens", 0)
    output = raw.get("output_tokens", 0)
    return WireUsage(
        input=raw.get("input_tokens", 0) + read + write,
        output=output,
        cached_input=read,
        cache_write=write,
        cache_write_1h=min(raw.get("1h", 0), write),
        reasoning=min(raw.get("thinking", 0), output),
        web_searches=raw.get("searches", 0),
        service_tier=None,  # Anthropic's "standard"/"priority" is capacity, not a price row
    )


def _web_search_calls(response: dict[str, Any]) -> int:
    output = response.get("output")
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output if _dict(item).get("type") == "web_search_call")


def from_json(kind: str, body: dict[str, Any]) -> WireUsage | None:
    """The usage in a whole (non-streamed) answer, or None when it reports none."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    if kind == "anthropic":
        return anthropic_usage(usage)
    found = openai_usage(usage, body.get("service_tier"))
    searches = _web_search_calls(body)
    return replace(found, web_searches=searches) if searches else found


class SseReader:
    """Cuts a byte stream into server-sent events: ``feed`` returns the whole ones.

    Each event is ``(raw bytes including its blank line, event name or None, data text)``.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes, str | None, str]]:
        self._buf += chunk
        events: list[tuple[bytes, str | None, str]] = []
        while True:
            # "\n\n" ends an event; a provider may use "\r\n\r\n" (the spec allows both).
            cut, size = self._buf.find(b"\n\n"), 2
            crlf = self._buf.find(b"\r\n\r\n")
            if crlf != -1 and (cut == -1 or crlf < cut):
                cut, size = crlf, 4
            if cut == -1:
                return events
            raw, self._buf = self._buf[: cut + size], self._buf[cut + size :]
            name, data = None, []
            for line in raw.decode("utf-8", "replace").splitlines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            events.append((raw, name, "\n".join(data)))

    def rest(self) -> bytes:
        """Bytes of an event the stream never finished."""
        return self._buf


_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class StreamMeter:
    """The usage of one streamed answer, fed event by event.

    ``withhold_usage_chunk``: an OpenAI chat stream whose client did not ask for
    ``include_usage`` (the gateway asked for it): ``keep`` says False for the usage-only chunk.
    """

    def __init__(self, kind: str, *, withhold_usage_chunk: bool = False) -> None:
        self.kind = kind
        self.withhold = withhold_usage_chunk
        self.usage: WireUsage | None = None
        self.done = False  # the usage is final: nothing more to read for it
        self.response_id: str | None = None  # a Responses stream's id (from its terminal)
        self._raw: dict[str, Any] = {}  # Anthropic: message_start's usage, then each delta's

    def event(self, name: str | None, data: str) -> bool:
        """Take one event; True when the client should get it."""
        if not data or data == "[DONE]" or data[0] != "{":
            if data == "[DONE]":
                self.done = True
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        kind = obj.get("type") if isinstance(obj.get("type"), str) else name
        if self.kind == "anthropic":
            if kind == "message_start":
                usage = _dict(_dict(obj.get("message")).get("usage"))
                self._raw = {}
                self.usage = anthropic_usage(usage, self._raw)
            elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
                self.usage = anthropic_usage(obj["usage"], self._raw)
            elif kind == "message_stop":
                self.done = True
            return True
        if kind in _TERMINAL:
            terminal = _dict(obj.get("response"))
            if isinstance(terminal.get("id"), str):
                self.response_id = terminal["id"]
            self.usage = from_json("openai", terminal) or self.usage
            self.done = True
            return True
        chunk = obj.get("usage")
        if isinstance(chunk, dict):  # chat: the usage chunk (choices empty), after the last
            self.usage = openai_usage(chunk, obj.get("service_tier"))
            if self.withhold and not obj.get("choices"):
                return False
        return True
