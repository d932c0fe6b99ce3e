"""Who owns a live run: host, boot id, pid and the pid's start time (pids are reused).

``Ledger.claim`` settles the open holds of runs whose supervisor died on this machine;
these say whether it did.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from supervisor.budget._store import Owner

__all__ = ["owner", "owner_alive"]


def _pid_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner() -> Owner:
    """Who runs this ledger: host, boot id, pid and the pid's start time (pids are reused)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": boot, "pid": pid, "start": _pid_start(pid)}


def owner_alive(them: Owner, me: Owner) -> bool | None:
    """Whether the supervisor that owns a run is alive; None when it is on another host."""
    if them.get("host") != me["host"]:
        return None  # its own host will settle it; else the holds expire
    if them.get("boot") != me["boot"]:
        return False  # the machine rebooted since: it is gone
    pid = them.get("pid")
    return isinstance(pid, int) and _pid_start(pid) == them.get("start")
