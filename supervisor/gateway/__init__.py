"""The LLM gateway: supervise keeps the provider keys, the child gets a loopback endpoint.

Importing this package is cheap (the policy model only); ``Gateway`` imports aiohttp on
first use, so a run without the gateway never loads it.

Wiring it into a run (see ``Gateway``'s docstring for each argument)::

    providers = resolve(policy.gateway, os.environ)          # [] under auto: gateway off
    gw = Gateway(run_backend, providers, token=secrets.token_urlsafe(32), lock=rpc_lock,
                 sock=listening_socket_or_None, listen=policy.gateway.listen,
                 on_denied=lambda error, detail: ...)          # audit ``denied``, via gateway
    gw.start()
    env = gw.scrub_env(child_env, key_variables(policy.gateway))
    ...
    gw.close()
"""

from __future__ import annotations

from supervisor.gateway._policy import (
    DEFAULT_PROVIDERS,
    GatewayPolicy,
    Provider,
    ProviderPolicy,
    key_variables,
    resolve,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from supervisor.gateway._server import Gateway

__all__ = [
    "DEFAULT_PROVIDERS",
    "Gateway",
    "GatewayPolicy",
    "Provider",
    "ProviderPolicy",
    "key_variables",
    "resolve",
]


def __getattr__(name: str) -> object:
    if name == "Gateway":  # aiohttp only when a gateway is made
        from supervisor.gateway._server import Gateway

        return Gateway
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
