"""The policy's ``gateway`` section, and the providers it resolves to (with their keys).

``gateway: auto`` (the default), ``on`` or ``off``, or a mapping with ``mode``, ``listen``
and ``providers``. Without ``providers`` the defaults are OpenAI and Anthropic, each on when
supervise holds its key (``OPENAI_API_KEY`` / ``ANTHROPIC_API_KEY`` in its environment).
Keys are read by ``resolve`` only, and never appear in a repr, a log or an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = [
    "DEFAULT_PROVIDERS",
    "GatewayPolicy",
    "Provider",
    "ProviderPolicy",
    "key_variables",
    "resolve",
]

Kind = Literal["openai", "anthropic"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProviderPolicy(_Model):
    """One upstream: its wire format, its base URL and where supervise reads its key."""

    kind: Kind
    upstream: str
    key_env: str | None = None
    key_file: str | None = None

    @field_validator("upstream")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL (try https://api.openai.com/v1)")
        return value.rstrip("/")

    @field_validator("key_env")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV.match(value):
            raise ValueError(f"{value!r} is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> ProviderPolicy:
        if self.key_env is not None and self.key_file is not None:
            raise ValueError("give key_env or key_file, not both")
        return self


DEFAULT_PROVIDERS: dict[str, ProviderPolicy] = {
    "openai": ProviderPolicy(
        kind="openai", upstream="https://api.openai.com/v1", key_env="OPENAI_API_KEY"
    ),
    "anthropic": ProviderPolicy(
        kind="anthropic", upstream="https://api.anthropic.com", key_env="ANTHROPIC_API_KEY"
    ),
}


class GatewayPolicy(_Model):
    """``gateway:``: ``auto`` = on when the policy has a budget and supervise holds a key."""

    mode: Literal["auto", "on", "off"] = "auto"
    listen: str = "127.0.0.1:0"
    providers: dict[str, ProviderPolicy] | None = None

    @model_validator(mode="before")
    @classmethod
    def _scalar(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a boolean
            return {"mode": "on" if value else "off"}
        if isinstance(value, str):
            return {"mode": value}
        if value is None:
            return {}
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if isinstance(value, bool):  # YAML 1.1: `mode: on` is a boolean
            return "on" if value else "off"
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = str(value).rpartition(":")
        if host != "127.0.0.1" or not port.isdigit() or int(port) > 65535:
            raise ValueError(
                f"{value!r} is not a loopback address (try 127.0.0.1:0, or 127.0.0.1:8787)"
            )
        return value

    @field_validator("providers")
    @classmethod
    def _names(cls, value: dict[str, ProviderPolicy] | None) -> dict[str, ProviderPolicy] | None:
        for name in value or {}:
            if not _NAME.match(name):
                raise ValueError(f"{name!r} is not a provider name (lowercase letters, digits, -_)")
        return value

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class Provider:
    """A resolved upstream. ``key`` None: the client's own key is passed (custody off)."""

    name: str
    kind: Kind
    upstream: str
    key: str | None = field(default=None, repr=False)
    key_source: str = ""  # "key_env OPENAI_API_KEY" or "key_file ~/x": for messages, not the key


def _read_key(policy: ProviderPolicy, environ: dict[str, str] | os._Environ[str]) -> str | None:
    if policy.key_env is not None:
        return environ.get(policy.key_env) or None
    if policy.key_file is not None:
        try:
            with open(os.path.expanduser(policy.key_file), encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None
    return None


def resolve(
    section: GatewayPolicy | None,
    environ: dict[str, str] | os._Environ[str],
    *,
    keyless: bool = False,
) -> list[Provider]:
    """The providers the gateway serves: those whose key supervise holds.

    ``keyless=True`` keeps the others too, with ``key=None`` (custody off: an instrumented
    client's own key is passed upstream). An empty list under ``mode: auto`` means off.
    """
    section = section or GatewayPolicy()
    configured = section.providers if section.providers is not None else DEFAULT_PROVIDERS
    found = []
    for name, policy in configured.items():
        key = _read_key(policy, environ)
        if key is None and not keyless:
            continue
        source = f"key_env {policy.key_env}" if policy.key_env else f"key_file {policy.key_file}"
        found.append(Provider(name, policy.kind, policy.upstream, key, source))
    return found


def key_variables(section: GatewayPolicy | None) -> set[str]:
    """Every environment variable that holds a provider key: removed from the child's env."""
    section = section or GatewayPolicy()
    configured = section.providers if section.providers is not None else DEFAULT_PROVIDERS
    names = {p.key_env for p in configured.values() if p.key_env}
    return names | {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"}
