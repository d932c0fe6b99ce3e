"""The process-tree sampler and the pace it samples at.

Rlimits are per process; an agent is a tree.  ``TreeSampler`` measures the whole tree
under the reaper: RSS (``limits.memory``), CPU time (``limits.cpu_time``: live processes
plus every descendant already reaped, so short-lived workers cannot dodge it), the live
process count (``limits.processes``) and the most fds any one process holds.

It reads ``/proc`` directly rather than through psutil: one ``/proc/PID/stat`` read gives
a process's RSS and CPU (psutil needs two files and object set-up, ~4x the cost; see
``scripts/bench``), and the tree is walked through ``/proc/PID/task/TID/children`` from
the reaper down, never by scanning every pid of the host.

``next_interval`` paces the samples: slow while every limit is far away, fast as one
nears, faster still when the last samples show it growing toward the limit.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")

SLOW = 0.1  # seconds between samples while every limit is below half
FAST = 0.02  # at 80% of a limit
FLOOR = 0.005  # never faster than this


class Sample:
    """One measurement of the tree."""

    __slots__ = ("cpu", "max_fds", "pids", "processes", "rss", "t")

    def __init__(self, t: float) -> None:
        self.t = t
        self.rss = 0
        self.cpu = 0.0
        self.processes = 0
        self.max_fds = 0
        self.pids: list[int] = []


def _read(path: str) -> bytes:
    """A whole small /proc file, with bare syscalls (the io stack costs 3x more)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _children(pid: int, threads: int = 0) -> list[int]:
    """The children of every thread of ``pid`` (one read when it has a single thread)."""
    if threads == 1:
        tids = [str(pid)]
    else:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    out: list[int] = []
    for tid in tids:
        try:
            data = _read(f"/proc/{pid}/task/{tid}/children")
        except OSError:
            continue
        if len(data) == 4096:  # more children than one read holds
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                data = f.read()
        out.extend(map(int, data.split()))
    return out


def _stat(pid: int) -> tuple[int, float, float, int] | None:
    """(rss bytes, own CPU s, reaped children's CPU s, threads) of one process."""
    try:
        data = _read(f"/proc/{pid}/stat")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17,
    # num_threads=20, rss=24.
    own = (int(fields[11]) + int(fields[12])) / TICK
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return int(fields[21]) * PAGE, own, reaped, int(fields[17])


def _session_members(sid: int) -> list[int]:
    """Every process of session ``sid``, by a scan of all of /proc (for rare paths only)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = _read(f"/proc/{entry}/stat")
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if int(fields[3]) == sid:  # field 6: session
            out.append(int(entry))
    return out


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class TreeSampler:
    """Measures the tree below ``root`` (the reaper, single-threaded, itself not counted).

    Per process and sample: one ``stat`` read, one ``children`` read (a directory listing
    more only for a multi-threaded process), and an fd count every ``fd_every`` samples
    (fds change slowly and their listing costs the most).
    """

    def __init__(self, root: int, *, fd_every: int = 3) -> None:
        self.root = root
        self.fd_every = fd_every
        self._n = 0
        self._max_fds = 0

    def pids(self) -> list[int]:
        """Every live descendant of the root, breadth first."""
        found = _children(self.root, 1)
        i = 0
        while i < len(found):
            found.extend(_children(found[i]))
            i += 1
        return found

    def sample(self, t: float) -> Sample:
        s = Sample(t)
        root = _stat(self.root)
        if root is not None:
            s.cpu = root[2]  # everything the reaper has reaped
        count_fds = self._n % self.fd_every == 0
        self._n += 1
        todo = _children(self.root, 1)
        while todo:
            pid = todo.pop()
            st = _stat(pid)
            if st is None:
                continue  # exited between the walk and the read
            s.pids.append(pid)
            s.rss += st[0]
            s.cpu += st[1] + st[2]
            todo.extend(_children(pid, st[3]))
            if count_fds:
                s.max_fds = max(s.max_fds, _fd_count(pid))
        if count_fds:
            self._max_fds = s.max_fds
        s.max_fds = self._max_fds
        s.processes = len(s.pids)
        return s


def next_interval(
    prev: Sample | None, cur: Sample, watched: Iterable[tuple[str, float, float]]
) -> float:
    """Seconds until the next sample, from how close and how fast each limit is nearing.

    ``watched`` is (name, used now, limit) for each limit the sampler feeds.  The time
    left before a limit at the current growth rate is sampled at least four times.
    """
    interval = SLOW
    dt = cur.t - prev.t if prev is not None else 0.0
    for name, used, limit in watched:
        if limit <= 0:
            continue
        frac = used / limit
        if frac >= 0.8:
            interval = min(interval, FAST)
        elif frac >= 0.5:
            interval = min(interval, 0.05)
        if prev is not None and dt > 0:
            before = {"memory": prev.rss, "processes": prev.processes, "cpu_time": prev.cpu}
            rate = (used - before.get(name, used)) / dt
            if rate > 0:
                interval = min(interval, (limit - used) / rate / 4)
    return max(FLOOR, interval)
