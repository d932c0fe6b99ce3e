"""The plan in the reaper's words: the one place that says how a limit reaches the kernel.

The reaper (``_reaper.c``) takes ``key=value`` words; this module makes every one of them
that carries a limit: the rlimits (``cpu``, ``as``, ``fsize``, ``nofile``), the process
caps (``nproc`` in a user namespace, ``pids.max`` of a cgroup), ``oom``, and the
confinement words whose shape is fixed here (network, IPC, cgroup).  What the confinement
decides at run time (the jail's rules, the quota's RLIMIT_FSIZE) comes from
``_confine.Confinement``; the words are still spelt here.
"""

from __future__ import annotations

import math
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._plan import RunPlan


def cpu_soft(cpu_time: float) -> int:
    """RLIMIT_CPU's soft limit for ``limits.cpu_time``: whole seconds, at least one."""
    return max(1, math.ceil(cpu_time))


def rlimit_words(plan: RunPlan) -> list[str]:
    """The reaper's words for the kernel rlimits of this plan.

    RLIMIT_CPU gets hard = soft + 1 s, so SIGXCPU (a named cause) comes before the
    kernel's SIGKILL.  Under ``on_violation: warn`` nothing may be killed, so the two
    rlimits whose breach kills (CPU, FSIZE) are left to the watcher.  RLIMIT_FSIZE is
    not here: it also caps the workspace, so ``Confinement`` computes it (``fsize_words``).
    """
    words = []
    lim = plan.max
    if lim.cpu_time is not None and plan.kills:
        soft = cpu_soft(lim.cpu_time)
        words.append(f"cpu={soft}:{soft + 1}")
    if lim.address_space is not None:
        words.append(f"as={int(lim.address_space)}")
    if lim.open_files is not None:
        words.append(f"nofile={int(lim.open_files)}")
    return words


def fsize_words(soft: int | None, hard: int | None) -> list[str]:
    """The reaper's RLIMIT_FSIZE word (soft:hard; -1 is unlimited), if there is a cap."""
    if hard is None:
        return []
    return [f"fsize={soft}:{hard}"]


def task_cap(processes: int) -> int:
    """The kernel backstop's task count for ``limits.processes`` (RLIMIT_NPROC or a pids
    cgroup): both count threads, so it is generous enough for threaded programs, and only
    keeps a fork bomb from getting far past the watcher's exact count."""
    return max(16 * int(processes), 256)


def nproc_cap(plan: RunPlan) -> int | None:
    """RLIMIT_NPROC for ``processes`` in a user namespace, or None where it cannot be.

    RLIMIT_NPROC counts threads, not processes, and (outside a user namespace) every
    process of the user on the host; root is exempt from it.  So it is no exact limit:
    the watcher counts processes exactly.  Where it cannot be used, ``Confinement`` tries
    a pids cgroup with the same cap.
    """
    processes = plan.max.processes
    if processes is None or os.geteuid() == 0:
        return None
    from ._linux import userns_available

    return task_cap(processes) if userns_available() else None


def nproc_evidence(plan: RunPlan, pid: int) -> str | None:
    """What caps processes in the kernel, from evidence: the child's user namespace."""
    cap = nproc_cap(plan)
    if cap is None:
        return None
    try:
        ours = os.readlink("/proc/self/ns/user")
        theirs = os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None
    return f"RLIMIT_NPROC={cap} in a user namespace" if ours != theirs else None


def oom_score_adj() -> int:
    """The child's oom_score_adj: 500 above ours, so the OOM killer picks it first."""
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            own = int(f.read())
    except (OSError, ValueError):
        own = 0
    return min(1000, own + 500)


def network_words(landlock_abi: int | None) -> list[str]:
    """``network: deny``: a namespace of its own; Landlock's TCP rules if that is refused
    and the kernel has them (ABI 4), else the run fails."""
    if landlock_abi is not None and landlock_abi >= 4:
        from .workspace import NET_BIND_TCP, NET_CONNECT_TCP

        return ["netns=2", f"lnetfb={NET_BIND_TCP | NET_CONNECT_TCP:#x}"]
    return ["netns=1"]


def gateway_words(fd: int, port: int) -> list[str]:
    """``network: deny`` with the gateway on: the helper makes the gateway's listening
    socket (127.0.0.1:``port``) where the tree lives and sends it over ``fd``; under the
    Landlock TCP fallback that port is the one the tree may connect to."""
    return [f"gw={fd}:{port}"]


def gateway_port(fixed: int) -> int:
    """The port the gateway listens on in the tree's namespace: ``gateway.listen``'s if
    fixed (not 0), else one picked now (the namespace is new and empty, so any is free,
    and the child's environment can carry it before the spawn)."""
    return fixed or 20000 + int.from_bytes(os.urandom(4), "big") % 40000


def cgroup_words(paths: str) -> list[str]:
    """The cgroups (``DIR:DIR...``) the command joins before exec."""
    return [f"cgroup={paths}"]


IPC_WORDS = ["ipcns=1"]  # an IPC namespace of the tree's own, where it may


def helper_words(
    plan: RunPlan, fsize: list[str], confine: list[str]
) -> tuple[list[str], list[str]]:
    """(the rlimits, for run_start; every limit word the reaper gets) for one run, given
    ``Confinement``'s RLIMIT_FSIZE words and its own (jail, network, cgroup)."""
    rlimits = [*rlimit_words(plan), *fsize]
    words = [*rlimits, f"oom={oom_score_adj()}", "scope=1", *confine]
    cap = nproc_cap(plan)
    if cap is not None:
        words.append(f"nproc={cap}")
    return rlimits, words
