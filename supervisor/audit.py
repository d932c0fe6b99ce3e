"""The audit log: an append-only, fsync'd, hash-chained JSON Lines file.

Every line is one record with the keys in ``KEYS``. ``hash`` is the SHA-256 hex of the
record without ``hash``, serialized as canonical JSON (sorted keys, ``(",", ":")``
separators, UTF-8); ``prev`` is the hash of the line before (64 zeros on the first line);
``seq`` counts from 0 per file. The line itself is the canonical JSON of the whole record,
so the file is byte-for-byte reproducible from its records.

Several processes may append to one file at once: each append takes ``flock(LOCK_EX)``
(waiting behind other writers; not behind the run's own tree: see ``_lock``),
finds the last complete line (from a cache, or by reading only the tail of the file), and
writes its line with one ``write`` on an ``O_APPEND`` descriptor, then ``fsync``.

Rotation is by size: the writer whose line takes the file to ``max_size`` renames it, under
the lock, to the next free number (``audit.jsonl.1``, ``.2``, ...: a rotated file never
changes name again) and leaves an empty ``audit.jsonl``. The first line of the new file
has ``seq`` 0 and ``prev`` the last hash of the file it rotated from, so the chain runs
across every file. ``log_files`` lists a log's files oldest first.

This module is the writer. The canonical form and the chain's tail, shared with the reader,
are in ``supervisor._audit_chain``; reading is loaded on first use of its names here:
``read_events``, ``verify`` and ``VerifyReport`` from ``supervisor._audit_read``;
``filter_events``, ``parse_since`` and ``format_event`` from ``supervisor._audit_view``.

This module is imported on every run: stdlib only, and nothing the run path does not already
load (no dataclasses, pathlib, datetime or threading; measured with ``python -X importtime``).
"""

from __future__ import annotations

import _thread
import errno
import fcntl
import os

from supervisor._audit_chain import (
    EVENTS,
    KEYS,
    _canonical,
    _hash,
    _last_record,
    _number,
    _rotated,
    _rotated_tail,
    log_files,
)
from supervisor._audit_chain import (
    ZERO_HASH as ZERO_HASH,  # re-exported: scripts/bench.py writes logs with it
)
from supervisor._flock import LockHeld, wait_flock
from supervisor._time import iso_time
from supervisor.errors import AuditError

# typing costs ~5 ms to import; mypy honours any constant named TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:  # imported where used: supervisor.py imports this module on every run
    from pathlib import Path
    from typing import Any, TypeAlias

    from supervisor._audit_read import VerifyReport, read_events, verify
    from supervisor._audit_view import filter_events, format_event, parse_since

    PathArg: TypeAlias = str | os.PathLike[str]

__all__ = [
    "EVENTS", "KEYS", "AuditLog", "VerifyReport", "default_audit_path", "filter_events",
    "format_event", "log_files", "parse_since", "read_events", "verify",
]  # fmt: skip

# Names loaded on first use, where only readers pay for them (not on a run's path).
_READERS = dict.fromkeys(("VerifyReport", "read_events", "verify"), "_audit_read")
_READERS.update(dict.fromkeys(("filter_events", "format_event", "parse_since"), "_audit_view"))


def __getattr__(name: str) -> Any:
    """The reading side (``verify``, ``read_events``, ``format_event``...), on first use."""
    if name not in _READERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    globals()[name] = value = getattr(import_module(f"supervisor.{_READERS[name]}"), name)
    return value


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


def _write_error(path: str, exc: OSError) -> AuditError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free disk space on that filesystem, or pass --audit FILE elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make it writable by this user, or pass --audit FILE"
    elif isinstance(exc, LockHeld):
        hint = exc.hint
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
        record: dict[str, Any] = {"ts": iso_time(), "seq": seq + 1, **fields, "prev": prev}
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


def _lock(fd: int) -> None:
    """flock(LOCK_EX) of the log: others waited for, the run's own tree not (``_flock``)."""
    wait_flock(fd)
