"""A validated policy as the engine uses it: a plain ``RunPlan``, and a cache of them.

``Policy`` (pydantic) is the schema; validating it costs ~100 ms of imports.  The engine
only needs the effective values, so it runs on a ``RunPlan`` built from
``Policy.to_dict()``.  The command line keeps each validated policy as JSON in the user's
cache, keyed by the SHA-256 of the file's bytes, the ``--set`` items and this version, so
``supervise -- true`` with an unchanged policy imports neither pydantic nor yaml.
"""

from __future__ import annotations

import json
import os

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    from .policy import Policy

    # Every name a limit may have: ``plan.max.get("wal_time")`` is a type error.
    LimitName = Literal[
        "wall_time",
        "cpu_time",
        "step_time",
        "memory",
        "address_space",
        "file_size",
        "open_files",
        "processes",
    ]

_FORMAT = 5  # bump when the shape of Policy.to_dict(), or what validates, changes


class Limits:
    """The run's limits as typed attributes (None: not limited); ``plan.max.wall_time``.

    A misspelt attribute is an AttributeError at run time and a mypy error before: unlike
    a dict lookup, a typo can never read as "no limit".
    """

    __slots__ = (
        "address_space",
        "cpu_time",
        "file_size",
        "memory",
        "open_files",
        "processes",
        "step_time",
        "wall_time",
    )

    def __init__(self, data: dict[str, Any]) -> None:
        # As validated (no conversion: the audit log records the values as the policy has
        # them, 5 stays 5); durations are seconds, sizes bytes.
        self.wall_time: float | None = data.get("wall_time")
        self.cpu_time: float | None = data.get("cpu_time")
        self.step_time: float | None = data.get("step_time")
        self.memory: int | None = data.get("memory")
        self.address_space: int | None = data.get("address_space")
        self.file_size: int | None = data.get("file_size")
        self.open_files: int | None = data.get("open_files")
        self.processes: int | None = data.get("processes")

    def get(self, name: LimitName) -> float | int | None:
        """A limit by name, for code that loops over several (the name is Literal-typed)."""
        value: float | int | None = getattr(self, name)
        return value


class RunPlan:
    """The effective policy of a run, as plain values (seconds, bytes, counts).

    ``max`` holds the limits, typed; ``limits`` is the same as the policy wrote it (a dict,
    for display: ``supervise``'s summary line).  ``policy`` is the whole validated policy
    as JSON data, what the plan cache stores.
    """

    __slots__ = (
        "agent",
        "audit",
        "audit_keep",
        "audit_max_size",
        "budget",
        "env_inherit",
        "env_set",
        "gateway",
        "grace",
        "limits",
        "max",
        "name",
        "network",
        "on_violation",
        "policy",
        "sha256",
        "source",
        "user",
        "workspace",
    )

    def __init__(self, data: dict[str, Any], sha256: str) -> None:
        self.policy = data
        self.sha256 = sha256
        self.name: str = data.get("name") or "unnamed"
        self.agent: str | None = data.get("agent")
        self.limits: dict[str, Any] = dict(data.get("limits") or {})
        self.max = Limits(self.limits)
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
        self.gateway: dict[str, Any] | str | None = data.get("gateway")
        self.user: str | int = data.get("user", "auto")
        self.source: str | None = None  # the policy file, when it came from one

    @classmethod
    def from_policy(cls, policy: Policy) -> RunPlan:
        plan = cls(policy.to_dict(), policy.sha256())
        plan.source = None if policy.source.startswith("<") else policy.source
        return plan

    def needs_rpc(self, gateway: bool) -> bool:
        """Whether a run asks anything of the budget RPC: a budget (or the gateway, whose
        ledger counts usage), a workspace's check_write, steps."""
        return (
            gateway
            or self.budget is not None
            or self.workspace is not None
            or self.max.step_time is not None
        )

    @property
    def kills(self) -> bool:
        """Whether a breach stops the tree (``on_violation: kill``), or only warns."""
        return self.on_violation == "kill"

    def rlimit_words(self) -> list[str]:
        """``limits.rlimit_words(self)``; kept for callers of the old name (test_fuzz)."""
        from .limits import rlimit_words

        return rlimit_words(self)


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
        plan = RunPlan(cached["policy"], cached["sha256"])
        plan.source = path
        return plan
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
    plan.source = path
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"policy": plan.policy, "sha256": plan.sha256}, f)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs speed
    return plan
