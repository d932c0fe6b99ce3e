"""The process-tree sampler, the pace it samples at, and the limit checks on what it saw.

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

The checks (``sample_checks``, ``kernel_breach``, ``exit_checks``) say which limit a
measurement or a death stands for; the run decides what follows (a breach, an alert).
"""

from __future__ import annotations

import math
import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from decimal import Decimal
    from typing import Any, TypeAlias

    from ._cgroup import TreeCgroups
    from ._plan import Limits, RunPlan
    from .result import RunResult, Usage, Violation

    # (limit, used, limit value, how it was measured): one limit's state now.
    Check: TypeAlias = tuple[str, float, float, str]

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")

SLOW = 0.1  # seconds between samples while every limit is below half
FAST = 0.02  # at 80% of a limit
FLOOR = 0.005  # never faster than this
OOM = math.inf  # a check's "used" for a limit the kernel enforced (it killed: no figure)


class Sample:
    """One measurement of the tree."""

    __slots__ = ("cpu", "max_fds", "memory_how", "oom", "pids", "processes", "rss", "t")

    def __init__(self, t: float) -> None:
        self.t = t
        self.rss = 0  # the tree's memory: RSS, PSS past the limit, or the cgroup's
        self.memory_how = "tree RSS"
        self.oom = 0  # OOM kills in the tree's memory cgroup
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


def _pss(pid: int) -> int | None:
    """A process's proportional set size (shared pages divided among their sharers): 0
    once it is gone or exiting (its memory with it), None where it may not be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except PermissionError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    return 0


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

    With the tree's cgroups (``_cgroup.TreeCgroups``) the memory figure and OOM kills come
    from the memory group and the CPU total is at least the CPU group's.  Without them, a
    tree RSS past ``limits.memory`` is confirmed by PSS before it counts (a fork pool's
    shared pages once, not once per process), and the last CPU seen of a process that
    vanished without its parent's ``cutime`` growing by it (reaped by the kernel:
    ``SIGCHLD`` ignored) is kept.
    """

    def __init__(self, root: int, cgroups: TreeCgroups | None = None, *, fd_every: int = 3) -> None:
        self.root = root
        self.fd_every = fd_every
        self.cgroups = cgroups
        self.memory_limit = None if cgroups is None else cgroups.plan.max.memory
        self._n = 0
        self._max_fds = 0
        self._seen: dict[int, tuple[int, float, float]] = {}  # pid: (parent, CPU, cutime)
        self._lost = 0.0  # CPU of processes gone without reaching a cutime

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
        seen: dict[int, tuple[int, float, float]] = {}
        rss: dict[int, int] = {}
        root = _stat(self.root)
        if root is not None:
            s.cpu = root[2]  # everything the reaper has reaped
            seen[self.root] = (0, root[2], root[2])
        count_fds = self._n % self.fd_every == 0
        self._n += 1
        todo = [(pid, self.root) for pid in _children(self.root, 1)]
        while todo:
            pid, parent = todo.pop()
            st = _stat(pid)
            if st is None:
                continue  # exited between the walk and the read
            s.pids.append(pid)
            rss[pid] = st[0]
            s.cpu += st[1] + st[2]
            seen[pid] = (parent, st[1] + st[2], st[2])
            todo.extend((child, pid) for child in _children(pid, st[3]))
            if count_fds:
                s.max_fds = max(s.max_fds, _fd_count(pid))
        if count_fds:
            self._max_fds = s.max_fds
        s.max_fds = self._max_fds
        s.processes = len(s.pids)
        s.rss = sum(rss.values())
        self._count_lost(seen)
        s.cpu += self._lost
        self._kernel_figures(s, rss)
        return s

    def _count_lost(self, seen: dict[int, tuple[int, float, float]]) -> None:
        """Keep the CPU of processes gone since the last sample that their (live) parent's
        cutime did not take in: children the kernel reaped."""
        gone: dict[int, float] = {}
        for pid, (parent, cpu, _) in self._seen.items():
            if pid not in seen and pid != self.root:
                gone[parent] = gone.get(parent, 0.0) + cpu
        for parent, cpu in gone.items():
            if parent in seen and parent in self._seen:
                took = seen[parent][2] - self._seen[parent][2]
                self._lost += max(0.0, cpu - took)
        self._seen = seen

    def _kernel_figures(self, s: Sample, rss: dict[int, int]) -> None:
        """The cgroups' figures where they are in force, else PSS past the memory limit."""
        cg = self.cgroups
        if cg is not None:
            cpu = cg.cpu()
            if cpu is not None:
                s.cpu = max(s.cpu, cpu)
            mem = cg.memory()
            if mem is not None:
                s.rss, s.oom = mem
                s.memory_how = "the tree's memory cgroup"
                return
        limit = self.memory_limit
        if limit is not None and s.rss > limit:
            pss = [_pss(pid) for pid in rss]
            s.rss = sum(rss[pid] if p is None else p for pid, p in zip(rss, pss, strict=True))
            s.memory_how = "tree PSS"


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


