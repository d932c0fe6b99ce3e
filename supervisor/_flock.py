"""Waiting for an ``flock`` that others share: the audit log's, the SQLite ledger's.

Several supervisors append to one audit log and write one ledger, each under ``flock``;
on a loaded machine they queue, and a queue is no fault.  But anyone who can read those
files can lock them, the supervised tree included, and a supervisor waiting on its own
tree enforces nothing.  The kernel says who holds a lock (``/proc/locks``), so the wait
tells the two apart: the run's own tree may hold it ``LOCK_WAIT``, others ``CONTENDED_WAIT``.

Imported on every run (the audit log): stdlib only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

__all__ = ["CONTENDED_WAIT", "LOCK_WAIT", "LockHeld", "wait_flock"]

LOCK_WAIT = 2.0  # seconds: longest a process of the run's own tree may hold the lock
CONTENDED_WAIT = 30.0  # seconds: longest wait behind others (supervisors queueing, fsync'ing)


class LockHeld(OSError):
    """A lock stayed held; ``hint`` says by whom, so the fix fits the cause."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(errno.EWOULDBLOCK, message)
        self.hint = hint


def wait_flock(fd: int) -> float:
    """flock(LOCK_EX) of ``fd``, waiting behind other writers; the seconds waited, or
    ``LockHeld`` (an OSError).

    Anyone who can read a file can hold its lock (a jailed tree can read it), and a
    supervisor waiting there enforces nothing.  The holder's pid is in ``/proc/locks``:
    held for ``LOCK_WAIT`` by a process of this supervisor's own tree, the wait fails
    (the caller fails closed: the run stops, 125, or the call is denied).  Others queueing on a
    busy machine are waited for, up to ``CONTENDED_WAIT``.  Uncontended, one syscall.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        pass
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    start = look = time.monotonic()
    mine = 0.0  # seconds the lock was seen held by this supervisor's tree
    unknown = start  # since when the holder could not be seen (no /proc, another pid namespace)
    holder: int | None = None
    delay = 0.0001
    while True:
        time.sleep(delay)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return time.monotonic() - start
        except BlockingIOError:
            pass
        delay = min(2 * delay, 0.001)
        now = time.monotonic()
        if now - look < 0.02:  # /proc/locks is read at most 50 times a second
            continue
        if holder is not None and _descends(holder):
            mine += now - look
        look = now
        holder = _holder(where)
        if holder != 0:  # a holder seen, or none: the lock changes hands and we lost a race
            unknown = now
        if holder is not None and holder <= 0:
            holder = None
        if mine >= LOCK_WAIT:
            raise LockHeld(
                f"its lock was held for more than {LOCK_WAIT:g} s by pid {holder or '?'}, "
                "a process of the supervised command",
                "a supervised command must not lock it; the run was stopped (fail closed)",
            )
        if now - unknown >= LOCK_WAIT:
            raise LockHeld(
                f"its lock was held for more than {LOCK_WAIT:g} s by a process not seen "
                "in /proc/locks",
                "find who holds it (lslocks), or pass --audit FILE",
            )
        if now - start >= CONTENDED_WAIT:
            name = "another process" if holder is None else f"pid {holder} ({_comm(holder)})"
            raise LockHeld(
                f"its lock was held for more than {CONTENDED_WAIT:g} s by other writers",
                f"{name} holds it: is it stopped or hung? Or pass --audit FILE",
            )


def _holder(where: str) -> int | None:
    """The pid holding the flock of the file ``major:minor:inode`` (from /proc/locks);
    None when nobody holds it now, 0 when it cannot be seen (no /proc, another pid
    namespace)."""
    try:
        with open("/proc/locks", "rb") as f:
            table = f.read().decode("ascii", "replace")
    except OSError:
        return 0
    for line in table.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == where:
            return int(parts[4]) if parts[4].isdigit() else 0
    return None


def _descends(pid: int) -> bool:
    """Whether ``pid`` is a descendant of this process (its tree: the reaper and below)."""
    me = os.getpid()
    for _ in range(64):  # deeper trees are not ours to walk
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # ppid, after "(comm) state"
        if pid == me:
            return True
        if pid <= 1:
            return False
    return False


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return "gone"
