"""What a run confines beyond the rlimits: the workspace (jail, quota, file caps), network,
and the kernel's backstops for the tree (cgroups, an IPC namespace).

``Confinement`` is built before the spawn (it makes the workspace, scans it, and turns the
policy into the reaper's words) and polled by the run loop after it:

- the jail is Landlock in the command (``workspace.Workspace.jail_words``);
- ``network: deny`` is a network namespace of the command's own (through a user namespace
  when unprivileged), else Landlock's TCP rules (ABI 4); the run fails (125) when neither
  is possible rather than run with the network on;
- the quota is watched from inotify events (``_quota.QuotaTracker``) and the kernel helps:
  RLIMIT_FSIZE of every process of the tree is lowered, as the quota fills, to what is left
  (plus the largest file, so appending to one file can use the whole quota), and one byte
  more: a write runs past the quota by at most one block, which the watcher sees as a
  breach.  ``max_file_size`` is RLIMIT_FSIZE = max_file_size + 1 the same way.  Once the
  quota is broken (under ``on_violation: kill``) RLIMIT_FSIZE drops to 0 at once, before
  the violation is logged and the tree signalled: many small files cannot be capped by an
  offset limit ahead of time, but nothing grows while the run stops it.  The events are
  folded by a thread of their own (the quota guard), so that this happens within an event
  batch of the crossing even while the run loop waits on something else: an fsync'd audit
  line was measured taking 30-130 ms on a busy disk, time enough for four small-file
  writers to add 2-5 MiB.  The guard wakes the run loop (``fileno()``), which decides;
- the tree's cgroups (``_cgroup.TreeCgroups``): a pids cgroup where RLIMIT_NPROC cannot
  back up ``limits.processes`` (root is exempt from it), a memory cgroup that enforces
  ``limits.memory``, the tree's CPU by the kernel's clock; where one can be made;
- the tree gets an IPC namespace of its own where it may (root, or a user namespace):
  SysV shared memory and message queues then go with it instead of outliving the run.

What the kernel actually applied is read back after the spawn (``after_spawn``), never
assumed, and goes into ``run_start`` (``enforced()``).
"""

from __future__ import annotations

import _thread
import os
import resource

from .errors import WorkspaceError
from .limits import IPC_WORDS, fsize_words, network_words

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from typing import Any

    from ._cgroup import TreeCgroups
    from ._plan import RunPlan
    from ._quota import QuotaTracker
    from .result import Usage
    from .workspace import Workspace

HELD_OPEN_EVERY = 0.5  # seconds between looks for deleted files the tree holds open