# -- the checks ------------------------------------------------------------------------

# CPU seconds past cpu_time that the watcher leaves to the kernel's RLIMIT_CPU: a process
# that reaches the limit alone dies of SIGXCPU there (a tree of several is the watcher's).
KERNEL_FIRST = 0.1

_SAMPLED = (
    ("memory", "tree RSS"),
    ("processes", "live processes in the tree"),
    ("cpu_time", "tree CPU"),
    ("wall_time", "wall clock"),
)

_SIGNAL_LIMIT: dict[int, str] = {signal.SIGXCPU: "cpu_time", signal.SIGXFSZ: "file_size"}


def fold_sample(usage: Usage, cur: Sample) -> None:
    """The sample's figures into the run's peaks."""
    usage.peak_memory = max(usage.peak_memory, cur.rss)
    usage.peak_processes = max(usage.peak_processes, cur.processes)
    usage.peak_open_files = max(usage.peak_open_files, cur.max_fds)
    usage.cpu_time = max(usage.cpu_time, cur.cpu)


def current(cur: Sample, checks: list[Check], elapsed: float) -> dict[str, float]:
    """The current value of every gauge (``Run.on_sample``, ``--live``)."""
    out = {name: used for name, used, _, _ in checks}
    out.update(
        memory=cur.rss,
        processes=cur.processes,
        cpu_time=cur.cpu,
        open_files=cur.max_fds,
        wall_time=elapsed,
    )
    return out


def sample_checks(lim: Limits, cur: Sample, elapsed: float) -> list[Check]:
    """The sampled limits this plan has, with what the sample shows of each."""
    used = {
        "memory": cur.rss,
        "processes": cur.processes,
        "cpu_time": cur.cpu,
        "wall_time": elapsed,
    }
    out: list[Check] = []
    for name, how in _SAMPLED:
        limit = getattr(lim, name)
        if limit is None:
            continue
        if name == "memory":
            how = cur.memory_how
            if cur.oom:
                out.append((name, OOM, limit, "the kernel's OOM kill in the tree's memory cgroup"))
                continue
        value = used[name]
        if name == "cpu_time" and limit < value <= limit + KERNEL_FIRST:
            # RLIMIT_CPU stops each process at the limit: in this window its SIGXCPU is
            # due, and it, not the sampled sum, says why the tree was stopped.
            value = limit
        out.append((name, value, limit, how))
    return out


def kernel_breach(
    wstatus: int, cpu: float, shown: float, cpu_limit: float | None, killed_by_us: bool
) -> tuple[str, float | None, str] | None:
    """The limit the kernel enforced when a process of the tree died of ``wstatus``.

    SIGXCPU and SIGXFSZ name theirs; a SIGKILL we did not send, of a process whose own
    CPU (``cpu``, what RLIMIT_CPU counts) reached the limit, is RLIMIT_CPU's hard limit.
    Returns (limit, observed, signal name) or None; ``shown`` is a more precise CPU figure
    for the message (or -1).  file_size's observed value is None: the write was refused.
    """
    if not os.WIFSIGNALED(wstatus):
        return None
    sig = os.WTERMSIG(wstatus)
    limit = _SIGNAL_LIMIT.get(sig)
    if (
        limit is None
        and sig == signal.SIGKILL
        and not killed_by_us
        and cpu_limit is not None
        and cpu >= max(1, math.ceil(cpu_limit))
    ):
        limit = "cpu_time"  # killed by the kernel at the RLIMIT_CPU hard limit
    if limit is None:
        return None
    name = signal.Signals(sig).name
    if limit == "cpu_time":
        # The kernel's clock is exact, rusage is sampled: it may read a little under
        # the soft limit the kernel just enforced.
        soft = max(1, math.ceil(cpu_limit)) if cpu_limit is not None else 0
        return limit, max(cpu, shown, soft), name
    return limit, None, name


def step_check(
    step_time: float | None, deadline: tuple[float, str] | None, now: float
) -> Check | None:
    """The oldest open step, once it has run past ``step_time``."""
    if step_time is None or deadline is None or now < deadline[0]:
        return None
    at, name = deadline
    return "step_time", now - at + step_time, step_time, f"step {name!r}"


