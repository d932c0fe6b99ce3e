"""The policy: what a run may use, read from YAML and checked in full before anything starts.

``Policy.load("policy.yaml")`` returns a frozen, validated ``Policy`` or raises ``PolicyError``
with one line per problem, each naming the file, the line and the key path::

    policy.yaml:7 limits.memory: "2 gigs" is not a size (try 2GiB)

Sizes are stored in bytes and durations in seconds; absent limits are ``None`` (not limited).
``with_overrides`` applies a mapping of dotted keys or ``--set KEY=VALUE`` items; ``sha256``
fingerprints the effective policy for the audit log. The ``budget`` section's models live in
``supervisor.budget._policy``; the YAML loader that maps key paths to lines in
``supervisor._yaml``; the wording of problems and ``--set`` in ``supervisor._policy_errors``.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import date
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from supervisor._hash import sha256
from supervisor._policy_errors import UNBUILT, explain, override
from supervisor._units import (
    MAX_SIZE,
    compact_duration,
    compact_size,
    parse_duration,
    parse_size,
    parse_whole,
    show,
)
from supervisor._yaml import CYCLE, Loc, dotted, line_of, read_yaml, yaml_problem
from supervisor._yaml import walk as walk_yaml
from supervisor.budget._policy import BudgetPolicy, RateLimits, ScopeLimits
from supervisor.errors import PolicyError
from supervisor.gateway._policy import GatewayPolicy, ProviderPolicy

__all__ = ["AuditPolicy", "EnvPolicy", "Limits", "Policy", "WorkspacePolicy"]


def _limit(parse: Callable[[object], float], minimum: float = 0, why: str = "") -> Any:
    """A validator for an optional limit: null = not limited, else parsed and above ``minimum``."""

    def validate(value: object) -> object:
        if value is None:
            return None
        number = parse(value)
        if number <= minimum:
            reason = why or "a limit must be more than 0"
            raise ValueError(f"{show(value)} is too small ({reason}; null means no limit)")
        return number

    return BeforeValidator(validate)


def _parse_count(value: object) -> int:
    number = parse_whole(value)
    if number > MAX_SIZE:  # rlimits are 64-bit
        raise ValueError(f"{show(value)} is too large (the most is {MAX_SIZE})")
    return number


def _version(value: object) -> object:
    if value == 1 and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{show(value)} is not supported (this supervise reads version 1)")


def _text(value: object) -> object:
    """YAML reads ``name: 2024`` as a number, ``yes`` as true and ``2024-01-01`` as a date;
    take them as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date):
        return value.isoformat()
    return str(value) if isinstance(value, int | float) else value


def _number_text(value: object) -> object:
    # Numbers only: "name: yes" is more likely a mistake than a name.
    return value if isinstance(value, bool) else _text(value)


def _env_name(name: object) -> str:
    if not isinstance(name, str) or not name or "=" in name or "\0" in name:
        raise ValueError(f"{show(name)} is not an environment variable name")
    return name


