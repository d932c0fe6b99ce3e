"""Linux-only probes: what this kernel and this user can enforce.

Every probe is a real syscall or a kernel file, never a guess from the version number.
``capabilities()`` feeds ``supervise doctor``; ``run_start`` records what a run used.
"""

from __future__ import annotations

import os
import resource

# typing costs ~2 ms to import and this module is on every run's path (make_undumpable).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SYS_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1
_SYS_PIDFD_OPEN = 434
_PR_GET_CHILD_SUBREAPER = 37
_PR_SET_DUMPABLE = 4

_libc: Any = None


def _syscall(*args: int | None) -> tuple[int, int]:
    """A raw syscall: (return value, errno)."""
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    ret = int(_libc.syscall(*args))
    return ret, ctypes.get_errno()


def landlock_abi() -> int | None:
    """The Landlock ABI version, or None when the kernel lacks it or it is disabled."""
    ret, _ = _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return ret if ret > 0 else None


def has_pidfd() -> bool:
    ret, _ = _syscall(_SYS_PIDFD_OPEN, os.getpid(), 0)
    if ret >= 0:
        os.close(ret)
        return True
    return False


def make_undumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: a tree of the same uid can then no longer read
    its /proc/PID/environ (what the policy's env section withheld), fds or maps.  For the
    supervise command; an embedding program decides for itself (it loses core dumps)."""
    import ctypes

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def userns_available() -> bool:
    """Can this user create a user namespace (needed for an unprivileged net/pid namespace)?"""
    for path, bad in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return False
        except OSError:
            continue
    return os.path.exists("/proc/self/ns/user")


def cgroup_v2() -> str | None:
    """This process's cgroup v2 directory and whether it is delegated (writable), or None
    without a v2 hierarchy."""
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            controllers = f.read().strip() or "no controllers"
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), "/")
    except OSError:
        return None
    where = "/sys/fs/cgroup" + path
    delegated = os.access(os.path.join(where, "cgroup.procs"), os.W_OK)
    return f"{where} ({controllers}; {'delegated' if delegated else 'not writable'})"


_cgroup_dirs: dict[str, tuple[str, int] | None] = {}  # cgroup_parent()'s answers


def pids_cgroup() -> str | None:
    """A cgroup directory of the pids controller in which this process may make a child
    group (the v1 pids hierarchy, or a v2 group whose subtree has pids), else None."""
    found = cgroup_parent("pids")
    return None if found is None else found[0]


def cgroup_parent(controller: str) -> tuple[str, int] | None:
    """(directory, version) of a cgroup with ``controller`` in which this process may make
    a child group, else None: the v1 hierarchy of that controller, else the v2 group when
    its subtree has it.  ``cpu`` and ``freezer`` also take a bare v2 group: its
    ``cpu.stat`` and ``cgroup.freeze`` need no controller.  ``SUPERVISE_CGROUPS=off`` in
    supervise's environment finds none (the watcher's route, forced)."""
    if os.environ.get("SUPERVISE_CGROUPS") == "off":
        return None
    if controller not in _cgroup_dirs:
        _cgroup_dirs[controller] = _find_cgroup(controller)
    return _cgroup_dirs[controller]


_V1_NAME = {"cpu": "cpuacct", "pids": "pids", "memory": "memory", "freezer": "freezer"}


def _find_cgroup(controller: str) -> tuple[str, int] | None:
    try:
        with open("/proc/self/cgroup") as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f]
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    name = _V1_NAME.get(controller, controller)
    v1 = next((path for _, ctl, path in groups if name in ctl.split(",")), None)
    v2 = next((path for hid, ctl, path in groups if hid == "0" and not ctl), None)
    found: list[tuple[int, str, int]] = []  # (preference, directory, version)
    for mount in mounts:
        left, _, right = mount.partition(" - ")
        point, (fstype, _, *options) = left.split()[4], right.split()
        if fstype == "cgroup" and v1 is not None and name in options[0].split(","):
            found.append((0, os.path.normpath(f"{point}/{v1}"), 1))
        elif fstype == "cgroup2" and v2 is not None:
            where = os.path.normpath(f"{point}/{v2}")
            if controller not in ("cpu", "freezer"):
                try:
                    with open(os.path.join(where, "cgroup.subtree_control")) as f:
                        if controller not in f.read().split():
                            continue
                except OSError:
                    continue
            found.append((1, where, 2))
    for _, where, version in sorted(found):
        if os.access(where, os.W_OK) and ":" not in where:  # ':' separates them for the reaper
            return where, version
    return None


def _inotify_limit() -> int:
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def capabilities() -> dict[str, dict[str, Any]]:
    """What ``supervise doctor`` reports: per mechanism, whether it is available here,
    what was found, and what supervise falls back to without it."""
    from .spawn import reaper_path

    def row(available: bool, detail: str, fallback: str | None = None) -> dict[str, Any]:
        return {
            "available": available,
            "detail": detail,
            "fallback": None if available else fallback,
        }

    try:
        reaper = row(True, reaper_path())
    except Exception as e:  # doctor reports, it does not fail
        reaper = row(False, str(e), "none: supervise cannot run commands")
    abi = landlock_abi()
    userns = userns_available()
    root = os.geteuid() == 0
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cgroups = cgroup_v2()
    pids = pids_cgroup() if root or not userns else None
    memory, cpu = cgroup_parent("memory"), cgroup_parent("cpu")
    return {
        "kernel": row(True, os.uname().release),
        "reaper_helper": reaper,
        "rlimits": row(True, f"CPU, AS, FSIZE, NOFILE in the child (NOFILE hard here: {hard})"),
        "pidfd": row(
            has_pidfd(),
            "the reaper watches supervise through a pidfd",
            "EOF on the control pipe only (a forked copy of an embedding program delays it)",
        ),
        "subreaper": row(True, "the reaper is PR_SET_CHILD_SUBREAPER: escapees come back"),
        "user_namespaces": row(userns, "unprivileged user namespaces", "none needed so far"),
        "process_cap": row(
            (userns and not root) or pids is not None,
            "RLIMIT_NPROC in a user namespace backs up limits.processes"
            if userns and not root
            else f"a pids cgroup under {pids} backs up limits.processes",
            "root is exempt from RLIMIT_NPROC and no pids cgroup is writable: the watcher "
            "alone counts processes"
            if root
            else "no user namespaces: the watcher alone counts processes",
        ),
        "landlock": row(
            abi is not None,
            f"ABI {abi}: the workspace jail"
            + (", signal scoping" if abi is not None and abi >= 6 else ""),
            "no kernel path jail: jail: auto runs with the quota only, jail: required fails",
        ),
        "network_deny": row(
            root or userns or (abi or 0) >= 4,
            "a network namespace of the command's own"
            if root or userns
            else "Landlock TCP rules (ABI 4): TCP only, UDP and unix sockets stay open",
            "none: a policy with network: deny fails to start (125)",
        ),
        "quota_watch": row(
            _inotify_limit() > 0,
            f"inotify, up to {_inotify_limit()} watched directories per user",
            "none: a workspace with a quota fails to start (125)",
        ),
        "memory_cgroup": row(
            memory is not None,
            f"limits.memory by the kernel (on_violation: kill): a memory cgroup "
            f"v{memory[1]} under {memory[0]} (an OOM kill in it is the memory violation; "
            "shared memory, memfds, tmpfs counted once)"
            if memory is not None
            else "no memory cgroup can be made here (no delegation, or SUPERVISE_CGROUPS=off)",
            "the watcher: tree RSS sampled, a breach confirmed by PSS; memory not mapped by "
            "any process (SysV segments, memfds, tmpfs) is not counted",
        ),
        "cpu_cgroup": row(
            cpu is not None,
            f"the tree's CPU by the kernel's clock: a cgroup v{cpu[1]} under {cpu[0]} "
            "(children the kernel reaps included)"
            if cpu is not None
            else "no cgroup can be made here (no delegation, or SUPERVISE_CGROUPS=off)",
            "the watcher: /proc's CPU of live processes and reaped children, and the last "
            "CPU seen of processes the kernel reaped (a child shorter than a sample escapes)",
        ),
        "cgroup_v2": row(
            cgroups is not None, cgroups or "no v2 hierarchy", "not used: the watcher reads /proc"
        ),
    }
