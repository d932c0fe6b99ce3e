"""The policy: what a run may use, read from YAML and checked in full before anything starts.

``Policy.load("policy.yaml")`` returns a frozen, validated ``Policy`` or raises ``PolicyError``
with one line per problem, each naming the file, the line and the key path::

    policy.yaml:7 limits.memory: "2 gigs" is not a size (try 2GiB)

Sizes are stored in bytes and durations in seconds; absent limits are ``None`` (not limited).
``with_overrides`` applies ``--set KEY=VALUE`` items; ``sha256`` fingerprints the effective
policy for the audit log. The ``budget`` section's models live in
``supervisor.budget._policy``.
"""

from __future__ import annotations

import difflib
import errno
import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from datetime import date
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError
from pydantic_core import ErrorDetails

from supervisor._hash import sha256
from supervisor._units import (
    MAX_SIZE,
    compact_duration,
    compact_size,
    parse_duration,
    parse_size,
    parse_whole,
    printable,
    show,
)
from supervisor.budget._policy import BudgetPolicy, ModelPricing, RateLimits, ScopeLimits
from supervisor.errors import PolicyError

__all__ = ["AuditPolicy", "EnvPolicy", "Limits", "Policy", "WorkspacePolicy"]

_Loc = tuple[str | int, ...]

# Sections of the product's schema that are not built yet are refused, never ignored: a
# limit that is silently dropped would let a run think it is limited when it is not.
_UNBUILT: tuple[str, ...] = ()


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
    quota: Size = 1 << 30
    max_files: Annotated[int | None, _limit(_parse_count, 0, "a limit must be more than 0")] = 10000
    max_file_size: Size = 100 << 20
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


class Policy(_Model):
    """A validated policy. Build one with ``load``, ``from_yaml``, ``from_dict`` or ``default``."""

    version: Annotated[Literal[1], BeforeValidator(_version)] = 1
    name: Annotated[str, BeforeValidator(_number_text)] = "unnamed"
    agent: Annotated[str | None, BeforeValidator(_number_text)] = None
    limits: Limits = Field(default_factory=Limits)
    workspace: WorkspacePolicy | None = None
    network: Literal["allow", "deny"] = "allow"
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
        lines: dict[_Loc, int] = {}
        texts: dict[_Loc, str] = {}
        problems: list[tuple[_Loc, str]] = []

        def walk(node: yaml.Node) -> None:
            problems.extend(_walk(node, (), lines, texts))

        try:
            root, data = _read_yaml(text, walk)
        except yaml.YAMLError as error:
            line, problem = _yaml_problem(error, text, "check indentation and quoting")
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
        if any(message == _CYCLE for _, message in problems):
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
        lines: dict[_Loc, int] | None,
        problems: list[tuple[_Loc, str]],
    ) -> Policy:
        found: list[tuple[int, str]] = []

        def report(path: _Loc, message: str) -> None:
            if lines is None:
                found.append((0, f"{source} {_dotted(path)}: {message}"))
            else:
                line = _line(lines, path)
                found.append((line, f"{source}:{line} {_dotted(path)}: {message}"))

        for path, message in problems:
            report(path, message)
        data = dict(data)
        for key in _UNBUILT:
            if key in data:
                report(
                    (key,), "not supported yet by this version of supervise (remove the section)"
                )
                del data[key]
        try:
            policy = cls.model_validate(data)
        except ValidationError as error:
            for path, message in _explain(error):
                report(path, message)
        if found:
            # In file order, each problem once (sorted() is stable for problems on one line).
            ordered = dict.fromkeys(text for _, text in sorted(found, key=lambda pair: pair[0]))
            raise PolicyError(list(ordered), source=source)
        policy._source = source
        return policy

    def with_overrides(self, items: Iterable[str]) -> Policy:
        """A new policy with ``--set KEY=VALUE`` items applied (VALUE is YAML; null = off)."""
        items = list(items)
        if not items:
            return self
        data = self.to_dict()
        problems: list[tuple[int, str]] = []
        applied: list[tuple[_Loc, int]] = []
        for index, item in enumerate(items):
            key, equals, raw = item.partition("=")
            path: _Loc = tuple(key.strip().split("."))
            if path[:2] in _NAMED and len(path) > 2:
                # Variable and model names may contain dots; all after env.set. is the name.
                path = (*path[:2], ".".join(str(part) for part in path[2:]))
            trouble = _check_path(path) if equals and key.strip() else _KEY_VALUE
            if trouble is None:
                try:
                    # env values are text: FOO=0755 must stay "0755", not YAML's octal 493.
                    value = raw if len(path) == 3 and path[0] == "env" else _yaml_value(raw)
                    trouble = _put(data, path, value)
                except yaml.YAMLError as error:
                    trouble = "not valid YAML: " + _yaml_problem(error, raw, "quote the value")[1]
            if trouble is None:
                applied.append((path, index))
            else:
                problems.append((index, trouble))
        try:
            policy = type(self).model_validate(data)
        except ValidationError as error:
            for loc, message in _explain(error):
                # The base policy was valid, so the last item that touched loc is to blame.
                owners = [(p, i) for p, i in applied if loc[: len(p)] == p or p[: len(loc)] == loc]
                path, index = owners[-1]
                inner = f"{_dotted(loc)}: " if len(loc) > len(path) else ""
                problems.append((index, inner + message))
        if problems:
            lines = [
                f"--set {printable(items[index])}: {text}"
                for index, text in sorted(problems, key=lambda pair: pair[0])
            ]
            raise PolicyError(list(dict.fromkeys(lines)), source="--set")
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


