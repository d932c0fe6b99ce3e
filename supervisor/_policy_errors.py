"""What is wrong with a policy, said the way a user fixes it; and ``--set``.

Pydantic's errors become ``(key path, message)`` pairs (``explain``) that ``policy.py``
prints as ``policy.yaml:7 limits.memory: "2 gigs" is not a size (try 2GiB)``: an unknown
key says which one was meant, a wrong type says what was expected in YAML words.

``override`` applies overrides to a policy's data, either ``--set KEY=VALUE`` items (VALUE
is YAML) or a mapping ``{"limits.wall_time": "10s"}`` (values as they are), and blames each
problem on the item that caused it.

The schema (which key paths are sections, and their models) is passed in by ``policy.py``,
which defines the models; this module imports none of them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from supervisor._units import printable, show
from supervisor._yaml import Loc, dotted, yaml_problem, yaml_value
from supervisor.budget._policy import ModelPricing
from supervisor.errors import PolicyError

__all__ = ["NAMED", "UNBUILT", "Sections", "explain", "override", "unknown"]

Sections = Mapping[Loc, type[BaseModel]]
_T = TypeVar("_T")

# Sections of the product's schema that are not built yet are refused, never ignored: a
# limit that is silently dropped would let a run think it is limited when it is not.
UNBUILT: tuple[str, ...] = ()
# Mappings whose keys are names, not schema: everything after the prefix is one name
# (variable and model names may contain dots).
NAMED = {("env", "set"): "env.set.FOO=bar", ("budget", "pricing"): "budget.pricing.NAME={...}"}
_KEY_VALUE = "expected KEY=VALUE (e.g. --set limits.wall_time=10s)"

_EXPECTED = {
    "string": "text",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "dict": "a mapping (indented KEY: VALUE lines)",
    "model": "a mapping (indented KEY: VALUE lines)",
    "list": "a list",
}


def _known_keys(section: Loc, sections: Sections) -> list[str]:
    model = sections.get(section)
    if section[:2] == ("budget", "pricing") and len(section) == 3:
        model = ModelPricing  # budget.pricing.NAME: a model's prices
    keys = list(model.model_fields) if model is not None else []
    return keys + list(UNBUILT) if section == () else keys


def unknown(key: object, section: Loc, sections: Sections, full: bool = False) -> str:
    """``unknown key (did you mean memory?)``, or the list of known keys when nothing is close."""
    known = _known_keys(section, sections)
    prefix = dotted(section) + "." if full and section else ""
    close = difflib.get_close_matches(str(key), known, n=1)
    name = f" {printable(f'{prefix}{key}') or show('')}" if full else ""
    if close:
        return f"unknown key{name} (did you mean {prefix}{close[0]}?)"
    return f"unknown key{name} (known keys: {', '.join(known)})"


def explain(error: ValidationError, sections: Sections) -> list[tuple[Loc, str]]:
    """Turn pydantic's errors into (key path, readable message) pairs."""
    explained = []
    for detail in error.errors():
        path: Loc = tuple(part for part in detail["loc"] if part != "[key]")
        if detail["type"] in ("extra_forbidden", "invalid_key"):
            path = (*path[:-1], str(path[-1]))  # a key, even when YAML read it as a number
        explained.append((path, _message(detail, path, sections)))
    return explained


def _message(detail: ErrorDetails, path: Loc, sections: Sections) -> str:
    kind, value, context = detail["type"], detail.get("input"), detail.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in context:
        return str(context["error"])
    if kind in ("extra_forbidden", "invalid_key"):
        return unknown(path[-1], path[:-1], sections)
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(context.get("expected", "")))
        return f"{show(value)} is not one of: {', '.join(choices)}"
    if kind == "missing":
        return "is required"
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected is not None:
        return f"expected {expected}, got {show(value)}"
    return f"{detail['msg']}, got {show(value)}"


class _Item(NamedTuple):
    """One override: how messages name it, its key, and its value (YAML text for --set)."""

    label: str
    key: str | None  # None: not KEY=VALUE at all
    value: object
    is_text: bool