ALERTS = (0.8, 0.9)  # fractions of a limit that raise a warning, once each per run


class Verdicts:
    """What the measurements mean for one run: its violation (the first breach; under
    ``on_violation: warn`` one per limit) and an alert at each fraction of a limit.

    It decides and words; the run acts, through ``on_violation(violation, kill)`` and
    ``on_warning(warning, notification)``.
    """

    def __init__(
        self,
        plan: RunPlan,
        result: RunResult,
        on_violation: Callable[[Violation, bool], object],
        on_warning: Callable[[dict[str, Any], dict[str, Any]], object],
    ) -> None:
        self.plan = plan
        self.result = result
        self._on_violation = on_violation
        self._on_warning = on_warning
        self._warned: set[str] = set()
        self._alerted: set[tuple[str, float]] = set()

    def judge(self, checks: Iterable[Check]) -> None:
        """A breach for each limit past its value, else maybe an alert."""
        for name, used, limit, how in checks:
            if used == OOM:  # the kernel enforced it: no figure past the limit
                self.breach(name, None, limit, how)
            elif used > limit:
                self.breach(name, used, limit, how)
            else:
                self.alert(name, used, limit)

    def breach(self, limit: str, observed: float | None, value: Any, how: str) -> None:
        """A limit was broken: the run's violation, unless it has one (or warned of it)."""
        res = self.result
        if res.violation is not None or limit in self._warned:
            return
        from .result import Violation, breach_message

        violation = Violation(limit, observed, value, breach_message(limit, observed, value, how))
        res.violation = violation
        if not self.plan.kills:
            self._warned.add(limit)
        self._on_violation(violation, self.plan.kills)

    def alert(
        self,
        limit: str,
        used: float | int | Decimal,
        value: float | int | Decimal,
        fractions: tuple[float, ...] = ALERTS,
        scope: str | None = None,
    ) -> None:
        """At each alert fraction of a limit, once per run: a warning (and a notification
        for the child)."""
        for frac in fractions:
            key = (f"{scope}.{limit}" if scope else limit, frac)
            if key in self._alerted or _below(used, frac, value):
                continue
            self._alerted.add(key)
            from .result import alert_message

            message = alert_message(limit, used, value, frac, scope)
            warning: dict[str, Any] = {
                "limit": limit,
                "fraction": frac,
                "observed": _num(used),
                "limit_value": _num(value),
                "message": message,
            }
            note: dict[str, Any] = {
                "limit": limit,
                "used": _num(used),
                "limit_value": _num(value),
                "fraction": frac,
            }
            if scope:
                warning["scope"] = note["scope"] = scope
            self._on_warning(warning, note)

    def kernel_kill(
        self,
        pid: int,
        wstatus: int,
        cpu: float,
        shown: float,
        killed_by_us: bool,
        sigxfsz: Callable[[], tuple[str, int | None]] | None,
    ) -> None:
        """A process of the tree died: a breach if the kernel enforced a limit on it.

        ``sigxfsz()`` says which limit a SIGXFSZ stands for now (file_size, or a
        workspace cap that RLIMIT_FSIZE carries).
        """
        cpu_limit = self.plan.max.cpu_time
        found = kernel_breach(wstatus, cpu, shown, cpu_limit, killed_by_us)
        if found is None:
            return
        limit, observed, name = found
        if limit == "cpu_time":
            self.breach(limit, observed, cpu_limit, f"{name}, pid {pid}")
            return
        limit, value = sigxfsz() if sigxfsz is not None else ("file_size", self.plan.max.file_size)
        self.breach(limit, None, value, f"a write past it, {name}, pid {pid}")

    def tree_cpu(self, used: float) -> None:
        """The tree's exact CPU total (the reaper's rusage, at the end) against cpu_time."""
        cpu = self.plan.max.cpu_time
        if cpu is not None and used > cpu and self.result.violation is None:
            self.breach("cpu_time", used, cpu, "tree CPU")


def _below(used: float | int | Decimal, frac: float, value: float | int | Decimal) -> bool:
    """``used < frac * value``: in floats for the sampler's measurements, exactly for a
    budget's counts and money (0.00045 USD is 90% of 0.0005, though not in floats)."""
    if isinstance(used, float) or isinstance(value, float):
        return float(used) < frac * float(value)
    from decimal import Decimal

    return Decimal(used) < Decimal(str(frac)) * Decimal(value)


def _num(value: float | int | Decimal) -> float | int:
    """An exact int stays one; money (Decimal) becomes a float for the log and the child."""
    return value if isinstance(value, (int, float)) else float(value)
