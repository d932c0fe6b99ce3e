"""The audit log's format and chain, shared by its writer and its reader.

``KEYS`` and ``EVENTS`` are the record's shape; ``_canonical`` its one serialization (sorted
keys, no spaces, UTF-8) and ``_hash`` the SHA-256 over it without ``hash``. ``_last_record``
finds where a file's chain ends by reading only its tail; ``log_files`` lists a log's files,
rotated ones first. Imported on every run (by ``supervisor.audit``): stdlib only.
"""

from __future__ import annotations

import json
import math
import os

from supervisor._hash import sha256

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["EVENTS", "KEYS", "ZERO_HASH", "log_files"]

EVENTS = (
    "run_start", "warning", "denied", "violation", "rpc_error", "unsettled", "run_end",
    "budget_reset",
)  # fmt: skip
KEYS = (
    "ts", "seq", "run_id", "agent", "session", "event", "limit", "observed",
    "limit_value", "unit", "action", "detail", "prev", "hash",
)  # fmt: skip
ZERO_HASH = "0" * 64
KEY_SET = frozenset(KEYS)
_TAIL_CHUNK = 8192


def _canonical(record: dict[str, Any]) -> bytes:
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    # A lone surrogate (an undecodable file name) becomes its JSON escape: still valid UTF-8.
    return text.encode("utf-8", "backslashreplace")


def _hash(record: dict[str, Any]) -> str:
    return sha256(_canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def _number(value: Any) -> Any:
    """JSON-safe: Decimal and friends become int or float; inf and nan become strings."""
    if value is None or isinstance(value, (int, str)):
        return value
    number = float(value)  # a TypeError here names the bad type
    if not math.isfinite(number):
        return str(number)  # strict JSON has no inf/nan; jq and friends would choke
    return int(number) if number.is_integer() and not isinstance(value, float) else number


def _chain_point(line: bytes) -> tuple[int, str] | None:
    """(seq, hash) of a line that looks like a record, else None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    seq, digest = record.get("seq"), record.get("hash")
    if type(seq) is not int or not isinstance(digest, str) or len(digest) != 64:
        return None
    return seq, digest


def _last_record(fd: int, size: int) -> tuple[int, str, bool]:
    """(seq, hash, torn) of the last complete valid line, reading backwards from the end.

    ``torn`` is true when the file ends with a partial line (a writer died mid-write).
    Without any valid line the chain restarts: (-1, ZERO_HASH).
    """
    buf, pos = b"", size

    def read_more() -> int:
        nonlocal buf, pos
        n = min(pos, max(_TAIL_CHUNK, len(buf)))  # doubling keeps a long scan linear
        pos -= n
        buf = os.pread(fd, n, pos) + buf
        return n

    end = -1  # index in buf of the newline that ends the line being looked at
    while end < 0 and pos > 0:
        read_more()
        end = buf.rfind(b"\n")
    torn = end != len(buf) - 1
    while end >= 0:
        start = buf.rfind(b"\n", 0, end)
        while start < 0 and pos > 0:
            end += read_more()
            start = buf.rfind(b"\n", 0, end)
        point = _chain_point(buf[start + 1 : end])
        if point is not None:
            return point[0], point[1], torn
        end = start
    return -1, ZERO_HASH, torn


def _rotated(path: str) -> list[tuple[int, str]]:
    """(number, path) of each rotated file of ``path`` (``path.1``, ``path.2``...), in order."""
    parent, base = os.path.split(path)
    prefix = base + "."
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return []
    found = []
    for name in names:
        suffix = name[len(prefix) :]
        if name.startswith(prefix) and suffix.isdigit() and suffix.isascii():
            found.append((int(suffix), os.path.join(parent, name)))
    return sorted(found)


def log_files(path: str | os.PathLike[str]) -> list[str]:
    """The files of one log, oldest first: its rotated files by number, then ``path``.

    ``path`` is listed even when it does not exist and nothing was rotated from it (a
    reader then says there is no log); an absent ``path`` after a rotation is left out.
    """
    path = os.fspath(path)
    files = [name for _, name in _rotated(path)]
    if os.path.lexists(path) or not files:
        files.append(path)
    return files


def _rotated_tail(path: str) -> tuple[int, str]:
    """(-1, last hash) of the newest rotated file of ``path``: where a new file's chain starts."""
    for _, name in reversed(_rotated(path)):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            _, digest, _ = _last_record(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if digest != ZERO_HASH:
            return -1, digest
    return -1, ZERO_HASH
