"""The gateway's figures: added latency, added time to first byte, metered calls per second.

    scripts/bench --only gateway [--quick]

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
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from ._common import CONFIG, REPO, rows

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
        # A TCPSite started on port 0: its server is there and has sockets.
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # ^
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


def _child(*args: str) -> list[str]:
    """This module run as a child process (the upstream, the load)."""
    return [sys.executable, "-m", "scripts.benchmarks.gateway", *args]


def bench(tmp_dir: str) -> None:
    """The gateway rows of the table."""
    quick = CONFIG.quick
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

    fake = subprocess.Popen(_child("--upstream"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    assert fake.stdout is not None and fake.stdin is not None
    port = int(fake.stdout.readline())
    policy = BudgetPolicy.model_validate({"run": {"usd": 100000}})
    ledger = Ledger.open(policy, run_id="bench", agent="bench", session=None,
                         store=f"sqlite:///{tmp_dir}/gateway.db")  # fmt: skip
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
            _child("--load", str(gw.port), token, str(seconds), "32"),
            capture_output=True, text=True, check=True, cwd=REPO,
        )  # fmt: skip
        calls = int(loader.stdout) / seconds
        assert gw.wait_idle(30)
        spent = next(s for s in ledger.usage() if s.scope == "run")
        for label, key in (
            ("gateway: added latency per non-streamed call, p50", "call"),
            ("gateway: added time to first streamed byte, p50", "ttfb"),
        ):
            plain, through = figures[key]
            added = 1000 * (through - plain)
            rows.append((
                label, f"the same fake upstream directly {1000 * plain:.3f} ms",
                f"{1000 * through:.3f} ms", f"+{added:.3f} ms (target <= 1 ms)",
            ))  # fmt: skip
        rows.append((
            "gateway: metered calls/s through one run's gateway, 32 connections", "-",
            f"{calls:.0f}/s", f"{spent.calls.used} calls charged (target >= 500/s)",
        ))  # fmt: skip
    finally:
        gw.close()
        ledger.close()
        fake.stdin.close()
        fake.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--upstream"]:
        upstream()
    elif sys.argv[1:2] == ["--load"]:
        load(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
