"""The audit log: an append-only, fsync'd, hash-chained JSON Lines file.

Every line is one record with the keys in ``KEYS``. ``hash`` is the SHA-256 hex of the
record without ``hash``, serialized as canonical JSON (sorted keys, ``(",", ":")``
separators, UTF-8); ``prev`` is the hash of the line before (64 zeros on the first line);
``seq`` counts from 0 per file. The line itself is the canonical JSON of the whole record,
so the file is byte-for-byte reproducible from its records.

Several processes may append to one file at once: each append takes ``flock(LOCK_EX)``,
finds the last complete line (from a cache, or by reading only the tail of the file), and
writes its line with one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``.

Rotation is by size: the writer whose line takes the file to ``max_size`` renames it, under
the lock, to the next free number (``audit.jsonl.1``, ``.2``, ...: a rotated file never
changes name again) and leaves an empty ``audit.jsonl``. The first line of the new file
has ``seq`` 0 and ``prev`` the last hash of the file it rotated from, so the chain runs
across every file. ``log_files`` lists a log's files oldest first.

This module is imported on every run: stdlib only, and nothing the run path does not already
load (no dataclasses, pathlib, datetime or threading; measured with ``python -X importtime``).
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import json
import math
import os
import time

from supervisor._hash import sha256
from supervisor.errors import AuditError

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: supervisor.py imports this module on every run
    from collections.abc import Iterable, Iterator
    from datetime import datetime
    from pathlib import Path
    from typing import Any, TypeAlias

    PathArg: TypeAlias = str | os.PathLike[str]
    Paths: TypeAlias = PathArg | Iterable[PathArg]

__all__ = [
    "EVENTS", "KEYS", "AuditLog", "VerifyReport", "default_audit_path", "filter_events",
    "format_event", "log_files", "parse_since", "read_events", "verify",
]  # fmt: skip

EVENTS = (
    "run_start", "warning", "denied", "violation", "rpc_error", "unsettled", "run_end",
    "budget_reset",
)  # fmt: skip
KEYS = (
    "ts", "seq", "run_id", "agent", "session", "event", "limit", "observed",
    "limit_value", "unit", "action", "detail", "prev", "hash",
)  # fmt: skip
ZERO_HASH = "0" * 64
_KEY_SET = frozenset(KEYS)
_TAIL_CHUNK = 8192
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_MOVED = "a line was dropped, inserted or reordered before it"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def default_audit_file() -> str:
    """``default_audit_path()`` as a string, without importing pathlib (the run's hot path)."""
    state = os.environ.get("XDG_STATE_HOME")
    # The XDG spec says a relative XDG_STATE_HOME is invalid and must be ignored.
    if not (state and os.path.isabs(state)):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "supervise", "audit.jsonl")


def default_audit_path() -> Path:
    """``$XDG_STATE_HOME/supervise/audit.jsonl``, else ``~/.local/state/supervise/audit.jsonl``."""
    from pathlib import Path

    return Path(default_audit_file())


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


def log_files(path: PathArg) -> list[str]:
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


