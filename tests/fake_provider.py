"""A fake LLM provider on loopback: canned OpenAI and Anthropic responses and SSE streams.

Fixed usage numbers, cache fields included. The model name picks a variant: ``no-usage``
answers without usage, ``fail-500`` answers HTTP 500. Every request is counted, and logged
as ``("http", path)`` into a shared event list so tests can see what came first.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


ROUTES = {
    "/v1/chat/completions": (chat, chat_stream),
    "/v1/responses": (response, response_stream),
    "/v1/messages": (message, message_stream),
}


class FakeProvider:
    """The server, on 127.0.0.1 in a thread; ``requests`` holds (path, body) of each request."""

    def __init__(self, events: list[tuple[Any, ...]] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.events = events if events is not None else []
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                provider.requests.append((self.path, body))
                provider.events.append(("http", self.path))
                plain, stream = ROUTES[self.path]
                if body.get("model") == "fail-500":
                    self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                elif body.get("stream"):
                    self._sse(stream(body))
                else:
                    self._json(200, plain(body))

            def _json(self, status: int, data: dict[str, Any]) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _sse(self, events: list[tuple[str | None, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for name, data in events:
                        text = data if isinstance(data, str) else json.dumps(data)
                        head = f"event: {name}\n" if name else ""
                        self.wfile.write(f"{head}data: {text}\n\n".encode())
                        self.wfile.flush()
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
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
