"""A validated policy as the engine uses it: a plain ``RunPlan``, and a cache of them.

``Policy`` (pydantic) is the schema; validating it costs ~100 ms of imports.  The engine
only needs the effective values, so it runs on a ``RunPlan`` built from
``Policy.to_dict()``.  The command line keeps each validated policy as JSON in the user's
cache, keyed by the SHA-256 of the file's bytes, the ``--set`` items and this version, so
``supervise -- true`` with an unchanged policy imports neither pydantic nor yaml.
"""

from __future__ import annotations

import json
import math
import os

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

if TYPE_CHECKING:
    from .policy import Policy

_FORMAT = 4  # bump when the shape of Policy.to_dict(), or what validates, changes


class RunPlan:
    """The effective policy of a run, as plain values (seconds, bytes, counts)."""

    __slots__ = (
        "agent",
        "audit",
        "audit_keep",
        "audit_max_size",
        "budget",
        "env_inherit",
        "env_set",
        "grace",
        "limits",
        "name",
        "network",
        "on_violation",
        "policy",
        "sha256",
        "workspace",
    )

    def __init__(self, data: dict[str, Any], sha256: str) -> None:
        self.policy = data
        self.sha256 = sha256
        self.name: str = data.get("name") or "unnamed"
        self.agent: str | None = data.get("agent")
        self.limits: dict[str, Any] = dict(data.get("limits") or {})
        self.on_violation: str = data.get("on_violation", "kill")
        self.grace: float = float(data.get("grace", 2.0))
        env = data.get("env") or {}
        self.env_inherit: bool | list[str] = env.get("inherit", True)
        self.env_set: dict[str, str] = dict(env.get("set") or {})
        audit = data.get("audit") or {}
        self.audit: str | None = audit.get("path")
        self.audit_max_size: int | None = audit.get("max_size")
        self.audit_keep: int | None = audit.get("keep")
        self.workspace: dict[str, Any] | None = data.get("workspace")
        self.network: str = data.get("network", "allow")
        self.budget: dict[str, Any] | None = data.get("budget")

    @classmethod
    def from_policy(cls, policy: Policy) -> RunPlan:
        return cls(policy.to_dict(), policy.sha256())

    def limit(self, name: str) -> Any:
        return self.limits.get(name)

    def rlimit_words(self) -> list[str]:
        """The reaper's words for the kernel rlimits of this plan.

        RLIMIT_CPU gets hard = soft + 1 s, so SIGXCPU (a named cause) comes before the
        kernel's SIGKILL.  Under ``on_violation: warn`` nothing may be killed, so the two
        rlimits whose breach kills (CPU, FSIZE) are left to the watcher.  RLIMIT_FSIZE is
        not here: it also caps the workspace, so ``_confine.Confinement`` words it.
        """
        words = []
        kills = self.on_violation == "kill"
        cpu = self.limits.get("cpu_time")
        if cpu is not None and kills:
            soft = max(1, math.ceil(cpu))
            words.append(f"cpu={soft}:{soft + 1}")
        if self.limits.get("address_space") is not None:
            words.append(f"as={int(self.limits['address_space'])}")
        if self.limits.get("open_files") is not None:
            words.append(f"nofile={int(self.limits['open_files'])}")
        return words


def _default_policy_bytes() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "default.yaml"), "rb") as f:
        return f.read()


def load_plan(path: str | None, overrides: list[str]) -> RunPlan:
    """The plan for a policy file (None: the built-in default) with ``--set`` items.

    Raises PolicyError exactly as ``Policy.load`` would; only valid policies are cached.
    """
    from ._hash import sha256
    from .spawn import cache_dir

    if path is None:
        data = _default_policy_bytes()
        source = "<default>"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            from .policy import Policy

            Policy.load(path)  # raises the PolicyError that names the problem
            raise
        source = path
    h = sha256(b"%d\0" % _FORMAT)
    h.update(data)
    for item in overrides:
        h.update(b"\0" + item.encode("utf-8", "surrogateescape"))
    cache = os.path.join(cache_dir(), "policies", h.hexdigest() + ".json")
    try:
        with open(cache, "rb") as f:
            cached = json.loads(f.read())
        return RunPlan(cached["policy"], cached["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from .policy import Policy

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # As `supervise check` says it: "not UTF-8 text", never a policy read with U+FFFD.
        Policy.load(source)
        raise
    policy = Policy.from_yaml(text, source=source)
    if overrides:
        policy = policy.with_overrides(overrides)
    plan = RunPlan.from_policy(policy)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"policy": plan.policy, "sha256": plan.sha256}, f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs speed
    return plan
