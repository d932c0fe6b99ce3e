"""The gateway's server: one aiohttp app on its own thread and loop, one upstream session.

Per request (``_Call``): the run token is checked, the route looked up (anything else is a
404 that is never forwarded), the body read, the input estimated and the max tokens clamped
to what the budget can pay, one reservation made, the request sent upstream with the real
key, and the answer passed to the client chunk by chunk while its usage is read on the side.
At the end the hold is committed with the provider's usage (or at the hold when it reported
none; released when the provider refused the call).

The backend (the run's ``RunBackend``) is called from the gateway's loop thread, each call
under ``lock``: the run holds the same lock when it dispatches the budget RPC, since the
backend's totals and grants are not thread-safe. Calls are short (a SQLite transaction).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
from typing import Any

import aiohttp
from aiohttp import web

from supervisor.budget.pricing import Prices, provider_for_url
from supervisor.errors import BudgetError, StoreUnavailable
from supervisor.gateway._call import _Call, _error, _json_usage
from supervisor.gateway._policy import Provider
from supervisor.gateway._usage import SseReader, StreamMeter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from supervisor.gateway._call import Meter as Backend

__all__ = ["Gateway"]

MAX_BODY = 64 * 1024 * 1024  # a request (images inline) or a whole JSON answer
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
    "authorization",
    "x-api-key",
    "x-supervise-token",
    "x-supervise-label",
    "accept-encoding",
}
_ROUTES = {
    # kind -> path after the provider name -> (metered, max tokens field)
    "openai": {
        "v1/chat/completions": (True, "max_completion_tokens"),
        "v1/responses": (True, "max_output_tokens"),
        "v1/completions": (True, "max_tokens"),  # legacy completions
        "v1/embeddings": (True, None),
        "v1/models": (False, None),
    },
    "anthropic": {
        "v1/messages": (True, "max_tokens"),
        "v1/messages/count_tokens": (False, None),
        "v1/models": (False, None),
    },
}


class Gateway:
    """The run's LLM gateway.

    ``backend``: the run's budget backend (``_rpc_methods.Backend``: reserve, commit,
    release, usage), called under ``lock``. ``providers``: from ``_policy.resolve``.
    ``token``: the run token the child gets instead of a key. ``sock``: an already listening
    socket to serve (made in the child's network namespace), else ``listen`` is bound.
    ``on_denied(error, detail)``: a budget denial (``detail["via"] == "gateway"``).
    ``prices``: the ledger's (for clamping and for the prices the ledger's token counts
    cannot express: 1-hour cache writes, web searches, service tiers).
    """

    def __init__(
        self,
        backend: Backend,
        providers: list[Provider],
        *,
        token: str,
        lock: threading.Lock | None = None,
        sock: socket.socket | None = None,
        listen: str = "127.0.0.1:0",
        on_denied: Callable[[BudgetError | StoreUnavailable, dict[str, Any]], None] | None = None,
        prices: Prices | None = None,
    ) -> None:
        if not token:
            raise ValueError("the gateway needs a run token")
        self.backend = backend
        self.providers = {p.name: p for p in providers}
        self.token = token
        self.lock = lock or threading.Lock()
        self.on_denied = on_denied
        ledger = getattr(backend, "ledger", None)
        self.prices = prices or getattr(ledger, "prices", None) or Prices()
        self._price_ids: dict[str, str] = {}
        if sock is None:
            host, _, port = listen.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, int(port)))
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests = 0  # every request that reached the gateway
        self.forwarded = 0  # every request sent upstream
        self._limited: bool | None = None  # any usd or tokens limit (None: not asked yet)
        self._conversations: dict[str, int] = {}  # Responses id -> tokens of its turns
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None
        self._idle = threading.Condition()
        self._inflight = 0  # metered calls not yet settled

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Serve on a thread of its own; returns once it is listening."""
        for p in self.providers.values():
            self._price_ids[p.name] = provider_for_url(p.upstream) or p.name
        self._thread = threading.Thread(target=self._run, name="supervise-gateway", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start(), never lost
            self._failure = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,  # gzip, deflate, br: read for usage, passed on as identity
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            skip_auto_headers=("User-Agent",),
        )
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.SockSite(runner, self.sock)
            await site.start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving (in-flight calls get ~1 s) and free the socket; idempotent."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is not None and loop is not None and stop is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
            thread.join(timeout)
        self._thread = None
        self.sock.close()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the child's environment --------------------------------------------------------

    def child_env(self) -> dict[str, str]:
        """The variables SDKs and agents read: base URLs, and the run token as every key."""
        env = {"SUPERVISE_GATEWAY": self.url}
        kinds = {p.kind for p in self.providers.values()}
        names = set(self.providers)
        if "openai" in kinds:
            name = (
                "openai"
                if "openai" in names
                else next(p.name for p in self.providers.values() if p.kind == "openai")
            )
            base = f"{self.url}/{name}/v1"
            env.update(OPENAI_BASE_URL=base, OPENAI_API_BASE=base, OPENAI_API_KEY=self.token)
        if "anthropic" in kinds:
            name = (
                "anthropic"
                if "anthropic" in names
                else next(p.name for p in self.providers.values() if p.kind == "anthropic")
            )
            env.update(
                ANTHROPIC_BASE_URL=f"{self.url}/{name}",
                ANTHROPIC_API_KEY=self.token,
                ANTHROPIC_AUTH_TOKEN=self.token,
            )
        return env

    def scrub_env(
        self, env: Mapping[str, str], key_variables: set[str] | None = None
    ) -> dict[str, str]:
        """``env`` without any provider key, with the gateway's variables and NO_PROXY set."""
        from supervisor.gateway._policy import key_variables as default_keys

        drop = key_variables if key_variables is not None else default_keys(None)
        keys = {p.key for p in self.providers.values() if p.key}
        clean = {
            k: v for k, v in env.items() if k not in drop and not any(key in v for key in keys)
        }
        clean.update(self.child_env())
        for name in ("NO_PROXY", "no_proxy"):
            hosts = [h for h in clean.get(name, "").split(",") if h]
            clean[name] = ",".join([*hosts, *(h for h in ("127.0.0.1",) if h not in hosts)])
        return clean

    # -- one request --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        name, _, rest = request.path.lstrip("/").partition("/")
        provider = self.providers.get(name)
        kind = provider.kind if provider is not None else "openai"
        if not self._authorized(request):
            return _error(
                kind,
                401,
                "invalid_api_key",
                "supervise gateway: this request does not carry the run's token "
                "(use the OPENAI_API_KEY / ANTHROPIC_API_KEY the run set)",
            )
        route = _ROUTES[kind].get(rest.rstrip("/")) if provider is not None else None
        if route is None and provider is not None and rest.startswith("v1/models/"):
            route = (False, None)  # one model's description: free, like the list
        if provider is None or route is None:
            return _error(
                kind,
                404,
                "not_found",
                f"supervise gateway: {request.method} {request.path} is not an "
                "endpoint it meters, so it is not forwarded",
            )
        metered, max_field = route
        if not metered:
            return await self._forward(request, provider, await request.read(), None)
        if request.method != "POST":
            return _error(kind, 405, "invalid_request_error", f"{request.path} takes POST")
        with self._idle:
            self._inflight += 1
        try:
            return await _Call(self, request, provider, rest, max_field).run()
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every metered call is settled (a client that hung up included)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _authorized(self, request: web.Request) -> bool:
        h = request.headers
        given = h.get("x-supervise-token") or h.get("x-api-key") or ""
        auth = h.get("Authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _upstream(
        self, request: web.Request, provider: Provider, url_rest: str
    ) -> tuple[str, dict[str, str]]:
        rest = url_rest.removeprefix("v1/") if provider.kind == "openai" else url_rest
        url = f"{provider.upstream}/{rest}"
        if request.query_string:
            url += "?" + request.query_string
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        key = provider.key
        if key is None and request.headers.get("x-supervise-token"):
            # Custody off: the client's own key travels beside the token.
            auth = request.headers.get("Authorization", "")
            key = request.headers.get("x-api-key") or (auth[7:].strip() if auth else None)
        if key:
            if provider.kind == "anthropic":
                headers["x-api-key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        headers["Accept-Encoding"] = "gzip, deflate, br"
        return url, headers

    async def _forward(
        self, request: web.Request, provider: Provider, body: bytes, call: _Call | None
    ) -> web.StreamResponse:
        """Send the request upstream and pass the answer on; ``call`` meters it."""
        rest = request.path.lstrip("/").partition("/")[2]
        url, headers = self._upstream(request, provider, rest)
        self.forwarded += 1
        assert self._session is not None  # made by _serve before the first request
        try:
            upstream = await self._session.request(
                request.method, url, data=body or None, headers=headers, allow_redirects=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            if call is not None:
                call.settle(None, ok=False)
            return _error(
                provider.kind,
                502,
                "upstream_error",
                f"supervise gateway: {provider.name} upstream unreachable: {e}",
            )
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in _HOP:
                    response.headers.add(k, v)
            ok = 200 <= upstream.status < 300
            stream = "text/event-stream" in upstream.headers.get("Content-Type", "")
            meter = None
            if call is not None and stream:
                meter = StreamMeter(provider.kind, withhold_usage_chunk=call.withhold)
            reader = SseReader() if meter is not None else None
            whole = bytearray() if call is not None and not stream else None
            gone = False
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError):
                gone = True
            try:
                async for chunk in upstream.content.iter_any():
                    out = chunk
                    if reader is not None and meter is not None:
                        events = reader.feed(chunk)
                        if meter.withhold:
                            out = b"".join(raw for raw, n, d in events if meter.event(n, d))
                        else:
                            for _, n, d in events:
                                meter.event(n, d)
                    elif whole is not None and len(whole) < MAX_BODY:
                        whole += chunk
                    if not gone and out:
                        try:
                            await response.write(out)
                        except (ConnectionError, RuntimeError):
                            gone = True  # the client hung up: read on to the usage
                    if gone and (call is None or (meter is not None and meter.done)):
                        break
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass  # the upstream broke off: charge what it reported, else the hold
            if call is not None:
                if meter is not None:
                    usage, call.response_id = meter.usage, meter.response_id
                else:
                    usage, call.response_id = _json_usage(provider.kind, whole)
                call.settle(usage, ok=ok)
            if not gone:
                try:
                    if (
                        reader is not None
                        and meter is not None
                        and meter.withhold
                        and reader.rest()
                    ):
                        await response.write(reader.rest())
                    await response.write_eof()
                except (ConnectionError, RuntimeError):
                    pass
        return response

    # -- the backend, under the run's lock ----------------------------------------------

    def backend_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return getattr(self.backend, method)(*args, **kwargs)

    def limited(self) -> bool:
        """Whether any scope (the rate's aside) caps usd or tokens: clamping needs usage()."""
        if self._limited is None:
            self._limited = any(
                s["scope"] != "rate"
                and (s["usd"]["limit"] is not None or s["tokens"]["limit"] is not None)
                for s in self.backend_call("usage")["scopes"]
            )
        return self._limited

    def price_id(self, provider: Provider) -> str:
        return self._price_ids.get(provider.name, provider.name)