def _inherit(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        for index, name in enumerate(value):
            try:
                _env_name(name)
            except ValueError as error:
                raise ValueError(f"{error} (item {index + 1} of the list)") from None
        return value
    raise ValueError(
        f"expected true, false or a list of variable names, got {show(value)} (try [PATH, HOME])"
    )


def _env_set(value: object) -> object:
    if not isinstance(value, dict):
        return value  # let the model say "expected a mapping"
    for name in value:
        if isinstance(name, str | int | float):
            _env_name(_text(name))
    # Scalars become text; anything else is left for the model to refuse with its key path.
    return {_text(name): _text(text) for name, text in value.items()}


def _paths(value: object) -> object:
    """A list of paths: absolute or relative to where supervise runs, never empty text."""
    if not isinstance(value, list):
        return value  # let the model say "expected a list"
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip() or "\0" in item:
            raise ValueError(f"{show(item)} is not a path (item {index + 1} of the list)")
    return value


def _workspace_path(value: object) -> object:
    if isinstance(value, str) and (not value.strip() or "\0" in value):
        raise ValueError(f"{show(value)} is not a path (null: a fresh temporary directory)")
    return value


def _audit_path(value: object) -> object:
    if isinstance(value, str) and (not value.strip() or "\0" in value):
        raise ValueError(f"{show(value)} is not a path (null: the default audit log)")
    return value


Duration = Annotated[float | None, _limit(parse_duration)]
Size = Annotated[int | None, _limit(parse_size)]
Files = Annotated[int | None, _limit(_parse_count, 2, "stdin, stdout and stderr need 3 open files")]
Processes = Annotated[int | None, _limit(_parse_count, 0, "the command itself is 1 process")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Model):
    """Hard limits of one run. Sizes in bytes, durations in seconds; None = not limited."""

    wall_time: Duration = None
    cpu_time: Duration = None
    memory: Size = None
    address_space: Size = None
    file_size: Size = None
    open_files: Files = None
    processes: Processes = None
    step_time: Duration = None


class WorkspacePolicy(_Model):
    """Where the command works: a jailed directory under a storage quota (None = no limit)."""

    path: Annotated[str | None, BeforeValidator(_workspace_path)] = None
    keep: bool = False
    # Measured (issue 17): a venv with pandas, matplotlib and scipy is 12,242 entries and
    # 431 MiB on disk; a node_modules of react, vite, typescript, eslint and jest 9,674 and
    # 151 MiB; a clone of fastapi 3,615 and 192 MiB, its pack file 143 MiB. The defaults
    # hold all three together several times over and that pack file.
    quota: Size = 4 << 30
    max_files: Annotated[int | None, _limit(_parse_count, 0, "a limit must be more than 0")] = (
        100_000
    )
    max_file_size: Size = 1 << 30
    jail: Literal["auto", "required", "off"] = "auto"
    writable: Annotated[list[str], BeforeValidator(_paths)] = Field(default_factory=list)
    readable: Annotated[list[str] | None, BeforeValidator(_paths)] = None


class EnvPolicy(_Model):
    """The child's environment: what it inherits from supervise, and what is set on top."""

    inherit: Annotated[bool | list[str], BeforeValidator(_inherit)] = True
    set: Annotated[dict[str, str], BeforeValidator(_env_set)] = Field(default_factory=dict)


def _audit(value: object) -> object:
    """``audit: PATH`` is short for ``audit: {path: PATH}``."""
    return {"path": _audit_path(value)} if isinstance(value, str) else value


class AuditPolicy(_Model):
    """Where the audit log goes, and when it rotates (None = the default path, no rotation)."""

    path: Annotated[str | None, BeforeValidator(_audit_path)] = None
    max_size: Size = None  # rotate the file when a line takes it to this size
    keep: Annotated[int | None, _limit(_parse_count, 0, "keep at least 1 rotated file")] = None


def _user(value: object) -> str | int:
    """``user:``: auto, a user name, or a uid (whether it exists is checked at run time)."""
    if isinstance(value, bool) or value is None:
        raise ValueError("is not a user (give auto, a user name or a uid)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a uid (give a number >= 0)")
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    if not text or any(c in text for c in ":/ \t\n"):
        raise ValueError(f"{text!r} is not a user name (give auto, a user name or a uid)")
    return text


class Policy(_Model):
    """A validated policy. Build one with ``load``, ``from_yaml``, ``from_dict`` or ``default``."""

    version: Annotated[Literal[1], BeforeValidator(_version)] = 1
    name: Annotated[str, BeforeValidator(_number_text)] = "unnamed"
    agent: Annotated[str | None, BeforeValidator(_number_text)] = None
    limits: Limits = Field(default_factory=Limits)
    workspace: WorkspacePolicy | None = None
    network: Literal["allow", "deny"] = "allow"
    user: Annotated[str | int, BeforeValidator(_user)] = "auto"  # auto | NAME | UID
    gateway: GatewayPolicy = Field(default_factory=GatewayPolicy)
    on_violation: Literal["kill", "warn"] = "kill"
    grace: Annotated[float, BeforeValidator(parse_duration)] = 2.0
    env: EnvPolicy = Field(default_factory=EnvPolicy)
    budget: BudgetPolicy | None = None
    audit: Annotated[AuditPolicy | None, BeforeValidator(_audit)] = None

    _source: str = PrivateAttr(default="<dict>")
    _source_text: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str:
        """Where it came from: the path as given, ``<default>``, ``<dict>`` or ``<string>``."""
        return self._source

    @property
    def source_text(self) -> str | None:
        """The YAML text it was read from (before any ``--set``), or None."""
        return self._source_text

    def __eq__(self, other: object) -> bool:
        # Two policies are equal when they enforce the same thing, wherever they came from.
        if not isinstance(other, Policy):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(self.sha256())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and validate a policy file."""
        source = os.fspath(path)
        try:
            with open(source, encoding="utf-8") as file:
                text = file.read()
        except OSError as error:
            hint = {errno.EACCES: "check its permissions", errno.EISDIR: "give a file"}
            problem = f"cannot read the policy: {error.strerror or error}"
            fix = hint.get(error.errno or 0, "check the path")
            raise PolicyError([f"{source}: {problem} ({fix})"], source=source) from None
        except UnicodeDecodeError:
            problem = "cannot read the policy: it is not UTF-8 text (save it as UTF-8)"
            raise PolicyError([f"{source}: {problem}"], source=source) from None
        return cls.from_yaml(text, source=source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> Policy:
        """Validate a policy given as YAML text; ``source`` names it in messages."""
        lines: dict[Loc, int] = {}
        texts: dict[Loc, str] = {}
        problems: list[tuple[Loc, str]] = []

        def walk(node: yaml.Node) -> None:
            problems.extend(walk_yaml(node, (), lines, texts))

        try:
            root, data = read_yaml(text, walk)
        except yaml.YAMLError as error:
            line, problem = yaml_problem(error, text, "check indentation and quoting")
            where = source if line is None else f"{source}:{line}"
            raise PolicyError([f"{where}: not valid YAML: {problem}"], source=source) from None
        if data is None:
            problem = 'the policy is empty (start with "version: 1")'
            raise PolicyError([f"{source}:1: {problem}"], source=source)
        assert root is not None
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else show(data)
            problem = f'the policy must be a mapping of keys, got {kind} (start with "version: 1")'
            raise PolicyError([f"{source}:{root.start_mark.line + 1}: {problem}"], source=source)
        if any(message == CYCLE for _, message in problems):
            return cls._build({}, source, lines, problems)  # pydantic would recurse forever
        env = data.get("env")
        if isinstance(env, dict) and isinstance(env.get("set"), dict):
            # Env values are text as written: YAML would read 0755 as 493 and yes as true.
            values = env["set"] = dict(env["set"])
            for name, value in values.items():
                if isinstance(value, int | float | date) and ("env", "set", name) in texts:
                    values[name] = texts["env", "set", name]
        policy = cls._build(data, source, lines, problems)
        policy._source_text = text
        return policy

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Policy:
        """Validate a policy given as a dict (as YAML would load it)."""
        if not isinstance(data, dict):
            problem = f"the policy must be a mapping of keys, got {show(data)}"
            raise PolicyError([f"{source}: {problem}"], source=source)
        return cls._build(data, source, None, [])

    @classmethod
    def default(cls) -> Policy:
        """The built-in default policy (``supervisor/default.yaml``), parsed once."""
        return _default()

    @classmethod
    def _build(
        cls,
        data: dict[Any, Any],
        source: str,
        lines: dict[Loc, int] | None,
        problems: list[tuple[Loc, str]],
    ) -> Policy:
        found: list[tuple[int, str]] = []

        def report(path: Loc, message: str) -> None:
            if lines is None:
                found.append((0, f"{source} {dotted(path)}: {message}"))
            else:
                line = line_of(lines, path)
                found.append((line, f"{source}:{line} {dotted(path)}: {message}"))

        for path, message in problems:
            report(path, message)
        data = dict(data)
        for key in UNBUILT:
            if key in data:
                report(
                    (key,), "not supported yet by this version of supervise (remove the section)"
                )
                del data[key]
        try:
            policy = cls.model_validate(data)
        except ValidationError as error:
            for path, message in explain(error, _SECTIONS):
                report(path, message)
        if found:
            # In file order, each problem once (sorted() is stable for problems on one line).
            ordered = dict.fromkeys(text for _, text in sorted(found, key=lambda pair: pair[0]))
            raise PolicyError(list(ordered), source=source)
        policy._source = source
        return policy

    def with_overrides(self, overrides: Mapping[str, object] | Iterable[str]) -> Policy:
        """A new policy with overrides applied: a mapping of dotted keys to values
        (``{"limits.wall_time": "10s", "limits.memory": None}``), or ``--set KEY=VALUE``
        items (VALUE is YAML; null = off). Raises PolicyError naming each bad item."""
        policy = override(self.to_dict(), overrides, _SECTIONS, type(self).model_validate)
        if policy is None:
            return self
        policy._source = self._source
        policy._source_text = self._source_text
        return policy

    def to_dict(self) -> dict[str, Any]:
        """The effective policy as JSON-friendly data: bytes and seconds as plain numbers."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hex SHA-256 of the effective policy's canonical JSON (sorted keys, no spaces)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return sha256(canonical.encode("utf-8")).hexdigest()

    def to_yaml(self) -> str:
        """The effective policy as YAML with units (``2GiB``, ``10m``); from_yaml reads it back."""
        data = self.to_dict()
        limits = data["limits"]
        for key, value in limits.items():
            if value is not None and key in ("wall_time", "cpu_time", "step_time"):
                limits[key] = compact_duration(value)
            elif value is not None and key in ("memory", "address_space", "file_size"):
                limits[key] = compact_size(value)
        workspace = data.get("workspace") or {}
        for key in ("quota", "max_file_size"):
            if workspace.get(key) is not None:
                workspace[key] = compact_size(workspace[key])
        audit = data.get("audit") or {}
        if audit.get("max_size") is not None:
            audit["max_size"] = compact_size(audit["max_size"])
        data["grace"] = compact_duration(data["grace"])
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


_SECTIONS: dict[Loc, type[BaseModel]] = {
    (): Policy,
    ("limits",): Limits,
    ("workspace",): WorkspacePolicy,
    ("env",): EnvPolicy,
    ("budget",): BudgetPolicy,
    **{("budget", scope): ScopeLimits for scope in ("run", "session", "daily", "monthly")},
    ("budget", "rate"): RateLimits,
    ("audit",): AuditPolicy,
    ("gateway",): GatewayPolicy,
    **{("gateway", "providers", name): ProviderPolicy for name in ("openai", "anthropic")},
}


@functools.cache
def _default() -> Policy:
    text = resources.files("supervisor").joinpath("default.yaml").read_text(encoding="utf-8")
    return Policy.from_yaml(text, source="<default>")
