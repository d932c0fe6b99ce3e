"""The gateway's parts without a server: its policy section, key custody, the usage parsers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from supervisor.gateway import GatewayPolicy, key_variables, resolve
from supervisor.gateway._usage import SseReader, StreamMeter, WireUsage, from_json


@pytest.mark.parametrize(
    ("given", "mode"),
    [("auto", "auto"), ("on", "on"), (True, "on"), (False, "off"), (None, "auto")],
)
def test_scalar_forms(given: object, mode: str) -> None:
    """``gateway: on`` (a YAML boolean too) is the mapping form's mode."""
    assert GatewayPolicy.model_validate(given).mode == mode


@pytest.mark.parametrize(
    "bad",
    [{"mode": "maybe"}, {"listen": "0.0.0.0:80"}, {"listen": "localhost:1"},
     {"providers": {"x": {"kind": "grpc", "upstream": "https://a"}}},
     {"providers": {"X Y": {"kind": "openai", "upstream": "https://a"}}},
     {"providers": {"x": {"kind": "openai", "upstream": "ftp://a"}}},
     {"providers": {"x": {"kind": "openai", "upstream": "https://a", "key_env": "A",
                          "key_file": "/k"}}}],
)  # fmt: skip
def test_bad_sections_are_refused(bad: object) -> None:
    """A mode, listen address, kind, name, URL or double key source that cannot work fails."""
    with pytest.raises(ValidationError):
        GatewayPolicy.model_validate(bad)


def test_defaults_are_on_only_with_a_key(tmp_path: Path) -> None:
    """Without providers: OpenAI and Anthropic, each only when supervise holds its key."""
    assert resolve(None, {}) == []
    found = resolve(None, {"OPENAI_API_KEY": "sk-1"})
    assert [(p.name, p.kind, p.upstream) for p in found] == [
        ("openai", "openai", "https://api.openai.com/v1")
    ]
    assert [p.key for p in resolve(None, {}, keyless=True)] == [None, None]


def test_key_file_with_tilde_and_no_key_in_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """key_file is read with ~ expanded; a provider's repr never shows its key."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "or.key").write_text("sk-or-secret\n")
    section = GatewayPolicy.model_validate(
        {"mode": "on", "listen": "127.0.0.1:8787", "providers": {
            "openrouter": {"kind": "openai", "upstream": "https://openrouter.ai/api/v1/",
                           "key_file": "~/or.key"}}}
    )  # fmt: skip
    (provider,) = resolve(section, {})
    assert provider.key == "sk-or-secret" and provider.upstream == "https://openrouter.ai/api/v1"
    assert "sk-or-secret" not in repr(provider) and section.port == 8787
    assert key_variables(section) >= {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}


def test_importing_the_package_loads_no_aiohttp() -> None:
    """The policy model can be imported on the run's path without aiohttp."""
    code = "import sys, supervisor.gateway; print('aiohttp' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_openai_chat_and_responses_usage() -> None:
    """prompt_tokens include the cached ones; reasoning is part of the output."""
    chat = {"usage": {"prompt_tokens": 1200, "completion_tokens": 300,
                      "prompt_tokens_details": {"cached_tokens": 1000},
                      "completion_tokens_details": {"reasoning_tokens": 100}},
            "service_tier": "priority"}  # fmt: skip
    assert from_json("openai", chat) == WireUsage(1200, 300, 1000, 0, 0, 100, 0, "priority")
    response = {"usage": {"input_tokens": 900, "output_tokens": 250,
                          "input_tokens_details": {"cached_tokens": 800}},
                "output": [{"type": "web_search_call"}, {"type": "message"}]}  # fmt: skip
    assert from_json("openai", response) == WireUsage(900, 250, 800, web_searches=1)
    assert from_json("openai", {"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == (WireUsage(8))
    assert from_json("openai", {"usage": None}) is None


def test_anthropic_usage_adds_the_cache_to_the_input() -> None:
    """input_tokens exclude cache reads and writes; 1-hour writes and searches are kept."""
    usage = {"input_tokens": 25, "cache_read_input_tokens": 100,
             "cache_creation_input_tokens": 50, "output_tokens": 15,
             "cache_creation": {"ephemeral_5m_input_tokens": 20, "ephemeral_1h_input_tokens": 30},
             "server_tool_use": {"web_search_requests": 2}}  # fmt: skip
    got = from_json("anthropic", {"usage": usage})
    assert got == WireUsage(175, 15, 100, 50, 30, 0, 2)
    assert got is not None and got.priced_apart


def _sse(*events: tuple[str | None, object]) -> bytes:
    out = b""
    for name, data in events:
        head = f"event: {name}\r\n" if name else ""
        text = data if isinstance(data, str) else json.dumps(data)
        out += f"{head}data: {text}\r\n\r\n".encode()
    return out


def test_sse_reader_cuts_events_across_chunks() -> None:
    """Events split anywhere across chunks (CRLF too) come out whole, in order."""
    raw = _sse(("a", {"x": 1}), (None, "[DONE]"))
    reader = SseReader()
    got = []
    for i in range(len(raw)):
        got += reader.feed(raw[i : i + 1])
    assert [(n, d) for _, n, d in got] == [("a", '{"x": 1}'), (None, "[DONE]")]
    assert b"".join(r for r, _, _ in got) == raw and reader.rest() == b""


def test_anthropic_stream_takes_the_last_cumulative_delta() -> None:
    """message_start's input, then the last message_delta's output (a server tool repeats it)."""
    meter = StreamMeter("anthropic")
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 10,
             "cache_read_input_tokens": 5, "output_tokens": 1}}}  # fmt: skip
    for name, data in [("message_start", start),
                       ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}}),
                       ("message_delta", {"type": "message_delta", "usage": {
                           "output_tokens": 9, "server_tool_use": {"web_search_requests": 1}}}),
                       ("message_stop", {"type": "message_stop"})]:  # fmt: skip
        assert meter.event(name, json.dumps(data))
    assert meter.usage == WireUsage(15, 9, 5, web_searches=1) and meter.done


def test_chat_stream_withholds_the_usage_chunk_it_asked_for() -> None:
    """The usage-only chunk the gateway asked for is read, and not passed to the client."""
    meter = StreamMeter("openai", withhold_usage_chunk=True)
    assert meter.event(None, json.dumps({"choices": [{"delta": {}}], "usage": None}))
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    assert not meter.event(None, json.dumps({"choices": [], "usage": usage}))
    assert meter.event(None, "[DONE]") and meter.done and meter.usage == WireUsage(3, 2)


@pytest.mark.parametrize("status", ["completed", "incomplete", "failed"])
def test_responses_terminal_events(status: str) -> None:
    """Each terminal event of the Responses API carries the usage, and its id."""
    meter = StreamMeter("openai")
    response = {"id": "resp_9", "usage": {"input_tokens": 4, "output_tokens": 1}}
    meter.event(f"response.{status}", json.dumps({"type": f"response.{status}",
                                                  "response": response}))  # fmt: skip
    assert meter.usage == WireUsage(4, 1) and meter.response_id == "resp_9" and meter.done
