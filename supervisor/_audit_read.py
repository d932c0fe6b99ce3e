"""Reading the audit log's files back: every record in order, and the chain checked.

``read_events`` yields the records of one or several files; ``verify`` checks that every
line is a record in canonical form whose hash matches, and that each follows the one before
(across rotated files too), naming the first bad line. Re-exported by ``supervisor.audit``;
never imported on a run's path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

from supervisor._audit_chain import KEY_SET, KEYS, ZERO_HASH, _canonical, _hash
from supervisor._hash import sha256
from supervisor.errors import AuditError

Paths: TypeAlias = "str | os.PathLike[str] | Iterable[str | os.PathLike[str]]"

__all__ = ["VerifyReport", "read_events", "verify"]

_MOVED = "a line was dropped, inserted or reordered before it"


def _paths(paths: Paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based number, raw bytes including any newline) of each line of ``path``."""
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, 1)
    except FileNotFoundError:
        raise AuditError(
            f"no audit log at {path}", hint="check the path, or pass the file supervise wrote"
        ) from None
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror or exc}") from exc


def read_events(
    paths: Paths, *, strict: bool = True, skipped: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield every record of one or several files, in order.

    A line that is not a JSON object raises AuditError naming file and line, or is skipped
    with ``strict=False`` (and said, "FILE line N is ...", in ``skipped`` when given).
    """
    for path in _paths(paths):
        for number, raw in _lines(path):
            try:
                record = json.loads(raw)
            except ValueError as exc:
                why = f"not valid JSON ({exc})"
            else:
                if isinstance(record, dict):
                    yield record
                    continue
                why = "not a JSON object"
            if strict:
                raise AuditError(
                    f"{path} line {number} is {why}",
                    hint=f"supervise audit --verify {path} checks the whole file",
                )
            if skipped is not None:
                skipped.append(f"{path} line {number} is {why}")


class VerifyReport:
    """The outcome of ``verify``: ok, or the first bad line (1-based) and what is wrong.

    ``continues`` is the ``prev`` of the first line when the files given start in the middle
    of a chain (the files rotated before them were not given, or were deleted by ``keep``).
    Immutable like a frozen dataclass, without importing dataclasses (inspect, ast: ~9 ms)
    on every run. ``to_dict()`` is the JSON shape.
    """

    __slots__ = ("continues", "count", "line", "ok", "path", "problem")
    _FIELDS = ("ok", "count", "path", "line", "problem", "continues")
    ok: bool
    count: int
    path: str | None
    line: int | None
    problem: str | None
    continues: str | None

    def __init__(
        self,
        ok: bool,
        count: int,
        path: str | None = None,
        line: int | None = None,
        problem: str | None = None,
        continues: str | None = None,
    ) -> None:
        values = (ok, count, path, line, problem, continues)
        for name, value in zip(self._FIELDS, values, strict=True):
            object.__setattr__(self, name, value)  # the class is frozen: see __setattr__

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"VerifyReport is immutable: cannot set {name}")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyReport) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().values()))

    def __repr__(self) -> str:
        return f"VerifyReport({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    def __str__(self) -> str:
        if self.ok and self.continues:
            return (
                f"ok: {self.count} records, chain intact (it goes on from a rotated file not "
                f"read, whose last hash is {self.continues[:16]}...)"
            )
        if self.ok:
            return f"ok: {self.count} records, chain intact"
        return f"{self.path}: {self.problem}"


def _check_line(n: int, raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The record on this line, or a problem."""
    if not raw.endswith(b"\n"):
        return None, f"line {n} is truncated: it does not end with a newline (a torn write)"
    try:
        record = json.loads(raw)
    except ValueError:
        return None, f"line {n} is not valid JSON: a torn write from a writer that died, or an edit"
    if not isinstance(record, dict):
        return None, f"line {n} is not a JSON object"
    if record.keys() != KEY_SET:
        missing = ", ".join(k for k in KEYS if k not in record) or "none"
        extra = ", ".join(sorted(record.keys() - KEY_SET)) or "none"
        return None, f"line {n} is not an audit record: missing keys {missing}; extra keys {extra}"
    seq, prev, digest = record["seq"], record["prev"], record["hash"]
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(digest, str):
        return None, f"line {n} was edited: its seq, prev or hash has the wrong type"
    # One serialization serves both checks: with sorted keys, the canonical form without
    # "hash" is the canonical form with its "hash" member cut out (it is never first or last).
    canon = _canonical(record)
    member = b',"hash":' + json.dumps(digest).encode()
    body = canon.replace(member, b"", 1) if canon.count(member) == 1 else None
    actual = sha256(body).hexdigest() if body is not None else _hash(record)
    if actual != digest:
        return None, f"line {n} was edited: its hash does not match its content"
    if canon + b"\n" != raw:
        return None, f"line {n} was edited: it is not in canonical form"
    return record, None


def _chain_problem(
    n: int, record: dict[str, Any], prev: str, seq: int, prev_file: str | None
) -> str | None:
    """What is wrong with how line ``n`` follows the line before it (or the file before)."""
    if n > 1:
        if record["prev"] != prev:
            return f"line {n} does not follow line {n - 1}: {_MOVED}"
        if record["seq"] != seq + 1:
            return f"line {n} has seq {record['seq']} after seq {seq}: {_MOVED}"
    elif prev_file is None:
        # A file may start with the hash of one rotated before it (not given, or deleted by
        # keep), but always with seq 0: lines removed from its start are found.
        if record["seq"] != 0:
            return "line 1 does not start a chain: lines were removed from the start"
    elif record["prev"] != prev or record["seq"] not in (0, seq + 1):
        return f"line 1 does not follow the end of {prev_file}: a file is missing or out of order"
    return None


def verify(paths: Paths) -> VerifyReport:
    """Check every line of one file, or of rotated files in order, and name the first bad one.

    A later file in ``paths`` must chain from the previous file's last hash; its seq may
    restart at 0 (seq counts per file) or continue from the previous file.
    """
    count, prev, seq, prev_file, continues = 0, ZERO_HASH, -1, None, None
    for path in _paths(paths):
        for n, raw in _lines(path):
            record, problem = _check_line(n, raw)
            if record is not None:
                problem = _chain_problem(n, record, prev, seq, prev_file)
            if record is None or problem is not None:
                return VerifyReport(False, count, path, n, problem)
            if count == 0 and record["prev"] != ZERO_HASH:
                continues = record["prev"]
            count, prev, seq = count + 1, record["hash"], record["seq"]
        prev_file = path
    return VerifyReport(True, count, continues=continues)
