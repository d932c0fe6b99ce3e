"""The gateway's figures: added latency, added time to first byte, metered calls per second.

    python scripts/gateway_bench.py [--quick]

A fast fake upstream (aiohttp, its own process) answers a chat completion as JSON or as a
short SSE stream. The gateway runs in this process over a real ledger (SQLite, a budget with
a USD limit, so every call also reads the usage to clamp its max tokens). Latency and time
to first byte are medians of alternating calls straight to the upstream and through the
gateway, on one kept-alive connection each; throughput comes from a load process with 32
concurrent connections for a few seconds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
ANSWER = {
    "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": USAGE,
}  # fmt: skip


def upstream() -> None:
    """The fake provider: prints its port, serves until stdin closes."""
    from aiohttp import web

    raw = json.dumps(ANSWER).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=raw, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("a", "b", "c"):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}}], "usage": None}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\n".encode()
            )
        await response.write(b"data: [DONE]\n\n")
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


def load(port: int, token: str, seconds: float, concurrency: int) -> None:
    """The load process: prints how many calls completed in ``seconds``."""
    import aiohttp

    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "messages": []})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"

    async def main() -> None:
        done = 0
        end = time.monotonic() + seconds
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    async with session.post(url, data=body, headers=headers) as r:
                        await r.read()
                        assert r.status == 200, r.status
                    done += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        print(done, flush=True)

    asyncio.run(main())


def timed(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str],
          first_byte: bool) -> float:  # fmt: skip
    t = time.perf_counter()
    conn.request("POST", path, body, headers)
    answer = conn.getresponse()
    if first_byte:
        answer.read1(1)
        elapsed = time.perf_counter() - t
        answer.read()
        return elapsed
    answer.read()
    return time.perf_counter() - t


def main() -> None:
    quick = "--quick" in sys.argv
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))
    from supervisor._backend import RunBackend
    from supervisor.budget._policy import BudgetPolicy
    from supervisor.budget.ledger import Ledger
    from supervisor.gateway import Gateway, Provider
    from supervisor.result import Usage

    class Events:
        def budget_denied(self, error: Any) -> None: ...
        def budget_breached(self, error: Any) -> None: ...
        def budget_alert(self, alert: Any) -> None: ...
        def usage_changed(self, call: dict[str, Any]) -> None: ...
        def spend_lost(self, error: Any, call: dict[str, Any]) -> None: ...

    fake = subprocess.Popen([sys.executable, __file__, "--upstream"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert fake.stdout is not None and fake.stdin is not None
    port = int(fake.stdout.readline())
    tmp = tempfile.TemporaryDirectory()
    policy = BudgetPolicy.model_validate({"run": {"usd": 100000}})
    ledger = Ledger.open(policy, run_id="bench", agent="bench", session=None,
                         store=f"sqlite:///{tmp.name}/b.db")  # fmt: skip
    backend = RunBackend(Events(), Usage(), ledger, None, None)
    token = "bench-token"
    provider = Provider("openai", "openai", f"http://127.0.0.1:{port}/v1", "sk-bench")
    gw = Gateway(backend, [provider], token=token, lock=threading.Lock())
    gw.start()
    try:
        direct = http.client.HTTPConnection("127.0.0.1", port)
        via = http.client.HTTPConnection("127.0.0.1", gw.port)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        rounds = 100 if quick else 400
        figures = {}
        for name, stream in (("call", False), ("ttfb", True)):
            hi = [{"role": "user", "content": "hi"}]
            request = {"model": "gpt-4o-mini", "max_tokens": 50, "stream": stream, "messages": hi}
            body = json.dumps(request).encode()
            a, b = [], []
            for _ in range(rounds // 10):  # warm both connections and the price cache
                timed(direct, "/v1/chat/completions", body, headers, stream)
                timed(via, "/openai/v1/chat/completions", body, headers, stream)
            for _ in range(rounds):
                a.append(timed(direct, "/v1/chat/completions", body, headers, stream))
                b.append(timed(via, "/openai/v1/chat/completions", body, headers, stream))
            figures[name] = (statistics.median(a), statistics.median(b))
        direct.close()
        via.close()
        seconds = 2.0 if quick else 5.0
        loader = subprocess.run(
            [sys.executable, __file__, "--load", str(gw.port), token, str(seconds), "32"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        calls = int(loader.stdout) / seconds
        assert gw.wait_idle(30)
        spent = next(s for s in ledger.usage() if s.scope == "run")
        for label, key in (("added latency per call, p50", "call"),
                           ("added time to first byte (stream), p50", "ttfb")):  # fmt: skip
            plain, through = figures[key]
            added, plain_ms, via_ms = 1000 * (through - plain), 1000 * plain, 1000 * through
            print(f"{label:42} {added:7.3f} ms (direct {plain_ms:.3f} ms, via {via_ms:.3f} ms)")
        print(f"{'metered calls/s (32 connections)':42} {calls:7.0f}   "
              f"(ledger: {spent.calls.used} calls charged)")  # fmt: skip
    finally:
        gw.close()
        ledger.close()
        fake.stdin.close()
        fake.wait()
        tmp.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        upstream()
    elif sys.argv[1:2] == ["--load"]:
        load(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