def _now() -> str:
    """UTC ISO-8601 with microseconds and ``Z``, without importing datetime."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _write_error(path: str, exc: OSError) -> AuditError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space on that filesystem, or pass --audit FILE elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make it writable by this user, or pass --audit FILE"
    else:
        hint = "check the path, or pass --audit FILE"
    return AuditError(f"cannot write the audit log {path}: {exc.strerror or exc}", hint=hint)


class AuditLog:
    """Appends hash-chained records to one file; safe with other writers on the same file.

    The file is opened (and created, 0o600, parents 0o700) at construction, so an unwritable
    path fails before anything runs. The descriptor stays open between appends; if the path
    is rotated away or deleted, the next append reopens it. With ``max_size``, the append
    that takes the file to that size rotates it; ``keep`` rotated files are kept (None: all).
    """

    def __init__(
        self, path: PathArg, *, max_size: int | None = None, keep: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be more than 0, got {max_size}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be at least 1 (None keeps every file), got {keep}")
        self.max_size, self.keep = max_size, keep
        self._lock = _thread.allocate_lock()  # flock does not exclude threads sharing an fd
        self._fd: int | None = None
        self._closed = False
        self._cache: tuple[int, int, int, str] | None = None  # st_ino, st_size, seq, hash
        try:
            self._open()
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC  # read: the tail scan uses pread
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            parent = os.path.dirname(self.path) or "."
            os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(self.path, flags | os.O_CREAT, 0o600)
            try:
                os.fchmod(fd, 0o600)  # the umask may have taken our own write bit away
                dfd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dfd)  # so the new file's name survives a crash too
                finally:
                    os.close(dfd)
            except OSError:
                os.close(fd)
                raise
        self._fd, self._cache = fd, None
        return fd

    def _locked_fd(self) -> int:
        """The descriptor of the file now at ``path``, locked; reopens after a rotation."""
        while True:
            fd = self._fd if self._fd is not None else self._open()
            _lock(fd)
            mine = os.fstat(fd)
            try:
                there = os.stat(self.path)
                if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            self._fd = None
            os.close(fd)  # also releases the lock

    def append(
        self,
        event: str,
        *,
        run_id: str,
        agent: str | None = None,
        session: str | None = None,
        limit: str | None = None,
        observed: Any = None,
        limit_value: Any = None,
        unit: str | None = None,
        action: str | None = None,
        detail: Any = None,
    ) -> dict[str, Any]:
        """Write one record (durably) and return it."""
        if event not in EVENTS:
            raise ValueError(f"{event!r} is not an audit event (one of {', '.join(EVENTS)})")
        fields = {
            "run_id": run_id, "agent": agent, "session": session, "event": event,
            "limit": limit, "observed": _number(observed),
            "limit_value": _number(limit_value), "unit": unit,
            "action": action, "detail": detail,
        }  # fmt: skip
        with self._lock:
            if self._closed:
                raise ValueError(f"the audit log {self.path} is closed")
            try:
                fd = self._locked_fd()
                try:
                    return self._append_locked(fd, fields)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    if self._fd is None:  # rotated away: the next append opens the new file
                        os.close(fd)
            except OSError as exc:
                self._cache = None
                raise _write_error(self.path, exc) from exc

    def _append_locked(self, fd: int, fields: dict[str, Any]) -> dict[str, Any]:
        st = os.fstat(fd)
        cache = self._cache
        if cache is not None and cache[:2] == (st.st_ino, st.st_size):
            seq, prev, torn = cache[2], cache[3], False
        elif st.st_size == 0:  # a new file: the chain goes on from the file rotated before it
            (seq, prev), torn = _rotated_tail(self.path), False
        else:
            seq, prev, torn = _last_record(fd, st.st_size)
        record: dict[str, Any] = {"ts": _now(), "seq": seq + 1, **fields, "prev": prev}
        record["hash"] = _hash(record)
        # After a torn tail, start on a fresh line: the torn one stays visible to verify.
        data = (b"\n" if torn else b"") + _canonical(record) + b"\n"
        self._cache = None
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # A disk that filled mid-line leaves part of it: take it back (we hold the lock),
            # so the file still ends with a whole line and verifies.
            try:
                os.ftruncate(fd, st.st_size)
            except OSError:
                pass
            raise
        size = st.st_size + len(data)
        self._cache = (st.st_ino, size, record["seq"], record["hash"])
        if self.max_size is not None and size >= self.max_size:
            self._rotate()
        return record

    def _rotate(self) -> None:
        """Rename the full file (whose lock we hold) to the next number; leave an empty one.

        Writers waiting for the lock find the path's inode changed and reopen it; the first
        append to the new file chains from this one's last line (``_rotated_tail``).
        """
        rotated = _rotated(self.path)
        number = rotated[-1][0] + 1 if rotated else 1
        os.rename(self.path, f"{self.path}.{number}")
        self._fd, self._cache = None, None  # append() closes the old descriptor after unlock
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        parent = os.path.dirname(self.path) or "."
        if self.keep is not None:
            for _, name in rotated[: max(0, len(rotated) + 1 - self.keep)]:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        dfd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)  # the renames survive a crash, like the lines
        finally:
            os.close(dfd)

    def close(self) -> None:
        """Close the file; further appends raise ValueError."""
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({self.path!r})"


LOCK_WAIT = 2.0  # seconds


def _lock(fd: int) -> None:
    """flock(LOCK_EX) within LOCK_WAIT, else OSError (EWOULDBLOCK).

    Anyone who can read the log can hold its lock (a jailed tree can read it), and a
    supervisor waiting there enforces nothing: past LOCK_WAIT the append fails, and the
    run fails closed (its tree is killed, 125).  Uncontended, one syscall.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    end = time.monotonic() + LOCK_WAIT
    delay = 0.0001
    while True:
        time.sleep(delay)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                raise OSError(
                    errno.EWOULDBLOCK, f"its lock was held for more than {LOCK_WAIT:g} s"
                ) from None
            delay = min(2 * delay, 0.001)


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


