"""A fake LLM provider on loopback: canned OpenAI and Anthropic responses and SSE streams.

Fixed usage numbers, cache fields included. The model name picks a variant: ``no-usage``
answers without usage, ``fail-500`` answers HTTP 500. Every request is counted, and logged
as ``("http", path)`` into a shared event list so tests can see what came first; ``seen``
keeps each request's path, headers and raw body (what the gateway forwarded).

The request header ``x-fake`` picks a wire variant: ``gzip`` compresses the answer (SSE
flushed event by event), ``gate`` stops a stream halfway until ``gate`` is set, ``search``
adds Anthropic server-tool usage (two cumulative ``message_delta``), ``priority`` answers
with that ``service_tier``, ``flaky`` answers HTTP 500 to the first request that carries it
(then as usual: an SDK's retry succeeds). Also served: ``/v1/embeddings``, ``/v1/models``,
``/v1/messages/count_tokens``, legacy ``/v1/completions``. ``honor`` answers as a real
provider would: no more completion tokens than the request's max tokens, fewer prompt
tokens than its bytes.
"""

from __future__ import annotations

import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

CHAT_USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 100,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
RESPONSES_USAGE = {
    "input_tokens": 900,
    "input_tokens_details": {"cached_tokens": 800},
    "output_tokens": 250,
    "output_tokens_details": {"reasoning_tokens": 200},
    "total_tokens": 1150,
}
ANTHROPIC_USAGE = {
    "input_tokens": 25,
    "cache_read_input_tokens": 100,
    "cache_creation_input_tokens": 50,
    "output_tokens": 15,
    "output_tokens_details": {"thinking_tokens": 5},
}
WORDS = ["Hello", " world", ",", " how", " are", " you", " today", "?"]


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


def chat(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": body["model"],
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": None if body["model"] == "no-usage" else CHAT_USAGE,
    }


def chat_stream(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    model = body["model"]
    events: list[tuple[str | None, Any]] = [
        (None, _chunk(model, {"role": "assistant", "content": ""}))
    ]
    events += [(None, _chunk(model, {"content": word})) for word in WORDS]
    events.append((None, _chunk(model, {}, "stop")))
    if (body.get("stream_options") or {}).get("include_usage") and model != "no-usage":
        events.append((None, {**_chunk(model, {}), "choices": [], "usage": CHAT_USAGE}))
    events.append((None, "[DONE]"))
    return events


def response(body: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    done = status == "completed"
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "model": body["model"],
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "".join(WORDS), "annotations": []}],
            }
        ]
        if done
        else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": RESPONSES_USAGE if done and body["model"] != "no-usage" else None,
    }


def response_stream(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    events: list[tuple[str | None, Any]] = [
        (
            "response.created",
            {"type": "response.created", "response": response(body, "in_progress")},
        )
    ]
    for word in WORDS:
        delta = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0}
        events.append(("response.output_text.delta", {**delta, "content_index": 0, "delta": word}))
    events.append(
        ("response.completed", {"type": "response.completed", "response": response(body)})
    )
    return [(name, {**data, "sequence_number": i}) for i, (name, data) in enumerate(events)]


def message(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": body["model"],
        "content": [{"type": "text", "text": "".join(WORDS)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": None if body["model"] == "no-usage" else ANTHROPIC_USAGE,
    }


def message_stream(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    start = {**message(body), "content": [], "stop_reason": None}
    start["usage"] = {**ANTHROPIC_USAGE, "output_tokens": 1}
    del start["usage"]["output_tokens_details"]
    block = {"type": "text", "text": ""}
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": start}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        ("ping", {"type": "ping"}),
    ]
    for word in WORDS:
        delta = {"type": "text_delta", "text": word}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
        )
    usage = {"output_tokens": 15, "output_tokens_details": {"thinking_tokens": 5}}  # cumulative
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": stop, "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


EMBEDDING_USAGE = {"prompt_tokens": 8, "total_tokens": 8}


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    item = {"object": "embedding", "index": 0, "embedding": [0.0, 0.5]}
    return {"object": "list", "data": [item], "model": body["model"], "usage": EMBEDDING_USAGE}


def completion(body: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "text": "".join(WORDS), "logprobs": None, "finish_reason": "stop"}
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": body["model"],
        "choices": [choice],
        "usage": CHAT_USAGE,
    }


