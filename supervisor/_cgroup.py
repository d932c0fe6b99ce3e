"""The tree's cgroups: limits and accounting the kernel keeps for the whole tree.

Where this process may make child groups (root on a v1 hierarchy, root on a v2 mount
with the controller, or a v2 subtree delegated to it), a run's command joins, before it
execs, a group of its own per controller it needs (``cgroup_parent`` finds them):

- ``pids``: ``pids.max`` = ``limits.task_cap(processes)``, where RLIMIT_NPROC in a user
  namespace cannot back up ``processes`` (root is exempt from it);
- ``memory`` (under ``on_violation: kill``): ``memory.max`` (v2) or
  ``memory.limit_in_bytes`` (v1) = ``limits.memory``.  The kernel charges every page the
  tree makes resident once, whoever maps it: anonymous memory, SysV segments, memfds and
  tmpfs files included, copy-on-write pages shared by a fork pool once.  An OOM kill in
  the group (``memory.events`` / ``memory.oom_control``: ``oom_kill``) is the ``memory``
  violation; the watcher only reports the group's working set (usage less inactive file
  cache, which the kernel reclaims before it kills);
- ``cpu``: the tree's CPU from the group's own clock (``cpu.stat`` usage_usec on v2,
  ``cpuacct.usage`` on v1), so children reaped by the kernel (``SIGCHLD`` ignored),
  whose CPU reaches no ``cutime``, count too.

The reaper stays outside the groups (its own CPU and memory are not the tree's).
Without them the watcher enforces: RSS confirmed by PSS, and the last CPU seen of
processes that vanish unreaped (``watch.TreeSampler``).  ``enforced()`` says which route
a run took; ``SUPERVISE_CGROUPS=off`` forces the watcher's.
"""

from __future__ import annotations

import os

