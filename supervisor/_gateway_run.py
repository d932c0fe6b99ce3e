"""The LLM gateway in a run: whether it is on, its backend adapter, and the child's env.

``gateway: auto`` (the default) is on when the policy has a budget and supervise holds a
provider key; ``on`` is on whatever, with a ledger without limits when the policy has no
budget (usage is still counted); ``off`` never.  The gateway (``supervisor.gateway``,
aiohttp) is imported only when it is on.  It serves every configured provider: one
whose key supervise holds with that key (custody), one whose key it does not hold with
the key the client sends beside the run token (custody off: what an instrumented SDK
client does).

The child's environment (``child_env``): the variables SDKs and agents read
(``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``, the key variables = the run token,
``SUPERVISE_GATEWAY``: SPEC) point at the gateway for each provider kind whose key
supervise holds; a kind whose key it does not hold keeps its variables as they were, so a
program that is not instrumented talks to its provider with its own key as before (its
key was scrubbed and replaced by the token otherwise, which no provider takes).  Whenever
the gateway runs, the child also gets, for ``supervisor.instrument``:

- ``SUPERVISE_GATEWAY_URL``: the gateway's base URL (``http://127.0.0.1:PORT``);
- ``SUPERVISE_GATEWAY_TOKEN``: the run token (header ``x-supervise-token``);
- ``SUPERVISE_GATEWAY_PROVIDERS``: JSON ``{name: [kind, upstream]}``, so a client is sent
  to the route whose upstream is its own base URL (``<url>/<name>``).

Where it listens (``enforced.gateway.listens`` in ``run_start``): in supervise's network
namespace, which the tree shares (``host``); under ``network: deny``, where the tree lives:
the helper makes the listening socket on 127.0.0.1:PORT after the command entered its own
network namespace and sends it back (``netns``), so the gateway, served from outside, is
the tree's only way out.  Where the namespace was refused and Landlock's TCP rules stand in,
the socket is made in the host's namespace and the tree may connect to that one TCP port
(``landlock port rule``); where that port is taken on the host, the tree cannot reach the
gateway (None, and a fallback warning).

Threads: the gateway serves on a thread of its own; every call it makes into the run's
budget backend holds the run's lock, which the run's own thread holds except while it
waits in ``poll()``.  So the ledger, the verdicts and the stop are only ever touched by one
thread at a time, and the run's loop is woken after each call (a denial may have begun a
stop, whose deadlines the loop must see).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from decimal import Decimal
    from typing import Any

    from ._backend import BudgetEvents, RunBackend
    from ._plan import RunPlan
    from ._stop import Wake
    from .gateway import Gateway, GatewayPolicy, Provider


def _section(plan: RunPlan) -> GatewayPolicy:
    from .gateway import GatewayPolicy

    return GatewayPolicy.model_validate(plan.gateway)


def wanted(plan: RunPlan, environ: dict[str, str] | None = None) -> list[Provider] | None:
    """The providers the run's gateway serves, or None when it is off."""
    mode = _mode(plan.gateway)
    if mode == "off" or (mode == "auto" and plan.budget is None):
        return None
    from .gateway import resolve

    environ = dict(os.environ) if environ is None else environ
    providers = resolve(_section(plan), environ, keyless=True)
    if mode == "auto" and not any(p.key for p in providers):
        # Only instrumented clients would use it: they meter over the budget RPC instead.
        # (Started for them, it cost every such run an aiohttp import and a thread: 50
        # concurrent budget runs held the SQLite ledger's lock past its 2 s under load.)
        return None
    return providers or None


def _mode(section: object) -> str:
    """``gateway:``'s mode without validating it (the policy was validated already)."""
    if section is None:
        return "auto"
    if isinstance(section, bool):
        return "on" if section else "off"
    if isinstance(section, str):
        return section
    if isinstance(section, dict):
        return str(section.get("mode") or "auto")
    return "auto"


class GatewayBackend:
    """The run's ``RunBackend`` as the gateway sees it: a denial's audit line says
    ``via: gateway`` (with the model and label), and the run's loop is woken after each
    call.  The gateway holds the run's lock around every call (``Gateway(lock=...)``)."""

    def __init__(self, backend: RunBackend, events: BudgetEvents, wake: Wake) -> None:
        self.backend, self.events, self.wake = backend, events, wake
        self.ledger = backend.ledger

    def reserve(self, *, model: str, provider: str | None, input_tokens: int,
                max_output_tokens: int, usd: Decimal | None, label: str | None,
                key: str | None) -> dict[str, Any]:  # fmt: skip
        self.events.via = {"via": "gateway", "provider": provider, "model": model, "label": label}
        try:
            return self.backend.reserve(model=model, provider=provider, input_tokens=input_tokens,
                                        max_output_tokens=max_output_tokens, usd=usd,
                                        label=label, key=key)  # fmt: skip
        finally:
            self.events.via = None
            self.wake.poke()

    def commit(self, reservation: str, *, input_tokens: int, output_tokens: int,
               cached_input_tokens: int, cache_write_tokens: int, reasoning_tokens: int,
               usd: Decimal | None) -> dict[str, Any]:  # fmt: skip
        try:
            return self.backend.commit(
                reservation, input_tokens=input_tokens, output_tokens=output_tokens,
                cached_input_tokens=cached_input_tokens, cache_write_tokens=cache_write_tokens,
                reasoning_tokens=reasoning_tokens, usd=usd,
            )  # fmt: skip
        finally:
            self.wake.poke()

    def release(self, reservation: str) -> dict[str, Any]:
        return self.backend.release(reservation)

    def usage(self) -> dict[str, Any]:
        return self.backend.usage()


