"""Linux-only probes: what this kernel and this user can enforce.

Every probe is a real syscall or a kernel file, never a guess from the version number.
``capabilities()`` feeds ``supervise doctor``; ``run_start`` records what a run used.
"""

from __future__ import annotations

import os
import resource
from typing import Any

_SYS_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1
_SYS_PIDFD_OPEN = 434
_PR_GET_CHILD_SUBREAPER = 37

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
    """The cgroup v2 controllers available at the root, or None without a v2 hierarchy."""
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            return f.read().strip() or "(none)"
    except OSError:
        return None


def _rlimit(name: str) -> str:
    soft, hard = resource.getrlimit(getattr(resource, name))

    def show(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    return f"soft {show(soft)}, hard {show(hard)}"


def capabilities() -> dict[str, Any]:
    """What ``supervise doctor`` reports: each mechanism and whether it is enforced here."""
    from .spawn import reaper_path

    try:
        reaper = reaper_path()
    except Exception as e:  # doctor reports, it does not fail
        reaper = f"missing: {e}"
    abi = landlock_abi()
    return {
        "kernel": os.uname().release,
        "reaper_helper": reaper,
        "rlimits": "CPU, AS, FSIZE, NOFILE: set in the child before exec",
        "rlimit_nofile_here": _rlimit("RLIMIT_NOFILE"),
        "pidfd": "yes: the reaper sees the supervisor die" if has_pidfd() else "no: pipe EOF only",
        "subreaper": "yes: the reaper is PR_SET_CHILD_SUBREAPER",
        "landlock_abi": abi if abi is not None else "none (the workspace jail falls back)",
        "user_namespaces": "yes" if userns_available() else "no",
        "cgroup_v2": cgroup_v2() or "none",
    }