from .limits import cgroup_words, task_cap

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._plan import RunPlan


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _field(text: str, key: str) -> int:
    """The value of ``key value`` lines (memory.stat, memory.events, cpu.stat)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def wanted(plan: RunPlan) -> list[str]:
    """The controllers a run of ``plan`` needs a group of."""
    from ._linux import userns_available

    lim, out = plan.max, []
    if lim.processes is not None and (os.geteuid() == 0 or not userns_available()):
        out.append("pids")
    if lim.memory is not None and plan.kills:
        out.append("memory")
    if lim.cpu_time is not None:
        out.append("cpu")
    return out


class TreeCgroups:
    """The groups of one run: made before the spawn, removed after it."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.dirs: dict[str, tuple[str, int]] = {}  # controller -> (group, version)
        self.joined: dict[str, bool] = {}  # what after_spawn found in /proc/PID/cgroup
        self.tasks_cap = 0
        self._fds: dict[str, int] = {}  # the files read at every sample, kept open (pread)
        tag = f"supervise-{os.getpid()}-{os.urandom(4).hex()}"
        for controller in wanted(plan):
            self._make(controller, tag)

    def _make(self, controller: str, tag: str) -> None:
        from ._linux import cgroup_parent

        found = cgroup_parent(controller)
        if found is None:
            return
        parent, version = found
        path = os.path.join(parent, tag)
        lim = self.plan.max
        try:
            if path not in (d for d, _ in self.dirs.values()):
                os.mkdir(path)
            if controller == "pids":
                self.tasks_cap = task_cap(int(lim.processes or 0))
                self._write(path, "pids.max", self.tasks_cap)
            elif controller == "memory":
                name = "memory.max" if version == 2 else "memory.limit_in_bytes"
                self._write(path, name, int(lim.memory or 0))
                if version == 2:
                    self._write(path, "memory.swap.max", 0, needed=False)
                else:
                    self._write(path, "memory.memsw.limit_in_bytes", int(lim.memory or 0),
                                needed=False)  # fmt: skip
        except OSError:
            if path not in (d for d, _ in self.dirs.values()):
                _rmdir(path)
            return
        self.dirs[controller] = (path, version)

    @staticmethod
    def _write(path: str, name: str, value: int, *, needed: bool = True) -> None:
        try:
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))
        except OSError:
            if needed:
                raise

    def words(self) -> list[str]:
        """The reaper's word: every group the command joins before exec."""
        groups = list(dict.fromkeys(d for d, _ in self.dirs.values()))
        return cgroup_words(":".join(groups)) if groups else []

    def after_spawn(self, pid: int) -> None:
        """Which groups the command is in, from /proc/PID/cgroup (never assumed)."""
        if not self.dirs:
            return
        try:
            groups = _read(f"/proc/{pid}/cgroup")
        except OSError:
            return
        for controller, (path, _) in self.dirs.items():
            self.joined[controller] = f"/{os.path.basename(path)}\n" in groups

    def _in(self, controller: str) -> tuple[str, int] | None:
        found = self.dirs.get(controller)
        return found if found is not None and self.joined.get(controller) else None

    @property
    def memory_enforced(self) -> bool:
        return self._in("memory") is not None

    def _get(self, path: str) -> str:
        """A group file's content: one pread of an fd kept open (a sample reads a few of
        these ten times a second: open/read/close each time cost the watcher 0.2%)."""
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, 65536, 0).decode()

    def cpu(self) -> float | None:
        """The tree's CPU seconds by the group's clock, or None without one."""
        found = self._in("cpu")
        if found is None:
            return None
        path, version = found
        try:
            if version == 2:
                return _field(self._get(f"{path}/cpu.stat"), "usage_usec") / 1e6
            return int(self._get(f"{path}/cpuacct.usage")) / 1e9
        except (OSError, ValueError):
            return None

    def memory(self) -> tuple[int, int] | None:
        """(working set bytes, OOM kills) of the memory group, or None without one."""
        found = self._in("memory")
        if found is None:
            return None
        path, version = found
        get = self._get
        try:
            if version == 2:
                used = int(get(f"{path}/memory.current"))
                kills = _field(get(f"{path}/memory.events"), "oom_kill")
                key = "inactive_file"
            else:
                used = int(get(f"{path}/memory.usage_in_bytes"))
                kills = _field(get(f"{path}/memory.oom_control"), "oom_kill")
                key = "total_inactive_file"
            limit = self.plan.max.memory
            # The page cache the kernel would reclaim first is taken out near the limit
            # only (the kernel enforces; below half of it the figure is a gauge).
            if limit is not None and used * 2 >= limit:
                used -= _field(get(f"{path}/memory.stat"), key)
        except (OSError, ValueError):
            return None
        return max(0, used), kills

    def checks(self) -> list[tuple[str, float, float, str]]:
        """A ``memory`` check for an OOM kill in the group (``watch.OOM``: the kernel
        enforced it)."""
        mem, limit = self.memory(), self.plan.max.memory
        if mem is None or limit is None or not mem[1]:
            return []
        return [
            ("memory", float("inf"), limit, "the kernel's OOM kill in the tree's memory cgroup")
        ]

    def enforced(self) -> dict[str, Any]:
        """What run_start records: the groups in force, and each limit's route."""
        lim = self.plan.max
        out: dict[str, Any] = {}
        if "pids" in self.dirs:
            path = self.dirs["pids"][0]
            out["tasks_cgroup"] = (
                f"pids.max={self.tasks_cap} ({path})" if self.joined.get("pids") else None
            )
        if lim.memory is not None:
            found = self._in("memory")
            out["memory"] = (
                f"kernel: memory cgroup v{found[1]} ({found[0]})"
                if found is not None
                else "watcher: tree RSS, a breach confirmed by PSS"
            )
        if lim.cpu_time is not None:
            found = self._in("cpu")
            out["cpu"] = (
                f"kernel: RLIMIT_CPU per process, the tree's by cgroup v{found[1]} ({found[0]})"
                if found is not None
                else "watcher: tree CPU from /proc, unreaped processes' last CPU kept"
            )
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for path in dict.fromkeys(d for d, _ in self.dirs.values()):
            _rmdir(path)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # gone already (the reaper removes it), or never made
