"""The policy's YAML loader: one document, every key path mapped to its line.

``read_yaml`` loads with a ``SafeLoader`` held to what a policy is (nesting depth, merge
chains, scalars it cannot read become YAML errors with a line) and walks the nodes first:
``walk`` notes the 1-based line of every key path and the text of every scalar, and finds
duplicate keys, self-referring aliases and UTF-16 halves. ``yaml_problem`` turns a YAML
error into ``(line, "problem (fix)")``; ``yaml_value`` reads one ``--set`` value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeAlias

import yaml

from supervisor._units import MAX_SIZE, printable, show

__all__ = [
    "CYCLE", "Loc", "Unreadable", "dotted", "line_of", "read_yaml", "walk", "yaml_problem",
    "yaml_value",
]  # fmt: skip

Loc: TypeAlias = tuple[str | int, ...]  # a key path: ("limits", "memory"), ("env", "inherit", 0)

CYCLE = "refers to itself (remove the alias)"
# A policy is 4 levels deep. PyYAML's composer recurses once per level, so a deeper document
# ("[[[[...") is refused before it can exhaust the stack.
_MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class _TooDeep(yaml.composer.ComposerError):
    """A document nested deeper than any policy is."""


class Unreadable(yaml.constructor.ConstructorError):
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
            raise Unreadable(None, None, problem, node.start_mark) from None


def read_yaml(text: str, walk: Callable[[yaml.Node], object]) -> tuple[yaml.Node | None, Any]:
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
        raise Unreadable(None, None, problem, None) from None
    finally:
        if loader is not None:
            loader.dispose()


def yaml_value(text: str) -> Any:
    """A ``--set`` value: YAML, held to what a policy file is (nesting, duplicates, text)."""
    problems: list[tuple[Loc, str]] = []
    _, value = read_yaml(text, lambda node: problems.extend(walk(node, (), {}, {})))
    if problems:
        path, message = problems[0]
        where = f"{dotted(path)}: " if path else ""
        raise Unreadable(None, None, where + message, None)  # it says its own fix
    return value


def yaml_problem(error: yaml.YAMLError, text: str, fix: str) -> tuple[int | None, str]:
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
    elif isinstance(error, Unreadable):
        return line, problem  # it says its own fix
    return line, f"{problem} ({fix})"


def walk(
    node: yaml.Node, path: Loc, lines: dict[Loc, int], texts: dict[Loc, str]
) -> list[tuple[Loc, str]]:
    """Note the 1-based line of every key path and the text of every scalar; find duplicates."""
    todo: list[tuple[yaml.Node, Loc, frozenset[int]]] = [(node, path, frozenset())]
    problems: list[tuple[Loc, str]] = []
    walked: set[int] = set()
    while todo:
        node, path, above = todo.pop()
        if id(node) in above:  # an alias of its own ancestor
            problems.append((path, CYCLE))
            continue
        if id(node) in walked:  # an alias walked before: once is enough (and not exponential)
            continue
        walked.add(id(node))
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            texts[path] = node.value
            if _SURROGATE.search(node.value):
                problems.append((path, _surrogate(node.value)))
        children: list[tuple[yaml.Node, Loc]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[Loc, int] = {}
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


def line_of(lines: dict[Loc, int], path: Loc) -> int:
    """The line of ``path``, or of its nearest parent that is in the file (for a missing key)."""
    for depth in range(len(path), -1, -1):
        for candidate in (path[:depth], tuple(str(part) for part in path[:depth])):
            if candidate in lines:
                return lines[candidate]
    return 1


def dotted(path: Loc) -> str:
    """A key path as the user writes it: ``limits.memory``, ``env.inherit[2]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return printable(text)  # a key may hold a line break ("a\nb": 1)