_SECTIONS: dict[_Loc, type[BaseModel]] = {
    (): Policy,
    ("limits",): Limits,
    ("workspace",): WorkspacePolicy,
    ("env",): EnvPolicy,
    ("budget",): BudgetPolicy,
    **{("budget", scope): ScopeLimits for scope in ("run", "session", "daily", "monthly")},
    ("budget", "rate"): RateLimits,
    ("audit",): AuditPolicy,
}
# Mappings whose keys are names, not schema: everything after the prefix is one name
# (variable and model names may contain dots).
_NAMED = {("env", "set"): "env.set.FOO=bar", ("budget", "pricing"): "budget.pricing.NAME={...}"}


@functools.cache
def _default() -> Policy:
    text = resources.files("supervisor").joinpath("default.yaml").read_text(encoding="utf-8")
    return Policy.from_yaml(text, source="<default>")


_KEY_VALUE = "expected KEY=VALUE (e.g. --set limits.wall_time=10s)"
_CYCLE = "refers to itself (remove the alias)"
# A policy is 4 levels deep. PyYAML's composer recurses once per level, so a deeper document
# ("[[[[...") is refused before it can exhaust the stack.
_MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class _TooDeep(yaml.composer.ComposerError):
    """A document nested deeper than any policy is."""


class _Unreadable(yaml.constructor.ConstructorError):
    """A scalar YAML cannot turn into its type (its problem says the fix)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with a nesting limit, and scalars it cannot read as YAML errors with a line.

    SafeLoader lets ``ValueError`` and friends out for ``2024-13-01`` (a timestamp in month
    13), ``!!int x`` or a 5000-digit number; here they say which value, where, and the fix.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # untyped stub
                problem = f"nested more than {_MAX_DEPTH} levels deep"
                raise _TooDeep(None, None, problem, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as error:
            kind = str(node.tag).rpartition(":")[2]
            if kind == "int" and isinstance(error, ValueError) and "digits" in str(error):
                problem = f"a number of {len(str(node.value))} digits is too long to read"
                problem += f" (no limit takes more than {len(str(MAX_SIZE))})"
            else:
                # int(), float() and date() say what is wrong; a KeyError would only echo.
                why = f": {error}" if isinstance(error, ArithmeticError | ValueError) else ""
                problem = (
                    f"{show(node.value)} is not a valid {kind}{why} (quote it to make it text)"
                )
            raise _Unreadable(None, None, problem, node.start_mark) from None


def _read_yaml(text: str, walk: Callable[[yaml.Node], object]) -> tuple[yaml.Node | None, Any]:
    """The root node and the data of one YAML document, ``walk`` run on the nodes between.

    The walk sees the document as written: before construction expands merge keys (``<<``).
    Raises ``yaml.YAMLError`` for anything that is not one readable document.
    """
    loader = None
    try:
        loader = _Loader(text)  # the reader refuses control characters right here
        root = loader.get_single_node()
        if root is None:
            return None, None
        walk(root)
        return root, loader.construct_document(root)
    except RecursionError:
        # A chain of merge keys (a: &a {<<: *b}...) recurses in construction; compose
        # already stopped deep nesting.
        problem = "merge keys (<<) chained too deep (merge fewer levels)"
        raise _Unreadable(None, None, problem, None) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_value(text: str) -> Any:
    """A ``--set`` value: YAML, held to what a policy file is (nesting, duplicates, text)."""
    problems: list[tuple[_Loc, str]] = []
    _, value = _read_yaml(text, lambda node: problems.extend(_walk(node, (), {}, {})))
    if problems:
        path, message = problems[0]
        where = f"{_dotted(path)}: " if path else ""
        raise _Unreadable(None, None, where + message, None)  # it says its own fix
    return value


def _yaml_problem(error: yaml.YAMLError, text: str, fix: str) -> tuple[int | None, str]:
    """(1-based line or None, ``problem (fix)``) for a YAML error, in one line."""
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1 if isinstance(error.position, int) else None
        code = error.character if isinstance(error.character, int) else ord(str(error.character))
        if 0xDC80 <= code <= 0xDCFF:  # how Python hands on a byte that is not UTF-8 (argv)
            return line, f"the byte 0x{code - 0xDC00:02x} is not UTF-8 text (write it in UTF-8)"
        if 0xD800 <= code <= 0xDFFF:
            return line, _surrogate(chr(code))
        escape = f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
        problem = f"the character U+{code:04X} is not allowed in YAML"
        return line, f'{problem} (remove it, or write it as "{escape}" in double quotes)'
    if not isinstance(error, yaml.MarkedYAMLError):
        return None, f"{error} ({fix})"
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark is not None else None
    problem = error.problem or error.context or "syntax error"
    if error.context and problem.startswith("but "):  # "expected a single document ..."
        problem = f"{error.context}, {problem}"
    if "\\t" in problem:
        fix = "indent with spaces, not tabs"
    elif "another document" in problem:
        fix = "a policy is one document: remove the second ---"
    elif isinstance(error, _TooDeep):
        fix = "a policy is 4 levels deep"
    elif isinstance(error, _Unreadable):
        return line, problem  # it says its own fix
    return line, f"{problem} ({fix})"


def _walk(
    node: yaml.Node, path: _Loc, lines: dict[_Loc, int], texts: dict[_Loc, str]
) -> list[tuple[_Loc, str]]:
    """Note the 1-based line of every key path and the text of every scalar; find duplicates."""
    todo: list[tuple[yaml.Node, _Loc, frozenset[int]]] = [(node, path, frozenset())]
    problems: list[tuple[_Loc, str]] = []
    walked: set[int] = set()
    while todo:
        node, path, above = todo.pop()
        if id(node) in above:  # an alias of its own ancestor
            problems.append((path, _CYCLE))
            continue
        if id(node) in walked:  # an alias walked before: once is enough (and not exponential)
            continue
        walked.add(id(node))
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            texts[path] = node.value
            if _SURROGATE.search(node.value):
                problems.append((path, _surrogate(node.value)))
        children: list[tuple[yaml.Node, _Loc]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[_Loc, int] = {}
            for key, value in node.value:
                child = (*path, key.value if isinstance(key, yaml.ScalarNode) else "?")
                if isinstance(key, yaml.ScalarNode) and _SURROGATE.search(key.value):
                    problems.append((child, "the key: " + _surrogate(key.value)))
                if child in seen:
                    message = f"duplicate key (also on line {seen[child]}; keep one)"
                    problems.append((child, message))
                seen[child] = lines[child] = key.start_mark.line + 1
                children.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*path, index)) for index, item in enumerate(node.value)]
        todo += [(child, where, above | {id(node)}) for child, where in reversed(children)]
    return problems


def _surrogate(text: str) -> str:
    # "\ud83d\ude00" (JSON's escape of one emoji) reads in YAML as two halves, not a character;
    # no file name, variable or name can hold one.
    half = _SURROGATE.search(text)
    assert half is not None
    code = ord(half[0])
    return (
        f"\\u{code:04x} is half of a UTF-16 pair, not a character "
        "(write the character itself, or escape it whole as \\U0001F600)"
    )


def _line(lines: dict[_Loc, int], path: _Loc) -> int:
    """The line of ``path``, or of its nearest parent that is in the file (for a missing key)."""
    for depth in range(len(path), -1, -1):
        for candidate in (path[:depth], tuple(str(part) for part in path[:depth])):
            if candidate in lines:
                return lines[candidate]
    return 1


def _dotted(path: _Loc) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return printable(text)  # a key may hold a line break ("a\nb": 1)


def _known_keys(section: _Loc) -> list[str]:
    model = _SECTIONS.get(section)
    if section[:2] == ("budget", "pricing") and len(section) == 3:
        model = ModelPricing  # budget.pricing.NAME: a model's prices
    keys = list(model.model_fields) if model is not None else []
    return keys + list(_UNBUILT) if section == () else keys


def _unknown(key: object, section: _Loc, full: bool = False) -> str:
    """``unknown key (did you mean memory?)``, or the list of known keys when nothing is close."""
    known = _known_keys(section)
    prefix = _dotted(section) + "." if full and section else ""
    close = difflib.get_close_matches(str(key), known, n=1)
    name = f" {printable(f'{prefix}{key}') or show('')}" if full else ""
    if close:
        return f"unknown key{name} (did you mean {prefix}{close[0]}?)"
    return f"unknown key{name} (known keys: {', '.join(known)})"


_EXPECTED = {
    "string": "text",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "dict": "a mapping (indented KEY: VALUE lines)",
    "model": "a mapping (indented KEY: VALUE lines)",
    "list": "a list",
}


def _explain(error: ValidationError) -> list[tuple[_Loc, str]]:
    """Turn pydantic's errors into (key path, readable message) pairs."""
    explained = []
    for detail in error.errors():
        path: _Loc = tuple(part for part in detail["loc"] if part != "[key]")
        if detail["type"] in ("extra_forbidden", "invalid_key"):
            path = (*path[:-1], str(path[-1]))  # a key, even when YAML read it as a number
        explained.append((path, _message(detail, path)))
    return explained