class Opening:
    """The run's gateway from before the spawn to its start: ``open()`` before the spawn
    (the child's environment; the helper's ``words`` and ``fds`` under ``network: deny``),
    ``serve()`` after it (the gateway, serving the socket made in the tree's namespace)."""

    RECEIVE_WAIT = 10.0  # seconds: the socket is sent before exec, so it is there already

    def __init__(self) -> None:
        self.words: list[str] = []
        self.fds: tuple[int, ...] = ()
        self.listens: str | None = None
        self.gateway: Gateway | None = None  # once it serves
        self._start: Callable[[socket.socket], Gateway] | None = None
        self._ours = -1

    def open(
        self,
        providers: list[Provider],
        plan: RunPlan,
        backend: RunBackend,
        events: BudgetEvents,
        lock: Any,
        wake: Wake,
        env: dict[str, str],
    ) -> None:
        """Before the spawn: ``env`` (the child's) gets the gateway's variables, and loses
        every provider key whatever ``env.inherit`` said."""
        import secrets

        from .gateway import Gateway, key_variables

        section, token = _section(plan), secrets.token_urlsafe(32)
        meter = GatewayBackend(backend, events, wake)

        def start(sock: socket.socket | None) -> Gateway:
            gw = Gateway(meter, providers, token=token, lock=lock, sock=sock,
                         listen=section.listen)  # fmt: skip
            gw.start()
            return gw

        if plan.network == "deny":
            import _socket

            from .limits import gateway_port, gateway_words

            port = gateway_port(section.port)
            ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
            self._ours, self.fds = ours.detach(), (theirs.detach(),)
            self.words = gateway_words(self.fds[0], port)
            self._start = start
            endpoint = _future_endpoint(providers, token, f"http://127.0.0.1:{port}")
        else:
            self.gateway = endpoint = start(None)
            self.listens = "host"
        redirect: set[str] = {p.kind for p in providers if p.key}  # kinds whose key we hold
        new = child_env(endpoint, providers, redirect, env, key_variables(section))
        env.clear()
        env.update(new)

    def serve(self, network: str | None, warnings: list[str]) -> Gateway | None:
        """After the spawn: the gateway, serving (under ``network: deny``) the socket the
        helper made where the tree lives; ``network`` is what the kernel applied
        (``Confinement.network``).  Without it, a fallback warning in ``warnings``."""
        if self._start is None:
            return self.gateway
        self._close_helper_end()
        sock = self._receive()
        if sock is None:
            # The Landlock fallback found the port taken on the host: the tree cannot
            # reach the gateway (nor anything else); its keys stay out all the same.
            import sys

            message = "network: deny: the LLM gateway is not reachable from the tree"
            warnings.append(message)
            print(f"supervise: warning: {message}", file=sys.stderr)
            return None
        self.listens = "netns" if network == "namespace" else "landlock port rule"
        self.gateway = self._start(sock)
        return self.gateway

    def _receive(self) -> socket.socket | None:
        """The listening socket the helper sent, or None when it sent none (EOF)."""
        import select
        import socket

        ours, self._ours = self._ours, -1
        with socket.socket(fileno=ours) as channel:
            poller = select.poll()
            poller.register(ours, select.POLLIN)
            if not poller.poll(self.RECEIVE_WAIT * 1000):
                return None
            try:
                _, fds, _, _ = socket.recv_fds(channel, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                return None
        return socket.socket(fileno=fds[0]) if fds else None

    def _close_helper_end(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = ()

    def close(self) -> None:
        """Free what ``serve()`` did not hand over (a run that failed to start)."""
        self._close_helper_end()
        if self._ours >= 0:
            os.close(self._ours)
            self._ours = -1
        if self.gateway is not None:
            self.gateway.close()


def _future_endpoint(providers: list[Provider], token: str, url: str) -> Gateway:
    """A stand-in for the gateway that will serve ``url`` once the spawn made its socket:
    what ``child_env`` reads of it (``scrub_env``, ``url``, ``token``), nothing bound."""
    from .gateway import Gateway

    endpoint = object.__new__(Gateway)
    endpoint.providers = {p.name: p for p in providers}
    endpoint.token, endpoint.url = token, url
    return endpoint


# The variables the gateway sets per provider kind (``Gateway.child_env``).
_KIND_VARIABLES = {
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY"),
    "anthropic": ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"),
}


def child_env(
    gw: Gateway, providers: list[Provider], redirect: set[str], env: dict[str, str],
    key_names: set[str],
) -> dict[str, str]:  # fmt: skip
    """The child's environment: ``redirect``'s kinds point at the gateway (keys removed),
    the others keep their variables; the instrumentation's variables in any case."""
    import json

    if redirect:
        new = gw.scrub_env(env, key_names)
        held = [p.key for p in providers if p.key]
        for kind, names in _KIND_VARIABLES.items():
            if kind in redirect:
                continue
            for name in names:  # not redirected: as it was before the gateway
                if name in env and not any(key in env[name] for key in held):
                    new[name] = env[name]
                else:
                    new.pop(name, None)
    else:
        new = dict(env)
        new.pop("SUPERVISE_GATEWAY", None)  # SPEC: only where the SDK variables point at it
        for name in ("NO_PROXY", "no_proxy"):
            hosts = [h for h in new.get(name, "").split(",") if h]
            new[name] = ",".join([*hosts, *(h for h in ("127.0.0.1",) if h not in hosts)])
    new["SUPERVISE_GATEWAY_URL"] = gw.url
    new["SUPERVISE_GATEWAY_TOKEN"] = gw.token
    new["SUPERVISE_GATEWAY_PROVIDERS"] = json.dumps(
        {p.name: [p.kind, p.upstream] for p in providers}, separators=(",", ":")
    )
    return new