def completion_stream(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    events: list[tuple[str | None, Any]] = []
    for word in WORDS:
        choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": None}
        events.append((None, {**completion(body), "choices": [choice], "usage": None}))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append((None, {**completion(body), "choices": [], "usage": CHAT_USAGE}))
    events.append((None, "[DONE]"))
    return events


def count_tokens(body: dict[str, Any]) -> dict[str, Any]:
    return {"input_tokens": 42}


def no_stream(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    raise AssertionError("this endpoint does not stream")


ROUTES = {
    "/v1/chat/completions": (chat, chat_stream),
    "/v1/responses": (response, response_stream),
    "/v1/messages": (message, message_stream),
    "/v1/embeddings": (embeddings, no_stream),
    "/v1/completions": (completion, completion_stream),
    "/v1/messages/count_tokens": (count_tokens, no_stream),
}
SEARCH_USAGE = {"server_tool_use": {"web_search_requests": 3}}


class FakeProvider:
    """The server, on 127.0.0.1 in a thread; ``requests`` holds (path, body) of each request."""

    def __init__(self, events: list[tuple[Any, ...]] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.served: list[dict[str, Any]] = []  # the usage of every whole JSON answer
        self.events = events if events is not None else []
        self.gate = threading.Event()  # x-fake: gate streams wait on it halfway
        self.halfway = threading.Event()  # set when a gated stream reached the gate
        self.finished = threading.Event()  # set when a gated stream wrote its last event
        self.failed = 0  # requests answered 500 (x-fake: flaky, model fail-500)
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                provider.seen.append((self.path, dict(self.headers), b""))
                provider.events.append(("http", self.path))
                if self.path.startswith("/v1/models"):
                    self._json(200, {"object": "list", "data": [{"id": "gpt-4o-mini"}]})
                else:
                    self._json(404, {"error": {"message": "no such path"}})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                provider.requests.append((self.path, body))
                provider.seen.append((self.path, dict(self.headers), raw))
                provider.events.append(("http", self.path))
                plain, stream = ROUTES[self.path.partition("?")[0]]
                fake = self.headers.get("x-fake", "")
                flaky = fake == "flaky" and provider.failed == 0
                if body.get("model") == "fail-500" or flaky:
                    provider.failed += 1
                    self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                elif body.get("stream"):
                    self._sse(self._vary(stream(body), fake), fake)
                else:
                    answer = plain(body)
                    if fake == "priority":
                        answer["service_tier"] = "priority"
                    if fake == "honor" and answer.get("usage"):  # a real provider's max tokens
                        most = body.get("max_completion_tokens") or body.get("max_tokens")
                        out = min(cast(int, CHAT_USAGE["completion_tokens"]), most or 10**9)
                        details = {"reasoning_tokens": min(100, out)}
                        prompt = min(cast(int, CHAT_USAGE["prompt_tokens"]), len(raw) // 4)
                        cached = {"cached_tokens": prompt // 2}  # fewer tokens than bytes
                        answer["usage"] = {**CHAT_USAGE, "completion_tokens": out,
                                           "completion_tokens_details": details,
                                           "prompt_tokens": prompt,
                                           "prompt_tokens_details": cached}  # fmt: skip
                    if answer.get("usage"):
                        provider.served.append(answer["usage"])
                    if fake == "search" and answer.get("usage"):
                        answer["usage"] = {**answer["usage"], **SEARCH_USAGE}
                    self._json(200, answer, gzip=fake == "gzip")

            def _vary(
                self, events: list[tuple[str | None, Any]], fake: str
            ) -> list[tuple[str | None, Any]]:
                if fake != "search":
                    return events
                # A server tool: a first message_delta, then a later cumulative one.
                out: list[tuple[str | None, Any]] = []
                for name, data in events:
                    if name == "message_delta":
                        early = {**data, "usage": {"output_tokens": 7, **SEARCH_USAGE}}
                        out.append((name, early))
                    out.append((name, data))
                return [(n, {**d, "usage": {**d["usage"], **SEARCH_USAGE}}) if n ==
                        "message_delta" else (n, d) for n, d in out]  # fmt: skip

            def _json(self, status: int, data: dict[str, Any], gzip: bool = False) -> None:
                raw = json.dumps(data).encode()
                if gzip:
                    packer = zlib.compressobj(wbits=31)
                    raw = packer.compress(raw) + packer.flush()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if gzip:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _sse(self, events: list[tuple[str | None, Any]], fake: str = "") -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                if fake == "gzip":
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                packer = zlib.compressobj(wbits=31) if fake == "gzip" else None
                try:
                    for i, (name, data) in enumerate(events):
                        if fake == "gate" and i == len(events) // 2:
                            provider.halfway.set()
                            provider.gate.wait(30)
                        text = data if isinstance(data, str) else json.dumps(data)
                        head = f"event: {name}\n" if name else ""
                        raw = f"{head}data: {text}\n\n".encode()
                        if packer is not None:
                            raw = packer.compress(raw) + packer.flush(zlib.Z_SYNC_FLUSH)
                        self.wfile.write(raw)
                        self.wfile.flush()
                    if packer is not None:
                        self.wfile.write(packer.flush())
                    if fake == "gate":
                        provider.finished.set()
                except OSError:
                    pass  # the client stopped reading: a stream cut short

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that hangs up mid-stream is what some tests do

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