def _items(overrides: Mapping[str, object] | Iterable[str]) -> tuple[list[_Item], str]:
    """The overrides as items, and the source their problems name."""
    if isinstance(overrides, str | bytes):
        raise TypeError(
            "with_overrides takes a mapping {KEY: VALUE} or a list of KEY=VALUE strings, "
            f"not one string: try [{overrides!r}]"
        )
    if isinstance(overrides, Mapping):
        items = []
        for key, value in overrides.items():
            label = f"override {printable(str(key))}={show(value)}"
            items.append(_Item(label, key if isinstance(key, str) else None, value, False))
        return items, "overrides"
    items = []
    for item in overrides:
        key, equals, raw = item.partition("=")
        items.append(_Item(f"--set {printable(item)}", key if equals else None, raw, True))
    return items, "--set"


def _path(key: str) -> Loc:
    path: Loc = tuple(key.strip().split("."))
    if path[:2] in NAMED and len(path) > 2:
        # Variable and model names may contain dots; all after env.set. is the name.
        path = (*path[:2], ".".join(str(part) for part in path[2:]))
    return path


def override(
    data: dict[str, Any],
    overrides: Mapping[str, object] | Iterable[str],
    sections: Sections,
    validate: Callable[[dict[str, Any]], _T],
) -> _T | None:
    """``validate`` of ``data`` with the overrides applied (None when there are none), or
    PolicyError with one line per problem, each naming the item to blame."""
    items, source = _items(overrides)
    if not items:
        return None
    problems: list[tuple[int, str]] = []
    applied: list[tuple[Loc, int]] = []
    for index, item in enumerate(items):
        path = _path(item.key) if item.key is not None else ()
        trouble = _check_path(path, sections) if item.key and item.key.strip() else _KEY_VALUE
        if trouble is None:
            value = item.value
            try:
                # env values are text: FOO=0755 must stay "0755", not YAML's octal 493.
                if item.is_text and not (len(path) == 3 and path[0] == "env"):
                    value = yaml_value(str(value))
                trouble = _put(data, path, value, sections)
            except yaml.YAMLError as error:
                trouble = "not valid YAML: " + yaml_problem(error, str(value), "quote the value")[1]
        if trouble is None:
            applied.append((path, index))
        else:
            problems.append((index, trouble))
    try:
        result = validate(data)
    except ValidationError as error:
        for loc, message in explain(error, sections):
            # The base policy was valid, so the last item that touched loc is to blame.
            owners = [(p, i) for p, i in applied if loc[: len(p)] == p or p[: len(loc)] == loc]
            path, index = owners[-1]
            inner = f"{dotted(loc)}: " if len(loc) > len(path) else ""
            problems.append((index, inner + message))
    else:
        if not problems:
            return result
    lines = [
        f"{items[index].label}: {text}"
        for index, text in sorted(problems, key=lambda pair: pair[0])
    ]
    raise PolicyError(list(dict.fromkeys(lines)), source=source)


def _check_path(path: Loc, sections: Sections) -> str | None:
    """Why ``--set`` cannot use this key path, or None when it names a real key."""
    section: Loc = ()
    for depth, part in enumerate(path):
        if section not in sections:
            if section in NAMED and depth == len(path) - 1:
                example = NAMED[section]
                return None if part else f"{dotted(section)}. needs a name (e.g. --set {example})"
            return f"{dotted(section)} is not a section (try --set {dotted(section)}=VALUE)"
        if depth == 0 and part in UNBUILT:
            return f"{part}: not supported yet by this version of supervise"
        if part not in sections[section].model_fields:
            return unknown(part, section, sections, full=True)
        section = (*section, part)
    return None


def _put(data: dict[str, Any], path: Loc, value: object, sections: Sections) -> str | None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        if node.get(part) is None and (path[: depth + 1] in sections or path[: depth + 1] in NAMED):
            node[part] = {}  # e.g. --set budget.daily.usd=5 on a policy without a budget
        node = node.get(part)
        if not isinstance(node, dict):
            where = dotted(path[: depth + 1])
            return f"{where} is not a mapping here (an earlier --set replaced it)"
    node[path[-1]] = value
    return None