class Confinement:
    """The workspace and network confinement of one run."""

    def __init__(self, plan: RunPlan, argv: list[str], env: dict[str, str]) -> None:
        self.plan = plan
        self.workspace: Workspace | None = None
        self.tracker: QuotaTracker | None = None
        self.words: list[str] = []
        self.warnings: list[str] = []
        self.landlock: dict[str, Any] | None = None
        self.network: str | None = None
        self.peak_bytes = 0
        self.peak_files = 0
        self._abi: int | None = None
        self._fsize_hard: int | None = None
        self._fsize_soft: int | None = None
        self._held_at = 0.0
        self._capped: set[int] = set()  # pids whose RLIMIT_FSIZE is _fsize_soft
        # The tracker and the caps, shared with the guard (_thread: threading is imported
        # only when a guard starts, off the path of runs without a quota).
        self._lock = _thread.RLock()
        self._guard: threading.Thread | None = None
        self._guard_fds: tuple[int, int, int] = (-1, -1, -1)  # wake (eventfd), stop pipe r, w
        self._reaper = 0  # the command's parent: the root of the tree the guard freezes
        self.cgroups: TreeCgroups | None = None  # the tree's cgroups, made here
        self._guards: dict[str, Any] = {}  # what after_spawn found in force
        kills = plan.on_violation == "kill"
        spec = plan.workspace
        if spec is not None or plan.network == "deny":
            from ._linux import landlock_abi

            self._abi = landlock_abi()
        if spec is not None:
            self._setup_workspace(spec, argv, env)
        if plan.network == "deny":
            self._setup_network()
        self._setup_fsize(kills)
        self._setup_cgroups()
        self.words += IPC_WORDS
        from ._identity import identity_words

        try:
            self.words += identity_words(plan, self.workspace, jailed=self.landlock is not None)
        except WorkspaceError:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------

    def _setup_workspace(self, spec: dict[str, Any], argv: list[str], env: dict[str, str]) -> None:
        from ._quota import QuotaTracker
        from .workspace import Workspace

        ws = self.workspace = Workspace(spec)
        try:
            ws.prepare()
            jail = ws.jail_words(argv[0] if argv else "", env.get("PATH"), self._abi)
            if any(spec.get(k) is not None for k in ("quota", "max_files", "max_file_size")):
                try:
                    self.tracker = ws.tracker = QuotaTracker(ws.path)
                except OSError as e:
                    raise WorkspaceError(
                        f"cannot watch the workspace {ws.path}: {e.strerror} "
                        "(raise fs.inotify.max_user_instances, or remove the quota limits)"
                    ) from None
                self._observe()
        except WorkspaceError:
            ws.cleanup()
            raise
        self.words += jail
        if jail:
            self.landlock = {
                "abi": self._abi,
                "writes": "workspace" + (" + writable" if ws.writable else ""),
                "reads": "all" if ws.readable is None else "listed",
            }
            if "TMPDIR" not in self.plan.env_set:
                env["TMPDIR"] = ws.path  # the only place the tree can make temporary files
            from ._identity import jail_home

            jail_home(env, ws, self.plan.env_set)
        elif spec.get("jail", "auto") == "auto" and self._abi is None:
            self.warnings.append(
                "workspace.jail: this kernel has no Landlock, so the command can write "
                "outside its workspace (the quota still holds; jail: required refuses to run)"
            )

    def _setup_network(self) -> None:
        self.words += network_words(self._abi)

    def _setup_fsize(self, kills: bool) -> None:
        """RLIMIT_FSIZE from limits.file_size and, when they kill, the workspace caps."""
        spec = self.plan.workspace or {}
        mfs = spec.get("max_file_size")
        given = [self.plan.max.file_size, None if mfs is None else mfs + 1] if kills else []
        caps = [int(c) for c in given if c is not None]
        quota = kills and spec.get("quota") is not None and self.tracker is not None
        if not caps and not quota:
            return
        self._fsize_hard = min(caps) if caps else resource.RLIM_INFINITY
        self._fsize_soft = self._quota_cap()

    def _setup_cgroups(self) -> None:
        """The tree's cgroups (``_cgroup``): pids, memory and CPU, where they can be made."""
        from ._cgroup import TreeCgroups

        self.cgroups = TreeCgroups(self.plan)
        self.words += self.cgroups.words()

    def fsize_words(self) -> list[str]:
        """The reaper's RLIMIT_FSIZE word for the caps computed here, if any."""
        return fsize_words(self._fsize_soft, self._fsize_hard)

    def _quota_cap(self) -> int | None:
        """The soft RLIMIT_FSIZE the quota allows now (never above the hard one).

        The largest file may grow by what is left of the quota; counting it by its own
        blocks (not its size) keeps the cap right while writeback lags behind the writes.
        """
        hard = self._fsize_hard
        quota: int | None = (self.plan.workspace or {}).get("quota")
        if hard is None or quota is None or self.tracker is None:
            return hard
        used, _ = self.tracker.totals()
        if used > quota:
            return 0  # broken: nothing may grow while the run stops the tree
        size, blocks = self.tracker.largest_file()
        left = max(0, quota - used)
        # A sparse largest file (size past its blocks) may still be extended by what is left.
        room = max(quota - (used - blocks), size + left, 0) + 1
        return room if hard == resource.RLIM_INFINITY else min(hard, room)

    def after_spawn(self, pid: int) -> None:
        """Record what the kernel applied to the command: its namespaces (network, IPC),
        its pids cgroup, its seccomp filter."""

        def own(ns: str) -> bool | None:
            try:
                return os.readlink(f"/proc/self/ns/{ns}") != os.readlink(f"/proc/{pid}/ns/{ns}")
            except OSError:
                return None  # gone already: no evidence either way

        self._start_guard(pid)
        from ._identity import evidence

        self._guards["identity"] = evidence(pid, self.words)
        if self.plan.network == "deny":
            self.network = "namespace" if own("net") else "landlock-tcp"
        self._guards["ipc"] = "namespace" if own("ipc") else None
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return
        seccomp = status.get("Seccomp", "").strip() == "2"
        self._guards["seccomp"] = (
            "rlimits and scheduling of other processes refused" if seccomp else None
        )
        if self.cgroups is not None:
            self.cgroups.after_spawn(pid)
            self._guards.update(self.cgroups.enforced())

    # -- the quota guard ----------------------------------------------------------------

    def _start_guard(self, pid: int) -> None:
        """Under ``on_violation: kill`` with a quota: the thread that folds inotify events."""
        quota = (self.plan.workspace or {}).get("quota")
        if self.tracker is None or quota is None or self._fsize_hard is None:
            return
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                self._reaper = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return  # the command is gone already: nothing left to guard
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
        self._guard_fds = (wake, stop_r, stop_w)
        import threading

        self._guard = threading.Thread(
            target=self._guard_loop, args=(quota,), name="supervise-quota", daemon=True
        )
        self._guard.start()

    def _guard_loop(self, quota: int) -> None:
        import select

        from .watch import TreeSampler

        assert self.tracker is not None
        wake, stop, _ = self._guard_fds
        poller = select.poll()
        poller.register(self.tracker.fileno(), select.POLLIN)
        poller.register(stop, select.POLLIN)
        frozen = False
        while all(fd != stop for fd, _ in poller.poll()):
            # One read of events at a time, the quota checked after each: a batch of
            # several MiB of small files folded whole would be checked too late.
            changed = True
            while changed and not frozen:
                with self._lock:
                    changed = self.tracker.poll(reads=1)
                    if self.tracker.totals()[0] > quota:
                        # RLIMIT_FSIZE 0 for the whole tree as it is now (the run loop's
                        # last sample may predate the writers); a later fork inherits it.
                        self._lower_fsize(TreeSampler(self._reaper).pids())
                        frozen = True
            if frozen:
                with self._lock:
                    self.tracker.poll()
            os.eventfd_write(wake, 1)

    def _stop_guard(self) -> None:
        if self._guard is not None:
            os.write(self._guard_fds[2], b"!")
            self._guard.join()
            self._guard = None
        for fd in self._guard_fds:
            if fd >= 0:
                os.close(fd)
        self._guard_fds = (-1, -1, -1)

    # -- the run ----------------------------------------------------------------------

    def fileno(self) -> int:
        """Poll this for reading, then call ``poll()``: the guard's wake-ups, else inotify."""
        if self._guard is not None:
            return self._guard_fds[0]
        return self.tracker.fileno() if self.tracker is not None else -1

    def poll(self, pids: list[int], *, final: bool = False) -> list[tuple[str, int, int, str]]:
        """Fold inotify events in, lower the tree's RLIMIT_FSIZE if the quota filled, and
        return the workspace's (limit, used, limit value, how) for the limits it has.

        While the guard runs, it alone folds events (in small batches, the quota checked
        after each): a large batch folded here, under the lock, would keep the guard from
        freezing the tree in time. ``final`` (the tree is gone) folds what is left.
        """
        if self.tracker is None:
            return []
        guarded = self._guard is not None
        if guarded:
            try:
                os.eventfd_read(self._guard_fds[0])
            except BlockingIOError:
                pass
        with self._lock:
            if final or not guarded:
                self.tracker.poll()
            return self._observe(pids)

    def periodic(self, pids: list[int], now: float) -> list[tuple[str, int, int, str]]:
        """At each tree sample: a rescan when a directory could not be watched, and (twice a
        second, once files were deleted) the deleted files the tree still holds open."""
        with self._lock:
            return self._periodic(pids, now)

    def _periodic(self, pids: list[int], now: float) -> list[tuple[str, int, int, str]]:
        tracker = self.tracker
        if tracker is None:
            return []
        if tracker.maybe_rescan(now):
            tracker.held_open(pids)
            return self._observe(pids)
        if not tracker.unlinked or now < self._held_at:
            return []
        self._held_at = now + HELD_OPEN_EVERY
        before = tracker.held
        if tracker.held_open(pids) == before:
            return []
        return self._observe(pids)

    def _observe(self, pids: list[int] | None = None) -> list[tuple[str, int, int, str]]:
        assert self.tracker is not None
        used, files = self.tracker.totals()
        self.peak_bytes = max(self.peak_bytes, used)
        self.peak_files = max(self.peak_files, files)
        if pids:
            self._lower_fsize(pids)
        spec = self.plan.workspace or {}
        found = []
        if spec.get("quota") is not None:
            found.append(("storage", used, spec["quota"], "disk used by the workspace"))
        if spec.get("max_files") is not None:
            found.append(("files", files, spec["max_files"], "files and directories in it"))
        if spec.get("max_file_size") is not None:
            size, path = self.tracker.largest()
            where = os.path.relpath(path, self.tracker.root) if path else "no file"
            found.append(("max_file_size", size, spec["max_file_size"], where))
        return found

    def _lower_fsize(self, pids: list[int]) -> None:
        soft, hard = self._quota_cap(), self._fsize_hard
        if soft is None or hard is None:
            return
        if soft != self._fsize_soft:
            self._fsize_soft = soft
            self._capped.clear()
        todo = [pid for pid in pids if pid not in self._capped]
        self._capped.update(todo)
        for pid in todo:
            try:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))
            except OSError:
                pass  # gone, or it lowered its own hard limit further: fine either way

    def sigxfsz_limit(self) -> tuple[str, int | None]:
        """The limit a SIGXFSZ in the tree stands for now, and its value."""
        spec = self.plan.workspace or {}
        file_size = self.plan.max.file_size
        soft, hard = self._fsize_soft, self._fsize_hard
        if hard == resource.RLIM_INFINITY:
            hard = None
        if soft is not None and (hard is None or soft < hard) and spec.get("quota"):
            return "storage", spec["quota"]
        mfs = spec.get("max_file_size")
        if mfs is not None and (file_size is None or mfs + 1 <= file_size):
            return "max_file_size", mfs
        return "file_size", file_size

    def final_checks(self, usage: Usage) -> list[tuple[str, float, float, str]]:
        """Once the tree is gone: the workspace's last events (a command may write and exit
        within one poll) and its peaks, an OOM kill no sample saw, the cgroup's CPU total."""
        found: list[tuple[str, float, float, str]] = []
        if self.tracker is not None:
            found += self.poll([], final=True)
            usage.storage_bytes, usage.files = self.peak_bytes, self.peak_files
        if self.cgroups is not None:
            cpu = self.cgroups.cpu()
            if cpu is not None:
                usage.cpu_time = max(usage.cpu_time, cpu)
            found += self.cgroups.checks()
        return found

    @property
    def watches_storage(self) -> bool:
        """Whether the workspace has quota limits this run watches."""
        return self.tracker is not None

    def storage_used(self) -> tuple[int, int]:
        """(bytes, files) the workspace holds now; (0, 0) without a quota watch."""
        if self.tracker is None:
            return 0, 0
        return self.tracker.totals()  # two counters: no lock, the guard may hold it a while

    def enforced(self) -> dict[str, Any]:
        """What run_start records."""
        ws = self.workspace
        return {
            "landlock": self.landlock,
            "network": self.network,
            "workspace": None if ws is None else ws.path,
            "quota": None if self.tracker is None else "inotify + RLIMIT_FSIZE",
            **self._guards,
        }

    def close(self) -> None:
        self._stop_guard()
        if self.workspace is not None:
            self.workspace.cleanup()
        if self.cgroups is not None:
            self.cgroups.close()