def read_events(paths: Paths, *, strict: bool = True) -> Iterator[dict[str, Any]]:
    """Yield every record of one or several files, in order.

    A line that is not a JSON object raises AuditError naming file and line, or is skipped
    with ``strict=False``.
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
    if record.keys() != _KEY_SET:
        missing = ", ".join(k for k in KEYS if k not in record) or "none"
        extra = ", ".join(sorted(record.keys() - _KEY_SET)) or "none"
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


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime: ISO 8601 (naive means UTC), or now minus 30s, 15m, 1h, 7d."""
    from datetime import UTC, datetime, timedelta

    value = text.strip()
    unit = _UNITS.get(value[-1:])
    if unit is not None and value[:-1].isdigit() and value[:-1].isascii():
        now = now if now is not None else datetime.now(UTC)
        return now.astimezone(UTC) - timedelta(seconds=int(value[:-1]) * unit)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f'"{text}" is not a time (try 1h, 7d or 2026-11-24T10:00:00Z)') from None
    # Naive times are UTC, because every time the log shows is UTC.
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def filter_events(
    events: Iterable[dict[str, Any]],
    *,
    agent: str | None = None,
    session: str | None = None,
    event: str | None = None,
    limit: str | None = None,
    since: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """The records that match every given field (exact match) and are not older than ``since``."""
    if event is not None and event not in EVENTS:
        raise ValueError(f"{event!r} is not an audit event (one of {', '.join(EVENTS)})")
    wanted = {"agent": agent, "session": session, "event": event, "limit": limit}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    floor = None
    if since is not None:
        from datetime import UTC

        aware = since.replace(tzinfo=UTC) if since.tzinfo is None else since
        # ts strings share one fixed UTC format, so they compare in time order as text.
        floor = aware.astimezone(UTC).strftime(_TS_FORMAT)
    return (
        r
        for r in events
        if all(r.get(k) == v for k, v in wanted.items())
        and (floor is None or str(r.get("ts", "")) >= floor)
    )


def _show(value: Any, unit: Any) -> str:
    if value is None:
        return ""
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}" if unit else text


def format_event(record: dict[str, Any]) -> str:
    """One line for a terminal: time, event, run, agent, session, limit, action, detail."""
    ts = str(record.get("ts") or "?")
    if len(ts) > 20 and ts.endswith("Z"):
        ts = ts[:19] + "Z"  # seconds are enough on a terminal; --json has the rest
    parts = [ts, str(record.get("event")), f"run={record.get('run_id')}"]
    for key in ("agent", "session"):
        if record.get(key) is not None:
            parts.append(f"{key}={record[key]}")
    if record.get("limit") is not None:
        unit = record.get("unit")
        shown = [_show(record.get(k), unit) for k in ("observed", "limit_value")]
        sign = ">" if record.get("event") in ("violation", "denied") else "/"
        parts.append(f"{record['limit']} {f' {sign} '.join(s for s in shown if s)}".rstrip())
    if record.get("action") is not None:
        parts.append(str(record["action"]))
    detail = record.get("detail")
    if detail is not None:
        parts.append(detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True))
    return "  ".join(parts)