def _message(detail: ErrorDetails, path: _Loc) -> str:
    kind, value, context = detail["type"], detail.get("input"), detail.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in context:
        return str(context["error"])
    if kind in ("extra_forbidden", "invalid_key"):
        return _unknown(path[-1], path[:-1])
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(context.get("expected", "")))
        return f"{show(value)} is not one of: {', '.join(choices)}"
    if kind == "missing":
        return "is required"
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected is not None:
        return f"expected {expected}, got {show(value)}"
    return f"{detail['msg']}, got {show(value)}"


def _check_path(path: _Loc) -> str | None:
    """Why ``--set`` cannot use this key path, or None when it names a real key."""
    section: _Loc = ()
    for depth, part in enumerate(path):
        if section not in _SECTIONS:
            if section in _NAMED and depth == len(path) - 1:
                example = _NAMED[section]
                return None if part else f"{_dotted(section)}. needs a name (e.g. --set {example})"
            return f"{_dotted(section)} is not a section (try --set {_dotted(section)}=VALUE)"
        if depth == 0 and part in _UNBUILT:
            return f"{part}: not supported yet by this version of supervise"
        if part not in _SECTIONS[section].model_fields:
            return _unknown(part, section, full=True)
        section = (*section, part)
    return None


def _put(data: dict[str, Any], path: _Loc, value: object) -> str | None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if node.get(part) is None and (
            path[: depth + 1] in _SECTIONS or path[: depth + 1] in _NAMED
        ):
            node[part] = {}  # e.g. --set budget.daily.usd=5 on a policy without a budget
        node = node.get(part)
        if not isinstance(node, dict):
            where = _dotted(path[: depth + 1])
            return f"{where} is not a mapping here (an earlier --set replaced it)"
    node[path[-1]] = value
    return None
